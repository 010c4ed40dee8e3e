"""Which VPN transport the kill switch admitted at each moment of a leaktest run.

The verdict on an uplink may not use the transport the plan or `up` resolved: a VPN qube
with several servers moves its kill switch to the next one (netstack.vpn.failover), before
the run or during it (a killed tunnel stays silent long enough to trigger one). What the
kernel admitted at a packet's time is the endpoint set in force then: the live set read at
the start of the run, then each swap the failover history records with its wall-clock times
(the same clock as a capture's timestamps). Anything else is a leak; a set or history that
cannot be read stops the run (CannotCheck) instead of guessing."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from netstack.errors import CannotCheck, NetstackError
from netstack.vpn.failover import ServerState, Switch
from netstack.vpn.info import ENDPOINT_SET, ENDPOINT_SET6, Transport, VpnInfo, transport

INF = math.inf


@dataclass(frozen=True)
class Span:
    """From `start` to `end` (wall-clock seconds, both included) the kill switch admitted
    `allowed`. A swap span covers one nft transaction whose instant inside it is unknown:
    both servers' transport is admitted there."""

    start: float
    end: float
    allowed: frozenset[Transport]
    swap: bool = False


@dataclass(frozen=True)
class Timeline:
    spans: tuple[Span, ...]

    def at(self, t: float) -> frozenset[Transport]:
        """The transport the kill switch admitted at time t (empty: none)."""
        out: frozenset[Transport] = frozenset()
        for s in self.spans:
            if s.start <= t <= s.end:
                out |= s.allowed
        return out


def timeline(servers: list[set[Transport]], current: int, history: list[Switch],
             live: set[Transport] | None = None, live_at: float | None = None) -> Timeline:
    """Pure: the endpoint set in force over time, from each server's transport (index ->
    triples), the current index, the failover history (`from`, `to`, `swap_start`,
    `swap_end`) and the live set read at `live_at`. Where two sources disagree the
    intersection is kept (fail closed): a history whose `from` is not the previous `to`,
    a current server that is not the last `to`, a live set that lacks what the history
    says."""

    def srv(i: Any) -> frozenset[Transport]:
        return frozenset(servers[i]) if isinstance(i, int) and 0 <= i < len(servers) \
            else frozenset()

    spans: list[Span] = []
    before = -INF
    prev = None
    for h in sorted(history, key=lambda h: h.swap_start):
        start, end = h.swap_start, h.swap_end
        held = srv(h.from_) if prev is None else srv(prev) & srv(h.from_)
        spans.append(Span(before, start, held))
        spans.append(Span(start, end, srv(h.from_) | srv(h.to), swap=True))
        before, prev = end, h.to
    last = srv(current) if prev is None else srv(prev) & srv(current)
    spans.append(Span(before, INF, last))
    if live is not None and live_at is not None:
        spans = [Span(s.start, s.end, s.allowed & frozenset(live), s.swap)
                 if not s.swap and s.start <= live_at <= s.end else s for s in spans]
    return Timeline(tuple(spans))


@dataclass
class VpnSource:
    """One VPN qube's inputs to its timeline: its servers' transport (from the plan and
    what `up` resolved), the live set at the start of the run, and the failover state then
    (re-read after the run for the swaps made during it)."""

    qube: str
    netns: str
    servers: list[set[Transport]]
    server_file: str | None  # None: a single server, nothing ever swaps
    current: int
    history: list[Switch]
    live: set[Transport]
    live_at: float

    def timeline(self) -> Timeline:
        return timeline(self.servers, self.current, self.history, self.live, self.live_at)

    def refresh(self) -> None:
        """Pick up the swaps made since the start. A file gone by now (`down` during the
        run) keeps the start's state: a later swap's transport then counts as a leak."""
        if self.server_file is None:
            return
        try:
            got = read_server_state(self.server_file, self.qube)
        except CannotCheck:
            return
        if got is not None:
            self.current, self.history = got


def read_server_state(path: str, qube: str) -> tuple[int, list[Switch]] | None:
    """(current index, history) from `vpn-QUBE.server`; None when it does not exist yet
    (the watcher starts on the first server). A damaged file is CannotCheck: which server
    the kill switch admits is then unknown."""
    from netstack import codec

    try:
        st = codec.read(path, ServerState)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, NetstackError) as e:
        raise CannotCheck(f"cannot read which server VPN qube {qube} uses ({path}: "
                          f"{str(e).splitlines()[0][:120]}); fix: `netstack down` and `up` "
                          "again") from None
    return st.current, list(st.history)


def live_set(ruleset: dict[str, Any]) -> tuple[bool, set[Transport]]:
    """(found, elements) of the endpoint sets in a listed ruleset."""
    found, out = False, set()
    for item in ruleset.get("nftables", []):
        s = item.get("set")
        if s and s.get("table") in (None, "netstack") and s["name"] in (ENDPOINT_SET,
                                                                         ENDPOINT_SET6):
            found = True
            for e in s.get("elem", []):
                c = e.get("concat") if isinstance(e, dict) else None
                if c and len(c) == 3:
                    out.add((str(c[0]), str(c[1]), int(c[2])))
    return found, out


def source(info: VpnInfo, resolved: dict[str, list[str]] | None, k: Any) -> VpnSource:
    """A VPN qube's timeline inputs at the start of a run (the kernel read now)."""
    n = max(1, len(info.servers))
    servers = [set(transport(info.server(i), resolved)) for i in range(n)]
    current, history, server_file = 0, [], None
    if len(info.servers) > 1:
        server_file = info.server_file
        got = read_server_state(server_file, info.qube)
        if got is not None:
            current, history = got
    try:
        found, live = live_set(k.nft_list(info.netns))
    except Exception as e:  # noqa: BLE001 - any failure to read means: cannot check
        raise CannotCheck(f"cannot read the kill switch of VPN qube {info.qube} (namespace "
                          f"{info.netns}: {str(e).splitlines()[0][:120] if str(e) else e!r})"
                          "; fix: `netstack status` shows what is wrong, `down` and `up` "
                          "repair it") from None
    if not found:
        raise CannotCheck(f"VPN qube {info.qube} has no set {ENDPOINT_SET} in table inet "
                          f"netstack of {info.netns}: its kill switch is not netstack's; fix:"
                          " `netstack down` and `up` again")
    return VpnSource(info.qube, info.netns, servers, server_file, current, history, live,
                     time.time())
