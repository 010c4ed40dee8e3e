"""`netstack check`'s pure parts (no root): flow classes, the flow model built from
synthetic packets and lab records (outcomes from evidence: the payload mark through NAT,
Tor and a SOCKS port, DNS by name, ICMP on a lab host's link, stopped only when nothing got
past the hop, unknown otherwise), the verdict's order, and its renderings (JUnit with a
failure exactly for what made the exit code non-zero, JSON that parses with the program's
output around it, the HTML page)."""

from __future__ import annotations

import json
import types
import xml.etree.ElementTree as ET

import pytest

from netstack import check
from netstack.check import Flow, Leak, Report

CTX = types.SimpleNamespace(exits={"203.0.113.41"}, vpn_server="203.0.113.10",
                            chain=[None, types.SimpleNamespace(kind="firewall",
                                                                  client_env={})])


@pytest.mark.parametrize("family,proto,dst,dport,klass", [
    ("ipv4", "tcp", "198.51.100.99", 443, "allowed"),
    ("ipv4", "udp", "10.139.1.1", 53, "allowed"),
    ("ipv4", "udp", "198.51.100.53", 53, "dns"),
    ("ipv4", "tcp", "8.8.4.4", 53, "dns"),
    ("ipv4", "udp", "198.51.100.99", 3478, "udp"),
    ("ipv4", "udp", "224.0.0.251", 5353, "multicast"),
    ("ipv4", "udp", "224.0.0.252", 5355, "multicast"),
    ("ipv6", "udp", "ff02::fb", 5353, "ipv6"),
    ("ipv4", "ip-proto-253", "198.51.100.99", None, "raw"),
    ("ipv4", "tcp", "10.137.0.4", 9050, "gateway"),
    ("ipv4", "icmp", "198.51.100.99", None, "icmp"),
])
def test_flow_classes(family, proto, dst, dport, klass):
    assert check.classify(CTX, family, proto, dst, dport) == klass


def test_a_tor_gateways_socks_ports_are_a_proxy_not_a_bypass():
    from netstack.tor.gateway import TorInfo

    gw = types.SimpleNamespace(kind="tor", info=TorInfo("sys-whonix", "ns", "10.137.0.4", "/d",
                                                       socks_ports={"apt": 9104}))
    from netstack.kinds.tor import TorSpec

    gw.client_env = TorSpec().client_env(gw)  # what plan.build puts in the plan
    ctx = types.SimpleNamespace(chain=[None, gw])
    assert check.proxies(ctx) == {("10.137.0.4", 9050), ("10.137.0.4", 9104)}
    assert check.classify(ctx, "ipv4", "tcp", "10.137.0.4", 9104) == "proxy"
    assert check.classify(ctx, "ipv4", "tcp", "10.137.0.4", 9051) == "gateway"


def report(**kw):
    base = dict(stack="s", qube="anon-whonix", expect="tor", command=["x"], exit_status=0,
                seconds=1.0, pcaps="/tmp/p", flows=[], leaks=[], names_asked=[],
                chain=[{"name": "anon-whonix", "kind": "app", "label": "red",
                        "address": "10.137.0.5"},
                       {"name": "sys-whonix", "kind": "tor", "label": "black",
                        "address": "10.137.0.4"}], links=[])
    base.update(kw)
    r = Report(**base)
    r.verdict = check.verdict(r)
    return r


STOPPED = Flow("ipv4", "udp", "198.51.100.99", 3478, 1, 62, "udp", "stopped",
               stopped_by={"qube": "sys-whonix", "hook": "forward", "rule": "forward policy",
                           "chain": "forward", "handle": None})
LEFT = Flow("ipv4", "tcp", "198.51.100.99", 443, 9, 1000, "allowed", "left", "tor",
            ["www.example.org"])
LEAK = Leak("sys-whonix:eth0", "/tmp/p/sys-whonix_eth0.pcap", 3, "IP / UDP 10.137.0.4 > x")


def test_the_verdict_puts_a_leak_first_then_the_command_then_a_stopped_attempt():
    assert report(flows=[LEFT]).verdict == 0
    assert report(flows=[LEFT, STOPPED]).verdict == 2
    assert report(flows=[LEFT, STOPPED], bypass="warn").verdict == 0
    assert report(flows=[STOPPED], exit_status=5).verdict == 3
    assert report(flows=[STOPPED], exit_status=5, leaks=[LEAK]).verdict == 1


def test_junit_has_a_testcase_per_flow_and_the_evidence_in_failures():
    # a leak decides exit 1: the leak fails; the stopped attempt is listed, not failed
    root = ET.fromstring(check.junit(report(flows=[LEFT, STOPPED], leaks=[LEAK])))
    cases = {c.get("name"): c.find("failure") for c in root}
    links = cases["no packet where the chain forbids it"]
    assert links is not None and "frame 3" in links.text
    assert next(v for k, v in cases.items() if k.startswith("udp:")) is None
    assert next(v for k, v in cases.items() if k.startswith("allowed:")) is None
    assert root.get("failures") == "1"
    # the stopped attempt alone decides exit 2: it fails, with the rule that stopped it
    root = ET.fromstring(check.junit(report(flows=[LEFT, STOPPED])))
    udp = next(c.find("failure") for c in root if c.get("name").startswith("udp:"))
    assert udp is not None and "stopped by sys-whonix forward" in udp.text
    assert root.get("failures") == "1"


def test_the_html_page_draws_the_chain_in_label_colours_and_lists_leaks():
    page = check.html(report(flows=[LEFT], leaks=[LEAK]))
    assert page.startswith("<!doctype html>") and "<svg" in page
    assert "#d32f2f" in page and "#212121" in page  # red workstation, black gateway
    assert "frame 3" in page and "LEAK" in page
    assert "<script" not in page  # self-contained, nothing fetched


# --- the flow model, from synthetic packets and lab records ---------------------------------

WS, WS6, GW = "10.137.0.5", "fd00:137::5", "10.137.0.4"
VPN_SERVER, EXIT, ISP = "203.0.113.10", "203.0.113.41", "192.0.2.2"
WEB, SINK = "198.51.100.80", "198.51.100.99"
REQ = b"GET / HTTP/1.1\r\nHost: web.lab.test\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
RULE = {"qube": "sys-whonix", "hook": "forward", "rule": "forward policy", "chain": "forward",
        "handle": 7}


def ctx():
    ws = types.SimpleNamespace(name="anon-whonix", ipv4=WS, ipv6=WS6)
    gw = types.SimpleNamespace(name="sys-whonix", kind="firewall", netns="ns-gw", client_env={})
    return types.SimpleNamespace(ws=ws, chain=[ws, gw], exits={EXIT}, vpn_server=VPN_SERVER)


def tcp_conn(src, sport, dst, dport, payload=b"", isn=1000, six=False):
    """A client's half of a TCP connection as its link carries it: SYN, ACK, payload in
    two segments (the second one retransmitted), FIN."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    ip = (IPv6 if six else IP)(src=src, dst=dst)
    out = [Ether() / ip / TCP(sport=sport, dport=dport, flags="S", seq=isn),
           Ether() / ip / TCP(sport=sport, dport=dport, flags="A", seq=isn + 1)]
    half = len(payload) // 2
    for off, part in ((0, payload[:half]), (half, payload[half:]), (half, payload[half:])):
        if part:
            out.append(Ether() / ip / TCP(sport=sport, dport=dport, flags="PA",
                                          seq=isn + 1 + off) / Raw(part))
    out.append(Ether() / ip / TCP(sport=sport, dport=dport, flags="FA",
                                  seq=isn + 1 + len(payload)))
    return out


def udp_pkt(src, sport, dst, dport, payload):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    return Ether() / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(payload)


def echo(src, dst, ident, payload=b"netstack-ping-0123456789abcdef"):
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    return Ether() / IP(src=src, dst=dst) / ICMP(type=8, id=ident, seq=1) / Raw(payload)


def record(proto, client, cport, dst, dport, first, service="lab-http", **extra):
    """A lab service's record, made by the lab's own function (so both sides agree)."""
    from netstack.lab.services import conn_record

    r = conn_record(proto, (client, cport), (dst, dport) if dst else None, first, **extra)
    r.update(service=service, t=1.0)
    return r


def model(pkts, records=(), seen=(), stop=None, expect="tor"):
    """Flows from the workstation link's packets, attributed, and the report's verdict."""
    c = ctx()
    flows, asked, _answers = check.flows_of(c, pkts)
    src = check.Seen("anon-whonix:eth0", "source", "/p/src.pcap", pkts)
    check.attribute(c, flows, list(records), [src, *seen], stop or (lambda f: None), src)
    leaks = [Leak(src.link, src.pcap, f.first_frame, "wrong way", kind="flow")
             for f in flows if f.outcome == "left" and f.via != expect]
    r = report(flows=flows, leaks=leaks, names_asked=asked, expect=expect)
    return r, {(f.proto, f.dst, f.dport, f.sport): f for f in flows}


def test_the_readme_example_a_page_through_the_vpn_is_left_by_its_mark_not_stopped():
    """The issue's case: lab-http saw the VPN server's address and its own port, never the
    workstation's tuple; the mark of the request finds the flow, and no guess stops it."""
    pkts = tcp_conn(WS, 41000, WEB, 80, REQ)
    r, fl = model(pkts, [record("tcp", VPN_SERVER, 53211, WEB, 80, REQ, host="web.lab.test",
                                path="/")], stop=lambda f: RULE, expect="vpn")
    f = fl[("tcp", WEB, 80, 41000)]
    assert (f.outcome, f.via, f.names) == ("left", "vpn", ["web.lab.test"])
    assert "mark of its first 64 payload bytes" in f.reason
    assert r.verdict == 0 and f.stopped_by is None


def test_connections_are_flows_of_their_own_and_an_unlogged_one_is_unknown_never_clean():
    pkts = tcp_conn(WS, 41000, WEB, 80, REQ) + tcp_conn(WS, 41002, WEB, 80, REQ + b"x",
                                                        isn=9000)
    r, fl = model(pkts, [record("tcp", EXIT, 5000, WEB, 80, REQ)])
    assert fl[("tcp", WEB, 80, 41000)].outcome == "left"
    other = fl[("tcp", WEB, 80, 41002)]
    assert other.outcome == "unknown" and "no lab host saw it" in other.reason
    assert r.verdict == 1 and any("UNKNOWN" in x for x in check.reasons(r))
    assert "outcome unknown: no lab host saw it" in check.table(r)


def test_an_address_without_a_name_is_attributed():
    pkts = tcp_conn(WS, 41000, WEB, 80, REQ)
    r, fl = model(pkts, [record("tcp", EXIT, 5000, WEB, 80, REQ)])
    f = fl[("tcp", WEB, 80, 41000)]
    assert (f.outcome, f.via, f.names, r.verdict) == ("left", "tor", [], 0)


def test_a_mark_in_another_connection_does_not_count():
    pkts = tcp_conn(WS, 41000, WEB, 80, b"POST /other HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
    r, fl = model(pkts, [record("tcp", EXIT, 5000, WEB, 80, REQ)])
    assert fl[("tcp", WEB, 80, 41000)].outcome == "unknown" and r.verdict == 1


def test_through_the_socks_port_the_mark_is_found_past_the_handshake():
    socks = b"\x05\x01\x00" + b"\x05\x01\x00\x03\x0fwww.example.org\x00\x50"
    pkts = tcp_conn(WS, 41000, GW, 9050, socks + REQ)
    c = ctx()
    import unittest.mock as mock

    with mock.patch.object(check, "proxies", lambda _c: {(GW, 9050)}):
        flows, _a, _n = check.flows_of(c, pkts)
        check.attribute(c, flows, [record("tcp", EXIT, 5000, SINK, 80, REQ, "lab-sink")],
                        [check.Seen("ws", "source", "/p", pkts)], lambda f: None)
    (f,) = flows
    assert (f.klass, f.outcome, f.via) == ("proxy", "left", "tor")


def test_dns_asked_again_by_the_gateway_is_matched_by_the_name():
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    q = Ether() / IP(src=WS, dst="10.139.1.1") / UDP(sport=5353, dport=53) / DNS(
        rd=1, qd=DNSQR(qname="www.example.org"))
    r, fl = model([q], [record("udp", EXIT, 999, "198.51.100.53", 53, b"another query id",
                               "lab-dns", name="www.example.org")])
    f = fl[("udp", "10.139.1.1", 53, 5353)]
    assert (f.outcome, f.via) == ("left", "tor") and "by the name" in f.reason
    assert r.names_asked == ["www.example.org"] and r.verdict == 0


def test_udp_through_the_sink_is_matched_by_its_datagram():
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"0123456789ab"
    pkts = [udp_pkt(WS, 40001, SINK, 3478, stun)]
    r, fl = model(pkts, [record("udp", VPN_SERVER, 40001, None, None, stun, "lab-sink")],
                  expect="vpn")
    f = fl[("udp", SINK, 3478, 40001)]
    assert (f.klass, f.outcome, f.via, r.verdict) == ("udp", "left", "vpn", 0)


def test_tcp_through_the_sink_left_the_wrong_way_is_a_leak():
    pkts = tcp_conn(WS, 41000, SINK, 443, b"\x16\x03\x01" + bytes(range(100)))
    r, fl = model(pkts, [record("tcp", ISP, 7000, SINK, 443, b"\x16\x03\x01" + bytes(range(100)),
                                "lab-sink", sni="x.example.com")])
    f = fl[("tcp", SINK, 443, 41000)]
    assert (f.outcome, f.via, f.names) == ("left", "direct", ["x.example.com"])
    assert r.verdict == 1 and check.flow_fails(r, f) == "leak"


def test_icmp_echo_is_left_when_a_lab_hosts_link_carried_it():
    out = echo(WS, WEB, 77)
    there = echo(VPN_SERVER, WEB, 3101)  # the VPN's NAT changed the identifier, not the data
    lab = check.Seen("lab:web", "lab-host", "/p/lab_web.pcap", [there])
    r, fl = model([out], seen=[lab], expect="vpn")
    f = fl[("icmp", WEB, None, None)]
    assert (f.klass, f.outcome, f.via, f.echo_id) == ("icmp", "left", "vpn", 77)
    assert f.evidence[-1].link == "lab:web" and f.evidence[-1].frame == 1
    assert r.verdict == 0


def test_icmp_stopped_only_when_no_link_beyond_the_hop_carried_it():
    out = echo(WS, WEB, 77)
    r, fl = model([out], stop=lambda f: RULE)
    f = fl[("icmp", WEB, None, None)]
    assert f.outcome == "stopped" and r.verdict == 2
    assert [e.kind for e in f.evidence] == ["capture", "rule"]
    assert f.evidence[0].link == "anon-whonix:eth0" and f.evidence[0].frame == 1
    beyond = check.Seen("sys-whonix:eth0", "vpn-inner", "/p/b.pcap", [echo(GW, WEB, 5)])
    r, fl = model([out], seen=[beyond], stop=lambda f: RULE)
    f = fl[("icmp", WEB, None, None)]
    assert f.outcome == "unknown" and "seen on sys-whonix:eth0 (frame 1)" in f.reason
    assert r.verdict == 1


def test_icmp_errors_and_bare_rsts_the_workstation_answers_with_are_not_flows():
    from scapy.layers.inet import ICMP, IP, TCP
    from scapy.layers.l2 import Ether

    pkts = [Ether() / IP(src=WS, dst="10.139.1.1") / ICMP(type=3, code=3),
            Ether() / IP(src=WS, dst=WEB) / TCP(sport=1, dport=80, flags="R")]
    r, fl = model(pkts)
    assert fl == {} and r.verdict == 0


def test_ipv6_is_attributed_stopped_with_the_rule():
    pkts = tcp_conn(WS6, 41000, "2001:db8::80", 80, six=True)
    r, fl = model(pkts, stop=lambda f: RULE if f.family == "ipv6" else None)
    f = fl[("tcp", "2001:db8::80", 80, 41000)]
    assert (f.family, f.klass, f.outcome) == ("ipv6", "ipv6", "stopped")
    assert r.verdict == 2


def test_no_rule_and_no_lab_host_is_unknown_with_the_reason():
    pkts = tcp_conn(WS, 41000, "203.0.113.77", 80, REQ)
    r, fl = model(pkts)
    f = fl[("tcp", "203.0.113.77", 80, 41000)]
    assert f.outcome == "unknown" and "let it through" in f.reason and r.verdict == 1


# --- the renderings ----------------------------------------------------------------------------

UNKNOWN = Flow("ipv4", "tcp", "203.0.113.77", 80, 3, 180, "allowed", "unknown",
               reason="no lab host saw it")
WRONG_WAY = Flow("ipv4", "tcp", "198.51.100.99", 443, 9, 1000, "allowed", "left", "direct")


@pytest.mark.parametrize("kw,code", [
    (dict(flows=[LEFT]), 0),
    (dict(flows=[LEFT, STOPPED], bypass="warn"), 0),
    (dict(flows=[LEFT], leaks=[LEAK]), 1),
    (dict(flows=[LEFT, WRONG_WAY], leaks=[Leak("ws", "/p/ws.pcap", 1, "left via direct",
                                                "flow")]), 1),
    (dict(flows=[LEFT, UNKNOWN]), 1),
    (dict(flows=[LEFT, STOPPED]), 2),
    (dict(flows=[LEFT], exit_status=7), 3),
    (dict(flows=[LEFT], exit_status=-15, ended_by="timeout"), 3),
    (dict(flows=[LEFT], exit_status=130, ended_by="SIGTERM"), 3),
])
def test_junit_fails_exactly_what_made_the_exit_code_non_zero(kw, code):
    r = report(**kw)
    assert r.verdict == code
    root = ET.fromstring(check.junit(r))
    failed = [c for c in root if c.find("failure") is not None]
    assert int(root.get("failures")) == len(failed)
    assert (len(failed) > 0) == (code != 0)
    flows_failed = {c.get("name").split(":")[0] for c in failed
                    if c.get("classname").startswith("netstack.check.")
                    and c.get("classname").split(".")[-1] in check.CLASSES}
    assert flows_failed == {f.klass for f in r.flows if check.flow_fails(r, f)}
    command = next(c for c in root if c.get("name") == "the command")
    assert (command.find("failure") is not None) == (code == 3)
    has_unknown = any(f is UNKNOWN for f in r.flows)
    assert ("outcome unknown: no lab host saw it" in check.table(r)) == has_unknown
    assert check.table(r).splitlines()[-1].startswith(check.word(r))
    assert check.word(r) == ("UNKNOWN" if code == 1 and not r.leaks else check.WORDS[code])


def test_json_is_the_only_thing_on_stdout_with_the_programs_output_around(monkeypatch,
                                                                       capfd):
    """`check --json`: the program writes to the stdout it is given (fd level, as a child
    process would); the report still parses, and the program's output is on stderr."""
    import os

    from netstack import cli

    def fake_run(cmd, *a, stdout=None, timeout=None, **kw):
        os.write(stdout if stdout is not None else 1, b"203.0.113.10\nprogram output\n")
        return report(flows=[LEFT, UNKNOWN])
    monkeypatch.setattr(check, "run", fake_run)
    code = cli.main(["check", "--json", "--", "curl", "http://198.51.100.80/"])
    out, err = capfd.readouterr()
    r = json.loads(out)
    assert code == 1 and r["verdict"] == 1 and r["verdict_word"] == "UNKNOWN"
    assert "program output" in err and "program output" not in out
    (unk,) = [f for f in r["flows"] if f["outcome"] == "unknown"]
    assert unk["reason"] == "no lab host saw it" and not any(k.startswith("_") for k in unk)
    assert any(x.startswith("UNKNOWN") for x in r["reasons"])


def test_sigterm_and_sighup_are_handled_like_ctrl_c_and_deferred_during_the_report():
    import os
    import signal

    with check.Signals() as sig:
        for s in (signal.SIGTERM, signal.SIGHUP):
            with pytest.raises(KeyboardInterrupt) as e:
                os.kill(os.getpid(), s)  # delivered to ourselves before kill returns
            assert isinstance(e.value, check.Interrupted) and e.value.signum == s
        sig.defer()
        os.kill(os.getpid(), signal.SIGTERM)  # while the report is written: only noted
        assert sig.pending == signal.SIGTERM


def test_a_capture_knows_the_stack_of_its_namespace():
    from netstack.leaktest.capture import stack_of

    assert stack_of("nst-hc1-sys-net") == "hc1" and stack_of("nsl-ck12ab34-web") == "ck12ab34"
    assert stack_of("myns") is None and stack_of("nst-") is None


def test_a_payload_on_a_dns_port_that_is_not_dns_does_not_break_the_flows():
    pkts = [udp_pkt(WS, 40000, "224.0.0.251", 5353, b"hello multicast 123")]
    r, fl = model(pkts, stop=lambda f: RULE)
    f = fl[("udp", "224.0.0.251", 5353, 40000)]
    assert (f.klass, f.outcome, r.names_asked) == ("multicast", "stopped", [])


def test_multicast_is_run_through_input_as_the_kernel_delivers_it():
    """Not routed (no multicast routing): the evaluator must see it where the kernel
    takes it, else the flow would be judged on a forward path it never takes."""
    assert check.route_of("no-such-netns", "224.0.0.251", WS, "vif4") == ("lo", "")


def _dns_exchange(reply: bool):
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    q = Ether() / IP(src=WS, dst="10.139.1.1") / UDP(sport=5300, dport=53) / DNS(
        id=7, rd=1, qd=DNSQR(qname="cached.example.org"))
    a = Ether() / IP(src="10.139.1.1", dst=WS) / UDP(sport=53, dport=5300) / DNS(
        id=7, qr=1, qd=DNSQR(qname="cached.example.org"))
    return [q, a] if reply else [q]


LOCAL = {"fate": "local", "qube": "sys-whonix", "hook": "input", "rule": "DNS to Tor",
         "chain": "input", "handle": 9}


def test_dns_the_gateway_answers_itself_is_answered_not_stopped_nor_unknown():
    """Tor's DNSPort answering from its cache: no lab host saw a query, the evaluator
    delivers it to sys-whonix itself, and the reply is on the workstation's link."""
    r, fl = model(_dns_exchange(reply=True), stop=lambda f: LOCAL)
    f = fl[("udp", "10.139.1.1", 53, 5300)]
    assert (f.outcome, f.stopped_by, r.verdict) == ("answered", None, 0)
    assert "answered by the chain itself" in check.flow_line(f)


def test_dns_the_gateway_takes_and_does_not_answer_is_held_not_unknown():
    """glibc asks the second nameserver (10.139.1.2) when the first fails; the gateway's
    DNSPort may not answer that one before the command ends (CI of stop 33: check cried
    UNKNOWN on a whole chain). Held: exit 0, never stopped, never unknown."""
    r, fl = model(_dns_exchange(reply=False), stop=lambda f: LOCAL)
    f = fl[("udp", "10.139.1.1", 53, 5300)]
    assert (f.outcome, f.stopped_by, r.verdict) == ("held", None, 0)
    assert "held by the chain itself" in check.flow_line(f)


def test_dns_the_gateway_takes_but_a_link_beyond_carried_is_unknown():
    """Held only when nothing past the gateway carried it."""
    from scapy.layers.l2 import Ether

    q = _dns_exchange(reply=False)[0]
    past = check.Seen("sys-whonix:uplink", "gateway-uplink", "/p/up.pcap", [Ether(bytes(q))])
    r, fl = model([q], seen=[past], stop=lambda f: LOCAL)
    assert fl[("udp", "10.139.1.1", 53, 5300)].outcome == "unknown" and r.verdict == 1


def test_other_traffic_the_gateway_takes_for_itself_and_sends_nowhere_is_held():
    """A stream Tor's TransPort took and gave up (curl exit 35 right after bootstrap: CI
    2026-12-07): no lab host logged it, nothing beyond carried it: held, not unknown."""
    pkts = tcp_conn(WS, 41000, "203.0.113.77", 80, REQ)
    r, fl = model(pkts, stop=lambda f: LOCAL)
    f = fl[("tcp", "203.0.113.77", 80, 41000)]
    assert f.outcome == "held" and "no lab host saw it" in f.reason
    assert r.verdict == 0 and f.stopped_by is None


def test_other_traffic_the_gateway_takes_but_seen_beyond_is_unknown():
    from scapy.layers.l2 import Ether

    pkts = tcp_conn(WS, 41000, "203.0.113.77", 80, REQ)
    past = check.Seen("sys-whonix:uplink", "gateway-uplink", "/p/up.pcap",
                      [Ether(bytes(p)) for p in pkts[:1]])
    r, fl = model(pkts, seen=[past], stop=lambda f: LOCAL)
    f = fl[("tcp", "203.0.113.77", 80, 41000)]
    assert f.outcome == "unknown" and "hands it to its own service" in f.reason
    assert r.verdict == 1


def test_a_second_request_on_a_kept_alive_connection_is_not_another_flows():
    """lab-http logs each request with its connection's mark: both belong to the first
    connection; the second connection (same request bytes) was not seen by any lab host."""
    pkts = tcp_conn(WS, 41000, WEB, 80, REQ) + tcp_conn(WS, 41002, WEB, 80, REQ, isn=9000)
    recs = [record("tcp", EXIT, 5000, WEB, 80, REQ), record("tcp", EXIT, 5000, WEB, 80, REQ)]
    r, fl = model(pkts, recs)
    assert fl[("tcp", WEB, 80, 41000)].outcome == "left"
    assert fl[("tcp", WEB, 80, 41002)].outcome == "unknown" and r.verdict == 1


def test_a_tor_gateway_is_ready_for_the_program_once_a_circuit_is_built(monkeypatch):
    from netstack.tor import control
    from netstack.tor.gateway import TorInfo

    answers = iter([{"circuit_established": False, "circuits_built": 0},
                    {"circuit_established": True, "circuits_built": 0},
                    {"circuit_established": True, "circuits_built": 3}])
    asked: list[str] = []

    def status(sock):
        asked.append(sock)
        return next(answers)
    monkeypatch.setattr(control, "status", status)
    gw = types.SimpleNamespace(name="sys-whonix", info=TorInfo("sys-whonix", "ns", GW, "/d"))
    said: list[str] = []
    check.wait_circuit(gw, 5, lambda pct, what: said.append(what))
    assert len(asked) == 3 and said == ["3 circuits built"]
    check.wait_circuit(types.SimpleNamespace(name="sys-net", info=None), 5, None)  # no tor


def test_a_connection_from_before_the_run_is_not_the_programs():
    """Regression (a full run): a shared lab's web server retransmitted FINs of an earlier
    test's connections on the ISP link while check ran, and check called them leaks of the
    program. A TCP packet whose connection's SYN the capture never saw predates the run;
    one whose SYN it saw is judged (a leak begins with its SYN)."""
    from scapy.layers.inet import IP, TCP

    old = IP(src=WEB, dst=ISP) / TCP(sport=80, dport=52278, flags="FPA")
    syn = IP(src=ISP, dst=WEB) / TCP(sport=40000, dport=80, flags="S")
    later = IP(src=WEB, dst=ISP) / TCP(sport=80, dport=40000, flags="FPA")
    opened = check.opened_conns([syn, later, old])
    assert check.predates(old, opened)
    assert not check.predates(syn, opened) and not check.predates(later, opened)
    assert not check.predates(IP(src=WS, dst=WEB) / b"x", opened)  # not TCP: judged


def test_an_interfaces_own_mld_from_the_unspecified_address_is_link_chatter():
    """Regression (a full run): right after `up` with IPv6 on, an uplink's MLD report from
    "::" (sent while its address is still tentative) was called a leak on the ISP link.
    Link-scope chatter from "::" is allowed like that from fe80::/10; anything else from
    "::" or to a wider scope is still judged."""
    import types

    from scapy.layers.inet6 import ICMPv6MLReport2, IPv6, IPv6ExtHdrHopByHop

    from netstack.leaktest.battery import flow_allowed

    ctx = types.SimpleNamespace(ws=types.SimpleNamespace(ipv4=WS, ipv6=WS6),
                                plan=types.SimpleNamespace(ipv6=True))
    mld = IPv6(src="::", dst="ff02::16") / IPv6ExtHdrHopByHop() / ICMPv6MLReport2()
    assert flow_allowed(ctx, "vpn-out", mld)
    wide = IPv6(src="::", dst="ff0e::16") / IPv6ExtHdrHopByHop() / ICMPv6MLReport2()
    assert not flow_allowed(ctx, "vpn-out", wide)
    ctx.plan.ipv6 = False
    assert not flow_allowed(ctx, "vpn-out", mld)
