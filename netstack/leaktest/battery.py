"""`netstack leaktest`: the probe battery from a hostile workstation, captures on every link
of its chain and on the lab side, and a verdict per link from an allowlist of flows derived
from the recorded plan (never from the topology re-read another way)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netstack.errors import StateError, UsageError
from netstack.kernel import Kernel, proc_alive
from netstack.kinds.registry import RUNTIMES, SPECS
from netstack.leaktest import SCENARIOS
from netstack.leaktest.capture import Capture
from netstack.leaktest.catalogue import Case, Target, cases, stamp
from netstack.leaktest.endpoints import Timeline, VpnSource, source
from netstack.leaktest.prober import Prober, Sent
from netstack.model import Plan, QubeInfo
from netstack.processes import children, supervisor_pid
from netstack.rules.nft import commands
from netstack.state import State
from netstack.vpn.info import VpnInfo


@dataclass
class Link:
    name: str
    netns: str
    iface: str
    zone: str  # source | sibling | plain | tor-out | vpn-out | vpn-inner | lab-egress | lab-host
    capture: Capture | None = None
    packets: int = 0
    violations: list[str] = field(default_factory=list)


@dataclass
class Ctx:
    stack: str
    plan: Plan
    state: State
    ws: QubeInfo
    chain: list[QubeInfo]  # ws first, then its netvms up to sys-net
    protection: str  # tor | vpn | plain: the outermost protection of the workstation
    endpoints: set[tuple[str, str, int]]  # (ip, proto, port) of VPN transport
    relays: set[tuple[str, int]]
    exits: set[str]
    vpn_server: str | None
    kernel: Kernel
    # what each VPN qube's kill switch admitted over time (the live set, then its failover
    # history): `endpoints` is the union at the start, kept for the links it decides
    vpn: list[VpnSource] = field(default_factory=list)
    timelines: list[Timeline] = field(default_factory=list)

    def transport_at(self, t: float) -> set[tuple[str, str, int]]:
        """The VPN transport the kill switches admitted at wall-clock time t."""
        out: set[tuple[str, str, int]] = set()
        for tl in self.timelines:
            out |= tl.at(t)
        return out

    def servers(self) -> set[tuple[str, str, int]]:
        """Every server's transport of every VPN qube, whichever is current."""
        return {t for v in self.vpn for srv in v.servers for t in srv}

    def refresh_transport(self) -> None:
        """After a run: the failover swaps made during it join the timelines."""
        for v in self.vpn:
            v.refresh()
        self.timelines = [v.timeline() for v in self.vpn]


def _protection(q: QubeInfo) -> str | None:
    return q.traits.protection


def context(stack: str, ws_name: str | None, k: Kernel) -> Ctx:
    from netstack.stack import require

    st = require(stack)
    if st.data.status != "up":
        raise StateError(f"stack {stack!r} is not up; start it with `netstack --stack {stack} "
                         "up --lab`")
    plan = st.plan
    assert plan is not None
    apps = [q for q in plan.qubes if not q.traits.provides_network and not q.cut_off]
    if ws_name is None:
        if not apps:
            raise UsageError("the stack has no app qube with a netvm to probe from")
        ws = next((q for q in apps if any(_protection(x) == "tor"
                                          for x in plan.chain(q.name)[1:])), apps[0])
    elif not plan.has_qube(ws_name) or plan.qube(ws_name).traits.provides_network:
        raise UsageError(f"--qube {ws_name!r} is not an app qube of stack {stack!r}")
    elif plan.qube(ws_name).cut_off:
        raise UsageError(f"--qube {ws_name!r} has no netvm (cut off with `attach {ws_name} "
                         f"none`): nothing leaves it to test (fix: netstack --stack {stack} "
                         f"attach {ws_name} NETVM first)")
    else:
        ws = plan.qube(ws_name)
    chain = plan.chain(ws.name)
    kinds = {_protection(q) for q in chain[1:]}
    kind = "tor" if "tor" in kinds else "vpn" if "vpn" in kinds else "plain"
    # what the kill switches admit live, not what `up` resolved: a failover moves them
    vpn = [source(i, st.data.resolved.get(i.qube), k) for i in plan.infos(VpnInfo)]
    timelines = [v.timeline() for v in vpn]
    now = time.time()
    endpoints = {t for tl in timelines for t in tl.at(now)}
    lab = plan.lab
    relays = lab.relay_ports if lab else set()
    exits = lab.exits if lab else set()
    vs = lab.vpn_server.address if lab else None
    return Ctx(stack, plan, st, ws, chain, kind, endpoints, relays, exits, vs, k, vpn,
               timelines)


def target(ctx: Ctx) -> Target:
    gw = ctx.chain[1]
    siblings = tuple(c.ipv4 for c in gw.clients if c.name != ctx.ws.name)
    lab = ctx.plan.lab
    web = lab.hosts["web"].address if lab else "198.51.100.80"
    dns = lab.hosts["dns"].address if lab else "198.51.100.53"
    from netstack.addressing import qube_ipv6, qube_ll

    return Target(ctx.ws.ipv4, gw.ipv4, tuple(q.ipv4 for q in ctx.chain[2:]),
                  siblings, web, dns, f"web.{lab.domain if lab else 'lab.test'}",
                  ipv6=ctx.plan.ipv6, gateway6=gw.ipv6 or qube_ipv6(gw.ipv4),
                  ws6=ctx.ws.ipv6 or "", ws_ll=qube_ll(ctx.ws.ipv4) if ctx.plan.ipv6 else "")


def links(ctx: Ctx) -> list[Link]:
    """Every link of the workstation's chain, its siblings' links, the tunnels, and the
    lab side. The zone of a qube's uplink is set by the outermost tunnel at or below it."""
    out = [Link(f"{ctx.ws.name}:eth0", ctx.ws.netns, "eth0", "source")]
    on_chain = {q.name for q in ctx.chain}
    outer = "plain"
    for q in ctx.chain[1:]:
        outer = SPECS[q.kind].leak_zone(outer)
        tun = q.tunnel
        if tun:
            out.append(Link(f"{q.name}:{tun.dev}", q.netns, tun.dev, "vpn-inner"))
        name = "isp-link" if q.netvm is None else f"{q.name}:{q.upstream_if}"
        out.append(Link(name, q.netns, q.upstream_if, outer))
    for q in ctx.plan.qubes:
        if q.name not in on_chain and q.netvm in on_chain:
            out.append(Link(f"{q.name}:eth0", q.netns, "eth0", "sibling"))
    lab = ctx.plan.lab
    if lab and ctx.plan.uplink.mode == "lab":
        vs = lab.vpn_server
        if ctx.endpoints:
            out.append(Link("lab:vpn-server", vs.netns, vs.interface, "lab-egress"))
        for h in ("web", "dns", "sink"):
            if h in lab.hosts:
                out.append(Link(f"lab:{h}", lab.hosts[h].netns, "eth0", "lab-host"))
    # a tunnel device exists only while its daemon runs, and is up once configured (the
    # admin flag: the operstate of a fresh veth lags behind by up to a second)
    live = {(lk.netns, x.name) for lk in out for x in ctx.kernel.links(lk.netns)
            if x.flags & 0x1}
    return [lk for lk in out if (lk.netns, lk.iface) in live]


def flow_allowed(ctx: Ctx, zone: str, p: Any) -> bool:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6

    if zone in ("source", "sibling"):
        return True  # sibling: markers decide, nothing of the battery may show up there
    if IPv6 in p:
        import ipaddress

        from netstack.addressing import qube_ll

        own = {ctx.ws.ipv6, qube_ll(ctx.ws.ipv4)}
        if own & {p[IPv6].src, p[IPv6].dst}:
            return False  # the workstation's own IPv6 never appears beyond its link
        src, dst = ipaddress.ip_address(p[IPv6].src), ipaddress.ip_address(p[IPv6].dst)
        if ctx.plan.ipv6 and (src.is_link_local or src.is_unspecified) and (
                dst.is_link_local or (dst.is_multicast and (int(dst) >> 112) & 0xF == 2)):
            # a qube's own link-scope chatter (MLD, ND) on its own link; from "::" while an
            # interface is still checking its address (DAD), e.g. an MLD report right
            # after `up`
            return True
        # beyond a VPN or Tor gateway never; in a plain chain only with IPv6 on (masqueraded)
        return ctx.plan.ipv6 and zone == "plain"
    if IP not in p:
        return True  # ARP and friends: link-local by nature
    ip = p[IP]
    ends = {ip.src, ip.dst}
    if ctx.ws.ipv4 in ends:
        return False  # the workstation's own address never appears beyond its link
    sport = p[TCP].sport if TCP in p else p[UDP].sport if UDP in p else None
    dport = p[TCP].dport if TCP in p else p[UDP].dport if UDP in p else None
    proto = "tcp" if TCP in p else "udp" if UDP in p else None

    def transport() -> bool:
        """To a VPN server: only the transport its kill switch admitted at the packet's
        time. From one: any server the VPN qube knows (an old server retries to an
        endpoint it learned before a failover; what our side sends back is judged as
        "to")."""
        eps = ctx.transport_at(float(p.time))
        known = eps | ctx.servers()
        if any(ip.dst == a and proto == pr and dport == po for a, pr, po in eps) or any(
                ip.src == a and proto == pr and sport == po for a, pr, po in known):
            return True
        return icmp_error_about(lambda a, pr, po: (a, pr, po) in eps,
                                lambda a, pr, po: (a, pr, po) in known)

    def relay() -> bool:
        if TCP in p:
            return (ip.dst, dport) in ctx.relays or (ip.src, sport) in ctx.relays
        return icmp_error_about(lambda a, pr, po: pr == "tcp" and (a, po) in ctx.relays)

    def icmp_error_about(pred, pred_src=None) -> bool:
        """An ICMP error (a dead tunnel's "unreachable") quoting an allowed flow, whichever
        end of the quoted packet the allowed peer is (`pred_src`: the test when the peer
        sent the quoted packet, if it differs)."""
        from scapy.layers.inet import ICMP, IPerror, TCPerror, UDPerror

        if ICMP not in p or p[ICMP].type not in (3, 11) or IPerror not in p:
            return False
        q = p[IPerror]
        inner = p.getlayer(TCPerror) or p.getlayer(UDPerror)
        if inner is None:
            return False
        pr = "tcp" if TCPerror in p else "udp"
        return pred(q.dst, pr, inner.dport) or (pred_src or pred)(q.src, pr, inner.sport)

    if zone == "sibling":
        return True  # markers decide: nothing of the battery may show up here
    if zone == "plain":
        return True  # masqueraded legit traffic; markers of blocked cases decide
    if zone == "tor-out":
        return relay() if ctx.relays else TCP in p
    if zone == "vpn-out":
        return transport()
    if zone == "vpn-inner":
        return relay() if ctx.protection == "tor" and ctx.relays else True
    if zone == "lab-egress":
        if transport():
            return True
        if ctx.protection == "tor":
            return relay()
        return ctx.vpn_server in ends
    if zone == "lab-host":
        if ctx.protection == "tor":
            return bool(ends & ctx.exits)
        if ctx.protection == "vpn":
            return ctx.vpn_server in ends
        return True
    return False


@dataclass(frozen=True)
class Fault:
    """A protection broken on purpose (test helpers only: tests/integration/faults.py).
    `inject` breaks it and returns the function that repairs it."""

    name: str
    inject: Callable[[Ctx], Callable[[], None]]


@dataclass
class Report:
    stack: str
    workstation: str
    chain_kind: str
    scenario: str
    fault: str | None
    pcaps: str
    seconds: float
    packets_sent: int
    cases: list[dict[str, Any]]
    links: list[dict[str, Any]]
    leaks: int
    errors: list[str] = field(default_factory=list)  # why the run proves nothing

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run(stack: str, ws_name: str | None = None, scenario: str = "steady",
        fault: Fault | None = None, pcaps_dir: str | None = None, *, kernel: Kernel
        ) -> Report:
    if scenario not in SCENARIOS:
        raise UsageError(f"--scenario {scenario!r}: use one of {', '.join(SCENARIOS)}")
    return _run(context(stack, ws_name, kernel), scenario, fault, pcaps_dir)


def _run(ctx: Ctx, scenario: str, fault: Fault | None, pcaps_dir: str | None) -> Report:
    stack = ctx.stack
    t0 = time.monotonic()
    run_id = secrets.token_hex(3)
    stamp_ = time.strftime("%Y%m%d-%H%M%S")
    base = pcaps_dir or os.path.join(os.getcwd(), "pcaps")
    out_dir = os.path.join(base, f"{stamp_}-{stack}-{scenario}"
                                 f"{'-' + fault.name if fault else ''}")
    os.makedirs(out_dir, exist_ok=True)
    cs = stamp(cases(target(ctx)), run_id)
    lks = links(ctx)
    prober = Prober(ctx.ws.netns)
    restore: list = []
    sent: dict[str, Sent] = {}  # marker -> what the sender confirmed
    local_results: list = []  # the local channels (netstack.leaktest.local)
    call_results: list | None = None  # the call socket (netstack.leaktest.callcheck)
    after_down: set[str] = set()  # cases sent while `down` tore the stack away
    try:
        for lk in lks:
            lk.capture = Capture(lk.netns, lk.iface,
                                 os.path.join(out_dir, lk.name.replace(":", "_") + ".pcap"))
            lk.capture.start()
        if fault:
            restore.append(fault.inject(ctx))
        with _scenario(ctx, scenario):
            downer = None
            # raw probes first, real clients last: a client's request completes end to end,
            # so by then every earlier probe has reached as far as it ever will
            for i, c in enumerate(sorted(cs, key=lambda c: c.tool is not None)):
                if scenario == "down" and i == len(cs) // 3:
                    # `netstack down` while probes run: daemons die, namespaces go away
                    # (ours stay alive only as long as a capture or the prober is inside)
                    from netstack.reconcile import teardown

                    downer = threading.Thread(target=teardown,
                                              args=(ctx.state, ctx.kernel.fork()))
                    downer.start()
                if downer:
                    after_down.add(c.marker)
                if c.packets:
                    sent[c.marker] = prober.send(c.packets)
                if c.tool:
                    sent[c.marker] = _run_tool(ctx, c.tool)
            if downer:
                downer.join()
            elif ctx.ws.traits.sandboxed:
                from netstack.leaktest import local

                fwd = (local.Forward(ctx.plan.net.netns, ctx.plan.upstream_dns[0])
                       if ctx.plan.lab else None)  # a real host's resolver is never asked
                others = tuple(q.name for q in ctx.plan.qubes if q.name != ctx.ws.name
                               and q.traits.sandboxed)[:2]  # ids must differ
                local_results = local.run(ctx.kernel, ctx.stack, ctx.ws.name, ctx.ws.netns,
                                          fwd, others)
                from netstack.leaktest import callcheck

                # the call layer's daemon is a thread of the supervisor, which a scenario
                # holds stopped (so nothing restarts what it killed): steady runs only
                if scenario == "steady":
                    call_results = callcheck.run(ctx.kernel, ctx.stack, ctx.ws.name)
            time.sleep(0.1)  # tcpdump drains its socket buffer to the pcap before SIGINT
    finally:
        prober.close()
        for lk in lks:
            if lk.capture:
                lk.capture.stop()
        for r in reversed(restore):
            r()
    r = _verdict(ctx, cs, lks, scenario, fault.name if fault else None, out_dir, sent,
                 after_down, time.monotonic() - t0)
    _add_local(r, local_results)
    if call_results:  # (no other app qube: no call to try)
        _add_calls(r, call_results)
    return r


def _add_local(r: Report, results: list) -> None:
    """One row per local channel and account: LEAK names what was reachable."""
    from netstack.leaktest.local import CHECKS

    for res in results:
        for check, what in CHECKS.items():
            name = f"local-{check}" + ("-root" if res.who == "root" else "")
            leak = res.leaks.get(check)
            verdict = "ERROR" if res.error else "LEAK" if leak else "ok"
            r.cases.append({"case": name, "property": f"no way around the chain: {what}",
                            "marker": "", "planned": 1, "sent": 0 if res.error else 1,
                            "send_errors": [res.error] if res.error else [],
                            "after_down": False, "seen_on": [],
                            "leaked_on": [leak] if leak else [], "verdict": verdict})
            r.leaks += 1 if leak else 0
        if res.error:
            r.errors.append(f"local channels as {res.who}: {res.error}")


def _add_calls(r: Report, results: list) -> None:
    """One row for the call socket: LEAK when a call the policy does not allow arrived."""
    leaks = [x.leak for x in results if x.leak]
    errors = [f"{x.target}: {x.error}" for x in results if x.error]
    verdict = "LEAK" if leaks else "ERROR" if errors else "ok"
    r.cases.append({"case": "local-call", "property": "no way around the chain: a call the "
                    "policy does not allow reaches another qube (qubes.Filecopy through the "
                    "call socket)", "marker": "", "planned": len(results),
                    "sent": sum(1 for x in results if not x.error and "not tried" not in x.note),
                    "send_errors": errors, "after_down": False, "seen_on": [],
                    "leaked_on": leaks, "verdict": verdict,
                    "targets": {x.target: x.note for x in results}})
    r.leaks += len(leaks)
    r.errors += [f"the call socket: {e}" for e in errors]


def _run_tool(ctx: Ctx, tool: list[str]) -> Sent:
    """A real client counts as sent once it ran inside the workstation (its request may
    well be refused: that is what the case looks at)."""
    if not ctx.kernel.netns_exists(ctx.ws.netns):
        return Sent(0, ["the workstation's namespace is gone"])
    try:
        p = subprocess.run(["ip", "netns", "exec", ctx.ws.netns, *tool],
                           capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return Sent(1)
    if p.returncode in (126, 127):  # not found / not executable: it never ran
        return Sent(0, [f"{tool[0]} did not run: {p.stderr.decode(errors='replace').strip()}"])
    return Sent(1)


def _verdict(ctx: Ctx, cs: list[Case], lks: list[Link], scenario: str, fault: str | None,
             out_dir: str, sent: dict[str, Sent], after_down: set[str],
             secs: float) -> Report:
    seen: dict[str, list[str]] = {c.marker: [] for c in cs}
    leaked: dict[str, list[str]] = {c.marker: [] for c in cs}
    legit = {c.marker: ctx.protection in c.legit for c in cs}
    ctx.refresh_transport()
    unattributed = 0
    for lk in lks:
        assert lk.capture is not None
        pkts = lk.capture.packets()
        lk.packets = len(pkts)
        for p in pkts:
            raw = bytes(p)
            mk = next((m for m in seen if m.encode() in raw), None)
            ok = flow_allowed(ctx, lk.zone, p)
            if mk:
                if lk.name not in seen[mk]:
                    seen[mk].append(lk.name)
                if lk.zone != "source" and (not ok or not legit[mk]) \
                        and lk.name not in leaked[mk]:
                    leaked[mk].append(lk.name)
                    lk.violations.append(f"{mk}: {p.summary()}")
            elif not ok:
                unattributed += 1
                lk.violations.append(p.summary())
    errors: list[str] = []
    control: dict[str, str] = {}
    for c in cs:
        if c.control == "nd-reply":  # a bare message, found by what it asks, not a marker
            asked, got = _nd_seen(lks, target(ctx).gateway6)
            if asked:
                seen[c.marker].append(next(lk.name for lk in lks if lk.zone == "source"))
            if got and not ctx.plan.ipv6:
                leaked[c.marker].append(f"{lks[0].name} (the gateway speaks IPv6)")
            elif not got and ctx.plan.ipv6:
                control[c.marker] = "BLIND"
                errors.append(f"{c.name}: no answer from the gateway with IPv6 on: the IPv6 "
                              "cases prove nothing")
    src = next(lk.name for lk in lks if lk.zone == "source")
    for c in cs:  # a case proves something only if its probes really left
        why = unproven(c, sent.get(c.marker, Sent(0, ["never sent"])), src in seen[c.marker])
        if why and c.marker not in after_down:
            control.setdefault(c.marker, "ERROR")
            errors.append(f"{c.name}: {why}: the case proves nothing")
    case_rows = [{"case": c.name, "property": c.property, "marker": c.marker,
                  "planned": len(c.packets) + (1 if c.tool else 0),
                  "sent": sent[c.marker].sent if c.marker in sent else 0,
                  "send_errors": sent[c.marker].failed if c.marker in sent else [],
                  "after_down": c.marker in after_down,
                  "seen_on": seen[c.marker], "leaked_on": leaked[c.marker],
                  "verdict": "LEAK" if leaked[c.marker] else control.get(c.marker, "ok")}
                 for c in cs]
    link_rows = [{"link": lk.name, "netns": lk.netns, "interface": lk.iface, "zone": lk.zone,
                  "packets": lk.packets, "violations": lk.violations[:20],
                  "violation_count": len(lk.violations),
                  "pcap": lk.capture.path if lk.capture else None,
                  "verdict": "LEAK" if lk.violations and lk.zone != "source" else "ok"}
                 for lk in lks]
    leaks = sum(1 for r in case_rows if r["leaked_on"]) + unattributed
    return Report(ctx.stack, ctx.ws.name, ctx.protection, scenario, fault, out_dir,
                  round(secs, 2), sum(s.sent for s in sent.values()), case_rows, link_rows,
                  leaks, errors)


def unproven(c: Case, s: Sent, seen_at_source: bool) -> str | None:
    """Why a case's probes prove nothing, or None: the sender did not confirm every packet,
    or a marked probe it confirmed never showed up on the workstation's own link (then the
    captures further up cannot have seen it either)."""
    planned = len(c.packets) + (1 if c.tool else 0)
    if s.sent < planned or s.failed:
        return (f"{planned - s.sent} of {planned} probes not sent"
                + (f" ({'; '.join(s.failed[:2])})" if s.failed else ""))
    bare = all(p.get("bare") for p in c.packets) if c.packets else True
    if not bare and not seen_at_source:
        return "the sender confirmed its probes but the workstation's link never carried them"
    return None


def _nd_seen(lks: list[Link], target_addr: str) -> tuple[bool, bool]:
    """(the solicitation for the gateway's address left, its advertisement came back) on
    the workstation's link."""
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS

    src = next(lk for lk in lks if lk.zone == "source")
    assert src.capture is not None
    pkts = src.capture.packets()
    return (any(ICMPv6ND_NS in p and p[ICMPv6ND_NS].tgt == target_addr for p in pkts),
            any(ICMPv6ND_NA in p and p[ICMPv6ND_NA].tgt == target_addr for p in pkts))


def _daemons(ctx: Ctx, protection: str) -> list[str]:
    """Names of the daemons of the chain's qubes with this protection (vpn/tor)."""
    nss = {q.netns for q in ctx.chain if _protection(q) == protection}
    return [d.name for d in ctx.plan.daemons if d.netns in nss]


@contextlib.contextmanager
def hold_dead(ctx: Ctx, protection: str):
    """Kill a chain's tunnel or Tor daemon and keep it dead (the supervisor paused) while
    the body runs."""
    names_ = _daemons(ctx, protection)
    kids = {n: c for n, c in children(ctx.state).items() if n in names_}
    if not kids:
        raise UsageError(f"this stack runs no {protection} daemon")
    sup = supervisor_pid(ctx.state)
    assert sup is not None
    os.kill(sup, signal.SIGSTOP)
    try:
        for c in kids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)
        end = time.monotonic() + 5
        while any(proc_alive(c.pid, c.start) for c in kids.values()):
            if time.monotonic() > end:
                break
            time.sleep(0.01)
        # A kernel WireGuard device outlives its keeper: the keeper's post-start hook (not
        # paused) deletes it when the keeper exits. Until it is gone the tunnel still
        # carries traffic, and the scenario would not be the one it names.
        devs = [(q.netns, q.tunnel.dev) for q in ctx.chain
                if _protection(q) == protection and q.tunnel is not None]
        while any(x.name == dev for ns, dev in devs for x in ctx.kernel.links(ns)):
            if time.monotonic() > end:
                break
            time.sleep(0.01)
        yield
    finally:
        os.kill(sup, signal.SIGCONT)
        _wait_restarted(ctx, {n: c.pid for n, c in kids.items()})


def _wait_restarted(ctx: Ctx, old: dict[str, int], timeout: float = 60) -> None:
    """After a scenario, the chain is whole again before anything else runs: each daemon
    has a new pid and, where it has a post-start hook, reported itself configured."""
    hooked = {d.name for d in ctx.plan.daemons if d.post_start}
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        kids = children(ctx.state)
        if all(n in kids and kids[n].pid != pid and proc_alive(kids[n].pid, None)
               and (kids[n].configured or n not in hooked)
               for n, pid in old.items()):
            return
        time.sleep(0.05)


@contextlib.contextmanager
def _scenario(ctx: Ctx, scenario: str):
    if scenario in ("steady", "down"):
        yield
    elif scenario == "vpn-killed":
        with hold_dead(ctx, "vpn"):
            yield
    elif scenario == "tor-killed":
        with hold_dead(ctx, "tor"):
            yield
    elif scenario == "firewall-reload":
        stop = threading.Event()
        targets = [n for n in ctx.plan.namespaces if n.qube and n.ruleset
                   and n.qube != ctx.ws.name]
        k = ctx.kernel.fork()  # this thread's own handles

        def loop() -> None:
            while not stop.is_set():
                for n in targets:
                    k.nft(n.name, commands(n.ruleset or {}))

        th = threading.Thread(target=loop, daemon=True)
        th.start()
        try:
            yield
        finally:
            stop.set()
            th.join()
            k.close()
            reload_runtime(ctx)


def reload_runtime(ctx: Ctx) -> None:
    """After full reloads: each role restores what it fills at run time."""
    for q in ctx.plan.qubes:
        RUNTIMES[q.kind].after_reload(q, ctx.kernel, ctx.state)


