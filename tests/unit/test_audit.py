"""The audit's evaluator and properties on the generated rulesets (all PASS) and on a corpus
of deliberately broken rulesets, one per leak class, each caught with a concrete
counterexample. No root: pure evaluation of JSON."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from netstack import stack
from netstack.audit import audit
from netstack.model import UplinkSpec
from netstack.tor.gateway import tor_uid
from tests.unit.test_config import ROOT
from tests.unit.test_vpn_parsers import WG_MULLVAD_LIKE

CORPUS = Path(__file__).resolve().parents[1] / "audit_corpus"


def make_plan(tmp_path, cfg="tests/configs/tor-two-workstations.toml"):
    """The config's plan over the lab, with a provider file whose endpoint is an address
    (203.0.113.10, the lab VPN server's), so the kill switch's set is in the ruleset."""
    wg = tmp_path / "client-wireguard.conf"
    wg.write_text(WG_MULLVAD_LIKE.replace("185.65.134.1", "203.0.113.10"))
    c = tmp_path / "config.toml"
    c.write_text((ROOT / cfg).read_text().replace('"lab:wireguard"', f'"{wg}"'))
    return stack.plan_only(str(c), "main", UplinkSpec("lab"))


def rulesets(p):
    return {n.name: n.ruleset for n in p.namespaces if n.ruleset}


def results(p, rs):
    res, _ = audit(p, rs, None)
    return {(r.qube, r.property): r for r in res}


def test_generated_chain_audits_clean(tmp_path):
    for cfg in ("tests/configs/tor-two-workstations.toml", "configs/basic.toml"):
        p = make_plan(tmp_path, cfg)
        res = results(p, rulesets(p))
        bad = {k: (r.status, r.counterexample) for k, r in res.items() if r.status != "PASS"}
        assert not bad
        assert len(res) >= 16


@pytest.mark.parametrize("cfg", ["configs/basic.toml", "configs/vpn.toml",
                                 "configs/tor-over-vpn.toml",
                                 "tests/configs/tor-two-workstations.toml"])
def test_generated_chain_with_ipv6_on_audits_clean(tmp_path, cfg):
    """With IPv6 on, the properties follow: no "no IPv6 egress" claim, but anti-spoofing
    admits exactly each client's own global and link-local addresses, and the kill switch
    and the Tor gateway are checked with IPv6 classes too."""
    src = tmp_path / "v6.toml"
    src.write_text("[stack]\nipv6 = true\n\n" + (ROOT / cfg).read_text())
    p = make_plan(tmp_path, str(src))
    res = results(p, rulesets(p))
    assert not {k: (r.status, r.counterexample) for k, r in res.items() if r.status != "PASS"}
    assert not [k for k in res if k[1] == "no IPv6 egress"]
    spoof = [r for k, r in res.items() if k[1].startswith("anti-spoofing")]
    assert spoof and all("(IPv6)" in r.reason and "fe80::a89:" in r.reason for r in spoof)


def test_antispoofing_that_admits_all_link_local_fails_with_ipv6_on(tmp_path):
    src = tmp_path / "v6.toml"
    src.write_text("[stack]\nipv6 = true\n\n" + (ROOT / "configs/basic.toml").read_text())
    p = make_plan(tmp_path, str(src))
    rs = copy.deepcopy(rulesets(p))
    for i in rs[BFW]["nftables"]:
        r = i.get("rule")
        if r and r.get("comment") == "antispoof work (IPv6)":  # the old rule: any fe80::/10
            r["expr"][2]["match"]["right"]["set"][1] = {"prefix": {"addr": "fe80::", "len": 10}}
    r = results(p, rs)[("sys-firewall", "anti-spoofing work")]
    assert r.status == "FAIL" and r.counterexample["saddr"].startswith("fe80::")


def _rules(rs, ns):
    return rs[ns]["nftables"]


def drop_rules(rs, ns, pred):
    rs[ns]["nftables"] = [i for i in rs[ns]["nftables"] if not ("rule" in i and pred(i["rule"]))]


def insert_rule(rs, ns, chain, expr, comment=None, first=True):
    items = rs[ns]["nftables"]
    rule = {"rule": {"family": "inet", "table": "netstack", "chain": chain, "expr": expr,
                     **({"comment": comment} if comment else {})}}
    idx = next((k for k, i in enumerate(items) if "rule" in i and i["rule"]["chain"] == chain),
               len(items)) if first else len(items)
    items.insert(idx, rule)


def match(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


IIF = {"meta": {"key": "iifname"}}
OIF = {"meta": {"key": "oifname"}}
DPORT = {"payload": {"protocol": "tcp", "field": "dport"}}
SKUID, SKGID = {"meta": {"key": "skuid"}}, {"meta": {"key": "skgid"}}
L4 = {"meta": {"key": "l4proto"}}
FW, VPN, GW = "nst-main-sys-firewall", "nst-main-sys-proxyvm", "nst-main-sys-whonix"
BFW = "nst-main-sys-firewall"


def mutate(name, rs):
    """One leak class each. Returns (qube, property) expected to FAIL."""
    if name == "invalid-not-dropped":
        drop_rules(rs, FW, lambda r: r.get("comment") == "drop INVALID")
        return ("sys-firewall", "INVALID dropped first")
    if name == "ipv6-falls-through-ip-saddr":
        drop_rules(rs, GW, lambda r: "IPv6" in str(r.get("comment")) and
                    r["chain"] == "prerouting")
        return ("sys-whonix", "anti-spoofing anon-whonix")
    if name == "kill-switch-missing-in-forward":
        insert_rule(rs, VPN, "forward", [match(IIF, "vif4"), {"accept": None}], "oops")
        return ("sys-proxyvm", "kill switch (forward)")
    if name == "redirect-without-drop":
        for i in rs[GW]["nftables"]:
            if "chain" in i and i["chain"]["name"] == "forward":
                i["chain"]["policy"] = "accept"
        drop_rules(rs, GW, lambda r: r["chain"] == "forward")
        return ("sys-whonix", "Tor gateway forwards nothing")
    if name == "spoof-check-missing":
        drop_rules(rs, GW, lambda r: r.get("comment") == "antispoof anon-whonix")
        return ("sys-whonix", "anti-spoofing anon-whonix")
    if name == "inter-qube-hole":
        insert_rule(rs, GW, "forward", [match(IIF, "vif5"), match(OIF, "vif6"), {"accept": None}])
        return ("sys-whonix", "no path between clients")
    if name == "control-port-exposed":
        insert_rule(rs, GW, "input", [match({"meta": {"key": "l4proto"}}, "tcp"),
                                       match(DPORT, 9051), {"accept": None}])
        return ("sys-whonix", "control port only through the filter")
    if name == "wildcard-interface-mistake":
        for i in rs[VPN]["nftables"]:
            r = i.get("rule")
            if r and r.get("comment") == "clients -> tunnel only":
                r["expr"][1] = match(OIF, "e*")  # "every ethX uplink": a wildcard into eth0
        return ("sys-proxyvm", "kill switch (forward)")
    if name == "rule-after-goto":
        rs[VPN]["nftables"].insert(1, {"chain": {"family": "inet", "table": "netstack",
                                                 "name": "clients"}})
        rs[VPN]["nftables"].append({"rule": {"family": "inet", "table": "netstack",
                                             "chain": "clients", "expr": [{"accept": None}]}})
        insert_rule(rs, VPN, "forward", [match(IIF, "vif4"), {"goto": {"target": "clients"}}])
        return ("sys-proxyvm", "kill switch (forward)")
    if name == "verdict-map-hole":
        insert_rule(rs, GW, "input", [
            match({"meta": {"key": "l4proto"}}, "tcp"),
            {"vmap": {"key": DPORT, "data": {"set": [[9040, {"accept": None}],
                                                      [9051, {"accept": None}]]}}}])
        # TransPort reached straight (not through the redirect) by the map's 9040
        return ("sys-whonix", "only TransPort, DNSPort and the SOCKS ports from clients")
    # one for each property the first corpus never broke (each FAILs only that way)
    if name == "default-accept-policy":
        for i in rs[FW]["nftables"]:
            if "chain" in i and i["chain"]["name"] == "input":
                i["chain"]["policy"] = "accept"
        return ("sys-firewall", "default drop")
    if name == "ipv6-egress-by-uid":  # the example: any process but root
        insert_rule(rs, FW, "output", [match(SKUID, 0, "!="), {"accept": None}])
        return ("sys-firewall", "no IPv6 egress")
    if name == "kill-switch-uid-hole":  # the example: uid 1000 in clear
        insert_rule(rs, VPN, "output", [match(OIF, "eth0"), match(SKUID, 1000), {"accept": None}])
        return ("sys-proxyvm", "kill switch (own output)")
    if name == "tor-output-any-gid":
        insert_rule(rs, GW, "output", [match(SKGID, 0), {"accept": None}])
        return ("sys-whonix", "gateway output only from tor")
    if name == "transport-without-redirect":  # TransPort straight, not through the NAT
        insert_rule(rs, GW, "input", [match(IIF, "vif5"), match(L4, "tcp"), match(DPORT, 9040),
                                       {"accept": None}])
        return ("sys-whonix", "only TransPort, DNSPort and the SOCKS ports from clients")
    if name == "redirect-every-tcp":  # the SYN-only match gone: mid-stream TCP too
        for i in rs[GW]["nftables"]:
            r = i.get("rule")
            if r and r.get("comment") == "TCP SYN -> TransPort":
                r["expr"] = [e for e in r["expr"] if "&" not in json.dumps(e)]
        return ("sys-whonix", "only new SYNs are redirected")
    if name == "endpoint-set-widened":
        for i in rs[VPN]["nftables"]:
            s = i.get("set")
            if s and s["name"] == "vpn_endpoints":
                s["elem"] = s["elem"] + [{"concat": ["198.51.100.53", "udp", 53]}]
        return ("sys-proxyvm", "VPN endpoints exactly as resolved")
    if name == "fwd-around-kill-switch":  # the issue's: the client's link straight to eth0
        netdev_table(rs, VPN, "ingress", "vif4", [{"fwd": {"dev": "eth0"}}])
        return ("sys-proxyvm", "kill switch (forward)")
    if name == "dup-to-uplink":  # a copy of what enters the tunnel, in clear on the uplink
        netdev_table(rs, VPN, "egress", "wg3-main", [{"dup": {"dev": "eth0"}}])
        return ("sys-proxyvm", "every path through the qube is modelled")
    if name == "fwd-between-clients":  # the issue's, in the Tor gateway: to the other's link
        netdev_table(rs, GW, "ingress", "vif5", [
            match({"payload": {"protocol": "ip", "field": "daddr"}}, "10.137.0.6"),
            {"fwd": {"dev": "vif6"}}])
        return ("sys-whonix", "Tor gateway forwards nothing")
    if name == "established-in-forward":  # a generic "replies" accept in a kill switch
        insert_rule(rs, VPN, "forward", [match({"ct": {"key": "state"}}, ["established"], "in"),
                                          {"accept": None}])
        return ("sys-proxyvm", "kill switch (forward)")
    raise KeyError(name)


CASES = ["invalid-not-dropped", "ipv6-falls-through-ip-saddr", "kill-switch-missing-in-forward",
         "redirect-without-drop", "spoof-check-missing", "inter-qube-hole",
         "control-port-exposed", "wildcard-interface-mistake", "rule-after-goto",
         "verdict-map-hole", "default-accept-policy", "ipv6-egress-by-uid",
         "kill-switch-uid-hole", "tor-output-any-gid", "transport-without-redirect",
         "redirect-every-tcp", "endpoint-set-widened", "established-in-forward",
         "fwd-around-kill-switch", "dup-to-uplink", "fwd-between-clients"]


def netdev_table(rs, ns, hook, dev, expr, table="evil"):
    """A netdev table netstack never makes: one base chain on `dev`'s hook, one rule."""
    rs[ns]["nftables"] += [
        {"table": {"family": "netdev", "name": table}},
        {"chain": {"family": "netdev", "table": table, "name": hook, "type": "filter",
                   "hook": hook, "prio": 0, "dev": dev, "policy": "accept"}},
        {"rule": {"family": "netdev", "table": table, "chain": hook, "expr": expr}}]


@pytest.mark.parametrize("name", CASES)
def test_broken_ruleset_is_caught_with_a_counterexample(tmp_path, name):
    p = make_plan(tmp_path)
    rs = copy.deepcopy(rulesets(p))
    key = mutate(name, rs)
    res = results(p, rs)
    r = res[key]
    assert r.status == "FAIL", (name, r.status, r.reason)
    ce = r.counterexample
    assert ce and r.trace
    if name == "invalid-not-dropped":
        assert ce["ct_state"] == "invalid"
    if name == "ipv6-falls-through-ip-saddr":
        assert ce["family"] == "ipv6" and ce["iifname"] == "vif5"
    if name in ("kill-switch-missing-in-forward", "wildcard-interface-mistake",
                "rule-after-goto"):
        assert ce["iifname"] == "vif4" and ce["oifname"] != "wg3-main"
    if name == "rule-after-goto":
        assert any("goto clients" in t for t in r.trace)
    if name == "control-port-exposed":
        assert ce["dport"] == 9051
    if name == "verdict-map-hole":
        assert ce["dport"] == 9040 and "dnat" not in ce.get("ct_status", [])
    if name == "inter-qube-hole":
        assert {ce["iifname"], ce["oifname"]} == {"vif5", "vif6"}
    if name == "spoof-check-missing":
        assert ce["saddr"] != "10.137.0.5"
    if name == "ipv6-egress-by-uid":
        assert ce["family"] == "ipv6" and ce["skuid"] not in (None, 0)
    if name == "kill-switch-uid-hole":
        assert ce["skuid"] == 1000 and ce["oifname"] == "eth0"
    if name == "tor-output-any-gid":
        assert ce["skgid"] == 0 and ce.get("skuid") != tor_uid()
    if name == "transport-without-redirect":
        assert ce["dport"] == 9040 and "dnat" not in ce.get("ct_status", [])
    if name == "redirect-every-tcp":
        assert ce.get("tcp_flags", []) != ["syn"] and any("redirect" in t for t in r.trace)
    if name == "endpoint-set-widened":
        assert ce == {"unexpected": [["198.51.100.53", "udp", 53]]}
    if name == "established-in-forward":
        assert ce["ct_state"] == "established" and ce["oifname"] != "wg3-main"
    if name == "fwd-around-kill-switch":
        assert ce["iifname"] == "vif4" and ce["oifname"] == "eth0"
        assert any("fwd to eth0" in t for t in r.trace)
    if name == "dup-to-uplink":
        assert ce["oifname"] == "wg3-main" and r.reason == "egress: dup eth0"
    if name == "fwd-between-clients":
        assert (ce["iifname"], ce["oifname"], ce["daddr"]) == ("vif5", "vif6", "10.137.0.6")
    if name == "default-accept-policy":
        assert not any(t.endswith("-> accept") and "policy" not in t for t in r.trace)
    # the corpus on disk is this exact ruleset (regenerate with NETSTACK_UPDATE_GOLDEN=1)
    import os

    path = CORPUS / f"{name}.json"
    ns = {"sys-firewall": FW, "sys-proxyvm": VPN, "sys-whonix": GW}[key[0]]
    text = json.dumps(rs[ns], indent=1, sort_keys=True) + "\n"
    if os.environ.get("NETSTACK_UPDATE_GOLDEN"):
        CORPUS.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text


def test_unknown_construct_is_unproven_never_pass(tmp_path):
    p = make_plan(tmp_path)
    rs = copy.deepcopy(rulesets(p))
    insert_rule(rs, GW, "forward", [{"match": {"op": "==", "left": {"meta": {
        "key": "cgroup"}}, "right": 5}}, {"accept": None}])
    r = results(p, rs)[("sys-whonix", "Tor gateway forwards nothing")]
    assert r.status == "UNPROVEN" and "cgroup" in r.reason


def test_limit_is_may_match(tmp_path):
    p = make_plan(tmp_path)
    rs = copy.deepcopy(rulesets(p))
    insert_rule(rs, GW, "input", [match({"meta": {"key": "l4proto"}}, "tcp"), match(DPORT, 9051),
                                   {"limit": {"rate": 1, "per": "second"}}, {"accept": None}])
    r = results(p, rs)[("sys-whonix", "control port only through the filter")]
    assert r.status in ("FAIL", "UNPROVEN") and r.status != "PASS"


def test_end_to_end_only_transport_on_the_isp_link(tmp_path):
    for cfg, ws, want in (("configs/vpn.toml", "work", "transport"),
                          ("tests/configs/tor-two-workstations.toml", "anon-whonix", "proxied")):
        p = make_plan(tmp_path, cfg)
        r = results(p, rulesets(p))[(ws, "end to end: only VPN transport on the ISP link")]
        # every packet the workstation can send, as regions: each ends somewhere named
        assert r.status == "PASS" and want in r.reason and "blocked" in r.reason
        assert r.classes >= 10 and "CLEAR" not in str(r.trace)


def test_end_to_end_catches_a_missing_kill_switch(tmp_path):
    """Traffic to the VPN endpoint's own address is routed to the uplink (the endpoint
    route); with the kill switch's forward rule gone and everything masqueraded (the usual
    VPN-gateway recipe) it reaches the ISP link in clear. Without the masquerade, sys-
    firewall's anti-spoofing would still stop it: the walk sees that too."""
    p = make_plan(tmp_path, "configs/vpn.toml")
    rs = copy.deepcopy(rulesets(p))
    insert_rule(rs, "nst-main-sys-proxyvm", "forward",
                 [match(IIF, "vif4"), match(OIF, "eth0"), {"accept": None}])
    r = results(p, rs)[("work", "end to end: only VPN transport on the ISP link")]
    assert r.status == "PASS" and "blocked" in r.reason  # anti-spoofing one hop up
    insert_rule(rs, "nst-main-sys-proxyvm", "nat_postrouting",
                 [match(OIF, "eth0"), {"masquerade": None}])
    r = results(p, rs)[("work", "end to end: only VPN transport on the ISP link")]
    assert r.status == "FAIL"
    assert r.counterexample["daddr"] == "203.0.113.10"
    assert any("ISP link CLEAR" in t for t in r.trace)
    assert any("sys-proxyvm: forward vif4->eth0 accept" in t for t in r.trace)
