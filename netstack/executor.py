"""The one executor of a user's command in a qube: `exec`, `run` (disposables), `check` and
the pytest plugin all come here.

Given the plan's qube and the kernel and state it is handed (it never makes a kernel of its
own), it builds the command line (an app qube: its bubblewrap sandbox, netstack.sandbox;
a service qube: its namespace, as root or --user), starts it with the caller's stdin and
stdout (or captured), records its pid in the stack's state while it runs (so `down` ends
it by pid and start time if netstack dies), forwards SIGTERM, SIGHUP and SIGINT to it, and
returns one exit code, the shell's:

  the program's own status         its exit code
  killed by signal N               128+N (143 for SIGTERM, 130 for SIGINT, 137 SIGKILL)
  program not found                127
  found, not executable            126

The program is started through `env --` inside the sandbox (the same environment, no shell
in between): env tells "not found" (127) from "cannot run" (126) where bubblewrap's own
execvp says 1 for both. A program that itself exits 126 or 127 looks the same (as in a
shell).

Signals: netstack gets them (the terminal's Ctrl-C included: the sandbox runs in a process
group of its own, so bubblewrap never dies of it and SIGKILLs the program) and hands them on
to the program's process group inside the sandbox (with --new-session bubblewrap makes the
sandbox's init a session leader and forks the program into its group); one that comes
before the program exists is handed on once it does (bubblewrap itself is never signalled
while it starts: killed in its first milliseconds it leaves the sandbox running).
A program that is still there GRACE seconds after the first signal, or at a second one, is
killed. A service qube's command at netstack's terminal stays in netstack's process group,
as when `exec` exec'd it: the terminal's Ctrl-C, Ctrl-backslash and hang-up reach it
directly (netstack outlives them), Ctrl-Z stops both, an interactive shell in sys-net works
as before; SIGTERM is handed on."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from netstack.errors import StateError, UsageError
from netstack.kernel import Kernel
from netstack.model import QubeInfo

NOT_FOUND = 127
NOT_EXECUTABLE = 126
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
GRACE = 3.0  # seconds the program gets after a forwarded signal (or a timeout) before SIGKILL
LAUNCHER = ("env", "--")  # exits 127 (not found) or 126 (not executable), else execs


def exit_code(returncode: int) -> int:
    """Popen's returncode as a shell reports it: -N (killed by signal N) is 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def qube(st: Any, name: str) -> QubeInfo:
    """The qube of the stack's plan by name, or a usage error listing the qubes."""
    plan = st.plan
    if plan is None or not plan.has_qube(name):
        qubes = ", ".join(sorted(q.name for q in plan.qubes)) if plan else "(none)"
        raise UsageError(f"no qube {name!r} in stack {st.stack!r}; qubes: {qubes}")
    return plan.qube(name)


def argv(k: Kernel, st: Any, q: QubeInfo, cmd: list[str], user: str | None = None,
         root_inside: bool = False, extra: tuple[Any, ...] = (),
         environ: Mapping[str, str] | None = None,
         warn: Callable[[str], None] | None = None) -> list[str]:
    """The command line of `cmd` in qube `q` of the stack whose state is `st`. An app
    qube's command runs in its sandbox (netstack.sandbox) as an unprivileged account; a
    service qube's (sys-net, sys-firewall, a VPN or Tor qube: netstack's own) as root in
    its namespace, for inspection, or as --user. `ip netns exec` binds /etc/netns/NS/* over
    /etc, so name lookups inside never use the host's resolver stubs. `extra`: grants
    beyond the qube's own (check's lab CA)."""
    from netstack import sandbox

    env = os.environ if environ is None else environ
    say = warn or (lambda m: print(f"netstack: {m}", file=sys.stderr))
    if not cmd:
        raise UsageError("exec: give a command after --, e.g. netstack exec work -- curl ...")
    if not k.netns_exists(q.netns):
        raise StateError(f"qube {q.name!r}: namespace {q.netns} is gone; run `netstack down` "
                         "and `up`")
    plan = st.plan
    run = [*LAUNCHER, *cmd]
    if q.traits.sandboxed:
        who = sandbox.account(user, env.get("SUDO_USER"))
        home: str | None = None
        if q.settings.get("home", "persistent") == "persistent":
            home = sandbox.home_dir(st.stack, q.name)
            sandbox.make_home(home, who)
        grants: tuple[sandbox.Grant, ...] = ()
        if q.settings.get("gui"):
            g = sandbox.gui_grant(env, who, 0 if root_inside else None)
            if g is None:
                say(f"{q.name}: gui = true, but {who.name} has no Wayland or X11 display "
                    "here; running without one")
            else:
                grants = (g,)
                if g.warning:
                    say(f"{q.name}: {g.warning}")
        netvm = plan.qube(q.netvm) if q.netvm else None
        client_env = netvm.client_env if netvm else {}
        from netstack import seccomp

        whonix = any(x.traits.protection == "tor" for x in plan.chain(q.name)[1:])
        public = os.path.join(st.dir, sandbox.PUBLIC)
        grants, client_env = forwarded(public, q.name, grants, client_env)
        ident = sandbox.make_identity(public, os.path.dirname(home) if home else None,
                                      q.name, whonix)
        bpf = seccomp.compile_filter(seccomp.path(public))
        lower = None
        if q.settings.get("template"):  # its root: the template under a throw-away overlay
            from netstack import templates

            lower = templates.lowers(q.settings["template"], who.uid, who.gid, root_inside)
        return sandbox.argv(q.netns, q.name, who, home, run, root_inside,
                            grants + tuple(extra), client_env, ident, bpf, lower,
                            sandbox.call_dir(public, q.name))
    if root_inside:
        raise UsageError(f"--root: {q.name} is a service qube; its commands run as root "
                         "already")
    out = ["ip", "netns", "exec", q.netns]
    if user is None:
        user = env.get("SUDO_USER") or None
    if user and user != "root":
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise UsageError(f"--user {user!r}: no such user") from None
        out += ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                "--"]
    return out + run


def forwarded(public: str, qube: str, grants: tuple[Any, ...], env: dict[str, str]
              ) -> tuple[tuple[Any, ...], dict[str, str]]:
    """A port its netvm forwards to it (vpn/portfwd.py): the directory the renewer keeps
    current, bound read-only at FORWARD_INSIDE, and its variables (as they are now) for
    the command."""
    from netstack import sandbox
    from netstack.vpn.portfwd import FORWARD_INSIDE, client_dir, read_env

    d = client_dir(public, qube)
    try:
        with open(os.path.join(d, "env")) as f:
            text = f.read()
    except FileNotFoundError:
        return grants, env
    return (grants + (sandbox.Grant("forward", d, FORWARD_INSIDE, (), readonly=True),),
            {**env, **read_env(text)})


@dataclass(frozen=True)
class Outcome:
    code: int  # as a shell reports it (see the module's table)
    pid: int  # of the process started (bubblewrap for an app qube)
    ended_by: str | None = None  # "SIGTERM", "SIGINT", "SIGHUP", "timeout", "cancelled"
    stdout: Any = None  # with capture
    stderr: Any = None


def run(k: Kernel, st: Any, q: QubeInfo, cmd: list[str], *, user: str | None = None,
        root_inside: bool = False, extra: tuple[Any, ...] = (), stdin: Any = None,
        stdout: Any = None, stderr: Any = None, capture: bool = False, text: bool = True,
        input: Any = None, timeout: float | None = None,
        forward: tuple[int, ...] = FORWARDED, name: str | None = None,
        environ: Mapping[str, str] | None = None,
        cancel: threading.Event | None = None) -> Outcome:
    """Run `cmd` in qube `q` until it exits, runs past `timeout` (then it is ended: SIGTERM,
    SIGKILL after GRACE) or netstack gets a signal of `forward` (handed on, see the module).
    stdin/stdout/stderr: as subprocess's (None: netstack's own); capture: both kept in the
    Outcome (text: decoded), `input` written to stdin. Any exception (a signal not
    forwarded: KeyboardInterrupt in pytest) ends the program before it propagates.
    cancel: set by another thread (the call layer's size cap), it ends the program as a
    timeout does (ended_by "cancelled")."""
    line = argv(k, st, q, cmd, user, root_inside, extra, environ)
    sandboxed = "bwrap" in line
    if capture:
        stdout = stderr = subprocess.PIPE
    if input is not None:
        stdin = subprocess.PIPE
    # a service qube's command at netstack's terminal: the terminal's own job (see _Forwarding)
    shared = not sandboxed and not capture and _at_terminal(stdin)
    sys.stdout.flush()
    sys.stderr.flush()
    fw = _Forwarding(sandboxed, forward, shared)
    reg: Any = None
    out: tuple[Any, Any] = (None, None)
    ended_by: str | None = None
    fw.install()  # before the start: a signal from now on is handed on (or ends the start)
    try:
        try:
            p = subprocess.Popen(line, stdin=stdin, stdout=stdout, stderr=stderr, text=text,
                                 preexec_fn=lambda: _child(shared))
        except FileNotFoundError as e:  # `ip` itself missing: the host lacks iproute2
            raise StateError(f"cannot start {line[0]}: {e.strerror} (run scripts/setup.sh)"
                             ) from None
        fw.started(p)
        try:
            reg = _record(q.netns, name or f"command in {q.name}", p.pid)
            try:
                fw.arm()
                out = _wait(p, capture, input, timeout, cancel)
                fw.armed = False  # it has exited: a signal now changes nothing
            except subprocess.TimeoutExpired:
                ended_by = "cancelled" if cancel is not None and cancel.is_set() else "timeout"
                fw.first = fw.first or 0  # a signal from now on kills
                fw.send(signal.SIGTERM)
            except _Signalled as s:
                ended_by = signal_name(s.signum)
            if ended_by is not None:
                out = _finish(p, capture, fw)
        except BaseException:
            fw.kill()
            p.wait()
            raise
    finally:
        fw.restore()
        if reg is not None:
            from netstack.processes import unregister_process

            unregister_process(reg)
    return Outcome(exit_code(p.returncode), p.pid, ended_by, *out)


def _record(netns: str, name: str, pid: int) -> Any:
    """The process in the stack's state while it runs (leaktest/capture.py's records):
    `down` ends it by pid and start time if netstack dies without ending it."""
    from netstack.processes import register_process

    return register_process(netns, name, pid)


def _outlive(_signum: int, _frame: Any) -> None:
    """The terminal's signal: its job, the command, has it too."""


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _wait(p: subprocess.Popen, capture: bool, input: Any, timeout: float | None,
          cancel: threading.Event | None = None) -> tuple[Any, Any]:
    if capture or input is not None:
        return p.communicate(input, timeout)
    if cancel is None:
        p.wait(timeout)
        return None, None
    end = None if timeout is None else time.monotonic() + timeout
    while True:  # TimeoutExpired once cancelled or past the deadline
        try:
            p.wait(0.05)
            return None, None
        except subprocess.TimeoutExpired:
            if cancel.is_set() or (end is not None and time.monotonic() >= end):
                raise


def _finish(p: subprocess.Popen, capture: bool, fw: _Forwarding) -> tuple[Any, Any]:
    """After the first signal: GRACE for the program (a signal that came before the
    sandbox's program existed is handed on once it does), then SIGKILL (a second signal
    kills at once, in the handler); what it wrote meanwhile is kept."""
    end = time.monotonic() + GRACE
    while True:
        step = 0.02 if fw.pending is not None else max(0.0, end - time.monotonic())
        try:
            if capture:
                return p.communicate(timeout=step)
            p.wait(step)
            return None, None
        except subprocess.TimeoutExpired:
            if fw.pending is not None:
                fw.send(fw.pending)
            if time.monotonic() >= end:
                break
    fw.kill()
    if capture:
        return p.communicate()
    p.wait()
    return None, None


def _at_terminal(stdin: Any) -> bool:
    """Our stdin (the command's) is our controlling terminal, and we are its foreground."""
    if stdin is not None:
        return False
    try:
        fd = sys.stdin.fileno()
        return os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def _child(shared: bool) -> None:
    """In the child before exec: a process group of its own unless `shared` (the
    terminal's Ctrl-C then reaches netstack, which hands it on, and never bubblewrap, whose
    death would SIGKILL the sandbox), and SIGKILL should netstack die (`kill -9`): nothing
    runs on in a namespace `down` is about to remove. bubblewrap's --die-with-parent takes
    the sandbox along."""
    import ctypes

    if not shared:
        os.setpgid(0, 0)
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


class _Forwarding:
    """While the program runs: the signals of `forward` handed on to it (the first one
    interrupts the wait with _Signalled, a later one kills). `shared`: a service qube's
    command in netstack's process group at its terminal, as `exec` once exec'd it: the
    terminal's signals (Ctrl-C, Ctrl-backslash, hang-up) reach it directly and netstack only
    outlives them, Ctrl-Z stops both; SIGTERM is handed on."""

    TERMINAL = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)

    def __init__(self, sandboxed: bool, forward: tuple[int, ...], shared: bool) -> None:
        self.p: subprocess.Popen | None = None
        self.sandboxed, self.shared = sandboxed, shared
        self.forward = forward if threading.current_thread() is threading.main_thread() \
            else ()
        self.old: dict[int, Any] = {}
        self.first: int | None = None  # the first signal handed on (0: a timeout)
        self.pending: int | None = None  # one for a sandbox whose program is not there yet
        self.armed = False

    def install(self) -> None:
        for s in self.forward:
            if not (self.shared and s in self.TERMINAL):
                self.old[s] = signal.signal(s, self._on)
        if self.shared and self.forward:
            for s in self.TERMINAL:  # (a handler, not SIG_IGN: the child must not inherit it)
                self.old[s] = signal.signal(s, _outlive)

    def started(self, p: subprocess.Popen) -> None:
        self.p = p
        if self.first is not None:  # a signal came while it was being started
            self.send(self.first)

    def arm(self) -> None:
        """From now on the first signal interrupts the wait; one that came before does so
        now."""
        self.armed = True
        if self.first is not None:
            raise _Signalled(self.first)

    def restore(self) -> None:
        self.armed = False
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}

    def _on(self, signum: int, _frame: Any) -> None:
        if self.first is not None:  # a second signal: no more waiting
            self.kill()
            return
        self.first = signum
        self.send(signum)
        if self.armed:
            raise _Signalled(signum)

    def send(self, signum: int) -> None:
        """Hand `signum` on: in a sandbox to the program's process group (the session
        bubblewrap made), kept pending until the program is there (bubblewrap is never
        signalled while it starts: killed in its first milliseconds, it leaves the sandbox
        running, field notes); else to the child's group (the child leads it), or the
        child alone when it shares netstack's."""
        self.pending = None
        if self.p is None or self.p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.shared:
                os.kill(self.p.pid, signum)
            elif not self.sandboxed:
                os.killpg(self.p.pid, signum)
            elif (group := sandbox_group(self.p.pid)) is not None:
                os.killpg(group, signum)
            else:
                self.pending = signum

    def kill(self) -> None:
        """SIGKILL to what we started (bubblewrap's sandbox dies with it)."""
        if self.p is None or self.p.poll() is not None:
            return
        if self.shared:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.p.pid, signal.SIGKILL)
            return
        for pg in (sandbox_group(self.p.pid) if self.sandboxed else None, self.p.pid):
            if pg is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pg, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before children (/proc/PID/task/TID/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        cur = todo.pop(0)
        kids: list[int] = []
        try:
            for tid in os.listdir(f"/proc/{cur}/task"):
                with open(f"/proc/{cur}/task/{tid}/children") as f:
                    kids += [int(x) for x in f.read().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def session_id(pid: int) -> int | None:
    from netstack.kernel import proc_fields

    rest = proc_fields(pid)
    return None if rest is None else int(rest[3])


def sandbox_group(pid: int) -> int | None:
    """The process group of the program bubblewrap (`pid`) runs: the first process below it
    that leads a session of its own (--new-session makes the sandbox's init one, and the
    program is forked into its group), once a process other than the leader is in it; None
    before."""
    from netstack.kernel import proc_fields

    below = descendants(pid)
    for d in below:
        if session_id(d) == d:
            return d if any(x != d and (f := proc_fields(x)) is not None and int(f[2]) == d
                            for x in below) else None
    return None
