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
from dataclasses import dataclass, field
from typing import Any

from netstack import netns
from netstack.errors import StateError, UsageError
from netstack.leaktest.capture import Capture
from netstack.leaktest.catalogue import Case, Target, cases, stamp
from netstack.leaktest.prober import Prober
from netstack.state import State, proc_alive

SCENARIOS = ("steady", "vpn-killed", "tor-killed", "firewall-reload", "down")
FAULTS = ("gateway-redirect-only", "no-kill-switch", "no-antispoof", "ipv6-allowed")


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
    plan: dict[str, Any]
    state: State
    ws: dict[str, Any]
    chain: list[dict[str, Any]]  # ws first, then its netvms up to sys-net
    kind: str  # tor | vpn | plain: the outermost protection of the workstation
    endpoints: set[tuple[str, str, int]]  # (ip, proto, port) of VPN transport
    relays: set[tuple[str, int]]
    exits: set[str]
    vpn_server: str | None
    tunnel_addrs: set[str]


def context(stack: str, ws_name: str | None) -> Ctx:
    st = State.load(stack)
    if st is None or st.data.get("status") != "up":
        raise StateError(f"stack {stack!r} is not up; start it with `netstack --stack {stack} "
                         "up --lab`")
    plan = st.data["plan"]
    qubes = {q["name"]: q for q in plan["qubes"]}
    apps = [q for q in plan["qubes"] if q["kind"] == "app"]
    if ws_name is None:
        if not apps:
            raise UsageError("the stack has no app qube to probe from")
        ws = next((q for q in apps if any(qubes[x]["kind"] == "tor" for x in _up(qubes, q))),
                  apps[0])
    elif ws_name not in qubes or qubes[ws_name]["kind"] != "app":
        raise UsageError(f"--qube {ws_name!r} is not an app qube of stack {stack!r}")
    else:
        ws = qubes[ws_name]
    chain = [ws] + [qubes[x] for x in _up(qubes, ws)]
    kinds = [q["kind"] for q in chain[1:]]
    kind = "tor" if "tor" in kinds else "vpn" if "vpn" in kinds else "plain"
    resolved = st.data.get("vpn_resolved") or {}
    endpoints = set()
    for v in plan.get("vpns", []):
        for e in v["endpoints"]:
            for ip in resolved.get(v["qube"], {}).get(e["host"], []):
                endpoints.add((ip, e["proto"], e["port"]))
    lab = plan.get("lab") or {}
    nodes = lab.get("tor_nodes") or {}
    relays = {(n["address"], p) for n in nodes.values() for p in (n["or_port"], n["dir_port"])}
    exits = {n["address"] for n in nodes.values() if n["role"] == "exit"}
    vs = (lab.get("vpn_server") or {}).get("address")
    tun = {a.split("/")[0] for v in plan.get("vpns", []) for a in v["tunnel_addresses"]}
    tun |= {"10.67.0.2"} if any(v["type"] == "openvpn" for v in plan.get("vpns", [])) else set()
    return Ctx(stack, plan, st, ws, chain, kind, endpoints, relays, exits, vs, tun)


def _up(qubes: dict[str, Any], q: dict[str, Any]) -> list[str]:
    out = []
    while q["netvm"]:
        out.append(q["netvm"])
        q = qubes[q["netvm"]]
    return out


def target(ctx: Ctx) -> Target:
    gw = ctx.chain[1]
    siblings = tuple(q["ipv4"] for q in ctx.plan["qubes"]
                     if q["netvm"] == gw["name"] and q["name"] != ctx.ws["name"])
    lab = ctx.plan.get("lab") or {}
    hosts = lab.get("hosts") or {}
    web = (hosts.get("web") or {}).get("address", "198.51.100.80")
    dns = (hosts.get("dns") or {}).get("address", "198.51.100.53")
    return Target(ctx.ws["ipv4"], gw["ipv4"], tuple(q["ipv4"] for q in ctx.chain[2:]),
                  siblings, web, dns, f"web.{lab.get('domain', 'lab.test')}")


def links(ctx: Ctx) -> list[Link]:
    """Every link of the workstation's chain, its siblings' links, the VPN tunnel, and the
    lab side. The zone of a qube's uplink is set by the outermost tunnel at or below it."""
    out = [Link(f"{ctx.ws['name']}:eth0", ctx.ws["netns"], "eth0", "source")]
    on_chain = {q["name"] for q in ctx.chain}
    outer = "plain"
    for q in ctx.chain[1:]:
        if q["kind"] == "tor" and outer == "plain":
            outer = "tor-out"
        if q["kind"] == "vpn":
            outer = "vpn-out"
            v = next(v for v in ctx.plan["vpns"] if v["qube"] == q["name"])
            out.append(Link(f"{q['name']}:{v['dev']}", q["netns"], v["dev"], "vpn-inner"))
        iface = "uplink" if q["kind"] == "net" else "eth0"
        name = "isp-link" if q["kind"] == "net" else f"{q['name']}:{iface}"
        out.append(Link(name, q["netns"], iface, outer))
    for q in ctx.plan["qubes"]:
        if q["name"] not in on_chain and q["netvm"] in on_chain:
            out.append(Link(f"{q['name']}:eth0", q["netns"], "eth0", "sibling"))
    lab = ctx.plan.get("lab")
    if lab and ctx.plan.get("uplink", {}).get("mode") == "lab":
        vs = lab.get("vpn_server")
        if vs and ctx.endpoints:
            out.append(Link("lab:vpn-server", vs["netns"], vs["interface"], "lab-egress"))
        for h in ("web", "dns"):
            out.append(Link(f"lab:{h}", lab["hosts"][h]["netns"], "eth0", "lab-host"))
    return [lk for lk in out if netns.exists(lk.netns) and _has_link(lk.netns, lk.iface)]


def _has_link(ns: str, iface: str) -> bool:
    """A tunnel device exists only while its daemon runs."""
    return subprocess.run(["ip", "-n", ns, "link", "show", "dev", iface],
                          capture_output=True).returncode == 0


def _flow_allowed(ctx: Ctx, zone: str, p: Any) -> bool:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6

    if zone == "source":
        return True
    if IPv6 in p:
        return False  # IPv6 is off everywhere beyond the workstation
    if IP not in p:
        return True  # ARP and friends: link-local by nature
    ip = p[IP]
    ends = {ip.src, ip.dst}
    if ctx.ws["ipv4"] in ends:
        return False  # the workstation's own address never appears beyond its link
    sport = p[TCP].sport if TCP in p else p[UDP].sport if UDP in p else None
    dport = p[TCP].dport if TCP in p else p[UDP].dport if UDP in p else None
    proto = "tcp" if TCP in p else "udp" if UDP in p else None

    def transport() -> bool:
        if any((ip.dst == a and proto == pr and dport == po)
               or (ip.src == a and proto == pr and sport == po)
               for a, pr, po in ctx.endpoints):
            return True
        return icmp_error_about(lambda a, pr, po: (a, pr, po) in ctx.endpoints)

    def relay() -> bool:
        if TCP in p:
            return (ip.dst, dport) in ctx.relays or (ip.src, sport) in ctx.relays
        return icmp_error_about(lambda a, pr, po: pr == "tcp" and (a, po) in ctx.relays)

    def icmp_error_about(pred) -> bool:
        """An ICMP error (a dead tunnel's "unreachable") quoting an allowed flow, whichever
        end of the quoted packet the allowed peer is."""
        from scapy.layers.inet import ICMP, IPerror, TCPerror, UDPerror

        if ICMP not in p or p[ICMP].type not in (3, 11) or IPerror not in p:
            return False
        q = p[IPerror]
        inner = p.getlayer(TCPerror) or p.getlayer(UDPerror)
        if inner is None:
            return False
        pr = "tcp" if TCPerror in p else "udp"
        return pred(q.dst, pr, inner.dport) or pred(q.src, pr, inner.sport)

    if zone == "sibling":
        return True  # markers decide: nothing of the battery may show up here
    if zone == "plain":
        return True  # masqueraded legit traffic; markers of blocked cases decide
    if zone == "tor-out":
        return relay() if ctx.relays else TCP in p
    if zone == "vpn-out":
        return transport()
    if zone == "vpn-inner":
        return relay() if ctx.kind == "tor" and ctx.relays else True
    if zone == "lab-egress":
        if transport():
            return True
        if ctx.kind == "tor":
            return relay()
        return ctx.vpn_server in ends
    if zone == "lab-host":
        if ctx.kind == "tor":
            return bool(ends & ctx.exits)
        if ctx.kind == "vpn":
            return ctx.vpn_server in ends
        return True
    return False


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

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run(stack: str, ws_name: str | None = None, scenario: str = "steady",
        fault: str | None = None, pcaps_dir: str | None = None) -> Report:
    if scenario not in SCENARIOS:
        raise UsageError(f"--scenario {scenario!r}: use one of {', '.join(SCENARIOS)}")
    if fault is not None and fault not in FAULTS:
        raise UsageError(f"--inject-fault {fault!r}: use one of {', '.join(FAULTS)}")
    ctx = context(stack, ws_name)
    t0 = time.monotonic()
    run_id = secrets.token_hex(3)
    stamp_ = time.strftime("%Y%m%d-%H%M%S")
    base = pcaps_dir or os.path.join(os.getcwd(), "pcaps")
    out_dir = os.path.join(base, f"{stamp_}-{stack}-{scenario}{'-' + fault if fault else ''}")
    os.makedirs(out_dir, exist_ok=True)
    cs = stamp(cases(target(ctx)), run_id)
    lks = links(ctx)
    prober = Prober(ctx.ws["netns"])
    restore: list = []
    sent = 0
    try:
        for lk in lks:
            lk.capture = Capture(lk.netns, lk.iface,
                                 os.path.join(out_dir, lk.name.replace(":", "_") + ".pcap"))
            lk.capture.start()
        if fault:
            restore.append(_inject(ctx, fault))
        with _scenario(ctx, scenario):
            downer = None
            # raw probes first, real clients last: a client's request completes end to end,
            # so by then every earlier probe has reached as far as it ever will
            for i, c in enumerate(sorted(cs, key=lambda c: c.tool is not None)):
                if scenario == "down" and i == len(cs) // 3:
                    # `netstack down` while probes run: daemons die, namespaces go away
                    # (ours stay alive only as long as a capture or the prober is inside)
                    from netstack.apply import down as stack_down

                    downer = threading.Thread(target=stack_down, args=(ctx.state,))
                    downer.start()
                if c.packets:
                    sent += prober.send(c.packets)
                if c.tool and netns.exists(ctx.ws["netns"]):
                    subprocess.run(["ip", "netns", "exec", ctx.ws["netns"], *c.tool],
                                   capture_output=True, timeout=30)
            if downer:
                downer.join()
            time.sleep(0.1)  # tcpdump drains its socket buffer to the pcap before SIGINT
    finally:
        prober.close()
        for lk in lks:
            if lk.capture:
                lk.capture.stop()
        for r in reversed(restore):
            r()
    return _verdict(ctx, cs, lks, scenario, fault, out_dir, sent, time.monotonic() - t0)


def _verdict(ctx: Ctx, cs: list[Case], lks: list[Link], scenario: str, fault: str | None,
             out_dir: str, sent: int, secs: float) -> Report:
    seen: dict[str, list[str]] = {c.marker: [] for c in cs}
    leaked: dict[str, list[str]] = {c.marker: [] for c in cs}
    legit = {c.marker: ctx.kind in c.legit for c in cs}
    unattributed = 0
    for lk in lks:
        assert lk.capture is not None
        pkts = lk.capture.packets()
        lk.packets = len(pkts)
        for p in pkts:
            raw = bytes(p)
            mk = next((m for m in seen if m.encode() in raw), None)
            ok = _flow_allowed(ctx, lk.zone, p)
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
    case_rows = [{"case": c.name, "property": c.property, "marker": c.marker,
                  "sent": len(c.packets) + (1 if c.tool else 0),
                  "seen_on": seen[c.marker], "leaked_on": leaked[c.marker],
                  "verdict": "LEAK" if leaked[c.marker] else "ok"} for c in cs]
    link_rows = [{"link": lk.name, "netns": lk.netns, "interface": lk.iface, "zone": lk.zone,
                  "packets": lk.packets, "violations": lk.violations[:20],
                  "violation_count": len(lk.violations),
                  "pcap": lk.capture.path if lk.capture else None,
                  "verdict": "LEAK" if lk.violations and lk.zone != "source" else "ok"}
                 for lk in lks]
    leaks = sum(1 for r in case_rows if r["leaked_on"]) + unattributed
    return Report(ctx.stack, ctx.ws["name"], ctx.kind, scenario, fault, out_dir,
                  round(secs, 2), sent, case_rows, link_rows, leaks)


def _supervisor_pid(ctx: Ctx) -> int:
    return next(o["pid"] for o in ctx.state.objects if o["type"] == "process"
                and o["name"] == "supervisor")


def _children(ctx: Ctx) -> dict[str, Any]:
    from netstack.apply import supervisor_children

    return supervisor_children(ctx.state)


@contextlib.contextmanager
def _hold_dead(ctx: Ctx, daemon_prefix: str):
    """Kill a daemon and keep it dead (the supervisor paused) while the body runs."""
    kids = {n: c for n, c in _children(ctx).items() if n.startswith(daemon_prefix)}
    if not kids:
        raise UsageError(f"this stack runs no {daemon_prefix.rstrip('-')} daemon")
    sup = _supervisor_pid(ctx)
    os.kill(sup, signal.SIGSTOP)
    try:
        for c in kids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(c["pid"], signal.SIGKILL)
        end = time.monotonic() + 5
        while any(proc_alive(c["pid"], c["start"]) for c in kids.values()):
            if time.monotonic() > end:
                break
            time.sleep(0.01)
        yield
    finally:
        os.kill(sup, signal.SIGCONT)
        _wait_restarted(ctx, {n: c["pid"] for n, c in kids.items()})


def _wait_restarted(ctx: Ctx, old: dict[str, int], timeout: float = 60) -> None:
    """After a scenario, the chain is whole again before anything else runs: each daemon
    has a new pid and, where it has a post-start hook, reported itself configured."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        kids = _children(ctx)
        if all(n in kids and kids[n]["pid"] != pid and proc_alive(kids[n]["pid"], None)
               and (kids[n].get("configured") or not n.startswith("vpn-"))
               for n, pid in old.items()):
            return
        time.sleep(0.05)


@contextlib.contextmanager
def _scenario(ctx: Ctx, scenario: str):
    if scenario in ("steady", "down"):
        yield
    elif scenario == "vpn-killed":
        with _hold_dead(ctx, "vpn-"):
            yield
    elif scenario == "tor-killed":
        with _hold_dead(ctx, "tor-"):
            yield
    elif scenario == "firewall-reload":
        from netstack.apply import load_ruleset

        stop = threading.Event()
        targets = [n for n in ctx.plan["namespaces"] if n["owner"].startswith("qube:")
                   and n["ruleset"] and n["owner"] != f"qube:{ctx.ws['name']}"]
        reloads = [0]

        def loop() -> None:
            while not stop.is_set():
                for n in targets:
                    load_ruleset(n["name"], n["ruleset"])
                reloads[0] += 1

        th = threading.Thread(target=loop, daemon=True)
        th.start()
        try:
            yield
        finally:
            stop.set()
            th.join()
            _refill_vpn_sets(ctx)


def _refill_vpn_sets(ctx: Ctx) -> None:
    """A full reload empties the VPN endpoint sets (filled at run time): fill them again."""
    from netstack.apply import _nft
    from netstack.rules.nft import set_elements_commands
    from netstack.vpn import runtime

    resolved = ctx.state.data.get("vpn_resolved") or {}
    for d in ctx.plan.get("vpns", []):
        info = runtime.VpnInfo(**d)
        _nft(info.netns).json_cmd(set_elements_commands(
            runtime.ENDPOINT_SET, runtime.endpoint_elements(info, resolved.get(info.qube, {}))))


def _inject(ctx: Ctx, fault: str):
    """Break one rule on purpose (test-only). Returns the function that repairs it."""
    from netstack.apply import load_ruleset
    from netstack.rules.nft import MASQUERADE, Ruleset, oifname

    plan_ns = {n["name"]: n for n in ctx.plan["namespaces"]}
    gw = ctx.chain[1]
    undo: list = []

    def reload(ns: str) -> None:
        load_ruleset(ns, plan_ns[ns]["ruleset"])
        for k, v in plan_ns[ns]["sysctls"].items():
            netns.write_sysctl(ns, k, v)

    if fault == "gateway-redirect-only":
        # a naive transparent proxy: only the redirect, forwarding on, nothing dropped
        tor = next((q for q in ctx.chain if q["kind"] == "tor"), None)
        if tor is None:
            raise UsageError("gateway-redirect-only needs a tor qube in the chain")
        rs = Ruleset()
        for ch in ("input", "forward", "output"):
            rs[ch].policy = "accept"
        live = plan_ns[tor["netns"]]["ruleset"]
        for item in live["nftables"]:
            r = item.get("rule")
            if r and r["chain"] == "nat_prerouting":
                rs["nat_prerouting"].add(*r["expr"], comment=r.get("comment"))
        rs["nat_postrouting"].add(oifname("eth0"), MASQUERADE)
        load_ruleset(tor["netns"], rs.to_json())
        netns.write_sysctl(tor["netns"], "net/ipv4/ip_forward", "1")
        undo.append(lambda: reload(tor["netns"]))
    elif fault == "no-kill-switch":
        vpn = next((q for q in ctx.chain if q["kind"] == "vpn"), None)
        if vpn is None:
            raise UsageError("no-kill-switch needs a vpn qube in the chain")
        rs = Ruleset()
        for ch in ("input", "forward", "output"):
            rs[ch].policy = "accept"
        rs["nat_postrouting"].add(oifname("eth0"), MASQUERADE)
        load_ruleset(vpn["netns"], rs.to_json())
        # the tunnel dies and the host still has its old default route: the classic leak
        subprocess.run(["ip", "-n", vpn["netns"], "route", "add", "default", "via",
                        vpn["gateway"], "dev", "eth0", "metric", "1000"], capture_output=True)
        hold = _hold_dead(ctx, "vpn-")
        hold.__enter__()

        def repair() -> None:
            hold.__exit__(None, None, None)
            subprocess.run(["ip", "-n", vpn["netns"], "route", "del", "default", "via",
                            vpn["gateway"], "dev", "eth0", "metric", "1000"],
                           capture_output=True)
            reload(vpn["netns"])
            _refill_vpn_sets(ctx)
        undo.append(repair)
    elif fault == "no-antispoof":
        live = plan_ns[gw["netns"]]["ruleset"]
        items = [i for i in live["nftables"]
                 if not (i.get("rule") and str(i["rule"].get("comment", "")).startswith(
                     f"antispoof {ctx.ws['name']}"))]
        load_ruleset(gw["netns"], {"nftables": items})
        undo.append(lambda: (reload(gw["netns"]), _refill_vpn_sets(ctx)))
    elif fault == "ipv6-allowed":
        live = plan_ns[gw["netns"]]["ruleset"]
        items = [i for i in live["nftables"] if not (i.get("rule") and (
            str(i["rule"].get("comment", "")).startswith("IPv6 is off")
            or "(IPv6" in str(i["rule"].get("comment", ""))))]
        load_ruleset(gw["netns"], {"nftables": items})
        ifs = ["all", "default", *gw["interfaces"]]
        vpn = next((v for v in ctx.plan.get("vpns", []) if v["qube"] == gw["name"]), None)
        out_if = vpn["dev"] if vpn else gw["interfaces"][0]  # where its forward rule leads
        ifs.append(out_if)
        for i in ifs:
            with contextlib.suppress(OSError):
                netns.write_sysctl(gw["netns"], f"net/ipv6/conf/{i}/disable_ipv6", "0")
        netns.write_sysctl(gw["netns"], "net/ipv6/conf/all/forwarding", "1")
        subprocess.run(["ip", "-n", gw["netns"], "-6", "route", "add", "default", "dev",
                        out_if], capture_output=True)

        def repair6() -> None:
            subprocess.run(["ip", "-n", gw["netns"], "-6", "route", "del", "default", "dev",
                            out_if], capture_output=True)
            for i in ifs:
                with contextlib.suppress(OSError):
                    netns.write_sysctl(gw["netns"], f"net/ipv6/conf/{i}/disable_ipv6", "1")
            netns.write_sysctl(gw["netns"], "net/ipv6/conf/all/forwarding", "0")
            reload(gw["netns"])
            _refill_vpn_sets(ctx)
        undo.append(repair6)

    def restore() -> None:
        for u in reversed(undo):
            u()
        # Forget connections the fault let through, so late replies to them (a web server
        # retransmitting its SYN/ACK for half a minute) meet no NAT mapping and die at
        # sys-net instead of haunting the next run's captures.
        for q in ctx.chain:
            subprocess.run(["ip", "netns", "exec", q["netns"], "conntrack", "-F"],
                           capture_output=True)
    return restore
