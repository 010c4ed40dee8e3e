"""`netstack metrics`: the chain's health in Prometheus' text format, for the tools a host's
owner already watches (Prometheus, node_exporter's textfile collector, Grafana).

What is measured is read as `status` reads it (links, tunnels, Tor, processes: one
`stack.status`), plus the counters of every per-qube firewall rule in its netvm (each rule
of a `firewall = [...]` list carries a counter, rules/qubefw.py) and the last `audit`'s
outcome (audit/__init__.py records it). `families` is pure (data in, metric families out)
so its names and labels are unit-tested; prometheus_client renders them and serves them.

Metric names follow Prometheus' conventions (base units, `_total` for counters); every
series is labelled with the stack, so several stacks on one host share one scrape.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from netstack.errors import UsageError

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from netstack.kernel import Kernel

# a client rule's comment (rules/qubefw.rule_note): "QUBE rule N: words", or the list's
# closing "QUBE: nothing matched"
RULE_NOTE = re.compile(r"^(?P<qube>[a-z0-9-]+) rule (?P<n>[0-9]+): ")
LAST_NOTE = re.compile(r"^(?P<qube>[a-z0-9-]+): nothing matched$")


@dataclass(frozen=True)
class RuleHits:
    """One per-qube firewall rule's counter, as the netvm's kernel has it."""

    qube: str
    netvm: str
    rule: str  # its number in the list, or "default" (nothing matched: dropped)
    action: str  # accept | drop
    packets: int
    bytes: int


@dataclass
class Inputs:
    """Everything one scrape reads (the impure part is `collect`)."""

    status: dict[str, Any]
    rules: list[RuleHits] = field(default_factory=list)
    audit: dict[str, Any] | None = None  # the last audit: {"time", "ok", "failed"}


def collect(stack: str, k: Kernel) -> Inputs:
    """Read the stack as `status` does, its client rules' counters and the last audit."""
    from netstack import stack as stack_mod
    from netstack.audit import last_result

    status = stack_mod.status(stack, k)
    return Inputs(status, rule_hits(stack, k), last_result(stack))


def rule_hits(stack: str, k: Kernel) -> list[RuleHits]:
    """Each client rule's counter, read from its netvm's ruleset (nftables binding)."""
    from netstack.pathfacts import list_ruleset
    from netstack.state import require

    st = require(stack)
    assert st.plan is not None
    netvms = sorted({q.netvm for q in st.plan.qubes if q.firewall is not None and q.netvm})
    out: list[RuleHits] = []
    for name in netvms:
        nv = st.plan.qube(name)
        if not k.netns_exists(nv.netns):
            continue
        out += hits_of(list_ruleset(k, nv.netns), name)
    return out


def hits_of(ruleset: dict[str, Any], netvm: str) -> list[RuleHits]:
    """The counters of client rules in one nft JSON listing (pure)."""
    out = []
    for item in ruleset.get("nftables", []):
        r = item.get("rule")
        if not isinstance(r, dict) or not isinstance(r.get("comment"), str):
            continue
        m, last = RULE_NOTE.match(r["comment"]), LAST_NOTE.match(r["comment"])
        if not (m or last):
            continue
        counter = next((e["counter"] for e in r.get("expr", [])
                        if isinstance(e, dict) and isinstance(e.get("counter"), dict)), None)
        if counter is None:
            continue
        action = "accept" if any(isinstance(e, dict) and "accept" in e
                                 for e in r.get("expr", [])) else "drop"
        qube = (m or last).group("qube")  # type: ignore[union-attr]
        rule = m.group("n") if m else "default"
        out.append(RuleHits(qube, netvm, rule, action, int(counter.get("packets", 0)),
                            int(counter.get("bytes", 0))))
    # one rule of the config may be several nft rules (IPv4 and IPv6, udp and tcp for
    # DNS): their counters add up to the rule's
    merged: dict[tuple[str, str, str, str], list[int]] = {}
    for h in out:
        acc = merged.setdefault((h.qube, h.netvm, h.rule, h.action), [0, 0])
        acc[0] += h.packets
        acc[1] += h.bytes
    return [RuleHits(q, n, r, a, p, b) for (q, n, r, a), (p, b) in merged.items()]


def families(inp: Inputs) -> list[Any]:
    """The metric families of one scrape (pure: data in, prometheus_client families out)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    s = inp.status
    stack = s["stack"]
    up = GaugeMetricFamily("netstack_up", "1 when the stack is up and healthy, 0 when "
                           "degraded or down (`netstack status`)", labels=["stack"])
    up.add_metric([stack], 1.0 if s["health"]["state"] == "up" else 0.0)
    problems = GaugeMetricFamily("netstack_problems", "Problems `status` reports",
                                 labels=["stack"])
    problems.add_metric([stack], float(len(s["health"]["problems"])
                                       + sum(len(q["health"]["problems"])
                                             for q in s["qubes"])))
    qube_up = GaugeMetricFamily("netstack_qube_up", "1 when the qube is up and healthy",
                                labels=["stack", "qube", "kind", "netvm"])
    rx_b = CounterMetricFamily("netstack_link_receive_bytes", "Bytes received on a qube's "
                               "link", labels=["stack", "qube", "link"])
    tx_b = CounterMetricFamily("netstack_link_transmit_bytes", "Bytes sent on a qube's "
                               "link", labels=["stack", "qube", "link"])
    rx_p = CounterMetricFamily("netstack_link_receive_packets", "Packets received on a "
                               "qube's link", labels=["stack", "qube", "link"])
    tx_p = CounterMetricFamily("netstack_link_transmit_packets", "Packets sent on a qube's "
                               "link", labels=["stack", "qube", "link"])
    link_up = GaugeMetricFamily("netstack_link_up", "1 when the link's operational state "
                                "is UP (or UNKNOWN, as tunnels report)",
                                labels=["stack", "qube", "link"])
    tun_up = GaugeMetricFamily("netstack_vpn_tunnel_up", "1 when the VPN tunnel is up",
                               labels=["stack", "qube", "type"])
    hs_age = GaugeMetricFamily("netstack_vpn_handshake_age_seconds", "Seconds since the "
                               "WireGuard tunnel's last handshake", labels=["stack", "qube"])
    restarts = CounterMetricFamily("netstack_process_restarts", "Restarts of a daemon by "
                                   "the supervisor", labels=["stack", "process"])
    alive = GaugeMetricFamily("netstack_process_up", "1 when the daemon runs",
                              labels=["stack", "process"])
    failovers = CounterMetricFamily("netstack_vpn_failovers", "Server switches of a VPN "
                                    "qube since `up`", labels=["stack", "qube"])
    server = GaugeMetricFamily("netstack_vpn_server_index", "Which of the VPN qube's "
                               "servers is in use (0: the first)", labels=["stack", "qube"])
    boot = GaugeMetricFamily("netstack_tor_bootstrap_ratio", "Tor's bootstrap progress "
                             "(1: done)", labels=["stack", "qube"])
    circ = GaugeMetricFamily("netstack_tor_circuit_established", "1 when Tor has a built "
                             "circuit", labels=["stack", "qube"])
    circs = GaugeMetricFamily("netstack_tor_circuits_built", "Tor's built circuits",
                              labels=["stack", "qube"])
    for q in s["qubes"]:
        name = q["name"]
        qube_up.add_metric([stack, name, q["kind"], q["netvm"] or ""],
                           1.0 if q["health"]["state"] == "up" else 0.0)
        for i in q["interfaces"]:
            lab = [stack, name, i["name"]]
            link_up.add_metric(lab, 1.0 if i["state"] in ("UP", "UNKNOWN") else 0.0)
            for fam, key in ((rx_b, "rx_bytes"), (tx_b, "tx_bytes"),
                             (rx_p, "rx_packets"), (tx_p, "tx_packets")):
                if i.get(key) is not None:
                    fam.add_metric(lab, float(i[key]))
        v = q.get("vpn")
        if v:
            tun_up.add_metric([stack, name, v["type"]], 1.0 if v.get("tunnel") == "up" else 0.0)
            if v.get("handshake_age_s") is not None:
                hs_age.add_metric([stack, name], float(v["handshake_age_s"]))
            f = v.get("failover")
            if f:
                failovers.add_metric([stack, name], float(len(f.get("switches", []))))
                server.add_metric([stack, name], float(f.get("current", 0)))
        t = q.get("tor")
        if t:
            if t.get("bootstrap") is not None:
                boot.add_metric([stack, name], float(t["bootstrap"]) / 100)
            circ.add_metric([stack, name], 1.0 if t.get("circuit_established") else 0.0)
            if t.get("circuits_built") is not None:
                circs.add_metric([stack, name], float(t["circuits_built"]))
    for p in s.get("processes", []):
        alive.add_metric([stack, p["name"]], 1.0 if p.get("alive") else 0.0)
        if p.get("restarts") is not None:
            restarts.add_metric([stack, p["name"]], float(p["restarts"]))
    hits_p = CounterMetricFamily("netstack_firewall_rule_packets", "Packets a qube's "
                                 "firewall rule matched in its netvm (rule=default: "
                                 "nothing matched, dropped)",
                                 labels=["stack", "qube", "netvm", "rule", "action"])
    hits_b = CounterMetricFamily("netstack_firewall_rule_bytes", "Bytes a qube's firewall "
                                 "rule matched in its netvm",
                                 labels=["stack", "qube", "netvm", "rule", "action"])
    for h in inp.rules:
        lab = [stack, h.qube, h.netvm, h.rule, h.action]
        hits_p.add_metric(lab, float(h.packets))
        hits_b.add_metric(lab, float(h.bytes))
    audit_ok = GaugeMetricFamily("netstack_audit_ok", "1 when the last `netstack audit` "
                                 "passed, 0 when it failed", labels=["stack"])
    audit_t = GaugeMetricFamily("netstack_audit_timestamp_seconds", "When the last "
                                "`netstack audit` ran (Unix time)", labels=["stack"])
    audit_failed = GaugeMetricFamily("netstack_audit_failed_properties", "Properties the "
                                     "last audit did not prove", labels=["stack"])
    if inp.audit:
        audit_ok.add_metric([stack], 1.0 if inp.audit["ok"] else 0.0)
        audit_t.add_metric([stack], float(inp.audit["time"]))
        audit_failed.add_metric([stack], float(inp.audit["failed"]))
    # the uplink watch (netstack/watch.py), as `status` reads its file
    w_alarms = GaugeMetricFamily("netstack_watch_alarms", "Packets the chain does not allow "
                                 "seen leaving the uplink since the last `watch --clear`",
                                 labels=["stack"])
    w_up = GaugeMetricFamily("netstack_watch_up", "1 when the uplink watch runs",
                             labels=["stack"])
    w_cut = GaugeMetricFamily("netstack_watch_uplink_cut", "1 when the watch set the uplink "
                              "down (on_leak = \"cut\")", labels=["stack"])
    w = inp.status.get("watch")
    if w:
        w_alarms.add_metric([stack], float(w["alarms"]))
        w_up.add_metric([stack], 1.0 if w["running"] else 0.0)
        w_cut.add_metric([stack], 1.0 if w["cut"] else 0.0)
    return [up, problems, qube_up, link_up, rx_b, tx_b, rx_p, tx_p, tun_up, hs_age, failovers,
            server, boot, circ, circs, alive, restarts, hits_p, hits_b, audit_ok, audit_t,
            audit_failed, w_alarms, w_up, w_cut]


class StackCollector:
    """A prometheus_client collector reading the stacks afresh at every scrape."""

    def __init__(self, stacks: list[str], k: Kernel) -> None:
        self.stacks, self.k = stacks, k

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        from netstack.errors import NetstackError

        scraped = GaugeMetricFamily("netstack_scrape_ok", "1 when the stack could be read "
                                    "(0: not up, or its state unreadable)", labels=["stack"])
        merged: dict[str, Any] = {}
        for name in self.stacks:
            try:
                fams = families(collect(name, self.k))
            except NetstackError:
                scraped.add_metric([name], 0.0)
                continue
            scraped.add_metric([name], 1.0)
            for f in fams:  # one family per metric name, every stack's samples in it
                if f.name in merged:
                    merged[f.name].samples += f.samples
                else:
                    merged[f.name] = f
        yield scraped
        yield from merged.values()


def registry(stacks: list[str], k: Kernel) -> Any:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    c: Collector = StackCollector(stacks, k)  # type: ignore[assignment]
    reg.register(c)
    return reg


def render(stacks: list[str], k: Kernel) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry(stacks, k)).decode()


def listen_address(text: str) -> tuple[str, int]:
    """--listen ADDR:PORT, loopback only: the metrics name qubes, endpoints and rule
    counts, which are for the host's owner (a scraper elsewhere goes through a proxy of
    theirs, with its own authentication)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
        n = int(port)
    except ValueError:
        ip, n = None, 0
    if not sep or ip is None or not 1 <= n <= 65535:
        raise UsageError(f"metrics --listen: {text!r} is not ADDR:PORT (e.g. "
                         "127.0.0.1:9853 or [::1]:9853)")
    if not ip.is_loopback:
        raise UsageError(f"metrics --listen: {host} is not a loopback address: the metrics "
                         "are served on the host's loopback only (e.g. 127.0.0.1:9853); "
                         "put your own authenticating proxy in front for a remote scraper")
    return str(ip), n
