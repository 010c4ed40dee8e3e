"""`netstack metrics` (pure parts): the families one scrape makes from a status, the
client rules' counters read from a netvm's listing, and --listen's loopback-only rule."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from netstack import metrics
from netstack.errors import UsageError


def status(state: str = "up") -> dict:
    link = {"name": "eth0", "state": "UP", "rx_bytes": 10, "tx_bytes": 20,
            "rx_packets": 1, "tx_packets": 2}
    return {"stack": "s1", "health": {"state": state, "problems": [] if state == "up"
                                      else ["x"]},
            "qubes": [
                {"name": "sys-proxyvm", "kind": "vpn", "netvm": "sys-firewall",
                 "health": {"state": "up", "problems": []}, "interfaces": [link],
                 "vpn": {"type": "wireguard", "tunnel": "up", "handshake_age_s": 4.5,
                         "failover": {"current": 1, "switches": [{}, {}]}}},
                {"name": "sys-whonix", "kind": "tor", "netvm": "sys-proxyvm",
                 "health": {"state": "up", "problems": []}, "interfaces": [],
                 "tor": {"bootstrap": 100, "circuit_established": True,
                         "circuits_built": 7}}],
            "processes": [{"name": "vpn-sys-proxyvm", "alive": True, "restarts": 3}]}


def scrape(inp: metrics.Inputs) -> dict[str, list]:
    class C:
        def collect(self):
            yield from metrics.families(inp)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(C())
    text = generate_latest(reg).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, **labels) -> float:
    hit = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hit) == 1, (labels, samples)
    return hit[0]


def test_a_scrape_reads_what_status_says():
    m = scrape(metrics.Inputs(status(), [metrics.RuleHits("work", "sys-firewall", "2",
                                                          "drop", 5, 300)],
                              {"time": 1.7e9, "ok": False, "failed": 2}))
    assert value(m["netstack_up"], stack="s1") == 1
    assert value(m["netstack_link_receive_bytes"], qube="sys-proxyvm", link="eth0") == 10
    assert value(m["netstack_link_transmit_packets"], qube="sys-proxyvm", link="eth0") == 2
    assert value(m["netstack_vpn_handshake_age_seconds"], qube="sys-proxyvm") == 4.5
    assert value(m["netstack_vpn_failovers"], qube="sys-proxyvm") == 2
    assert value(m["netstack_vpn_server_index"], qube="sys-proxyvm") == 1
    assert value(m["netstack_tor_bootstrap_ratio"], qube="sys-whonix") == 1.0
    assert value(m["netstack_tor_circuits_built"], qube="sys-whonix") == 7
    assert value(m["netstack_process_restarts"], process="vpn-sys-proxyvm") == 3
    assert value(m["netstack_firewall_rule_packets"], qube="work", rule="2",
                 action="drop") == 5
    assert value(m["netstack_audit_ok"], stack="s1") == 0
    assert value(m["netstack_audit_failed_properties"], stack="s1") == 2


def test_a_degraded_stack_and_no_audit_yet():
    m = scrape(metrics.Inputs(status("degraded")))
    assert value(m["netstack_up"], stack="s1") == 0
    assert value(m["netstack_problems"], stack="s1") == 1
    assert m["netstack_audit_ok"] == []  # never audited: no sample, not a made-up 0


def rule(comment: str, *expr: dict) -> dict:
    return {"rule": {"family": "inet", "table": "t", "chain": "fw-work", "comment": comment,
                     "expr": list(expr)}}


def test_rule_counters_add_up_per_rule_of_the_list():
    c = {"counter": {"packets": 3, "bytes": 180}}
    listing = {"nftables": [
        {"metainfo": {}},
        rule("work rule 1: action=accept specialtarget=dns", c, {"accept": None}),
        rule("work rule 1: action=accept specialtarget=dns", c, {"accept": None}),  # tcp
        rule("work rule 2: action=drop proto=tcp", c, {"drop": None}),
        rule("work: nothing matched", {"counter": {"packets": 9, "bytes": 900}},
             {"drop": None}),
        rule("anti-spoofing", c, {"drop": None}),  # not a client rule
        rule("work rule 3: action=accept", {"accept": None}),  # no counter: not counted
    ]}
    hits = {(h.qube, h.rule, h.action): (h.packets, h.bytes)
            for h in metrics.hits_of(listing, "sys-firewall")}
    assert hits == {("work", "1", "accept"): (6, 360), ("work", "2", "drop"): (3, 180),
                    ("work", "default", "drop"): (9, 900)}


@pytest.mark.parametrize("text,ok", [
    ("127.0.0.1:9853", ("127.0.0.1", 9853)), ("[::1]:9853", ("::1", 9853)),
    ("127.0.0.2:1", ("127.0.0.2", 1)),
    ("0.0.0.0:9853", None), ("192.0.2.1:9853", None), ("[2001:db8::1]:80", None),
    ("localhost:9853", None), ("127.0.0.1", None), ("127.0.0.1:0", None),
    ("127.0.0.1:65536", None), ("127.0.0.1:x", None),
])
def test_listen_only_on_loopback(text, ok):
    if ok:
        assert metrics.listen_address(text) == ok
    else:
        with pytest.raises(UsageError) as e:
            metrics.listen_address(text)
        assert "\n" not in str(e.value) and "--listen" in str(e.value)


def test_the_grafana_dashboard_asks_only_for_metrics_we_export():
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dash = json.loads((root / "docs" / "grafana-dashboard.json").read_text())
    m = scrape(metrics.Inputs(status(), [metrics.RuleHits("w", "f", "1", "accept", 1, 1)],
                              {"time": 1.0, "ok": True, "failed": 0}))
    exported = {s.name for samples in m.values() for s in samples}
    asked = {n for p in dash["panels"] for t in p["targets"]
             for n in re.findall(r"netstack_[a-z_]+", t["expr"])}
    assert asked and asked <= exported, asked - exported
