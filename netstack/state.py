"""The state of a stack in /run/netstack/STACK (root only): state.json (status, small),
plan.json (the typed Plan in force) and objects.jsonl, the intent log: every object that
outlives its namespace is recorded BEFORE it is made, one line each, so `down` can remove
everything after a crash at any point and `up` can tell a half-made stack from a running
one. Every file is read back into the dataclasses that wrote it (codec)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from netstack import codec
from netstack import names as _names  # RUN_DIR is read at each call (tests move it)
from netstack.codec import Tagged
from netstack.errors import DamagedFile, OtherSchema, StateError, UsageError
from netstack.kernel import atomic_write
from netstack.names import check_stack, stack_dir  # noqa: F401  (stack_dir: re-exported)
from netstack.schema import SCHEMA

if TYPE_CHECKING:  # read on first use of the plan: `down` never imports the model
    from collections.abc import Callable

    from netstack.model import Plan

# --- intent records -------------------------------------------------------------------

class Record(Tagged):
    """An object made by netstack that outlives the namespaces it touches."""

    registry: ClassVar[dict[str, type]] = {}


@dataclass(frozen=True)
class NetnsRec(Record):
    tag = "netns"
    name: str


@dataclass(frozen=True)
class FileRec(Record):
    tag = "file"
    path: str


@dataclass(frozen=True)
class DirRec(Record):
    tag = "dir"
    path: str


@dataclass(frozen=True)
class HostLinkRec(Record):
    tag = "host_link"
    ifname: str
    home: str | None = None


@dataclass(frozen=True)
class MovedRec(Record):
    tag = "moved"
    dev: str
    ns: str
    new_name: str
    home: str | None = None


@dataclass(frozen=True)
class MovedPhyRec(Record):
    """A Wi-Fi uplink: its radio (wiphy index `phy`) moved into `ns` with its netdev, which
    was renamed `new_name` there. `down` gives the radio back, also after a crash."""

    tag = "moved_phy"
    dev: str
    ns: str
    new_name: str
    phy: int
    home: str | None = None


@dataclass(frozen=True)
class HostSysctlRec(Record):
    tag = "host_sysctl"
    key: str
    old: str
    home: str | None = None


@dataclass(frozen=True)
class HostTableRec(Record):
    tag = "host_table"
    table: str
    home: str | None = None


@dataclass(frozen=True)
class ProcessRec(Record):
    """A process netstack starts. Recorded with its token before it exists; the process
    writes PIDFILE (pid, start time, token) as its first act, and the pid is recorded
    after the start: whichever survives a crash, `down` finds the process."""

    tag = "process"
    name: str
    token: str
    pidfile: str
    pid: int | None = None
    start: int | None = None


@dataclass(frozen=True)
class GoneRec(Record):
    """A live change removed the object recorded at line `seq`."""

    tag = "gone"
    seq: int


@dataclass
class PidFile:
    pid: int
    start: int | None
    token: str


@dataclass
class StackState:
    stack: str
    status: str = "partial"  # partial | up
    config: str | None = None
    started: float = 0.0
    resolved: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    dirauths: list[str] = field(default_factory=list)
    digests: dict[str, str | None] = field(default_factory=dict)  # ns -> ruleset loaded
    # ns -> chain -> each rule's digest, in order (health.rule_digests): status names the
    # rule that changed
    rule_digests: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    # `netstack attach`: qube -> the netvm it was moved to (None: cut off), until `down`
    netvms: dict[str, str | None] = field(default_factory=dict)
    # the process the stack lives for (`netstack check`'s own lab stack): pid and start
    # time; when it is gone (kill -9) the stack is an orphan (owner_gone)
    owner: int | None = None
    owner_start: int | None = None
    schema: int = SCHEMA


def owner_gone(data: StackState) -> bool:
    """A stack made for a process (check's lab stack) whose process no longer runs."""
    from netstack.kernel import proc_alive

    return data.owner is not None and not proc_alive(data.owner, data.owner_start)


class State:
    """One stack's files. Records are (seq, record): seq is the line in objects.jsonl."""

    def __init__(self, stack: str, data: StackState | None = None, plan: Plan | None = None,
                 records: list[tuple[int, Record]] | None = None, lines: int = 0) -> None:
        self.stack = stack
        self.dir = stack_dir(stack)
        self.path = os.path.join(self.dir, "state.json")
        self.log_path = os.path.join(self.dir, "objects.jsonl")
        self.plan_path = os.path.join(self.dir, "plan.json")
        self.data = data or StackState(stack)
        self._plan = plan
        self._plan_loaded = plan is not None
        self._records = records or []
        self._lines = lines
        self._tail_checked = False
        self.bad_lines: list[int] = []  # lines of objects.jsonl that could not be read
        self.lost = False  # state.json damaged or gone: its records may be incomplete
        self.notes: list[str] = []  # what a teardown from such a state could not know

    # --- reading --------------------------------------------------------------------
    @classmethod
    def load(cls, stack: str) -> State | None:
        d = stack_dir(stack)
        try:
            data = codec.read(os.path.join(d, "state.json"), StackState)
        except FileNotFoundError:
            return None
        except PermissionError:
            raise StateError(f"cannot read the state of stack {stack!r}: it belongs to root "
                             "(run with sudo)") from None
        except OtherSchema as e:
            raise StateError(f"stack {stack!r} was made by another version of netstack "
                             f"({e.path}: state schema {e.found}, this one reads {e.want}); "
                             "take it down with that version") from None
        except DamagedFile as e:
            raise DamagedFile(e.path, e.problem, f"`netstack --stack {stack} down` removes "
                              "what it finds of the stack") from None
        return cls.from_log(stack, data)

    @classmethod
    def from_log(cls, stack: str, data: StackState | None = None) -> State:
        """The stack with the records of its intent log, read line by line: a line that
        cannot be read (cut by a crash, damaged) is skipped and named in `bad_lines`.
        Without `data` (state.json gone or damaged): what `down` removes from."""
        records: list[tuple[int, Record]] = []
        bad: list[int] = []
        lines = 0
        with contextlib.suppress(FileNotFoundError), \
                open(os.path.join(stack_dir(stack), "objects.jsonl"), "rb") as f:
            for lines, line in enumerate(f, start=1):  # noqa: B007
                try:
                    records.append((lines - 1, codec.decode(Record, line, "objects.jsonl")))
                except (ValueError, StateError):
                    bad.append(lines)
        st = cls(stack, data, None, records, lines)
        st.bad_lines = bad
        return st

    @property
    def plan(self) -> Plan | None:
        """The plan in force, read on first use (`down` needs only the intent log)."""
        if not self._plan_loaded:
            from netstack.model import Plan

            # "loaded" is set only once the plan is there: two threads asking at once
            # (open-in-disposable's reader and its caller) each read it, neither sees a
            # None that is still being read (review finding: an intermittent traceback)
            plan = None
            try:
                plan = codec.read(self.plan_path, Plan)
            except FileNotFoundError:
                pass
            except DamagedFile as e:  # what status, audit and leaktest compare against is gone
                raise DamagedFile(self.plan_path, f"{e.problem}, so nothing can be compared "
                                  "with it", f"`netstack --stack {self.stack} down` (the "
                                  "intent log still knows every object) and `up` again"
                                  ) from None
            self._plan, self._plan_loaded = plan, True
        return self._plan

    @staticmethod
    def stacks() -> list[str]:
        try:
            return sorted(d for d in os.listdir(_names.RUN_DIR)
                          if os.path.exists(os.path.join(_names.RUN_DIR, d, "state.json")))
        except (FileNotFoundError, PermissionError):
            return []

    @property
    def objects(self) -> list[Record]:
        """Live records in the order they were made (removed ones left out)."""
        gone = {r.seq for _, r in self._records if isinstance(r, GoneRec)}
        return [r for seq, r in self._records if seq not in gone and not isinstance(r, GoneRec)]

    def seq_of(self, rec: Record) -> int | None:
        gone = {r.seq for _, r in self._records if isinstance(r, GoneRec)}
        for seq, r in reversed(self._records):
            if r == rec and seq not in gone:
                return seq
        return None

    # --- writing --------------------------------------------------------------------
    def create(self) -> None:
        """The stack's directory (root only) and state.json: from here on `down` knows the
        stack, before anything else is made."""
        make_stack_dir(self.dir)
        self.save()

    def save(self) -> None:
        codec.write(self.path, self.data)

    def set_plan(self, plan: Plan) -> None:
        self._plan, self._plan_loaded = plan, True
        codec.write(self.plan_path, plan)

    def set_status(self, status: str) -> None:
        self.data.status = status
        self.save()

    def set_resolved(self, qube: str, resolved: dict[str, list[str]]) -> None:
        self.data.resolved[qube] = resolved
        self.save()

    def record(self, rec: Record) -> int:
        """Write the intent before acting on it. Returns the record's seq."""
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            if not self._tail_checked:
                self._tail_checked = True
                if os.fstat(f.fileno()).st_size:
                    with open(self.log_path, "rb") as r:  # a line cut by a crash: end it
                        r.seek(-1, os.SEEK_END)
                        if r.read(1) != b"\n":
                            f.write("\n")
            f.write(codec.encode(rec) + "\n")
        seq = self._lines
        self._records.append((seq, rec))
        self._lines += 1
        _crash_point(len(self._records))
        return seq

    def forget(self, rec: Record) -> None:
        """A live change removed `rec`'s object."""
        seq = self.seq_of(rec)
        if seq is not None:
            self.record(GoneRec(seq))

    def compact(self) -> None:
        """Rewrite the intent log with only the live records (atomically): live changes
        such as disposables append a record and its removal for every object."""
        live = self.objects
        atomic_write(self.log_path, "".join(codec.encode(r) + "\n" for r in live))
        self._records = list(enumerate(live))
        self._lines = len(live)

    @property
    def removed(self) -> int:
        """Log lines that stand for removed objects (what `compact` would drop)."""
        return self._lines - len(self.objects)

    def replace(self, old: Record, new: Record) -> None:
        """Record `new` (e.g. a process with its pid) and retire `old`."""
        self.record(new)
        self.forget(old)

    def remove(self) -> None:
        """Delete the stack's directory, and nothing outside it."""
        d = checked_stack_dir(self.stack)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(d)

    def owns_path(self, path: str) -> bool:
        """Paths netstack may write and delete for this stack: its state directory, its
        namespaces' /etc/netns directories and its tunnels' wireguard-go sockets."""
        real = os.path.realpath(path)
        if not hasattr(self, "_roots"):
            self._roots = (os.path.realpath(self.dir), os.path.realpath("/etc/netns"))
        own, etc_netns = self._roots
        if real == own or real.startswith(own + os.sep):
            return True
        if real == etc_netns:
            return True  # made by us when missing; removed only while empty
        if real.startswith(etc_netns + os.sep):
            first = real[len(etc_netns) + 1:].split(os.sep)[0]
            return first.startswith((f"nst-{self.stack}-", f"nsl-{self.stack}-"))
        # wireguard-go's control socket of one of this stack's tunnels (names.tunnel_if)
        return os.path.dirname(real) == os.path.realpath("/var/run/wireguard") and \
            os.path.basename(real).endswith(f"-{self.stack}.sock")


def _flock(fd: int, wait: float) -> OSError | None:
    """Take the exclusive lock, waiting up to `wait` seconds (flock has no timeout: a
    poll with a deadline). The error when it could not be taken."""
    import time

    deadline = time.monotonic() + wait
    pause = 0.002
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() >= deadline:
                return e
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def make_stack_dir(d: str) -> None:
    """0711: daemons that drop root (tor as debian-tor) must traverse to their own
    directory; nothing here can be listed, and every file inside is 0600 or in a 0700
    directory."""
    os.makedirs(_names.RUN_DIR, mode=0o755, exist_ok=True)
    if os.path.islink(d):
        raise StateError(f"{d} is a symlink; netstack keeps its state only in a directory "
                         "of its own")
    with contextlib.suppress(FileExistsError):
        os.mkdir(d, 0o711)
    os.chmod(d, 0o711)


def checked_stack_dir(stack: str) -> str:
    """The stack's own directory, refused when it is not exactly RUN_DIR/STACK (a symlink,
    a name with a path in it)."""
    check_stack(stack)
    d = stack_dir(stack)
    want = os.path.join(os.path.realpath(_names.RUN_DIR), stack)
    if os.path.islink(d) or (os.path.exists(d) and os.path.realpath(d) != want):
        raise StateError(f"{d} is not netstack's own directory (a symlink?); not touching it")
    return d


class StackLock:
    """One writer per stack: an exclusive flock on the stack's directory, held by every
    command that changes it. A second writer gets "being changed by pid N" (exit 3)."""

    def __init__(self, stack: str, wait: float = 0.0,
                 on_wait: Callable[[int | None], None] | None = None) -> None:
        self.stack = stack
        self.wait = wait  # seconds to wait for another writer (disposables queue up)
        self.on_wait = on_wait  # told the holder's pid once, when it has to wait
        self.fd: int | None = None

    def __enter__(self) -> StackLock:
        d = checked_stack_dir(self.stack)
        make_stack_dir(d)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        e = _flock(fd, 0.0)
        if e is not None and self.wait > 0 and e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            if self.on_wait is not None:
                self.on_wait(_lock_holder(d))
            e = _flock(fd, self.wait)
        if e is not None:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = _lock_holder(d)
                raise StateError(f"stack {self.stack!r} is being changed by "
                                 f"{'pid ' + str(holder) if holder else 'another netstack'}; "
                                 "wait for it to finish") from None
            raise
        if not os.path.isdir(d) or os.stat(d).st_ino != os.fstat(fd).st_ino:
            os.close(fd)  # removed by the writer we waited for: take the new one
            return self.__enter__()
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        d = stack_dir(self.stack)
        with contextlib.suppress(OSError):  # an empty directory of a stack that is down
            if not os.path.exists(os.path.join(d, "state.json")):
                os.rmdir(d)


def _lock_holder(path: str) -> int | None:
    """The pid holding a flock on `path`, from /proc/locks."""
    st = os.stat(path)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError), open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == want:
                with contextlib.suppress(ValueError):
                    return int(parts[4])
    return None


def read_pidfile(path: str) -> PidFile | None:
    """None when there is none yet, or a part of one (`down` then ends the process by the
    pid recorded in the intent log)."""
    try:
        return codec.read(path, PidFile)
    except (FileNotFoundError, DamagedFile):
        return None


def crash_point(name: str) -> None:
    """Test hook: NETSTACK_TEST_CRASH_AT=NAME kills this process (SIGKILL) at a named point
    between two records (e.g. a process started but its pid not yet recorded)."""
    if os.environ.get("NETSTACK_TEST_CRASH_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _crash_point(n: int) -> None:
    """Test hook: NETSTACK_TEST_CRASH_AFTER=N kills this process (SIGKILL, no cleanup) right
    after the N-th object is recorded, to prove `down` recovers from a crash mid-`up`."""
    want = os.environ.get("NETSTACK_TEST_CRASH_AFTER")
    if want and int(want) == n:
        import signal

        # NETSTACK_TEST_CRASH_SIGNAL=15: a SIGTERM there instead (systemd's, timeout's)
        os.kill(os.getpid(), int(os.environ.get("NETSTACK_TEST_CRASH_SIGNAL",
                                                signal.SIGKILL)))


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"netstack {what} needs root (namespaces and nftables): run it "
                         "with sudo")


def require(stack: str) -> State:
    check_stack(stack)
    st = State.load(stack)
    if st is None or st.plan is None:
        raise StateError(f"stack {stack!r} is not up; start it with `netstack --stack {stack} "
                         "up --lab`")
    return st
