"""Starting and ending the processes of a stack: the supervisor (recorded in the intent log
before it exists, with a token it writes back in its pidfile) and, through its status
file, the daemons it runs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from netstack.codec import encode
from netstack.kernel import Kernel
from netstack.state import ProcessRec, State, crash_point, read_pidfile
from netstack.supervisor import PIDFILE, SPEC, Child, ServiceSpec, SupervisorSpec, read_status

if TYPE_CHECKING:  # `down` imports this module: not the model's dataclasses
    from netstack.model import Plan


def start_supervisor(plan: Plan, st: State, k: Kernel) -> None:
    """Open the lab services' sockets in their namespaces (so they accept from now on) and
    hand them to a detached supervisor that serves them and runs the daemons."""
    import secrets  # (hmac and _hashlib: ~4 ms that `down` does not need)

    socks: list[socket.socket] = []
    services = []
    try:
        for s in plan.services:
            fds = {}
            t = k.bind(s.netns, socket.SOCK_STREAM, s.bind, s.port)
            socks.append(t)
            fds["tcp"] = t.fileno()
            if s.type in ("dns", "sink"):
                u = k.bind(s.netns, socket.SOCK_DGRAM, s.bind, s.port)
                socks.append(u)
                fds["udp"] = u.fileno()
            services.append(ServiceSpec(s.name, s.type, s.netns, fds, dict(s.zone),
                                        os.path.join(st.dir, f"{s.name}.log")))
        spec = SupervisorSpec(plan.stack, services, list(plan.daemons),
                              calls="netstack.calls:serve" if any(
                                  q.traits.sandboxed for q in plan.qubes) else None,
                              watch="netstack.watch:serve" if plan.watch else None)
        k.write_file(os.path.join(st.dir, SPEC), encode(spec), 0o600)
        rec = ProcessRec("supervisor", secrets.token_hex(8), os.path.join(st.dir, PIDFILE))
        st.record(rec)  # before it exists: a crash from here on leaves it findable
        pid, start = k.spawn([sys.executable, "-m", "netstack.supervisor", st.dir, rec.token],
                             os.path.join(st.dir, "supervisor.log"),
                             tuple(x.fileno() for x in socks))
        crash_point("supervisor-started")
        st.record(dataclasses.replace(rec, pid=pid, start=start))
    finally:
        for x in socks:
            x.close()


def ask_to_end(recs: list[ProcessRec], k: Kernel) -> None:
    """SIGTERM every recorded process whose pid is known, without waiting: `end_all`
    waits for them later (teardown removes the namespaces meanwhile; the supervisor takes
    about 12 ms to exit, docs/field-notes.md "Processes")."""
    for r in recs:
        if r.pid is not None:
            k.kill_start(r.pid, r.start)


def end_all(recs: list[ProcessRec], st: State, k: Kernel, wait_pidfile: float = 1.0) -> None:
    """End every recorded process by PID (checked against its start time), then every
    child the supervisor reported: it may have died without them."""
    last: dict[str, ProcessRec] = {}
    for r in recs:
        if r.pid is not None or r.token not in last:
            last[r.token] = r
    for r in last.values():
        pid, start = r.pid, r.start
        if pid is None:  # `up` died between recording and starting it: ask its pidfile
            end = time.monotonic() + wait_pidfile
            pf = read_pidfile(r.pidfile)
            while pf is None and time.monotonic() < end:
                time.sleep(0.02)
                pf = read_pidfile(r.pidfile)
            if pf is not None and pf.token == r.token:
                pid, start = pf.pid, pf.start
        if pid is not None:
            k.kill(pid, start)
    for c in children(st).values():
        k.kill(c.pid, c.start)


def children(st: State) -> dict[str, Child]:
    """Processes the supervisor started, by daemon name, from its own status file."""
    s = read_status(st.dir)
    return dict(s.children) if s else {}


def supervisor_pid(st: State) -> int | None:
    for r in reversed(st.objects):
        if isinstance(r, ProcessRec) and r.name == "supervisor" and r.pid is not None:
            return r.pid
    pf = pidfile_supervisor(st)  # its record lost (a damaged intent log)
    return pf.pid if pf is not None and alive(pf) else None


def pidfile_supervisor(st: State) -> ProcessRec | None:
    """The supervisor as its own pidfile names it (pid, start time, token), or None."""
    path = os.path.join(st.dir, PIDFILE)
    pf = read_pidfile(path)
    if pf is None:
        return None
    return ProcessRec("supervisor", pf.token, path, pf.pid, pf.start)


def alive(r: ProcessRec) -> bool:
    from netstack.kernel import proc_alive

    return r.pid is not None and proc_alive(r.pid, r.start)


def listening(pid: int, proto: str, port: int) -> bool:
    """Whether a socket of `proto` (udp/tcp) is bound to `port` in the network namespace
    of process `pid` (its /proc/PID/net view): the daemon answers from now on."""
    want = f":{port:04X}"
    for fam in ("", "6"):
        try:
            with open(f"/proc/{pid}/net/{proto}{fam}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for r in rows:
            cols = r.split()
            if len(cols) > 3 and cols[1].endswith(want) and \
                    cols[3] == ("07" if proto == "udp" else "0A"):
                return True
    return False


def daemons_waiting(state_dir: str, ready: dict[str, str]) -> list[str]:
    """The named daemons that do not answer yet as their Daemon.ready says: "hook" until
    its hook reported `configured`, "udp/PORT" (or tcp) until the port is bound in its
    namespace (Kernel.wait_ready polls this)."""
    st = read_status(state_dir)
    kids = st.children if st else {}
    waiting = []
    for name, how in ready.items():
        c = kids.get(name)
        proto, _, port = how.partition("/")
        ok = c is not None and (c.configured if how == "hook"
                                else listening(c.pid, proto, int(port)))
        if not ok:
            waiting.append(name)
    return waiting


# --- processes a command starts in a stack's namespace (a capture, a user's command) ------

RECORD_WAIT = 10.0  # seconds to wait for another writer of the stack's state


def stack_of(netns: str) -> str | None:
    """The stack a namespace belongs to (names.qube_netns / lab_netns), or None."""
    parts = netns.split("-", 2)
    if len(parts) == 3 and parts[0] in ("nst", "nsl") and parts[1]:
        return parts[1]
    return None


def register_process(netns: str, name: str, pid: int) -> Any:
    """Record a process started in a stack's namespace (a tcpdump, the program `check`
    runs) in that stack's intent log, so `down` ends it by PID and start time; the
    record, or None when the namespace is no stack's or the state cannot be written."""
    from netstack.kernel import proc_start_time
    from netstack.state import ProcessRec, StackLock, State

    stack = stack_of(netns)
    if stack is None:
        return None
    rec = ProcessRec(name, secrets.token_hex(8), "", pid, proc_start_time(pid))
    try:
        with StackLock(stack, wait=RECORD_WAIT):
            st = State.load(stack)
            if st is None:
                return None
            st.record(rec)
    except Exception:  # noqa: BLE001 - a capture must work without it (the PID is ours)
        return None
    return (stack, rec)


def unregister_process(reg: Any) -> None:
    """Retire the record once the process has ended (a fresh load: others append too)."""
    from netstack.state import StackLock, State

    stack, rec = reg
    with contextlib.suppress(Exception), StackLock(stack, wait=RECORD_WAIT):
        st = State.load(stack)
        if st is not None and st.seq_of(rec) is not None:
            st.forget(rec)
            if st.removed > 200:  # a long-lived stack checked many times: as disposables do
                st.compact()
