"""Port forwarding at run time: the renewer the supervisor runs in a VPN qube's namespace
when a `forward` entry asks for a NAT-PMP port (`python -m netstack.vpn.portfwd_run SPEC`),
and the files a static port needs at `up`.

The renewer asks the gateway through the tunnel for a mapping of each protocol (the
gateway chooses the public port; ProtonVPN ignores the ports asked for), puts exactly the
granted (protocol, port) into the entry's nft set in one transaction, writes the state
`status` shows and the client's files, and asks again at half the granted lifetime (RFC
6886 section 3.3). A failed ask is retried every second; when the grant has expired
without a renewal, the set is emptied: the gateway may have given that port to someone
else, and nothing is forwarded on a port not held (fail closed). On SIGTERM it gives the
mapping back (lifetime 0), best effort."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from netstack import codec
from netstack.vpn import natpmp
from netstack.vpn.portfwd import (
    Forward,
    ForwardState,
    Grant,
    RenewerSpec,
    publication,
    read_state,
    set_commands,
)

RETRY = 1.0  # seconds between asks after a failure


class Refused(Exception):
    """The gateway answered with a result code other than success."""


def ask(gateway: str, data: bytes, parse: Callable[[bytes], Any], deadline: float,
        sock_factory: Callable[[], socket.socket] | None = None) -> Any:
    """Send a request and wait for its answer, retransmitting at 250 ms doubled (RFC 6886
    section 3.1) until `deadline` (monotonic); a datagram that is not the answer is
    skipped. TimeoutError when nothing answered."""
    s = (sock_factory or (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)))()
    try:
        s.connect((gateway, natpmp.PORT))  # answers from anywhere else are not read
        wait = natpmp.FIRST_WAIT
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"no NAT-PMP answer from {gateway}:{natpmp.PORT}")
            with contextlib.suppress(OSError):  # (no route yet: the tunnel is coming up)
                s.send(data)
            end = min(now + wait, deadline)
            while (left := end - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    got = s.recv(64)
                except TimeoutError:
                    break
                except OSError:  # ICMP unreachable, reported on the connected socket
                    time.sleep(max(0.0, min(left, 0.05)))
                    continue
                try:
                    return parse(got)
                except natpmp.NatPmpError:
                    continue
            wait *= 2
    finally:
        s.close()


def map_port(gateway: str, f: Forward, proto: str, lifetime: int, suggested: int,
             timeout: float) -> natpmp.MapResponse:
    r = ask(gateway, natpmp.map_request(natpmp.MapRequest(proto, f.port, suggested, lifetime)),
            lambda b: natpmp.parse_map_response(b, proto), time.monotonic() + timeout)
    if not r.ok:
        raise Refused(f"{proto} mapping refused: {natpmp.result_text(r.result)}")
    return r


def public_address(gateway: str, timeout: float) -> str:
    r = ask(gateway, natpmp.address_request(), natpmp.parse_address_response,
            time.monotonic() + timeout)
    if r.result != natpmp.SUCCESS:
        raise Refused(f"address request refused: {natpmp.result_text(r.result)}")
    return r.address


def ask_timeout(f: Forward) -> float:
    """How long one ask may take: well inside half the lifetime (the renewal margin)."""
    return max(1.0, min(4.0, f.lifetime / 4))


class Renewer:
    """One VPN qube's NAT-PMP entries; `nft(commands)` changes its ruleset, `publish()`
    writes the state and the clients' files (both injected: the unit tests record them)."""

    def __init__(self, spec: RenewerSpec, state: ForwardState,
                 nft: Callable[[dict[str, Any]], None],
                 publish: Callable[[ForwardState], None],
                 mapper: Callable[..., natpmp.MapResponse] = map_port,
                 address: Callable[[str, float], str] = public_address) -> None:
        self.spec = spec
        self.nft = nft
        self.publish = publish
        self.mapper = mapper
        self.address = address
        have = {g.index: g for g in state.grants}
        self.grants: dict[int, Grant] = {}
        for f in spec.forwards:
            g = have.get(f.index)
            self.grants[f.index] = g if g is not None and g.qube == f.qube else Grant(
                f.index, f.qube, f.port, list(f.protos), f.public, static=not f.natpmp)
        self.next_at: dict[int, float] = {f.index: 0.0 for f in spec.forwards if f.natpmp}

    def state(self) -> ForwardState:
        return ForwardState([self.grants[i] for i in sorted(self.grants)])

    def step(self, now: float) -> float:
        """Ask for every entry that is due; returns the wall time of the next ask."""
        for f in self.spec.forwards:
            if f.natpmp and now >= self.next_at[f.index]:
                self.next_at[f.index] = self.renew(f, now)
        self.publish(self.state())
        return min(self.next_at.values(), default=now + 3600)

    def renew(self, f: Forward, now: float) -> float:
        g = self.grants[f.index]
        assert f.gateway is not None
        t = ask_timeout(f)
        try:
            addr = g.public_address or self.address(f.gateway, t)
            got = [self.mapper(f.gateway, f, p, f.lifetime, g.public_port or 0, t)
                   for p in f.protos]
        except (OSError, TimeoutError, Refused, natpmp.NatPmpError) as e:
            g = replace(g, error=str(e) or type(e).__name__)
            if g.public_port and g.expires_at is not None and now >= g.expires_at:
                self.nft({"nftables": set_commands(f, None)})  # expired: forward nothing
                g = replace(g, public_port=None, error=f"{g.error}; the grant expired, "
                            "nothing is forwarded")
            self.grants[f.index] = g
            return now + RETRY
        port, life = got[0].external, min(r.lifetime for r in got)
        if port != g.public_port or g.expires_at is None or now >= g.expires_at:
            # (an expired grant's set may be empty: put the port back in any case)
            elems = [{"concat": [r.proto, r.external]} for r in got]
            from netstack.rules.nft import set_commands as replace_set

            self.nft({"nftables": replace_set(f.set_name, elems)})
        self.grants[f.index] = replace(g, public_port=port, public_address=addr,
                                       lifetime=life, renewed_at=now,
                                       expires_at=now + life, renewals=g.renewals + 1,
                                       error=None)
        return now + max(1.0, life / 2)

    def release(self) -> None:
        """Give the mappings back (lifetime 0), best effort, quickly."""
        for f in self.spec.forwards:
            g = self.grants[f.index]
            if f.natpmp and g.public_port and f.gateway:
                for p in f.protos:
                    with contextlib.suppress(Exception):
                        self.mapper(f.gateway, f, p, 0, g.public_port, 0.3)


def publish_files(spec: RenewerSpec, st: ForwardState) -> None:
    """The state file (status reads it) and each client's directory (its sandbox binds
    it read-only at FORWARD_INSIDE; `exec` sets the variables of its `env`); a port no
    longer held leaves no file behind."""
    dirs, files = publication(spec, st)
    for d, mode in dirs:
        os.makedirs(d, mode=mode, exist_ok=True)
        os.chmod(d, mode)  # (whatever the umask)
    keep = {path for path, _t, _m in files}
    for d, _mode in dirs[2:]:
        for name in os.listdir(d):
            if os.path.join(d, name) not in keep and (name.startswith("port-")
                                                      or name == "address"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(d, name))
    for path, text, mode in files:
        codec.atomic_write(path, text, mode)


def main() -> None:
    spec = codec.read(sys.argv[1], RenewerSpec)
    from netstack.kernel import RealKernel

    k = RealKernel()  # this program's entry; already inside the VPN qube's namespace
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    r = Renewer(spec, read_state(spec.state_path) or ForwardState(),
                lambda c: k.nft(None, c), lambda st: publish_files(spec, st))
    while not stop.is_set():
        nxt = r.step(time.time())
        stop.wait(max(0.05, nxt - time.time()))
    r.release()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
