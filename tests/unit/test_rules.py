"""Ruleset builders: golden JSON per qube of configs/basic.toml, plus the properties each
role must have, checked on the data itself (so a golden update cannot hide a regression).
Regenerate goldens with NETSTACK_UPDATE_GOLDEN=1 after a deliberate change, and review."""

import json
import os
from pathlib import Path

import pytest

from netstack import config, plan
from netstack.rules import nft
from tests.unit.test_config import ROOT

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def basic_plan(ipv6=False):
    text = (ROOT / "configs" / "basic.toml").read_text()
    if ipv6:
        text += "\n[stack]\nipv6 = true\n"
    return plan.build(config.parse(text), "main", plan.UplinkSpec("lab"))


def rules_of(ruleset, chain):
    return [r["rule"] for r in ruleset["nftables"] if "rule" in r and r["rule"]["chain"] == chain]


def chain_of(ruleset, name):
    return next(c["chain"] for c in ruleset["nftables"] if "chain" in c
                and c["chain"]["name"] == name)


@pytest.mark.parametrize("qube", ["sys-net", "sys-firewall", "work", "personal"])
def test_golden(qube):
    rs = basic_plan().ns(f"nst-main-{qube}").ruleset
    path = GOLDEN / f"basic-{qube}.json"
    text = json.dumps(rs, indent=1, sort_keys=True) + "\n"
    if os.environ.get("NETSTACK_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.read_text() == text, f"ruleset of {qube} changed; see {path}"


@pytest.mark.parametrize("qube", ["sys-net", "sys-firewall", "work"])
def test_default_drop_and_invalid_first(qube):
    rs = basic_plan().ns(f"nst-main-{qube}").ruleset
    for name in ("input", "forward", "output"):
        assert chain_of(rs, name)["policy"] == "drop"
    for name in ("prerouting", "forward", "output"):
        first = rules_of(rs, name)[0]
        assert first["comment"] == "drop INVALID"
        assert first["expr"][0] == nft.ct_state("invalid")
        assert first["expr"][-1] == nft.DROP
    assert chain_of(rs, "prerouting")["prio"] > -200  # after conntrack, else state unknown


def test_firewall_forwards_clients_only_upstream():
    rs = basic_plan().ns("nst-main-sys-firewall").ruleset
    accepts = [r for r in rules_of(rs, "forward") if r["expr"][-1] == nft.ACCEPT]
    assert [r["comment"] for r in accepts] == ["replies", "clients -> upstream only"]
    fwd = accepts[1]["expr"]
    assert fwd[0] == nft.iifname("vif3", "vif4") and fwd[1] == nft.oifname("eth0")


def test_firewall_antispoof_per_client_v4_and_v6():
    for ipv6 in (False, True):
        rs = basic_plan(ipv6).ns("nst-main-sys-firewall").ruleset
        spoof = {r["comment"]: r["expr"] for r in rules_of(rs, "prerouting")
                 if r.get("comment", "").startswith("antispoof")}
        assert spoof["antispoof work"][:3] == [nft.iifname("vif4"), nft.nfproto("ipv4"),
                                               nft.ip_saddr("10.137.0.4", "!=")]
        assert spoof["antispoof personal"][2] == nft.ip_saddr("10.137.0.3", "!=")
        v6 = spoof["antispoof work (IPv6)" if ipv6 else "antispoof work (IPv6 off)"]
        assert v6[1] == nft.nfproto("ipv6") and v6[-1] == nft.DROP
        if ipv6:
            assert "fd09:24ef:4179::a89:4" in json.dumps(v6)


def test_ipv6_is_dropped_everywhere_when_off():
    for ns in basic_plan().namespaces:
        if not ns.owner.startswith("qube:"):
            continue
        for chain in ("prerouting", "forward", "output"):
            assert any(r["expr"][0] == nft.nfproto("ipv6") and r["expr"][-1] == nft.DROP
                       for r in rules_of(ns.ruleset, chain)), (ns.name, chain)


def test_net_masquerades_and_answers_virtual_dns():
    rs = basic_plan().ns("nst-main-sys-net").ruleset
    post = rules_of(rs, "nat_postrouting")
    assert post[0]["expr"] == [nft.oifname("uplink"), nft.MASQUERADE]
    dnat = rules_of(rs, "nat_prerouting")
    assert {r["expr"][1]["match"]["right"] for r in dnat} == {"10.139.1.1", "10.139.1.2"}
    assert all(r["expr"][-1] == nft.dnat4("198.51.100.53") for r in dnat)


def test_app_talks_only_to_its_netvm_link():
    rs = basic_plan().ns("nst-main-work").ruleset
    out = [r for r in rules_of(rs, "output") if r["expr"][-1] == nft.ACCEPT]
    assert [r["comment"] for r in out] == ["replies", "loopback", "own traffic to upstream"]
    assert out[-1]["expr"][0] == nft.oifname("eth0")
    assert [r for r in rules_of(rs, "input") if r["expr"][-1] == nft.ACCEPT][-1]["comment"] \
        == "loopback"
    assert not [r for r in rules_of(rs, "forward") if r["comment"] != "replies"
                and r["expr"][-1] == nft.ACCEPT]  # forwards nothing


def test_commands_replace_the_table_atomically():
    rs = basic_plan().ns("nst-main-work").ruleset
    cmds = nft.commands(rs)["nftables"]
    table = {"table": {"family": "inet", "name": "netstack"}}
    assert cmds[:3] == [{"add": table}, {"delete": table}, {"add": table}]
    assert all(list(c) == ["add"] for c in cmds[3:])
