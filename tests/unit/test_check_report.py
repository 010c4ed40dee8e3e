"""`netstack check`'s pure parts (no root): flow classes, the verdict's order, and the
reports CI systems read (JUnit with one testcase per class, the HTML page)."""

from __future__ import annotations

import types
import xml.etree.ElementTree as ET

import pytest

from netstack import check
from netstack.check import Flow, Leak, Report

CTX = types.SimpleNamespace(exits={"203.0.113.41"}, vpn_server="203.0.113.10",
                            chain=[None, types.SimpleNamespace(kind="firewall")])


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


def test_junit_has_a_testcase_per_class_and_the_evidence_in_failures():
    root = ET.fromstring(check.junit(report(flows=[LEFT, STOPPED], leaks=[LEAK])))
    cases = {c.get("name"): c.find("failure") for c in root}
    assert cases["no leak"] is not None and "frame 3" in cases["no leak"].text
    udp = next(v for k, v in cases.items() if k.startswith("udp:"))
    assert udp is not None and "stopped by sys-whonix forward" in udp.text
    allowed = next(v for k, v in cases.items() if k.startswith("allowed:"))
    assert allowed is None
    assert root.get("failures") == "2"


def test_the_html_page_draws_the_chain_in_label_colours_and_lists_leaks():
    page = check.html(report(flows=[LEFT], leaks=[LEAK]))
    assert page.startswith("<!doctype html>") and "<svg" in page
    assert "#d32f2f" in page and "#212121" in page  # red workstation, black gateway
    assert "frame 3" in page and "LEAK" in page
    assert "<script" not in page  # self-contained, nothing fetched
