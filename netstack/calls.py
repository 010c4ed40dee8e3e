"""The call layer between app qubes (the peer of Qubes' qrexec; docs/calls.md).

Every app qube's sandbox has one unix socket (netstack.sandbox.call_dir, bound at
/run/netstack-call/sock) through which `netstack-call TARGET SERVICE[+ARG]`
(netstack/callclient.py) asks for a service in another qube. A thread of the stack's
supervisor (`serve`, started from the supervisor's spec) listens on all of them:

1. the source is the qube whose socket the call came in on, never what the caller says;
   the caller's process must also be in that qube's network namespace (SO_PEERCRED and
   /proc/PID/ns/net), so a host process that finds the world-readable socket is not a qube;
2. the name is checked (netstack.policy.name_problem: no '/', no NUL, no leading '.', at
   most 64 characters) and the policy evaluated (the directory is read again for every
   call: an edit is in force at once; a policy that no longer parses denies everything);
3. `ask`: the call waits in a pending list (`netstack calls`), answered by `netstack
   call-answer ID allow|deny` on the host, and is denied when nobody answers in time;
4. allowed: the service runs in the TARGET's sandbox through the one executor
   (netstack.executor), its stdin and stdout joined to the caller's by pipes (blocking
   writes: backpressure both ways), at most `call_max_bytes` each way (more: the service is
   ended and the call cut), its exit code handed back;
5. every call is a line of the stack's calls.log (JSON): source, target, service,
   argument, verdict, the deciding policy line, bytes each way, exit code.

Services, by Qubes' names: `qubes.Filecopy` and `qubes.ClipboardPaste` (built in, shell
scripts run in the target), and the user's own: an executable named SERVICE (or
SERVICE+ARG) in the directory `[stack] services` names, bound read-only into the target's
sandbox for the call. The service learns its caller from QREXEC_REMOTE_DOMAIN (set here,
from the socket) and its argument from QREXEC_SERVICE_ARGUMENT and $1."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import selectors
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from netstack import codec, policy
from netstack.errors import ConfigError, StateError, UsageError
from netstack.kernel import Kernel

LOG = "calls.log"
PENDING = "calls-pending"
MAX_HEADER = 256  # `TARGET SERVICE+ARG\n`: a qube name and 64 + 1 + 64 characters fit
HEADER_WAIT = 5.0  # seconds a caller has to send its request line
CALL_TIMEOUT = 3600.0  # a service running longer is ended
MAX_CALLS = 32  # calls in progress at once, over all qubes; more are refused at once
MAX_CALLS_PER_QUBE = 8  # so one qube's flood never takes every slot (nor the supervisor's
# threads: a refused connection is closed without a thread waiting for a slot)
MAX_LOG = 4 << 20  # calls.log (tmpfs: memory) is moved to calls.log.1 past this size
ANSWER_POLL = 0.05
REFUSED_EXIT, CUT_EXIT = 126, 125
ID_RE = re.compile(r"^[0-9a-f]{8}$")
CLIPBOARD_MAX = 256000  # bytes (Qubes' limit since 4.2)
CLIPBOARD = "clipboard"  # the host's one buffer, in the stack directory (root only)
SERVICE_INSIDE = "/run/netstack-service"

# Runs in the target for qubes.Filecopy. The stream: the file's name (a line), its size in
# bytes (a line), the bytes. The file is put in place (never over an existing one) only
# when all of it came; exit 0 is the destination's confirmation that it is there.
FILECOPY = r'''
src="$QREXEC_REMOTE_DOMAIN"
IFS= read -r name || { echo "no file name" >&2; exit 3; }
IFS= read -r size || { echo "no size" >&2; exit 3; }
case "$name" in ""|.|..|.*|*/*) echo "refused file name" >&2; exit 3;; esac
case "$size" in ""|*[!0-9]*) echo "refused size" >&2; exit 3;; esac
[ ${#name} -le 255 ] || { echo "file name too long" >&2; exit 3; }
d="$HOME/Incoming/$src"; mkdir -p -- "$d" || exit 3
[ -e "$d/$name" ] && { echo "$d/$name exists already" >&2; exit 3; }
part="$d/.$name.part"
if cat > "$part" && [ "$(wc -c < "$part")" -eq "$size" ]; then
  mv -n -- "$part" "$d/$name"
  [ -e "$part" ] || exit 0
fi
rm -f -- "$part"; echo "copy incomplete" >&2; exit 3
'''
# Runs in the target for qubes.ClipboardPaste: the bytes become the qube's clipboard, the
# file ~/.clipboard (what `clipboard copy` takes from a qube too).
CLIPBOARD_PASTE = r'''
cat > "$HOME/.clipboard.part" && mv -f -- "$HOME/.clipboard.part" "$HOME/.clipboard"
'''
# Runs in a new disposable for qubes.OpenInVM (`netstack open-in-disposable`): the stream
# as for qubes.Filecopy; the file is opened by the command given after the script's
# name; a changed file is offered back to the source with qubes.Filecopy, a call of the
# disposable's own (`@type:DispVM` in the policy), so it comes back only if a line says so.
OPEN_IN_VM = r'''
IFS= read -r name || { echo "no file name" >&2; exit 3; }
IFS= read -r size || { echo "no size" >&2; exit 3; }
case "$name" in ""|.|..|.*|*/*) echo "refused file name" >&2; exit 3;; esac
f="$HOME/$name"
cat > "$f" && [ "$(wc -c < "$f")" -eq "$size" ] || { echo "not all of it came" >&2; exit 3; }
before=$(sha256sum < "$f")
[ $# -gt 0 ] || set -- xdg-open  # a call from a qube names no command: the desktop's
"$@" "$f" < /dev/null
rc=$?
if [ "$(sha256sum < "$f")" != "$before" ]; then
  n=$(stat -c %s -- "$f")
  if { printf '%s\n%s\n' "$name" "$n"; cat -- "$f"; } | \
      netstack-call "$QREXEC_REMOTE_DOMAIN" qubes.Filecopy >/dev/null 2>&1; then
    echo "netstack: the changed $name went back to $QREXEC_REMOTE_DOMAIN" >&2
  else
    echo "netstack: the changed $name was not taken back (the policy's qubes.Filecopy)" >&2
  fi
fi
exit $rc
'''
BUILTIN = {"qubes.Filecopy": FILECOPY, "qubes.ClipboardPaste": CLIPBOARD_PASTE,
           "qubes.OpenInVM": OPEN_IN_VM}


@dataclass
class Pending:
    """A call waiting for `netstack call-answer`."""

    id: str
    source: str
    target: str
    service: str
    argument: str
    rule: str | None
    asked: float
    deadline: float


@dataclass
class Record:
    """One line of calls.log."""

    time: float
    id: str
    source: str
    target: str
    service: str
    argument: str
    verdict: str  # allow | deny | ask->allow | ask->deny | refused
    rule: str | None
    reason: str
    bytes_in: int = 0  # caller -> service
    bytes_out: int = 0  # service -> caller
    exit: int | None = None
    notify: bool = False  # the policy line's notify= (Qubes' default: yes for a deny)


def notice(rec: Record) -> None:
    """notify=: one line to the host's journal (syslog, priority notice), where Qubes shows
    a desktop notification; a host without a syslog socket drops it silently."""
    import syslog

    arg = f"+{rec.argument}" if rec.argument else ""
    syslog.openlog("netstack-call", 0, syslog.LOG_USER)
    syslog.syslog(syslog.LOG_NOTICE, f"{rec.verdict}: {rec.source} -> {rec.target} "
                  f"{rec.service}{arg} ({rec.rule or 'no policy line'}) [call {rec.id}]"
                  .encode("ascii", "backslashreplace").decode())


def new_id() -> str:
    return secrets.token_hex(4)


def log(stack_dir: str, rec: Record) -> None:
    """One line, one write, O_APPEND: the daemon's threads and host commands share it."""
    if rec.notify:
        notice(rec)
    path = os.path.join(stack_dir, LOG)
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_size > MAX_LOG:  # a qube's flood of refused calls: bounded
            os.rename(path, path + ".1")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps(asdict(rec), sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def read_log(stack_dir: str, last: int = 50) -> list[dict[str, Any]]:
    try:
        with open(os.path.join(stack_dir, LOG)) as f:
            lines = f.readlines()[-last:] if last else f.readlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def facts(plan: Any) -> dict[str, policy.QubeFacts]:
    """What the policy's tokens ask of the plan's app qubes (disposables: @type:DispVM)."""
    return {q.name: policy.QubeFacts(frozenset(q.tags),
                                     "DispVM" if q.settings.get("disposable") else "AppVM",
                                     plan.default_dispvm)
            for q in plan.qubes if q.traits.sandboxed}


def verdict(plan: Any, source: str, target: str, service: str, argument: str
            ) -> policy.Verdict:
    """The policy's verdict, the directory read now; one that no longer parses denies."""
    try:
        pol = policy.load(plan.policy)
    except ConfigError as e:
        return policy.Verdict("deny", target, reason=f"the policy does not parse: {e}")
    v = policy.evaluate(pol, source, target, service, argument, facts(plan))
    if v.action in ("allow", "ask") and getattr(plan, "invariants", None):
        why = breaks_invariant(plan, source, v.target, service, v.rule or "")
        if why:  # the policy may be edited on a running stack: every call is judged
            return policy.Verdict("deny", v.target, rule=v.rule, reason=why)
    return v


def breaks_invariant(plan: Any, source: str, target: str, service: str, where: str
                     ) -> str | None:
    """Why a call from `source` to `target` would break one of the user's invariants (a
    call hands data to the target, whose way out is then the data's: netstack.invariants),
    or None. A new disposable (@dispvm, @dispvm:QUBE) has the way out of the qube it is
    made like."""
    from netstack.invariants import CallEdge, judge_calls

    if target == "@dispvm":
        target = plan.default_dispvm or ""
    elif target.startswith("@dispvm:"):
        target = target[8:]
    if not target:
        return None
    bad = [v for v in judge_calls(plan, [CallEdge(source, target, service, where)])
           if not v.ok]
    return f"breaks {bad[0].line()}" if bad else None


def enforce_policy(plan: Any, action: str) -> None:
    """`up`/`plan` refuse a call policy that lets data out past the user's invariants: one
    line naming the invariant and the policy line (nothing is made)."""
    from netstack.errors import InvariantError

    if not getattr(plan, "invariants", None) or not plan.policy:
        return
    for source, target, service, where in policy.call_edges(policy.load(plan.policy),
                                                            facts(plan)):
        why = breaks_invariant(plan, source, target, service, where)
        if why:
            raise InvariantError(f"{action} refused: the call policy {why}; fix: change "
                                 f"{where} (deny that call) or the invariant")


# --- ask -------------------------------------------------------------------------------

def _pending_dir(stack_dir: str) -> str:
    d = os.path.join(stack_dir, PENDING)
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def wait_answer(stack_dir: str, p: Pending, stopping: threading.Event | None = None,
                gone: Callable[[], bool] | None = None) -> bool:
    """Put the call in the pending list and wait for `call-answer` until its deadline
    (then: deny). The entry is gone afterwards, answered or not. gone: whether the caller
    went away (then the call is withdrawn: an `allow` given later must not deliver what a
    killed `copy` had offered)."""
    d = _pending_dir(stack_dir)
    entry, answer = os.path.join(d, f"{p.id}.json"), os.path.join(d, f"{p.id}.answer")
    codec.write(entry, p)
    try:
        while time.time() < p.deadline and not (stopping and stopping.is_set()) \
                and not (gone and gone()):
            with contextlib.suppress(FileNotFoundError), open(answer) as f:
                return f.read().strip() == "allow"
            time.sleep(ANSWER_POLL)
        return False
    finally:
        for f in (entry, answer):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)


def peer_closed(conn: Any) -> bool:
    """The caller's end of the call socket is closed (its process ended). On a Unix
    stream socket that is POLLHUP: both directions shut, whatever bytes it sent are still
    queued; netstack-call's own half-close after its stdin (SHUT_WR) is not one."""
    import select

    try:
        p = select.poll()
        p.register(conn, select.POLLHUP)
        return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
                   for _fd, ev in p.poll(0))
    except (OSError, ValueError):
        return True


def pending(stack_dir: str) -> list[Pending]:
    d = os.path.join(stack_dir, PENDING)
    out = []
    with contextlib.suppress(FileNotFoundError):
        for fn in sorted(os.listdir(d)):
            if fn.endswith(".json"):
                with contextlib.suppress(Exception):
                    out.append(codec.read(os.path.join(d, fn), Pending))
    return sorted(out, key=lambda p: p.asked)


def answer(stack_dir: str, call_id: str, what: str) -> Pending:
    """`netstack call-answer ID allow|deny`: the waiting call gets it."""
    if not ID_RE.match(call_id):
        raise UsageError(f"call-answer: {call_id!r} is not a call id (see `netstack calls`)")
    if what not in ("allow", "deny"):
        raise UsageError("call-answer: say allow or deny")
    d = os.path.join(stack_dir, PENDING)
    try:
        p = codec.read(os.path.join(d, f"{call_id}.json"), Pending)
    except FileNotFoundError:
        raise UsageError(f"call-answer: no call {call_id} is waiting (answered, timed out, "
                         "or never asked; see `netstack calls`)") from None
    codec.atomic_write(os.path.join(d, f"{call_id}.answer"), what + "\n")
    return p


# --- running a service ------------------------------------------------------------------

def service_command(plan: Any, service: str, argument: str, source: str,
                    args: tuple[str, ...] = ()) -> tuple[list[str], tuple[Any, ...]] | None:
    """The command (and the read-only binds) of SERVICE+ARGUMENT in the target; None: no
    such service. Names were checked (policy.name_problem): no '/', no leading '.'."""
    from netstack import sandbox

    env = ["env", f"QREXEC_REMOTE_DOMAIN={source}", f"QREXEC_SERVICE_ARGUMENT={argument}",
           f"QREXEC_SERVICE_FULL_NAME={service}" + (f"+{argument}" if argument else "")]
    if service in BUILTIN:
        return [*env, "sh", "-c", BUILTIN[service], service, *args], ()
    d = plan.call_services
    if not d:
        return None
    base = os.path.realpath(d)
    for name in ([f"{service}+{argument}"] if argument else []) + [service]:
        path = os.path.realpath(os.path.join(base, name))
        if os.path.dirname(path) == base and os.path.isfile(path):
            inside = f"{SERVICE_INSIDE}/{service}"
            grant = sandbox.Grant("call", path, inside, (), readonly=True)
            return [*env, inside, *([argument] if argument else [])], (grant,)
    return None


@dataclass
class Result:
    exit: int
    bytes_in: int
    bytes_out: int
    cut: bool = False


def run_service(k: Kernel, st: Any, target: str, service: str, argument: str, source: str,
                user: str | None, read: Callable[[int], bytes],
                write: Callable[[bytes], None], cap: int, name: str,
                args: tuple[str, ...] = (), stderr: Any = subprocess.DEVNULL
                ) -> Result | None:
    """Run the service in the target's sandbox; `read` gives the caller's bytes (b"": the
    end), `write` takes the service's. None: no such service (nothing ran)."""
    from netstack import executor

    found = service_command(st.plan, service, argument, source, args)
    if found is None:
        return None
    cmd, grants = found
    q = st.plan.qube(target)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    cancel = threading.Event()
    counts = {"in": 0, "out": 0}
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            box["o"] = executor.run(k, st, q, cmd, user=user, extra=grants, stdin=in_r,
                                    stdout=out_w, stderr=stderr, text=False,
                                    forward=(), name=name, environ=os.environ,
                                    timeout=CALL_TIMEOUT, cancel=cancel)
        except Exception as e:  # noqa: BLE001 - reported to the caller as a failed call
            box["e"] = e
        finally:
            os.close(in_r)
            os.close(out_w)

    def feed() -> None:
        try:
            while True:
                data = read(65536)
                if not data:
                    break
                counts["in"] += len(data)
                if counts["in"] > cap:
                    cancel.set()
                    break
                _write_all(in_w, data)  # blocks while the service does not read
        except OSError:
            pass  # the service closed its stdin, or the caller went
        finally:
            os.close(in_w)

    t = threading.Thread(target=runner, daemon=True)
    t.start()
    threading.Thread(target=feed, daemon=True).start()
    try:
        while True:
            data = os.read(out_r, 65536)
            if not data:
                break
            counts["out"] += len(data)
            if counts["out"] > cap:
                cancel.set()
                break
            write(data)
    except OSError:
        cancel.set()  # the caller went: the service is ended
    finally:
        t.join()
        os.close(out_r)
    if "e" in box:
        raise box["e"]
    o = box["o"]
    cut = cancel.is_set()
    return Result(CUT_EXIT if cut else o.code, counts["in"], counts["out"], cut)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --- the daemon -------------------------------------------------------------------------

def _frame(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">cI", kind, len(payload)) + payload


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def peer_in_qube(conn: socket.socket, netns: str) -> bool:
    """The connecting process lives in the qube's network namespace."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid = struct.unpack("3i", creds)[0]
    try:
        want = os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return False
    return pid > 0 and _netns_inode(pid) == want


def _read_header(conn: socket.socket) -> tuple[bytes, bytes] | None:
    """The request line, and what came after it in the same reads (the caller's first
    bytes of stdin); None: none within HEADER_WAIT, or longer than MAX_HEADER."""
    conn.settimeout(HEADER_WAIT)
    buf = b""
    try:
        while b"\n" not in buf and len(buf) <= MAX_HEADER:
            chunk = conn.recv(MAX_HEADER + 1 - len(buf))
            if not chunk:
                return None
            buf += chunk
    except OSError:
        return None
    finally:
        conn.settimeout(None)
    line, nl, rest = buf.partition(b"\n")
    return (line, rest) if nl and len(line) <= MAX_HEADER else None


class Daemon:
    """The supervisor's call thread: one listening socket per app qube, a thread per
    call."""

    def __init__(self, stack: str, stack_dir: str, stopping: threading.Event, k: Kernel
                 ) -> None:
        self.stack, self.dir, self.stopping, self.k = stack, stack_dir, stopping, k
        self.listeners: dict[str, socket.socket] = {}
        self.sel = selectors.DefaultSelector()
        self.slots = threading.BoundedSemaphore(MAX_CALLS)
        self.busy: dict[str, int] = {}  # calls in progress per source qube
        self.busy_lock = threading.Lock()
        self.plan_mtime: int | None = None

    def _state(self) -> Any:
        from netstack.state import State

        return State.load(self.stack)

    def sync(self) -> None:
        """A socket for every app qube of the plan in force (disposables come and go)."""
        from netstack import sandbox

        path = os.path.join(self.dir, "plan.json")
        try:
            m = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return
        if m == self.plan_mtime:
            return
        st = self._state()
        if st is None or st.plan is None:
            return
        self.plan_mtime = m
        apps = {q.name for q in st.plan.qubes if q.traits.sandboxed}
        public = os.path.join(self.dir, sandbox.PUBLIC)
        for name in sorted(apps - set(self.listeners)):
            d = sandbox.call_dir(public, name)
            sock_path = os.path.join(d, "sock")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock_path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(sock_path)
            os.chmod(sock_path, 0o666)  # the sandbox's account connects; see peer_in_qube
            s.listen(16)
            s.setblocking(False)
            self.listeners[name] = s
            self.sel.register(s, selectors.EVENT_READ, name)
        for name in sorted(set(self.listeners) - apps):
            s = self.listeners.pop(name)
            self.sel.unregister(s)
            s.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(public, sandbox.CALLS, name, "sock"))

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.sync()
                for key, _ in self.sel.select(timeout=0.2):
                    with contextlib.suppress(OSError):
                        conn, _addr = key.fileobj.accept()  # type: ignore[union-attr]
                        conn.setblocking(True)
                        if not self.take(key.data):
                            self.refuse_busy(conn, key.data)
                            continue
                        threading.Thread(target=self.call, args=(conn, key.data),
                                         daemon=True).start()
        finally:
            for s in self.listeners.values():
                s.close()

    def take(self, source: str) -> bool:
        """A slot for a call of `source`, or False (too many at once, in all or of it)."""
        with self.busy_lock:
            if self.busy.get(source, 0) >= MAX_CALLS_PER_QUBE or \
                    not self.slots.acquire(blocking=False):
                return False
            self.busy[source] = self.busy.get(source, 0) + 1
            return True

    def give_back(self, source: str) -> None:
        with self.busy_lock:
            self.busy[source] -= 1
            self.slots.release()

    def refuse_busy(self, conn: socket.socket, source: str) -> None:
        with conn, contextlib.suppress(OSError):
            log(self.dir, Record(time.time(), new_id(), source, "?", "?", "", "refused",
                                 None, "too many calls at once"))
            conn.sendall(_frame(b"R", b"Request refused"))

    def call(self, conn: socket.socket, source: str) -> None:
        with conn:
            try:
                self._call(conn, source)
            except Exception as e:  # noqa: BLE001 - one call's failure is logged, never the daemon's
                with contextlib.suppress(Exception):
                    log(self.dir, Record(time.time(), new_id(), source, "?", "?", "",
                                         "refused", None, f"call layer error: {e}"))
                with contextlib.suppress(OSError):
                    conn.sendall(_frame(b"X", struct.pack(">i", CUT_EXIT)))
            finally:
                with contextlib.suppress(OSError):  # wakes a reader still in recv
                    conn.shutdown(socket.SHUT_RDWR)
                self.give_back(source)

    def _call(self, conn: socket.socket, source: str) -> None:
        cid = new_id()
        st = self._state()
        if st is None or st.plan is None or not st.plan.has_qube(source):
            return
        src_q = st.plan.qube(source)
        if not peer_in_qube(conn, src_q.netns):
            log(self.dir, Record(time.time(), cid, source, "?", "?", "", "refused", None,
                                 f"the caller is not in {source}'s network namespace"))
            conn.sendall(_frame(b"R", b"Request refused"))
            return
        got = _read_header(conn)
        words = got[0].decode("utf-8", "replace").split(" ") if got is not None else []
        if len(words) != 2:
            log(self.dir, Record(time.time(), cid, source, "?", "?", "", "refused", None,
                                 "no request line (TARGET SERVICE[+ARG])"))
            conn.sendall(_frame(b"R", b"Request refused"))
            return
        target, word = words
        service, argument = policy.split_call(word)
        v = verdict(st.plan, source, target, service, argument)
        rec = Record(time.time(), cid, source, v.target, service, argument, v.action, v.rule,
                     v.reason, notify=v.notify)
        if v.action == "ask":
            ok = wait_answer(self.dir, Pending(cid, source, v.target, service, argument,
                                               v.rule, time.time(),
                                               time.time() + st.plan.ask_timeout),
                             self.stopping, lambda: peer_closed(conn))
            rec.verdict = "ask->allow" if ok else "ask->deny"
            if not ok and peer_closed(conn):  # nobody left to tell: one record, no reply
                rec.reason += "; withdrawn: the caller went away before an answer"
                log(self.dir, rec)
                return
            if not ok:
                rec.reason += "; denied on the host (or nobody answered in time)"
        if rec.verdict in ("deny", "ask->deny"):
            log(self.dir, rec)
            conn.sendall(_frame(b"R", b"Request refused"))
            return
        if v.target.startswith("@dispvm") and not v.autostart:
            rec.verdict = "refused"
            rec.reason += "; autostart=no: the call needs a new disposable started"
            log(self.dir, rec)
            conn.sendall(_frame(b"R", b"Request refused"))
            return
        k = self.k.fork()  # handles of this call's own (a disposable's transaction)
        disp: str | None = None
        try:
            if v.target.startswith("@dispvm"):  # a new disposable, for this call only
                disp = self._new_disposable(k, v.target, source, rec)
                if disp is None:
                    conn.sendall(_frame(b"R", b"Request refused"))
                    return
                v = dataclasses.replace(v, target=disp)
                rec.target = disp
            self._run(k, conn, source, v, service, argument, word, got, rec, cid)
        finally:
            if disp is not None:
                from netstack import disposable

                with contextlib.suppress(Exception):
                    disposable.remove(self.stack, [disp], k)
            k.close()

    def _new_disposable(self, k: Kernel, token: str, source: str, rec: Record) -> str | None:
        """A disposable for `@dispvm` (made like the source's default, `[stack]
        default_dispvm`, else the most private path) or `@dispvm:QUBE` (like QUBE)."""
        from netstack import disposable

        like = token[len("@dispvm:"):] if token.startswith("@dispvm:") else None
        try:
            return disposable.add(self.stack, None, None, kernel=k, like=like).name
        except Exception as e:  # noqa: BLE001 - the call is refused and says why in the log
            rec.verdict, rec.reason = "refused", f"{rec.reason}; no disposable: {e}"
            log(self.dir, rec)
            return None

    def _run(self, k: Kernel, conn: socket.socket, source: str, v: policy.Verdict,
             service: str, argument: str, word: str, got: Any, rec: Record, cid: str
             ) -> None:
        st = self._state()  # what changed while the call waited (a disposable went)
        if st is None or st.plan is None or not st.plan.has_qube(v.target):
            rec.verdict, rec.reason = "refused", f"the target {v.target!r} is gone"
            log(self.dir, rec)
            conn.sendall(_frame(b"R", b"Request refused"))
            return
        assert got is not None
        first = [got[1]]

        def read(n: int) -> bytes:
            if first[0]:
                data, first[0] = first[0], b""
                return data
            return conn.recv(n)

        res = run_service(k, st, v.target, service, argument, source, v.user, read,
                          lambda b: conn.sendall(_frame(b"O", b)), st.plan.call_max_bytes,
                          f"call {cid} {source}->{v.target} {word}")
        if res is None:
            rec.verdict, rec.reason = "refused", f"{rec.reason}; no service {service!r} in " \
                                                 "the target"
            log(self.dir, rec)
            conn.sendall(_frame(b"R", b"Request refused"))
            return
        rec.bytes_in, rec.bytes_out, rec.exit = res.bytes_in, res.bytes_out, res.exit
        if res.cut:
            rec.reason += f"; cut: more than {st.plan.call_max_bytes} bytes one way"
        log(self.dir, rec)
        with contextlib.suppress(OSError):
            conn.sendall(_frame(b"X", struct.pack(">i", res.exit)))


def serve(stack_dir: str, stopping: threading.Event, kernel: Kernel) -> None:
    """The supervisor's entry (SupervisorSpec.calls): serve until the stack stops."""
    stack = os.path.basename(stack_dir.rstrip("/"))
    Daemon(stack, stack_dir, stopping, kernel).run()


# --- host commands ----------------------------------------------------------------------

def _stack(stack: str) -> Any:
    from netstack.state import require

    st = require(stack)
    if st.plan is None:
        raise StateError(f"stack {stack!r} has no plan; run `netstack down` and `up`")
    return st


def _app(st: Any, name: str) -> Any:
    from netstack import executor

    q = executor.qube(st, name)
    if not q.traits.sandboxed:
        raise UsageError(f"{name} is a service qube: calls, copies and the clipboard are "
                         "between app qubes")
    return q


# Runs in the source for `netstack copy/move`: the file (a regular file inside the home,
# resolved) goes to the target through the call layer, as qvm-copy does with qrexec;
# `move` deletes it only when the target confirmed (exit 0).
SEND_SCRIPT = r'''
r=$(realpath -e -- "$1" 2>/dev/null) || { echo "no such file: $1" >&2; exit 3; }
case "$r" in "$HOME"/*) ;; *) echo "$1 is outside the home (resolves to $r)" >&2; exit 3;; esac
[ -f "$r" ] || { echo "$1 is not a regular file" >&2; exit 3; }
if [ "$3" = move ] && [ -L "$1" ]; then echo "$1 is a symlink: move the file" >&2; exit 3; fi
n=$(basename -- "$1"); s=$(stat -c %s -- "$r") || exit 3
{ printf '%s\n%s\n' "$n" "$s"; cat -- "$r"; } | netstack-call "$2" qubes.Filecopy
rc=$?
[ $rc -eq 126 ] && exit 126
[ $rc -eq 0 ] || { echo "$2 did not take it (that name is in its Incoming already," \
  "or it did not arrive whole; exit $rc)" >&2; exit 5; }
if [ "$3" = move ]; then rm -f -- "$r" || exit 4; fi
'''


def copy(k: Kernel, stack: str, src: str, dst: str, move: bool = False,
         user: str | None = None) -> str:
    """`netstack copy|move SRC:PATH DST`: the source qube sends the file with
    `netstack-call DST qubes.Filecopy` (the policy decides); it lands in DST's
    ~/Incoming/SRC/. move: the source's file is deleted only after the destination
    confirmed. Returns where it landed (inside DST)."""
    from netstack import executor

    what = "move" if move else "copy"
    qube, sep, path = src.partition(":")
    if not sep or not qube or not path:
        raise UsageError(f"{what} {src!r}: give SOURCE:PATH, e.g. work:notes.txt")
    if qube == dst:
        raise UsageError(f"{what}: source and destination are the same qube")
    name = os.path.basename(path.rstrip("/"))
    if name in ("", ".", ".."):
        raise UsageError(f"{what} {src!r}: name a file, not a directory")
    import unicodedata

    # C0 and C1 controls, line and paragraph separators (as Qubes' qfile-unpacker refuses
    # unsafe names): a name that would break a line of the destination's listing
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        raise UsageError(f"{what} {src!r}: the file's name has a newline or another control "
                         "character, which the destination would refuse; rename it first")
    st = _stack(stack)
    _app(st, qube)
    _app(st, dst)
    if verdict(st.plan, qube, dst, "qubes.Filecopy", "").action == "ask":
        import sys

        print(f"netstack: the policy asks: `sudo netstack calls` lists the {what}, `sudo "
              f"netstack call-answer ID allow` lets it (denied in "
              f"{st.plan.ask_timeout:.0f} s)", file=sys.stderr)
    o = executor.run(k, st, st.plan.qube(qube), ["sh", "-c", SEND_SCRIPT, what, path, dst,
                                                 what], user=user, capture=True,
                     name=f"{what} from {qube}")
    if o.code == REFUSED_EXIT:
        raise UsageError(f"{what}: refused by the policy (qubes.Filecopy {qube} -> {dst}; "
                         "see `netstack calls`)")
    if o.code == 4:
        raise UsageError(f"{what}: copied to {dst}, but the source could not be deleted")
    if o.code != 0:
        msg = (o.stderr or "").strip().splitlines()
        raise UsageError(f"{what}: {msg[-1] if msg else f'failed (exit {o.code})'}")
    return f"~/Incoming/{qube}/{os.path.basename(path)}"


def clipboard_copy(k: Kernel, stack: str, qube: str, user: str | None = None) -> int:
    """`netstack clipboard copy QUBE`: the qube's offered clipboard (its ~/.clipboard) into
    the host's one buffer, replacing what was there. The bytes are never interpreted."""
    from netstack import executor

    st = _stack(stack)
    _app(st, qube)
    # a regular file only: a pipe there hung the host's command, a link is not the qube's
    # to offer; and a bounded read (the qube may swap the file between test and read)
    o = executor.run(k, st, st.plan.qube(qube),
                     ["sh", "-c", 'f="$HOME/.clipboard"; [ -e "$f" ] || [ -L "$f" ] || exit 2; '
                      '{ [ -L "$f" ] || [ ! -f "$f" ]; } && exit 3; '
                      'exec timeout 10 head -c "$1" -- "$f"', "clip",
                      str(CLIPBOARD_MAX + 1)], user=user, capture=True, text=False,
                     name=f"clipboard copy from {qube}")
    if o.code == 3:
        raise UsageError(f"clipboard copy: {qube}'s ~/.clipboard is not a regular file (a "
                         "link, a pipe or a device): nothing taken")
    if o.code == 124:
        raise UsageError(f"clipboard copy: {qube}'s ~/.clipboard could not be read in 10 s: "
                         "nothing taken")
    if o.code != 0:
        raise UsageError(f"clipboard copy: {qube} offers nothing (no ~/.clipboard)")
    data = o.stdout or b""
    if len(data) > CLIPBOARD_MAX:
        raise UsageError(f"clipboard copy: {qube}'s clipboard is larger than "
                         f"{CLIPBOARD_MAX} bytes; nothing taken")
    codec.atomic_write(os.path.join(st.dir, CLIPBOARD), qube.encode() + b"\n" + data)
    log(st.dir, Record(time.time(), new_id(), qube, "@host", "clipboard-copy", "", "allow",
                       None, "taken into the host's buffer", 0, len(data), 0))
    return len(data)


def clipboard_state(stack_dir: str) -> tuple[str, bytes] | None:
    try:
        with open(os.path.join(stack_dir, CLIPBOARD), "rb") as f:
            raw = f.read(CLIPBOARD_MAX + 64)
    except FileNotFoundError:
        return None
    origin, _, data = raw.partition(b"\n")
    return origin.decode(), data


def clipboard_paste(k: Kernel, stack: str, qube: str, prompt: Callable[[str], bool] | None
                    = None) -> tuple[str, int]:
    """`netstack clipboard paste QUBE`: the buffer to one qube, once (then it is empty),
    as the policy's qubes.ClipboardPaste decides with the buffer's origin as source.
    `ask`: prompt (a terminal) or the pending list. Returns (origin, bytes)."""
    st = _stack(stack)
    _app(st, qube)
    held = clipboard_state(st.dir)
    if held is None:
        raise UsageError("clipboard paste: the host's clipboard is empty (`netstack "
                         "clipboard copy QUBE` fills it)")
    origin, data = held
    cid = new_id()
    v = verdict(st.plan, origin, qube, "qubes.ClipboardPaste", "")
    rec = Record(time.time(), cid, origin, qube, "qubes.ClipboardPaste", "", v.action,
                 v.rule, v.reason, notify=v.notify)
    if v.action == "ask":
        ok = prompt(f"paste {len(data)} bytes from {origin} into {qube}?") if prompt else \
            wait_answer(st.dir, Pending(cid, origin, qube, "qubes.ClipboardPaste", "", v.rule,
                                        time.time(), time.time() + st.plan.ask_timeout))
        rec.verdict = "ask->allow" if ok else "ask->deny"
    if rec.verdict in ("deny", "ask->deny"):
        log(st.dir, rec)
        raise UsageError(f"clipboard paste: refused by the policy (qubes.ClipboardPaste "
                         f"{origin} -> {qube}: {v.reason})")
    chunks = [data]
    res = run_service(k, st, v.target, "qubes.ClipboardPaste", "", origin, v.user,
                      lambda _n: chunks.pop() if chunks else b"", lambda _b: None,
                      CLIPBOARD_MAX, f"clipboard paste {cid} into {v.target}")
    assert res is not None  # built in
    rec.bytes_in, rec.exit = res.bytes_in, res.exit
    log(st.dir, rec)
    if res.exit != 0:
        raise UsageError(f"clipboard paste: {qube} could not take it (exit {res.exit}); "
                         "the buffer is kept")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(st.dir, CLIPBOARD))
    return origin, len(data)


# Runs in the source for `open-in-disposable`: the stream of qubes.Filecopy on stdout.
READ_SCRIPT = r'''
r=$(realpath -e -- "$1" 2>/dev/null) || { echo "no such file: $1" >&2; exit 3; }
case "$r" in "$HOME"/*) ;; *) echo "$1 is outside the home (resolves to $r)" >&2; exit 3;; esac
[ -f "$r" ] || { echo "$1 is not a regular file" >&2; exit 3; }
printf '%s\n%s\n' "$(basename -- "$1")" "$(stat -c %s -- "$r")" && exec cat -- "$r"
'''


def open_in_disposable(k: Kernel, stack: str, src: str, cmd: list[str],
                       prompt: Callable[[str], bool] | None = None,
                       user: str | None = None) -> int:
    """`netstack open-in-disposable QUBE:PATH -- CMD...` (Qubes' qvm-open-in-dvm): the
    policy's qubes.OpenInVM from QUBE to @dispvm decides; a new disposable gets the file
    and runs CMD on it (its output is the caller's), and is gone when CMD ends. A changed
    file is offered back as the disposable's own qubes.Filecopy call (the policy decides
    again). Returns CMD's exit code."""
    from netstack import disposable, executor
    from netstack.state import State

    qube, sep, path = src.partition(":")
    if not sep or not qube or not path:
        raise UsageError(f"open-in-disposable {src!r}: give QUBE:PATH, e.g. work:report.pdf")
    if not cmd:
        raise UsageError("open-in-disposable: give the command after --, e.g. -- less")
    st = _stack(stack)
    src_q = _app(st, qube)
    cid = new_id()
    v = verdict(st.plan, qube, "@dispvm", "qubes.OpenInVM", "")
    rec = Record(time.time(), cid, qube, "@dispvm", "qubes.OpenInVM", "", v.action, v.rule,
                 v.reason, notify=v.notify)
    if v.action != "deny" and not v.autostart:
        rec.verdict = "refused"
        log(st.dir, rec)
        raise UsageError(f"open-in-disposable: refused by the policy ({v.rule}: autostart=no, "
                         "and the file would need a new disposable started)")
    if v.action == "ask":
        ok = prompt(f"open {path} of {qube} in a new disposable?") if prompt else \
            wait_answer(st.dir, Pending(cid, qube, "@dispvm", "qubes.OpenInVM", "", v.rule,
                                        time.time(), time.time() + st.plan.ask_timeout))
        rec.verdict = "ask->allow" if ok else "ask->deny"
    if rec.verdict in ("deny", "ask->deny") or v.target != "@dispvm":
        log(st.dir, rec)
        raise UsageError(f"open-in-disposable: refused by the policy (qubes.OpenInVM "
                         f"{qube} -> @dispvm: {v.reason})")
    dq = disposable.add(stack, None, None, kernel=k)
    try:
        st2 = State.load(stack)
        if st2 is None:
            raise StateError(f"stack {stack!r} went down")
        rec.target = dq.name
        r_fd, w_fd = os.pipe()
        box: dict[str, Any] = {}

        def reader() -> None:
            try:
                box["o"] = executor.run(k, st2, src_q, ["sh", "-c", READ_SCRIPT, "read", path],
                                        user=user, stdout=w_fd, stderr=subprocess.PIPE,
                                        forward=(), name=f"open-in-disposable from {qube}")
            finally:
                os.close(w_fd)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        out = os.fdopen(os.dup(1), "wb", buffering=0)
        try:
            res = run_service(k, st2, dq.name, "qubes.OpenInVM", "", qube, v.user,
                              lambda n: os.read(r_fd, n), out.write, st2.plan.call_max_bytes,
                              f"open-in-disposable {cid} in {dq.name}", tuple(cmd), None)
        finally:
            t.join()
            os.close(r_fd)
            out.close()
        assert res is not None  # built in
        rec.bytes_in, rec.bytes_out, rec.exit = res.bytes_in, res.bytes_out, res.exit
        log(st.dir, rec)
        o = box.get("o")
        if o is not None and o.code != 0:
            raise UsageError(f"open-in-disposable: {qube} could not send {path} (exit "
                             f"{o.code})")
        return res.exit
    finally:
        disposable.remove(stack, [dq.name], k)


def listing(stack: str, last: int = 20) -> dict[str, Any]:
    """`netstack calls`: what waits for an answer, and the last calls."""
    from netstack.state import require

    st = require(stack)
    held = clipboard_state(st.dir)
    problem = None
    if st.plan and st.plan.policy:
        try:  # read as each call reads it: a policy that stopped parsing denies every call
            policy.load(st.plan.policy)
        except ConfigError as e:
            problem = f"{e}: every call is denied until it is fixed"
    return {"pending": [asdict(p) for p in pending(st.dir)],
            "calls": read_log(st.dir, last),
            "clipboard": None if held is None else {"from": held[0], "bytes": len(held[1])},
            "policy": st.plan.policy if st.plan else None, "policy_problem": problem}
