"""The address plan and names derived from the config."""

import pytest

from netstack import addressing, config, names, plan
from netstack.codec import dump
from netstack.errors import ConfigError, UsageError
from netstack.kinds.registry import SPECS
from tests.unit.test_config import ROOT


def basic():
    return config.load(ROOT / "configs" / "basic.toml", SPECS)


def test_qube_addresses_follow_tree_order():
    a = addressing.plan_addresses(basic())
    assert {n: (x.qid, x.ipv4, x.gateway4) for n, x in a.items()} == {
        "sys-net": (1, "10.137.0.1", None),
        "sys-firewall": (2, "10.137.0.2", "10.137.0.1"),
        "personal": (3, "10.137.0.3", "10.137.0.2"),
        "work": (4, "10.137.0.4", "10.137.0.2"),
    }
    assert all(x.ipv6 is None for x in a.values())


def test_plan_is_deterministic_and_independent_of_table_order():
    text = (ROOT / "configs" / "basic.toml").read_text()
    blocks = text.split("\n\n")
    shuffled = "\n\n".join([blocks[0]] + list(reversed(blocks[1:])))
    p1 = dump(plan.build(config.parse(text, SPECS), "s", plan.UplinkSpec("lab")))
    p2 = dump(plan.build(config.parse(shuffled, SPECS), "s", plan.UplinkSpec("lab")))
    assert p1["qubes"] == p2["qubes"] and p1["addrs"] == p2["addrs"]


def test_ipv6_plan_follows_qubes():
    t = config.parse((ROOT / "configs" / "basic.toml").read_text()
                     + "\n[stack]\nipv6 = true\n", SPECS)
    a = addressing.plan_addresses(t)
    assert a["work"].ipv6 == "fd09:24ef:4179::a89:4"
    assert a["work"].gateway6 == "fd09:24ef:4179::a89:2"


def test_links_are_point_to_point_slash_32():
    p = plan.build(basic(), "s", plan.UplinkSpec("lab"))
    qube_addrs = [a for a in p.addrs if a.ns.startswith("nst-")
                  and a.ifname != names.UPLINK_IF]
    assert qube_addrs and all(a.cidr.endswith("/32") for a in qube_addrs)
    work_routes = [(r.dst, r.via) for r in p.routes if r.ns == "nst-s-work"]
    assert work_routes == [("10.137.0.2/32", None), ("default", "10.137.0.2")]


def test_every_qube_gets_virtual_dns_and_its_own_nsswitch():
    p = plan.build(basic(), "s", plan.UplinkSpec("lab"))
    for q in p.qubes:
        files = p.ns(q.netns).files
        assert files[f"/etc/netns/{q.netns}/resolv.conf"] == \
            "nameserver 10.139.1.1\nnameserver 10.139.1.2\n"
        assert "hosts: files dns\n" in files[f"/etc/netns/{q.netns}/nsswitch.conf"]


def test_lab_uses_documentation_addresses_only():
    import ipaddress

    p = plan.build(basic(), "s", plan.UplinkSpec("lab"))
    doc = [ipaddress.ip_network(n) for n in
           ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
    for a in p.addrs:
        if a.ns.startswith("nsl-") or a.ifname == names.UPLINK_IF:
            ip = ipaddress.ip_interface(a.cidr).ip
            assert any(ip in n for n in doc), a


def test_host_mode_resolvers():
    t = basic()
    up = plan.UplinkSpec("nat", "eth9")
    assert plan.upstream_dns(t, up, "nameserver 127.0.0.53\nnameserver 192.0.2.9\n") == \
        ["192.0.2.9"]
    with pytest.raises(ConfigError) as e:
        plan.upstream_dns(t, up, "nameserver 127.0.0.53\n")
    assert "field 'dns'" in str(e.value)
    # a moved uplink without a static address: the DHCP lease's resolvers, never the host's
    assert plan.upstream_dns(t, plan.UplinkSpec("move", "eth9"), "nameserver 192.0.2.9\n") \
        == []


def test_moved_uplink_static_needs_both_address_and_gateway():
    t = basic()
    t.root.settings["address"] = "192.0.2.7/24"
    with pytest.raises(ConfigError) as e:
        plan.build(plan.Inputs(t, "<memory>", host_resolv="nameserver 192.0.2.9\n"), "s",
                   plan.UplinkSpec("move", "eth9"))
    assert "field 'gateway'" in str(e.value) and "neither for DHCP" in str(e.value)


def test_moved_uplink_without_address_runs_dhcp():
    from netstack.dhcp import DNS_MAP, DhcpInfo

    p = plan.build(plan.Inputs(basic(), "<memory>", host_resolv="nameserver 192.0.2.9\n"),
                   "s", plan.UplinkSpec("move", "eth9"))
    net = p.qube("sys-net")
    assert isinstance(net.info, DhcpInfo) and net.info.dynamic_dns
    assert [d.name for d in p.daemons] == ["dhcp-sys-net"]
    assert "dhcpcd" in p.daemons[0].argv and p.daemons[0].requires == net.info.script
    assert not [a for a in p.addrs if a.ifname == names.UPLINK_IF]  # dhcpcd sets them
    assert not [r for r in p.routes if r.ns == net.netns and r.dev == names.UPLINK_IF]
    rs = p.ns(net.netns).ruleset["nftables"]
    assert {"map": {"family": "inet", "table": "netstack", "name": DNS_MAP,
                    "type": "ipv4_addr", "map": "ipv4_addr"}} in rs
    assert p.upstream_dns == []


@pytest.mark.parametrize("stack", ["main", "t1", "abcdefgh"])
def test_interface_names_fit_the_kernel_limit(stack):
    assert len(names.tunnel_if(stack, 250)) <= 15
    assert len(names.tunnel_if(stack, 250, "openvpn")) <= 15
    assert len(names.root_uplink_veth(stack)) <= 15
    assert names.vif(250) == "vif250"


@pytest.mark.parametrize("stack", ["", "Main", "1a", "abcdefghi", "a-b", "a/b"])
def test_bad_stack_names_are_refused(stack):
    with pytest.raises(UsageError):
        names.check_stack(stack)


def test_namespace_names_carry_the_stack():
    assert names.qube_netns("t1", "work") == "nst-t1-work"
    assert names.lab_netns("t1", "web") == "nsl-t1-web"
    p1 = plan.build(basic(), "a", plan.UplinkSpec("lab"))
    p2 = plan.build(basic(), "b", plan.UplinkSpec("lab"))
    assert not {n.name for n in p1.namespaces} & {n.name for n in p2.namespaces}


def test_check_ifname():
    with pytest.raises(ValueError):
        names.check_ifname("x" * 16)
    with pytest.raises(ValueError):
        names.check_ifname("a b")


def test_nat_uplink_plan():
    t = config.parse((ROOT / "configs" / "basic.toml").read_text().replace(
        'kind = "net"', 'kind = "net"\ndns = ["192.0.2.1"]', 1), SPECS)
    p = plan.build(t, "s1", plan.UplinkSpec("nat", "eth7"))
    assert p.host_nat and p.host_nat.dev == "eth7" and p.host_nat.veth == "nsu-s1"
    assert plan.nat_subnet("s1") == p.host_nat.subnet
    assert plan.nat_subnet("s1") != plan.nat_subnet("s2")
    host_addrs = [a.cidr for a in p.addrs if a.ns is None]
    assert len(host_addrs) == 1 and host_addrs[0].endswith("/30")
    from netstack.rules.host import host_nat_ruleset

    rs = host_nat_ruleset("netstack_s1", "nsu-s1", "eth7", p.host_nat.subnet)
    assert rs["nftables"][0] == {"table": {"family": "ip", "name": "netstack_s1"}}
    assert any(r["rule"]["comment"] == "masquerade sys-net" for r in rs["nftables"]
               if "rule" in r)
