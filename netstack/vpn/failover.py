"""Server failover of a VPN qube with several provider files (`config = ["a.conf",
"b.conf"]`): the supervisor's monitor of the tunnel daemon asks the VPN's resolver through
the tunnel every second; when nothing has answered for `failover_after` seconds (a dead
server, a lost handshake, OpenVPN reconnecting without end) it moves to the next server:

1. one nft transaction swaps the endpoint sets to the next server's transport: from this
   moment the kill switch admits that server only, the old one not at all;
2. the next server's daemon config and hook spec replace the current ones;
3. the daemon is restarted (at once, no backoff) and the hook configures the tunnel.

The choice is kept in `vpn-QUBE.server` (status, audit and reloads read it)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netstack.kernel import Kernel
from netstack.vpn.info import ServerState, Switch, read_state, write_state  # noqa: F401

PROBE_EVERY = 1.0


@dataclass
class ServerFiles:
    transport: list[list[Any]]  # [address, proto, port] the kill switch admits for it
    conf: str  # this server's daemon config and hook spec (put in place on a switch)
    spec: str
    name: str  # its provider file, for status


@dataclass
class FailoverSpec:
    qube: str
    netns: str
    dns: str  # asked through the tunnel: any answer means the tunnel carries traffic
    after: float
    conf_path: str
    spec_path: str
    server_file: str
    servers: list[ServerFiles] = field(default_factory=list)


def answers(ns: str | None, server: str, timeout: float) -> bool:
    """Whether `server` answers a DNS query (any answer, even an error) from inside `ns`."""
    from netstack import netns
    from netstack.dnswire import query

    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        q = query(".", 2)  # NS of the root: every resolver has it cached
        qid = q[:2]
        s.sendto(q, (server, 53))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg, _ = s.recvfrom(4096)
            if msg[:2] == qid:
                return True
    except OSError:
        return False
    finally:
        s.close()
    return False


def set_commands(servers: list[ServerFiles], i: int) -> dict[str, Any]:
    """The endpoint sets hold exactly server i's transport (one transaction)."""
    from netstack.vpn.info import endpoint_set_commands_for

    return endpoint_set_commands_for([tuple(t) for t in servers[i].transport])


def _put(src: str, dst: str) -> None:
    from netstack.kernel import atomic_write

    with open(src) as f:
        atomic_write(dst, f.read())


def switch(spec: FailoverSpec, st: ServerState, why: str, nft: Callable[[dict], None]
           ) -> ServerState:
    """Move to the next server: kill switch first, then its files; the caller restarts
    the daemon."""
    nxt = (st.current + 1) % len(spec.servers)
    t0 = time.time()
    nft(set_commands(spec.servers, nxt))
    t1 = time.time()
    s = spec.servers[nxt]
    _put(s.conf, spec.conf_path)
    _put(s.spec, spec.spec_path)
    new = ServerState(nxt, t1, (st.history + [Switch(st.current, nxt, why, t0, t1)])[-20:])
    write_state(spec.server_file, new)
    return new


def watch(spec_path: str, *, report: Callable[[dict[str, Any]], None],
          stopping: threading.Event, restart: Callable[[], None] = lambda: None,
          kernel: Kernel, **_: Any) -> None:
    """The supervisor's monitor: probe, and switch when the current server has not
    answered for `after` seconds (counted from its start: a server that never answers
    is left as surely as one that stops)."""
    from netstack import codec

    while not os.path.exists(spec_path):  # `up` writes it with the daemon's go signal
        if stopping.wait(0.05):
            return
    spec = codec.read(spec_path, FailoverSpec)
    st = read_state(spec.server_file) or ServerState(0, time.time())
    write_state(spec.server_file, st)
    last_ok = time.monotonic()
    k = kernel
    try:
        while not stopping.wait(PROBE_EVERY):
            if answers(spec.netns, spec.dns, min(1.0, spec.after / 2)):
                last_ok = time.monotonic()
                report({"server": st.current, "answering": True})
                continue
            silent = time.monotonic() - last_ok
            report({"server": st.current, "answering": False, "silent_s": round(silent, 1)})
            if silent < spec.after:
                continue
            why = f"no answer through the tunnel for {silent:.0f} s"
            st = switch(spec, st, why, lambda c: k.nft(spec.netns, c))
            restart()
            last_ok = time.monotonic()  # the next server gets its own `after` seconds
            report({"server": st.current, "answering": False, "switched": why})
    finally:
        with contextlib.suppress(Exception):
            k.close()
