"""The lab's first vote, released when every relay is in: a post-start hook of the lab's
first authority (the lab's private Tor network only; the supervisor runs it).

The lab's authorities start with their first vote held (network.HOLD_VOTING_INTERVAL).
This waits until every authority's control port lists the descriptor of every node that
publishes one, then moves all of them at once to the 5-s schedule with a valid-after time
RELEASE_LEAD_S ahead. So the first consensus lists the exits and guards: a first consensus
made at a fixed time after the torrc missed relays whose descriptors came late (the gateway
then found no exits and was ready only after its own refetch, 6-12 s later), and under load
the authorities could disagree on the first valid-after time (docs/field-notes.md, "The
first consensus")."""

from __future__ import annotations

import argparse
import math
import sys
import time

from netstack.tor.control import connect
from netstack.tor.network import HOLD_VOTING_INTERVAL, INITIAL_VOTING_INTERVAL

# tor votes at V-2 on a 5-s schedule (its delays shrink to a quarter of the interval):
# V at least this far ahead leaves 0.7 s to move the three authorities before the first vote
RELEASE_LEAD_S = 2.7
WAIT_S = 20.0  # then the vote is released with what is there (a loaded host, a dead relay)
POLL_S = 0.1
PUBLISH_WAIT_S = 30.0  # for the first consensus after the release (then the clients' own
# schedule fetches it)
NUDGE_WAIT_S = 15.0  # a told client's control connection (and its RESOLVE) stays this long


def release_time(now: float) -> tuple[int, int]:
    """(valid-after time V, TestingV3AuthVotingStartOffset) of a release at `now`: tor's
    schedule is the grid of INITIAL_VOTING_INTERVAL from midnight UTC (a multiple of it)
    plus the offset, and an authority votes for the first grid time after its clock."""
    v = math.ceil(now + RELEASE_LEAD_S)
    return v, v % INITIAL_VOTING_INTERVAL


def published(c) -> set[str]:
    """Nicknames of the router descriptors an authority holds."""
    text = c.get_info("desc/all-recent", "")
    return {x.split()[1] for x in text.splitlines() if x.startswith("router ")}


def _log(t0: float, msg: str) -> None:
    print(f"firstvote +{time.monotonic() - t0:.2f}s: {msg}", file=sys.stderr, flush=True)


def release(auths: list[str], expect: set[str], wait_s: float = WAIT_S) -> int | None:
    """Wait (at most wait_s) for every authority to hold every expected descriptor, then
    move the held ones to the 5-s schedule. Returns the valid-after time, or None when
    nothing was held (released already: this authority restarted into a running network,
    it joins the others' grid)."""
    t0 = time.monotonic()
    end = t0 + wait_s
    ctrls = [connect(s, timeout=max(1.0, end - time.monotonic())) for s in auths]
    try:
        held = [c for c in ctrls if int(c.get_conf("TestingV3AuthInitialVotingInterval"))
                == HOLD_VOTING_INTERVAL]
        running = [c for c in ctrls if c not in held]
        if running:  # a restart: the others vote already; the held one joins their grid
            off = running[0].get_conf("TestingV3AuthVotingStartOffset")
            for c in held:
                c.set_options({"TestingV3AuthInitialVotingInterval":
                               str(INITIAL_VOTING_INTERVAL),
                               "TestingV3AuthVotingStartOffset": off})
            _log(t0, f"{len(held)} held authority joined the running schedule (offset {off})")
            return None
        seen: dict[str, float] = {}
        while True:
            missing = set()
            for c in ctrls:
                missing |= expect - published(c)
            now = time.monotonic()
            for n in sorted(expect - missing - set(seen)):
                seen[n] = now - t0
            if not missing or now > end:
                break
            time.sleep(POLL_S)
        _log(t0, "descriptors at every authority: " + ", ".join(
            f"{n} +{s:.2f}s" for n, s in sorted(seen.items(), key=lambda x: x[1])) +
            (f"; still missing after {wait_s:.0f} s: {', '.join(sorted(missing))}"
             if missing else ""))
        v, off = release_time(time.time())
        for c in ctrls:
            c.set_options({"TestingV3AuthInitialVotingInterval": str(INITIAL_VOTING_INTERVAL),
                           "TestingV3AuthVotingStartOffset": str(off)})
        _log(t0, f"first vote released: valid-after {_iso(v)} (offset {off})")
        return v
    finally:
        for c in ctrls:
            c.close()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def nudge_clients(auths: list[str], v: int, clients: list[str],
                  wait_s: float = PUBLISH_WAIT_S) -> int:
    """Once every authority has published the consensus of valid-after `v`, make each lab
    client (a lab gateway) that has no consensus yet fetch it now. A client that met 404s
    before the first consensus backs off (at random, up to 3 times its last delay, no cap)
    and fetched it up to 6 s late; an application request while it lacks directory
    information and has no directory fetch under way makes tor retry its fetches at once
    (circuituse.c), and a controller's RESOLVE is one (docs/field-notes.md, "The first
    consensus"). SIGNAL RELOAD retries too, but reopens the ControlSocket and cuts every
    control connection (the gateway's monitor, a `netstack up` waiting for 100 %).
    Returns the RESOLVEs sent."""
    from stem.control import EventType

    from netstack.addressing import LAB_DOMAIN
    from netstack.tor.control import bootstrap_phase

    t0 = time.monotonic()
    cs = [connect(a, timeout=wait_s) for a in auths]
    try:  # each publishes at V by its own clock and loop: a fetch before that meets a 404
        while any(c.get_info("consensus/valid-after", "") < _iso(v) for c in cs):
            if time.monotonic() - t0 > wait_s:
                _log(t0, f"no consensus of {_iso(v)} within {wait_s:.0f} s; clients not told")
                return 0
            time.sleep(POLL_S)
    finally:
        for c in cs:
            c.close()
    _log(t0, f"consensus {_iso(v)} published by every authority")
    sent = 0
    gs = [connect(s, timeout=1.0) for s in clients]
    try:
        for g in gs:
            # the answer comes as an ADDRMAP event (tor warns when nobody listens)
            g.add_event_listener(lambda _e: None, EventType.ADDRMAP)
            if bootstrap_phase(g)[0] < 40:  # below loading_keys: no consensus yet
                # one is enough: tor retries its pending stream, and with it the fetches,
                # until it has circuits; kept open (with its stream) until then
                g.msg(f"RESOLVE web.{LAB_DOMAIN}")  # a lab name, resolved by a lab exit
                sent += 1
        end = time.monotonic() + NUDGE_WAIT_S
        while any(bootstrap_phase(g)[0] < 40 for g in gs) and time.monotonic() < end:
            time.sleep(POLL_S)
    finally:
        for g in gs:
            g.close()
    _log(t0, f"RESOLVEs sent: {sent}; every client has a consensus" if sent else
         "every client had a consensus already")
    return sent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netstack.tor.firstvote")
    ap.add_argument("--auth", action="append", default=[], help="an authority's ControlSocket")
    ap.add_argument("--expect", action="append", default=[], help="a node's nickname")
    ap.add_argument("--client", action="append", default=[],
                    help="a lab client's (gateway's) ControlSocket")
    ap.add_argument("--wait", type=float, default=WAIT_S)
    a = ap.parse_args(argv)
    try:
        v = release(a.auth, set(a.expect), a.wait)
        if v is not None and a.client:
            nudge_clients(a.auth, v, a.client)
    except Exception as e:  # noqa: BLE001 - stem's errors too (tor went away mid-query)
        # exit 0 all the same: a failing hook ends the authority (the supervisor restarts
        # it), and the held schedule votes within HOLD_VOTING_INTERVAL s anyway
        print(f"firstvote: not released: {e}", file=sys.stderr, flush=True)
        return 0
    print("configured", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
