"""Ruleset builders: golden JSON per qube of configs/basic.toml, plus the properties each
role must have, checked on the data itself (so a golden update cannot hide a regression).
Regenerate goldens with NETSTACK_UPDATE_GOLDEN=1 after a deliberate change, and review."""

import json
import os
from pathlib import Path

import pytest

from netstack import config, plan, stack
from netstack.codec import dump
from netstack.kinds.registry import SPECS
from netstack.rules import nft
from tests.unit.test_config import ROOT

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def basic_plan(ipv6=False):
    text = (ROOT / "configs" / "basic.toml").read_text()
    if ipv6:
        text += "\n[stack]\nipv6 = true\n"
    return plan.build(config.parse(text, SPECS), "main", plan.UplinkSpec("lab"))


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
    for name in ("prerouting", "output"):
        first = rules_of(rs, name)[0]
        assert first["comment"] == "drop INVALID"
        assert first["expr"][0] == nft.ct_state("invalid")
        assert first["expr"][-1] == nft.DROP
    assert chain_of(rs, "prerouting")["prio"] > -200  # after conntrack, else state unknown
    # forward sees only what prerouting let through: replies meet their accept first
    fwd = rules_of(rs, "forward")
    assert not any(r.get("comment") == "drop INVALID" for r in fwd)
    if qube != "work":
        assert fwd[0]["comment"] == "replies"


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
        for chain in ("prerouting", "output"):  # forward: only what prerouting passed
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


def vpn_plan(tmp_path, endpoint="203.0.113.10:51820"):
    from tests.unit.test_vpn_parsers import WG_MULLVAD_LIKE

    (tmp_path / "wg.conf").write_text(WG_MULLVAD_LIKE.replace("185.65.134.1:51820", endpoint))
    text = (ROOT / "configs" / "vpn.toml").read_text().replace("lab:wireguard", "wg.conf")
    cfg = tmp_path / "vpn.toml"
    cfg.write_text(text)
    return stack.plan_only(str(cfg), "main", plan.UplinkSpec("lab"))


def test_vpn_kill_switch_rules(tmp_path):
    p = vpn_plan(tmp_path)
    rs = p.ns("nst-main-sys-proxyvm").ruleset
    tun = p.qube("sys-proxyvm").info.dev
    assert tun == "wg3-main"
    fwd = [r for r in rules_of(rs, "forward") if r["expr"][-1] == nft.ACCEPT]
    # forwarded traffic leaves only through the tunnel; replies only come from it
    assert [r["comment"] for r in fwd] == ["clients -> tunnel only", "replies from the tunnel"]
    assert fwd[0]["expr"][1] == nft.oifname(tun)
    assert fwd[1]["expr"][0] == nft.iifname(tun)
    out = {r["comment"]: r["expr"] for r in rules_of(rs, "output") if r["expr"][-1] == nft.ACCEPT}
    assert set(out) == {"loopback", "replies to clients", "own traffic through the tunnel",
                        "VPN transport", "VPN transport (IPv6)"}
    for name, family, setname in (("VPN transport", "ip", "@vpn_endpoints"),
                                  ("VPN transport (IPv6)", "ip6", "@vpn_endpoints6")):
        transport = out[name]
        assert transport[0] == nft.oifname("eth0")
        assert transport[1] == nft.match(nft.meta("mark"), 0xCA6C)
        assert transport[3] == nft.match(nft.concat(nft.payload(family, "daddr"),
                                                    nft.meta("l4proto"),
                                                    nft.payload("th", "dport")), setname)
    sets = [i["set"] for i in rs["nftables"] if "set" in i]
    assert sets == [{"family": "inet", "table": "netstack", "name": "vpn_endpoints",
                     "type": ["ipv4_addr", "inet_proto", "inet_service"],
                     "elem": [{"concat": ["203.0.113.10", "udp", 51820]}]},
                    {"family": "inet", "table": "netstack", "name": "vpn_endpoints6",
                     "type": ["ipv6_addr", "inet_proto", "inet_service"]}]
    dnat = rules_of(rs, "nat_prerouting")
    assert dnat and all(r["expr"][-1] == nft.dnat4("10.64.0.1") for r in dnat)
    assert rules_of(rs, "nat_postrouting")[0]["expr"] == [nft.oifname(tun), nft.MASQUERADE]


def test_vpn_hostname_endpoint_starts_with_an_empty_set(tmp_path):
    p = vpn_plan(tmp_path, "vpn.example:51820")
    rs = p.ns("nst-main-sys-proxyvm").ruleset
    assert not [i for i in rs["nftables"] if "set" in i and "elem" in i["set"]]
    # nothing allowed out until `up` resolved it through sys-net
    assert dump(p.qube("sys-proxyvm").info.endpoints) == [
        {"host": "vpn.example", "port": 51820, "proto": "udp"}]


def test_vpn_needs_a_dns(tmp_path):
    from netstack.errors import ConfigError
    from tests.unit.test_vpn_parsers import WG_MULLVAD_LIKE

    (tmp_path / "wg.conf").write_text(WG_MULLVAD_LIKE.replace("DNS = 10.64.0.1", ""))
    cfg = tmp_path / "vpn.toml"
    cfg.write_text((ROOT / "configs" / "vpn.toml").read_text().replace("lab:wireguard",
                                                                        "wg.conf"))
    with pytest.raises(ConfigError) as e:
        stack.plan_only(str(cfg), "main", plan.UplinkSpec("lab"))
    assert "sys-proxyvm" in str(e.value) and "field 'dns'" in str(e.value)


def test_lab_file_needs_the_lab(tmp_path):
    from netstack.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        text = (ROOT / "configs" / "vpn.toml").read_text().replace(
            'kind = "net"', 'kind = "net"\ndns = ["192.0.2.1"]')
        (tmp_path / "vpn.toml").write_text(text)
        stack.plan_only(str(tmp_path / "vpn.toml"), "main", plan.UplinkSpec("nat", "eth9"))
    assert "only in the lab" in str(e.value)


def tor_plan(tmp_path):
    return stack.plan_only(str(ROOT / "configs" / "tor-over-vpn.toml"), "main",
                           plan.UplinkSpec("lab"))


def test_tor_gateway_rules(tmp_path):
    p = tor_plan(tmp_path)
    rs = p.ns("nst-main-sys-whonix").ruleset
    # nothing is ever forwarded, and forwarding is off
    assert not [r for r in rules_of(rs, "forward") if r["expr"][-1] == nft.ACCEPT]
    assert p.ns("nst-main-sys-whonix").sysctls["net/ipv4/ip_forward"] == "0"
    nat = {r["comment"]: r["expr"] for r in rules_of(rs, "nat_prerouting")}
    onion = "TCP SYN to Tor's automapped addresses -> TransPort"
    assert set(nat) == {"DNS -> DNSPort", "TCP SYN -> TransPort", onion}
    assert nat["TCP SYN -> TransPort"][-1] == nft.redirect(9040)
    assert nat[onion][-1] == nft.redirect(9040)  # .onion by name: 10.192.0.0/10 from DNSPort
    assert nft.ip_daddr({"prefix": {"addr": "10.192.0.0", "len": 10}}) in nat[onion]
    assert nat["DNS -> DNSPort"][-1] == nft.redirect(5400)
    for expr in nat.values():
        assert expr[0] == nft.iifname("vif5")  # only from the workstation's link
    syn = nat["TCP SYN -> TransPort"]
    for rule in (syn, nat[onion]):
        assert {"&": [nft.payload("tcp", "flags"), ["fin", "syn", "rst", "ack"]]} in \
            [e["match"]["left"] for e in rule if "match" in e]
    excluded = next(e["match"] for e in syn if "match" in e and e["match"]["op"] == "!=")
    assert {"prefix": {"addr": "10.0.0.0", "len": 8}} in excluded["right"]["set"]
    inp = {r["comment"]: r["expr"] for r in rules_of(rs, "input") if r["expr"][-1] == nft.ACCEPT}
    assert set(inp) == {"replies", "loopback", "redirected to TransPort", "redirected to DNSPort",
                        "SOCKS ports", "control port filter"}
    out = {r["comment"]: r["expr"] for r in rules_of(rs, "output") if r["expr"][-1] == nft.ACCEPT}
    assert set(out) == {"loopback", "replies to clients", "tor's own traffic upstream"}
    # by name in the plan (pure); nftables resolves it when loading (the live audit's drift
    # check compares the loaded, numeric form)
    assert out["tor's own traffic upstream"][1] == nft.match(nft.meta("skuid"), "debian-tor")


def test_torrc(tmp_path):
    from netstack.tor.gateway import torrc

    t = tor_plan(tmp_path).qube("sys-whonix").info
    rc = torrc(t, ["DirAuthority auth1 orport=5000 no-v2 v3ident=AA 203.0.113.21:7000 BB"]
               ).splitlines()
    assert "TransPort 10.137.0.4:9040 IsolateClientAddr IsolateDestAddr IsolateDestPort" in rc
    assert "DNSPort 10.137.0.4:5400 IsolateClientAddr" in rc
    assert "SocksPort 10.137.0.4:9050 IsolateClientAddr IsolateSOCKSAuth" in rc
    assert "User debian-tor" in rc and not any(x.startswith("ControlPort") for x in rc)
    assert not [x for x in rc if x.startswith("ControlPort")]  # a unix socket only
    assert f"ControlSocket {t.control_socket}" in rc
    assert "TestingTorNetwork 1" in rc and any(x.startswith("DirAuthority auth1") for x in rc)
    assert "FetchDirInfoEarly 1" in rc  # the lab's gateway asks the lab's authorities


def test_torrc_on_a_real_host_uses_the_public_network_and_bridges():
    from netstack.tor.gateway import TorInfo, torrc

    rc = torrc(TorInfo("gw", "ns", "10.137.0.4", "/run/netstack/x", "debian-tor", False,
                       ["obfs4 192.0.2.7:443 AAAA cert=x iat-mode=0"]))
    assert "TestingTorNetwork" not in rc and "DirAuthority" not in rc
    assert "FetchDirInfo" not in rc  # never loads the public network's authorities
    assert "UseBridges 1" in rc and "Bridge obfs4 192.0.2.7:443 AAAA cert=x iat-mode=0" in rc


def test_lab_first_authority_runs_the_first_vote_release(tmp_path):
    """Only the first authority has the hook that releases the held first vote; it waits
    for every node that publishes a descriptor at every authority, and tells the lab's
    gateway of the first consensus (docs/field-notes.md, "The first consensus")."""
    p = tor_plan(tmp_path)
    nodes = p.lab.tor_nodes
    hooks = {d.name: d.post_start for d in p.daemons if d.name.startswith("lab-tor-")}
    assert [n for n, h in hooks.items() if h] == ["lab-tor-auth1"]
    argv = list(hooks["lab-tor-auth1"])
    assert argv[1:3] == ["-m", "netstack.tor.firstvote"]

    def values(flag: str) -> list[str]:
        return [argv[i + 1] for i, x in enumerate(argv) if x == flag]

    assert values("--auth") == [nodes[n].control for n in ("auth1", "auth2", "auth3")]
    assert sorted(values("--expect")) == sorted(n for n, x in nodes.items()
                                                if x.role != "bridge")
    assert values("--client") == [p.qube("sys-whonix").info.control_socket]


def test_lab_tor_network_torrc(tmp_path):
    from netstack.tor import network

    nodes = list(tor_plan(tmp_path).lab.tor_nodes.values())
    assert sorted(n.role for n in nodes) == ["authority"] * 3 + ["exit"] * 2 + ["relay"]
    exit1 = next(n for n in nodes if n.name == "exit1")
    rc = network.node_torrc(exit1, ["DirAuthority x"], "/d/resolv.conf")
    assert "ExitPolicy accept *:*" in rc and "ServerDNSResolvConfFile /d/resolv.conf" in rc
    assert "ORPort 203.0.113.41:5000" in rc and "TestingV3AuthInitialVotingInterval 5" in rc
    assert f"DataDirectory {exit1.dir}" in rc
    auth = next(n for n in nodes if n.role == "authority")
    assert "V3AuthoritativeDirectory 1" in network.node_torrc(auth, [], "/r")
