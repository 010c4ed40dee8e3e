"""The uplink watch's allowed set and its classic BPF program (netstack/watchfilter.py),
judged by the program's own interpreter on packets built with scapy. The kernel runs the
same program in tests/integration/test_watch.py; here: what each chain allows, what it
never allows, and that a malformed packet is an alarm, never a silent drop."""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6MLReport2,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrHopByHop,
    RouterAlert,
)
from scapy.layers.l2 import ARP

from netstack import stack, watchfilter
from netstack.model import UplinkSpec
from netstack.watchfilter import (
    ALARM,
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    PACKET_OUTGOING,
    Allowed,
    allowed,
    program,
    run,
)
from tests.integration.util import ROOT

OWN = "192.0.2.2"
VPN = "203.0.113.10"
INCOMING = 0


def judge(al: Allowed, pkt, proto: int = ETH_P_IP, pkttype: int = PACKET_OUTGOING) -> bool:
    """True: an alarm (the filter passes the packet to the watch). Both programs judge:
    a device without link header (network header first) and an Ethernet uplink (the
    frame whole); they must agree."""
    data = bytes(pkt)
    bare = run(program(al), data, proto=proto, pkttype=pkttype) == ALARM
    frame = b"\xff" * 6 + b"\x02" * 6 + proto.to_bytes(2, "big") + data
    whole = run(program(al, ETH_HLEN), frame, proto=proto, pkttype=pkttype) == ALARM
    assert bare == whole, (bare, whole)
    return bare


VPN_ONLY = Allowed(own=(OWN,), transport=frozenset({(VPN, "udp", 51820)}))


def test_vpn_transport_passes_and_the_rest_is_an_alarm():
    assert not judge(VPN_ONLY, IP(src=OWN, dst=VPN) / UDP(sport=40000, dport=51820))
    for bad in (IP(src=OWN, dst=VPN) / UDP(sport=40000, dport=51821),  # other port
                IP(src=OWN, dst=VPN) / TCP(sport=40000, dport=51820),  # other proto
                IP(src=OWN, dst="198.51.100.80") / TCP(dport=80, flags="S"),  # in clear
                IP(src=OWN, dst="198.51.100.53") / UDP(dport=53),  # DNS in clear
                IP(src=OWN, dst="198.51.100.80") / ICMP(),
                IP(src="10.137.0.4", dst=VPN) / UDP(dport=51820) / b"x"):  # not masqueraded?
        if IP in bad and bad[IP].src == "10.137.0.4":
            continue  # the source is not judged in a VPN chain: the destination is
        assert judge(VPN_ONLY, bad), bad.summary()


def test_only_outgoing_packets_are_judged():
    leak = IP(src=OWN, dst="198.51.100.80") / TCP(dport=80)
    assert judge(VPN_ONLY, leak)
    assert not judge(VPN_ONLY, leak, pkttype=INCOMING)


def test_arp_passes_other_ethertypes_do_not():
    arp = ARP(psrc=OWN, pdst="192.0.2.1")
    assert not judge(VPN_ONLY, arp, proto=ETH_P_ARP)
    assert judge(VPN_ONLY, b"\x00" * 60, proto=0x8100)  # a VLAN tag
    assert judge(VPN_ONLY, b"\xaa\xaa\x03" + b"\x00" * 40, proto=0x0004)  # raw 802.2


def test_vlan_tags_are_alarms_in_band_or_out():
    inner = bytes(IP(src=OWN, dst=VPN) / UDP(sport=1, dport=51820))
    tagged = b"\xff" * 6 + b"\x02" * 6 + b"\x81\x00\x00\x07\x08\x00" + inner
    # the kernel says IPv4 and looks past the tag (docs/field-notes.md): the frame's own
    # ethertype is what the Ethernet program reads
    assert run(program(VPN_ONLY, ETH_HLEN), tagged, proto=ETH_P_IP,
               pkttype=PACKET_OUTGOING) == ALARM
    plain = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + inner
    assert run(program(VPN_ONLY, ETH_HLEN), plain, proto=ETH_P_IP, pkttype=PACKET_OUTGOING) == 0
    for l2, data in ((0, inner), (ETH_HLEN, plain)):
        assert run(program(VPN_ONLY, l2), data, proto=ETH_P_IP, pkttype=PACKET_OUTGOING,
                   vlan=True) == ALARM  # a tag kept out of band (VLAN offload)
    assert run(program(VPN_ONLY, ETH_HLEN), plain[:13], proto=ETH_P_IP,
               pkttype=PACKET_OUTGOING) == ALARM  # not even an Ethernet header


def test_malformed_and_truncated_are_alarms():
    good = bytes(IP(src=OWN, dst=VPN) / UDP(sport=1, dport=51820))
    assert judge(VPN_ONLY, good[:10])  # shorter than an IPv4 header
    assert judge(VPN_ONLY, good[:22])  # the ports cut off
    bad_ihl = bytearray(good)
    bad_ihl[0] = 0x44  # IHL 4: less than a header
    assert judge(VPN_ONLY, bytes(bad_ihl))
    v6_in_v4 = bytes(IPv6(dst="2001:db8::1") / UDP(dport=51820))
    assert judge(VPN_ONLY, v6_in_v4, proto=ETH_P_IP)  # version nibble not 4


def test_ip_options_move_the_ports():
    opt = IP(src=OWN, dst=VPN, options=b"\x01\x01\x01\x00") / UDP(sport=1, dport=51820)
    assert not judge(VPN_ONLY, opt)
    opt_bad = IP(src=OWN, dst=VPN, options=b"\x01\x01\x01\x00") / UDP(sport=51820, dport=9)
    assert judge(VPN_ONLY, opt_bad)


def test_fragments_only_to_an_allowed_peer_and_protocol():
    later = IP(src=OWN, dst=VPN, proto=17, frag=100) / (b"y" * 40)
    assert not judge(VPN_ONLY, later)
    elsewhere = IP(src=OWN, dst="198.51.100.80", proto=17, frag=100) / (b"y" * 40)
    assert judge(VPN_ONLY, elsewhere)


def test_icmp_errors_to_a_peer_pass_requests_do_not():
    err = IP(src=OWN, dst=VPN) / ICMP(type=3, code=3) / IP(src=VPN, dst=OWN) / UDP(
        sport=51820, dport=40000)
    assert not judge(VPN_ONLY, err)
    assert judge(VPN_ONLY, IP(src=OWN, dst=VPN) / ICMP(type=8))  # a ping to the server
    assert judge(VPN_ONLY, IP(src=OWN, dst="198.51.100.80") / ICMP(type=3, code=3)
                 / IP() / UDP())


def test_plain_chain_allows_its_own_source_only():
    al = Allowed(own=(OWN,), plain=True)
    assert not judge(al, IP(src=OWN, dst="198.51.100.80") / TCP(dport=80))
    assert judge(al, IP(src="10.137.0.4", dst="198.51.100.80") / TCP(dport=80))  # not NATed
    assert judge(al, IPv6(src="fe80::1", dst="ff02::2") / UDP(), proto=ETH_P_IPV6)


def test_dhcp_and_dns_when_allowed():
    dhcp = IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) / (b"\0" * 240)
    assert judge(VPN_ONLY, dhcp)
    assert not judge(Allowed(dhcp=True), dhcp)
    q = IP(src=OWN, dst="198.51.100.53") / UDP(sport=5353, dport=53)
    assert not judge(Allowed(own=(OWN,), dns=frozenset({"198.51.100.53"})), q)
    assert judge(Allowed(own=(OWN,), dns=frozenset({"198.51.100.53"})),
                 IP(src=OWN, dst="198.51.100.54") / UDP(dport=53))


def test_tor_relays_tcp_only():
    al = Allowed(own=(OWN,), relays=frozenset({("203.0.113.20", 9001)}))
    assert not judge(al, IP(src=OWN, dst="203.0.113.20") / TCP(sport=40000, dport=9001))
    assert judge(al, IP(src=OWN, dst="203.0.113.20") / UDP(dport=9001))
    assert judge(al, IP(src=OWN, dst="203.0.113.20") / TCP(dport=9030))


def test_ipv6_link_chatter_only_with_ipv6_on_and_the_right_hop_limit():
    ns = IPv6(src="fe80::1", dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt="fe80::2")
    assert judge(VPN_ONLY, ns, proto=ETH_P_IPV6)
    on = Allowed(own=(OWN,), ipv6=True)
    assert not judge(on, ns, proto=ETH_P_IPV6)
    routed = IPv6(src="fe80::1", dst="2001:db8::1", hlim=64) / ICMPv6ND_NS(tgt="fe80::2")
    assert judge(on, routed, proto=ETH_P_IPV6)
    ext = IPv6(src="fe80::1", dst="ff02::1", hlim=1) / IPv6ExtHdrHopByHop() / UDP()
    assert judge(on, ext, proto=ETH_P_IPV6)
    # an MLDv2 report as the kernel sends it: hop-by-hop (router alert), hop limit 1
    mld = IPv6(src="fe80::1", dst="ff02::16", hlim=1) / IPv6ExtHdrHopByHop(
        options=[RouterAlert()]) / ICMPv6MLReport2()
    assert not judge(on, mld, proto=ETH_P_IPV6)
    assert judge(VPN_ONLY, mld, proto=ETH_P_IPV6)
    mld.hlim = 2
    assert judge(on, mld, proto=ETH_P_IPV6)
    cut = bytes(IPv6(src="fe80::1", dst="ff02::16", hlim=1, nh=0, plen=8)
                / IPv6ExtHdrHopByHop(nh=58, options=[RouterAlert()]))
    assert judge(on, cut, proto=ETH_P_IPV6)  # the ICMPv6 header missing


def test_ipv6_vpn_transport():
    al = Allowed(transport=frozenset({("2001:db8::10", "udp", 51820)}))
    assert not judge(al, IPv6(dst="2001:db8::10") / UDP(dport=51820), proto=ETH_P_IPV6)
    assert judge(al, IPv6(dst="2001:db8::11") / UDP(dport=51820), proto=ETH_P_IPV6)


def test_a_large_allowed_set_still_fits_and_every_jump_resolves():
    flows = frozenset((f"203.0.{i // 250}.{i % 250 + 1}", "udp", 51820 + i % 3)
                      for i in range(300))
    al = Allowed(own=(OWN,), transport=flows)
    prog = program(al)
    assert len(prog) <= watchfilter.MAX_INSNS
    a, pr, po = sorted(flows)[-1]
    assert not judge(al, IP(src=OWN, dst=a) / UDP(dport=po))
    assert judge(al, IP(src=OWN, dst=a) / UDP(dport=po + 7))
    with pytest.raises(ValueError, match="4096"):
        program(Allowed(transport=frozenset((f"10.{i // 250}.{i % 250}.1", "udp", 1)
                                            for i in range(500))))


def test_random_packets_never_crash_and_only_allowed_flows_pass():
    rnd = random.Random(29)
    prog = program(VPN_ONLY)
    for _ in range(3000):
        n = rnd.randrange(0, 80)
        data = bytes(rnd.randrange(256) for _ in range(n))
        proto = rnd.choice([ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, 0x8100])
        got = run(prog, data, proto=proto, pkttype=PACKET_OUTGOING)
        if got == 0 and proto == ETH_P_IP:
            # passed silently: a well-formed packet to the server (ports or a later
            # fragment), or an ICMP error to it
            assert data[16:20] == bytes([203, 0, 113, 10]), data.hex()


def plan_of(name: str, text: str | None = None, tmp_path=None):
    path = str(ROOT / "configs" / name)
    if text is not None:
        p = tmp_path / "c.toml"
        p.write_text(text)
        path = str(p)
    return stack.plan_only(path, "main", UplinkSpec("lab"))


def test_allowed_of_the_shipped_chains(tmp_path):
    vpn = plan_of("vpn.toml")
    t = {"sys-proxyvm": [(VPN, "udp", 51820)]}
    al = allowed(vpn, own=[OWN], transport=t)
    assert al.transport == {(VPN, "udp", 51820)} and not al.plain and not al.relays
    assert not allowed(vpn, own=[OWN], transport={}).transport  # unresolved: nothing

    basic = allowed(plan_of("basic.toml"), own=[OWN], transport={})
    assert basic.plain and "work" in basic.why[-1]

    tov = allowed(plan_of("tor-over-vpn.toml"), own=[OWN], transport=t)
    assert tov.transport == {(VPN, "udp", 51820)} and not tov.relays and not tov.plain

    tor = plan_of("tor.toml")  # bridges = ["lab:obfs4"]: only the bridge
    al = allowed(tor, own=[OWN], transport={})
    (bridge,) = [n.address for n in tor.lab.tor_nodes.values() if n.role == "bridge"]
    assert al.relays == {(bridge, 5443)} and not al.plain
    no_bridge = plan_of("", (ROOT / "configs" / "tor.toml").read_text().replace(
        'bridges = ["lab:obfs4"]', ""), tmp_path)
    al = allowed(no_bridge, own=[OWN], transport={})
    assert al.relays == no_bridge.lab.relay_ports and not al.plain


def test_failover_changes_the_digest_and_only_the_current_server_passes():
    vpn = plan_of("vpn.toml")
    a = allowed(vpn, own=[OWN], transport={"sys-proxyvm": [(VPN, "udp", 51820)]})
    b = allowed(vpn, own=[OWN], transport={"sys-proxyvm": [(VPN, "udp", 51821)]})
    assert a.digest() != b.digest()
    assert judge(b, IP(src=OWN, dst=VPN) / UDP(dport=51820))
    assert not judge(b, IP(src=OWN, dst=VPN) / UDP(dport=51821))


def test_a_firewall_qube_alone_allows_nothing(tmp_path):
    text = ('[qubes.sys-net]\nkind = "net"\nlabel = "red"\n'
            '[qubes.sys-firewall]\nkind = "firewall"\nnetvm = "sys-net"\nlabel = "green"\n')
    al = allowed(plan_of("", text, tmp_path), own=[OWN], transport={})
    assert not al.plain and not al.transport and not al.relays
    assert judge(al, IP(src=OWN, dst="198.51.100.80") / TCP(dport=80))


def test_decode_names_what_leaked():
    d = watchfilter.decode(bytes(IP(src=OWN, dst="198.51.100.80") / TCP(sport=1234, dport=80,
                                                                        flags="S")), ETH_P_IP)
    assert d["summary"] == "tcp 192.0.2.2:1234 -> 198.51.100.80:80 [S] (40 bytes)"
    assert watchfilter.decode(b"\x45", ETH_P_IP)["summary"].startswith("other")
    assert "0x8100" in watchfilter.decode(b"", 0x8100)["summary"]


def test_problems_for_status():
    w = watchfilter.WatchFile(1, None, "supervisor", "cut", 0.0, 100.0, "uplink", "ns", {}, 10)
    assert watchfilter.problems(w, wanted=True, alive=True, now=101.0) == []
    assert "not running" in watchfilter.problems(w, wanted=True, alive=True, now=200.0)[0]
    assert watchfilter.problems(w, wanted=False, alive=False, now=200.0) == []
    w.count = 2
    w.cut = True
    w.alarms.append(watchfilter.Alarm(1.0, 1.0, {"summary": "tcp x"}, 0))
    (p,) = watchfilter.problems(w, wanted=False, alive=True, now=101.0)
    assert "2 packet(s)" in p and "tcp x" in p and "set the uplink down" in p


@pytest.mark.parametrize("line, needle", [
    ('watch = "yes"', "'watch'"),
    ('on_leak = "drop"', "'on_leak'"),
    ('on_leak = "cut"', "'on_leak': set, but no watch runs"),  # without watch = true
])
def test_config_refuses_a_bad_watch_setting(tmp_path, line, needle):
    from netstack.errors import ConfigError

    text = f"[stack]\n{line}\n" + (ROOT / "configs" / "vpn.toml").read_text()
    with pytest.raises(ConfigError, match=needle):
        plan_of("", text, tmp_path)


def test_the_plan_carries_the_watch_and_the_supervisor_runs_it(tmp_path):
    text = '[stack]\nwatch = true\non_leak = "cut"\n' + (ROOT / "configs" / "vpn.toml"
                                                         ).read_text()
    p = plan_of("", text, tmp_path)
    assert (p.watch, p.on_leak) == (True, "cut")
    assert (plan_of("vpn.toml").watch, plan_of("vpn.toml").on_leak) == (False, "log")
    from netstack import codec, model

    back = codec.decode(model.Plan, codec.encode(p), "plan")
    assert (back.watch, back.on_leak) == (True, "cut")


def test_metrics_carry_the_watch():
    from netstack import metrics
    from tests.unit.test_metrics import scrape, status, value

    st = status("degraded")
    st["watch"] = {"wanted": True, "on_leak": "cut", "running": True, "alarms": 3,
                   "cut": True, "pcap": "/x"}
    m = scrape(metrics.Inputs(st))
    assert value(m["netstack_watch_alarms"], stack="s1") == 3
    assert value(m["netstack_watch_up"], stack="s1") == 1
    assert value(m["netstack_watch_uplink_cut"], stack="s1") == 1
    assert not scrape(metrics.Inputs(status()))["netstack_watch_alarms"]


def test_tor_peers_reads_guards_and_connections(monkeypatch):
    """A public-network gateway's peers from tor's control port (a recording fake of the
    controller: the parsing is what is tested; the lab runs only private networks)."""
    from types import SimpleNamespace

    from netstack import watch
    from netstack.tor import control

    class Fake:
        closed = False

        def get_info(self, key, default=None):
            return {"entry-guards": "$AAAA~g1 up\n$BBBB=g2 never-connected",
                    "orconn-status": "$CCCC~r3 CONNECTED\n$AAAA~g1 CONNECTED"}[key]

        def get_network_status(self, fp):
            if fp == "BBBB":
                raise ValueError("not in our consensus")
            return SimpleNamespace(address={"AAAA": "192.0.2.50", "CCCC": "192.0.2.51"}[fp],
                                   or_port=9001)

        def close(self):
            Fake.closed = True

    monkeypatch.setattr(control, "connect", lambda *_a, **_k: Fake())
    assert watch.tor_peers("/x") == {("192.0.2.50", 9001), ("192.0.2.51", 9001)}
    assert Fake.closed

    def refuse(*_a, **_k):
        raise control.TorError("no socket")

    monkeypatch.setattr(control, "connect", refuse)
    assert watch.tor_peers("/x") == set()  # nothing allowed: its connections are alarms
