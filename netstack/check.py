"""`netstack check [CONFIG] [--qube Q] [--expect tor|vpn|direct] -- CMD`: leak-test any
program. A lab stack of its own (the offline internet: every name answers, every port
takes a connection) or a running one (`--stack`), CMD run in the workstation's sandbox with
the lab CA handed over, every link of the chain captured while it runs, the stack taken
down after (also on Ctrl-C or CMD crashing), and a report of every flow CMD caused:

- what left the way the chain allows, by name, address, port and bytes, and which way it
  arrived (a Tor exit, the VPN server, sys-net's ISP address: as the lab's hosts saw it);
- what it tried that the chain stopped, with the qube, hook and rule (comment and handle)
  that stopped it, found by running its first packet through the netvm's live ruleset
  with the audit's evaluator: direct UDP (STUN, WebRTC), DNS to its own resolver, IPv6,
  multicast (mDNS, LLMNR), raw IP, the gateway's own addresses, ICMP;
- any packet on any link the chain does not allow there (the leak test's rules), with the
  pcap and frame that prove it.

Exit: 0 clean, 1 a leak (something left another way than --expect), 2 CMD tried to get
around the chain and was stopped (`--bypass warn` makes it 0), 3 CMD itself failed."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from netstack.addressing import VIRTUAL_DNS
from netstack.errors import UsageError

EXPECT = ("tor", "vpn", "direct")
CA_INSIDE = "/run/netstack-lab-ca.pem"
CA_ENV = ("SSL_CERT_FILE", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
          "GIT_SSL_CAINFO")
CLASSES = {  # class -> what it means, in the report's words
    "allowed": "left through the chain",
    "proxy": "through the gateway's SOCKS port",
    "dns": "DNS to a resolver of its own (not the chain's)",
    "udp": "direct UDP (STUN, WebRTC, QUIC)",
    "ipv6": "IPv6",
    "multicast": "multicast or broadcast (mDNS, LLMNR, SSDP)",
    "raw": "raw IP (a protocol other than TCP, UDP, ICMP)",
    "gateway": "the gateway's or another qube's own addresses",
    "icmp": "ICMP (ping, traceroute)",
    "tcp": "TCP the chain did not carry",
}


@dataclass
class Flow:
    """One conversation CMD started, as its workstation's link saw it."""

    family: str
    proto: str
    dst: str
    dport: int | None
    packets: int = 0
    bytes: int = 0
    klass: str = "allowed"
    outcome: str = "left"  # left | stopped | unknown
    via: str | None = None  # tor | vpn | direct (how it reached the lab, when it did)
    names: list[str] = field(default_factory=list)
    stopped_by: dict[str, Any] | None = None
    first_frame: int = 0  # in the workstation link's pcap


@dataclass
class Leak:
    link: str
    pcap: str
    frame: int
    summary: str


@dataclass
class Report:
    stack: str
    qube: str
    expect: str
    command: list[str]
    exit_status: int | None
    seconds: float
    pcaps: str
    flows: list[Flow]
    leaks: list[Leak]
    names_asked: list[str]
    chain: list[dict[str, Any]]
    links: list[dict[str, Any]]
    verdict: int = 0
    bypass: str = "fail"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def stopped(self) -> list[Flow]:
        return [f for f in self.flows if f.outcome == "stopped"]


def default_expect(protection: str) -> str:
    return {"tor": "tor", "vpn": "vpn"}.get(protection, "direct")


def run(cmd: list[str], config: str | None = None, qube: str | None = None,
        expect: str | None = None, stack: str | None = None, pcaps: str | None = None,
        bypass: str = "fail", progress: Any = None, fault: Any = None) -> Report:
    """fault: a protection broken on purpose while CMD runs (tests only: the leak test's
    Fault), to show the report catches what the chain guards."""
    from netstack import stack as stacks
    from netstack.model import UplinkSpec

    if not cmd:
        raise UsageError("check: give the command after --, e.g. netstack check -- curl "
                         "https://example.org/")
    if expect is not None and expect not in EXPECT:
        raise UsageError(f"--expect {expect!r}: use one of {', '.join(EXPECT)}")
    if bypass not in ("fail", "warn"):
        raise UsageError(f"--bypass {bypass!r}: use fail or warn")
    stacks.require_root("check")
    own = stack is None
    name = stack or "ck" + secrets.token_hex(3)
    if own:
        if progress:
            progress(f"bringing up lab stack {name} (offline internet)")
        stacks.up(config, name, UplinkSpec("lab", sink=True))
    try:
        if own:
            wait_ready(name, progress)
        return _run(name, cmd, qube, expect, pcaps, bypass, fault)
    finally:
        if own:
            if progress:
                progress(f"taking stack {name} down")
            stacks.down(name)
            from netstack.rules.qubefw import overlay_path

            with contextlib.suppress(OSError):
                shutil.rmtree(os.path.dirname(overlay_path(name)))


def wait_ready(stack: str, progress: Any = None, timeout: float = 120) -> None:
    """Every VPN carries traffic and every Tor gateway bootstrapped (as `up` waits)."""
    from netstack.roles import role_for
    from netstack.state import State

    st = State.load(stack)
    assert st is not None and st.plan is not None
    for q in st.plan.qubes:
        role = role_for(q.kind)
        last: list[str] = []

        def say(pct: int, what: str, q: Any = q, last: list[str] = last) -> None:
            line = f"{q.name}: {pct}% {what}"
            if progress and (not last or last[-1] != line):
                last.append(line)
                progress(line)
        role.wait_ready(q, st, timeout, say)


class Watch:
    """Captures on every link of a workstation's chain and the lab logs' positions, from
    `start` on; `report` stops the captures and says what happened since (`check` runs
    one around CMD; the pytest plugin one per `chain.mark()`)."""

    def __init__(self, stack: str, qube: str | None, expect: str | None = None,
                 pcaps: str | None = None, bypass: str = "fail") -> None:
        from netstack.kernel import RealKernel
        from netstack.leaktest import battery

        self.k = RealKernel()
        self.ctx = battery.context(stack, qube, self.k)
        self.expect = expect or default_expect(self.ctx.protection)
        self.bypass = bypass
        when = time.strftime("%Y%m%d-%H%M%S")
        self.out_dir = pcaps or os.path.join(os.getcwd(), "pcaps",
                                             f"{when}-{stack}-check-{secrets.token_hex(2)}")
        self.lks: list[Any] = []
        self.logs: dict[str, int] = {}
        self.t0 = 0.0

    def start(self) -> Watch:
        from netstack.leaktest import battery
        from netstack.leaktest.capture import Capture

        os.makedirs(self.out_dir, exist_ok=True)
        self.lks = battery.links(self.ctx)
        self.logs = _log_marks(self.ctx)
        try:
            for lk in self.lks:
                lk.capture = Capture(lk.netns, lk.iface, os.path.join(
                    self.out_dir, lk.name.replace(":", "_") + ".pcap"))
                lk.capture.start()
        except BaseException:
            self.stop()
            raise
        self.t0 = time.monotonic()
        return self

    def stop(self) -> None:
        for lk in self.lks:
            if lk.capture:
                lk.capture.stop()

    def report(self, cmd: list[str], status: int | None) -> Report:
        time.sleep(0.2)  # the last replies and tcpdump's buffer reach the pcaps
        self.stop()
        secs = time.monotonic() - self.t0
        try:
            gw = self.ctx.chain[1]
            rulesets = {gw.netns: self.k.nft_list(gw.netns)}
            return _report(self.ctx, self.lks, self.logs, rulesets, cmd, status, secs,
                           self.out_dir, self.expect, self.bypass)
        finally:
            self.k.close()


def _run(stack: str, cmd: list[str], qube: str | None, expect: str | None,
         pcaps: str | None, bypass: str, fault: Any) -> Report:
    w = Watch(stack, qube, expect, pcaps, bypass).start()
    status: int | None = None
    try:
        repair = fault.inject(w.ctx) if fault else None
        try:
            status = run_in(w.ctx, cmd)
        finally:
            if repair:
                repair()
    except BaseException:
        w.stop()
        w.k.close()
        raise
    return w.report(cmd, status)


def run_in(ctx: Any, cmd: list[str], capture: bool = False) -> Any:
    """CMD in the workstation's sandbox (a service qube: as root in its namespace), with
    the lab CA where TLS libraries look for it. Its exit status (capture: the finished
    process, its output kept)."""
    from netstack import sandbox
    from netstack.lab.sink import ca_path
    from netstack.stack import exec_argv

    extra: tuple[Any, ...] = ()
    lab = ctx.plan.lab
    ca = ca_path(lab.dir) if lab else ""
    if ca and os.path.exists(ca):
        public = os.path.join(ctx.state.dir, "lab-ca.pem")  # the stack dir is 0711
        shutil.copyfile(ca, public)
        os.chmod(public, 0o644)
        extra = (sandbox.Grant("lab-ca", public, CA_INSIDE,
                               tuple((v, CA_INSIDE) for v in CA_ENV), readonly=True),)
    argv = exec_argv(ctx.stack, ctx.ws.name, None, cmd, extra=extra)
    if capture:
        return subprocess.run(argv, capture_output=True, text=True)
    try:
        return subprocess.run(argv).returncode
    except KeyboardInterrupt:
        return 130


def _log_marks(ctx: Any) -> dict[str, int]:
    """How many lines each lab service log has now: CMD's lines come after."""
    out = {}
    for n in ("lab-sink", "lab-http", "lab-dns"):
        p = os.path.join(ctx.state.dir, f"{n}.log")
        with contextlib.suppress(FileNotFoundError), open(p) as f:
            out[n] = sum(1 for _ in f)
    return out


def _new_log_lines(ctx: Any, marks: dict[str, int], name: str) -> list[dict[str, Any]]:
    p = os.path.join(ctx.state.dir, f"{name}.log")
    try:
        with open(p) as f:
            lines = f.read().splitlines()[marks.get(name, 0):]
    except FileNotFoundError:
        return []
    return [json.loads(x) for x in lines if x.strip()]


# --- the report -----------------------------------------------------------------------------

def proxies(ctx: Any) -> set[tuple[str, int]]:
    """(address, port) of the proxies the workstation's netvm offers it (a Tor gateway's
    SOCKS ports), from the environment the netvm gives its clients."""
    from netstack.roles import role_for

    gw = ctx.chain[1]
    env = role_for(gw.kind).client_env(gw)
    host = env.get("TOR_SOCKS_HOST")
    return {(host, int(v)) for k, v in env.items() if host and k.startswith("TOR_SOCKS_PORT")}


def classify(ctx: Any, family: str, proto: str, dst: str, dport: int | None) -> str:
    """The class of a flow by what it is (the outcome says whether the chain carried it)."""
    a = ipaddress.ip_address(dst)
    if proto == "tcp" and (dst, dport) in proxies(ctx):
        return "proxy"
    if family == "ipv6":
        return "ipv6"
    if a.is_multicast or dst == "255.255.255.255" or dst.endswith(".255"):
        return "multicast"
    if proto not in ("tcp", "udp", "icmp"):
        return "raw"
    if dport == 53 and dst not in VIRTUAL_DNS:
        return "dns"
    if dst in VIRTUAL_DNS and dport == 53:
        return "allowed"
    if a in ipaddress.ip_network("10.137.0.0/16") or a in ipaddress.ip_network(
            "10.139.0.0/16"):
        return "gateway"
    if proto == "icmp":
        return "icmp"
    if proto == "udp":
        return "udp"
    return "allowed"


def _via(ctx: Any, client: str) -> str:
    if client in ctx.exits:
        return "tor"
    if ctx.vpn_server and client == ctx.vpn_server:
        return "vpn"
    return "direct"


def _flows(ctx: Any, pkts: list[Any]) -> tuple[list[Flow], list[str], dict[str, list[str]]]:
    """CMD's flows on its own link, the names it asked, and address -> names answered."""
    from scapy.layers.dns import DNS
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import IPv6

    own = {a for a in (ctx.ws.ipv4, ctx.ws.ipv6) if a}
    flows: dict[tuple, Flow] = {}
    asked: list[str] = []
    answers: dict[str, list[str]] = {}
    for i, p in enumerate(pkts, start=1):
        ip = p.getlayer(IP) or p.getlayer(IPv6)
        if ip is None:
            continue
        if DNS in p:
            d = p[DNS]
            qds = list(d.qd) if isinstance(d.qd, list) else [d.qd] if d.qd else []
            ans = list(d.an) if isinstance(d.an, list) else \
                [d.an[j] for j in range(d.ancount)] if d.an else []
            if d.qr == 0:
                for q in qds:
                    qn = q.qname.decode(errors="replace").rstrip(".")
                    if qn not in asked and ip.src in own:
                        asked.append(qn)
            for rr in ans if d.qr == 1 else []:
                if getattr(rr, "type", 0) == 1:
                    names = answers.setdefault(str(rr.rdata), [])
                    n = rr.rrname.decode(errors="replace").rstrip(".")
                    if n not in names:
                        names.append(n)
        six = isinstance(ip, IPv6)
        if ip.src not in own and not (six and not ip.src.startswith("fe80:")
                                      and ip.src != "::"):
            continue  # replies, and the link's own neighbour discovery
        proto = "tcp" if TCP in p else "udp" if UDP in p else \
            "icmp" if ICMP in p or getattr(ip, "nh", 0) == 58 else \
            f"ip-proto-{ip.proto if not six else ip.nh}"
        dport = p[TCP].dport if TCP in p else p[UDP].dport if UDP in p else None
        key = ("ipv6" if six else "ipv4", proto, ip.dst, dport)
        f = flows.get(key)
        if f is None:
            f = flows[key] = Flow(key[0], proto, ip.dst, dport, first_frame=i)
            f.klass = classify(ctx, *key)
        f.packets += 1
        f.bytes += len(ip)
    return list(flows.values()), asked, answers


def _stopped_by(ctx: Any, rs: dict[str, Any], f: Flow) -> dict[str, Any] | None:
    """Run the flow's first packet through the workstation's netvm's live ruleset (the
    audit's evaluator): the hook and rule that drop it, or None if it passes there."""
    from netstack.audit.evaluator import Packet, Ruleset, Step, fate

    gw = ctx.chain[1]
    vif = next((c.vif for c in gw.clients if c.name == ctx.ws.name), None)
    if vif is None:
        return None
    p = Packet(family=f.family, iifname=vif, saddr=ctx.ws.ipv4 if f.family == "ipv4" else
               (ctx.ws.ipv6 or "::"), daddr=f.dst,
               l4proto=f.proto if not f.proto.startswith("ip-proto-") else
               f.proto.split("-")[-1], dport=f.dport, sport=40000 if f.dport else None,
               icmp_type=8 if f.proto == "icmp" else None)
    local = {a for a in (gw.ipv4, gw.ipv6) if a}
    traces: list[tuple[str, list[Step], list[str]]] = []
    try:
        hooks = fate(Ruleset(rs), p, lambda _d: gw.upstream_if, local, None, traces)
    except Exception:  # noqa: BLE001 - a report line must not break the report
        return None
    for (hook, verdict), (_h, steps, _t) in zip(hooks, traces, strict=False):
        if verdict == "drop":
            last = steps[-1] if steps else None
            return {"qube": gw.name, "hook": hook,
                    "rule": (last.comment or f"{last.chain} policy") if last else "policy",
                    "chain": last.chain if last else None,
                    "handle": last.handle if last else None}
    return None


def _report(ctx: Any, lks: list[Any], marks: dict[str, int], rulesets: dict[str, Any],
            cmd: list[str], status: int | None, secs: float, out_dir: str, expect: str,
            bypass: str) -> Report:
    import scapy.layers.dns  # noqa: F401  (dissect DNS when the pcap is read)

    from netstack.leaktest.battery import flow_allowed

    src = next(lk for lk in lks if lk.zone == "source")
    flows, asked, answers = _flows(ctx, src.capture.packets())
    arrived = _new_log_lines(ctx, marks, "lab-sink") + _new_log_lines(ctx, marks, "lab-http")
    dns_log = _new_log_lines(ctx, marks, "lab-dns")
    gw_rs = rulesets.get(ctx.chain[1].netns, {"nftables": []})
    claimed: set[int] = set()
    for f in sorted(flows, key=lambda f: f.klass == "proxy"):  # proxies take what is left
        f.names = sorted(set(answers.get(f.dst, [])))
        hits = [r for r in arrived if r.get("proto") == f.proto and (
            (r.get("dst") in (f.dst, None) and r.get("port") in (f.dport, None))
            or (f.proto == "tcp" and r.get("dst") is None and f.dst == r.get("host")))]
        if f.dst in VIRTUAL_DNS and f.dport == 53:
            hits = [r for r in dns_log if r.get("name") in asked]
        if f.klass == "proxy":  # what arrived for no direct flow came through the proxy
            hits = [r for r in arrived if id(r) not in claimed]
        claimed |= {id(r) for r in hits}
        if hits:
            f.outcome = "left"
            f.via = _via(ctx, hits[-1]["client"])
            f.names = sorted(set(f.names) | {n for r in hits for n in (r.get("host"),
                                                                           r.get("sni"))
                                             if n})
            continue
        f.stopped_by = _stopped_by(ctx, gw_rs, f)
        f.outcome = "stopped" if f.stopped_by else "unknown"
    leaks: list[Leak] = []
    link_rows = []
    for lk in lks:
        pkts = lk.capture.packets() if lk.capture else []
        bad = 0
        if lk.zone != "source":
            for i, p in enumerate(pkts, start=1):
                if not flow_allowed(ctx, lk.zone, p):
                    bad += 1
                    if len(leaks) < 50:
                        leaks.append(Leak(lk.name, lk.capture.path, i, p.summary()))
        link_rows.append({"link": lk.name, "zone": lk.zone, "packets": len(pkts),
                          "violations": bad, "pcap": lk.capture.path if lk.capture else None})
    for f in flows:
        if f.outcome == "left" and f.via != expect:
            leaks.append(Leak(src.name, src.capture.path, f.first_frame,
                              f"{f.proto} {f.dst}:{f.dport} left via {f.via}, not {expect}"))
    chain = [{"name": q.name, "kind": q.kind, "label": q.label, "address": q.ipv4}
             for q in ctx.chain]
    r = Report(ctx.stack, ctx.ws.name, expect, list(cmd), status, round(secs, 2), out_dir,
               flows, leaks, asked, chain, link_rows, bypass=bypass)
    r.verdict = verdict(r)
    return r


def verdict(r: Report) -> int:
    if r.leaks:
        return 1
    if r.exit_status not in (0, None):
        return 3
    if r.stopped and r.bypass == "fail":
        return 2
    return 0


# --- reports CI systems read ------------------------------------------------------------------

def junit(r: Report) -> str:
    """One testcase per flow class seen (and one for leaks), failures with the evidence."""
    from xml.sax.saxutils import escape, quoteattr

    cases = []
    leak_text = "\n".join(f"{x.link} {os.path.basename(x.pcap)} frame {x.frame}: {x.summary}"
                          for x in r.leaks)
    cases.append(("no leak", leak_text or None, "leak"))
    for k, what in CLASSES.items():
        fl = [f for f in r.flows if f.klass == k]
        if not fl:
            continue
        stopped = [f for f in fl if f.outcome == "stopped"]
        text = "\n".join(flow_line(f) for f in fl)
        fails = (k != "allowed" and stopped and r.bypass == "fail")
        cases.append((f"{k}: {what}", text if fails else None,
                      "stopped bypass attempt" if fails else ""))
    if r.exit_status not in (0, None):
        cases.append(("command", f"exit status {r.exit_status}", "command failed"))
    body = []
    for name, failure, kind in cases:
        body.append(f'  <testcase classname="netstack.check" name={quoteattr(name)}>')
        if failure is not None:
            body.append(f'    <failure message={quoteattr(kind)}>{escape(failure)}</failure>')
        body.append("  </testcase>")
    failures = sum(1 for _n, f, _k in cases if f is not None)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="netstack check" '
            f'tests="{len(cases)}" failures="{failures}" time="{r.seconds}">\n'
            + "\n".join(body) + "\n</testsuite>\n")


def flow_line(f: Flow) -> str:
    where = f"{f.dst}:{f.dport}" if f.dport is not None else f.dst
    names = f" ({', '.join(f.names)})" if f.names else ""
    if f.outcome == "left":
        how = f"left via {f.via}"
    elif f.stopped_by:
        s = f.stopped_by
        how = (f"stopped by {s['qube']} {s['hook']}: {s['rule']}"
               + (f" (handle {s['handle']})" if s.get("handle") else ""))
    else:
        how = "went nowhere the lab saw"
    return f"{f.proto} {where}{names}: {f.packets} packets, {f.bytes} bytes, {how}"


def table(r: Report) -> str:
    lines = [f"netstack check of {' '.join(r.command)} in {r.qube} (expect {r.expect}), "
             f"stack {r.stack}, {r.seconds} s, exit status {r.exit_status}"]
    lines.append(f"{'class':<10} {'outcome':<8} flow")
    for f in sorted(r.flows, key=lambda f: (f.outcome != "left", f.klass)):
        lines.append(f"{f.klass:<10} {f.outcome:<8} {flow_line(f)}")
    if r.names_asked:
        lines.append("names asked: " + ", ".join(r.names_asked))
    for x in r.leaks:
        lines.append(f"LEAK on {x.link}: {x.summary}  ({x.pcap} frame {x.frame})")
    word = {0: "CLEAN", 1: "LEAK", 2: "STOPPED", 3: "COMMAND FAILED"}[r.verdict]
    lines.append(f"{word}: {len(r.flows)} flows, {len(r.stopped)} stopped, {len(r.leaks)} "
                 f"leaks; pcaps in {r.pcaps}")
    return "\n".join(lines)


LABEL_HEX = {"red": "#d32f2f", "orange": "#f57c00", "yellow": "#fbc02d", "green": "#388e3c",
             "gray": "#757575", "blue": "#1976d2", "purple": "#7b1fa2", "black": "#212121"}


def html(r: Report) -> str:
    """One self-contained page: the chain in its label colours, packets per link, the
    flows, and each leak with its packet."""
    from html import escape

    w, box = 170, 130
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(r.chain) + 40}" '
           'height="120">']
    for i, q in enumerate(r.chain):
        x = 20 + i * w
        col = LABEL_HEX.get(q["label"], "#555")
        svg.append(f'<rect x="{x}" y="20" width="{box}" height="50" rx="8" fill="{col}"/>'
                   f'<text x="{x + box / 2}" y="42" fill="#fff" text-anchor="middle" '
                   f'font-size="13">{escape(q["name"])}</text><text x="{x + box / 2}" y="60" '
                   f'fill="#fff" text-anchor="middle" font-size="11">{escape(q["kind"])} '
                   f'{escape(q["address"])}</text>')
        if i:
            svg.append(f'<line x1="{x - w + box}" y1="45" x2="{x}" y2="45" stroke="#333" '
                       'stroke-width="2"/>')
        link = next((lk for lk in r.links if lk["link"].startswith(q["name"] + ":")), None)
        if link:
            col = "#c62828" if link["violations"] else "#2e7d32"
            svg.append(f'<text x="{x + box / 2}" y="92" text-anchor="middle" font-size="11" '
                       f'fill="{col}">{link["packets"]} pkts, {link["violations"]} bad'
                       '</text>')
    svg.append("</svg>")
    rows = "".join(f"<tr><td>{escape(f.klass)}</td><td>{escape(f.outcome)}</td>"
                   f"<td>{escape(flow_line(f))}</td></tr>" for f in r.flows)
    links = "".join(f"<tr><td>{escape(lk['link'])}</td><td>{escape(lk['zone'])}</td>"
                    f"<td>{lk['packets']}</td><td>{lk['violations']}</td></tr>"
                    for lk in r.links)
    leaks = "".join(f"<li><b>{escape(x.link)}</b> {escape(os.path.basename(x.pcap))} frame "
                    f"{x.frame}: <code>{escape(x.summary)}</code></li>" for x in r.leaks)
    word = {0: "CLEAN", 1: "LEAK", 2: "STOPPED", 3: "COMMAND FAILED"}[r.verdict]
    return (f"<!doctype html><meta charset='utf-8'><title>netstack check: {word}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td{padding:2px 8px;"
            "border-bottom:1px solid #ddd}code{font-size:90%}</style>"
            f"<h1>netstack check: {word}</h1><p><code>{escape(' '.join(r.command))}</code> "
            f"in {escape(r.qube)}, expected {escape(r.expect)}, exit status "
            f"{r.exit_status}, {r.seconds} s</p>{''.join(svg)}<h2>Flows</h2><table>"
            f"<tr><th>class</th><th>outcome</th><th>flow</th></tr>{rows}</table>"
            f"<h2>Links</h2><table><tr><th>link</th><th>zone</th><th>packets</th>"
            f"<th>not allowed</th></tr>{links}</table><h2>Leaks</h2>"
            f"<ul>{leaks or '<li>none</li>'}</ul>")
