"""The basic chain over the lab, proven with real packets (root)."""

from __future__ import annotations

import json
import secrets

import pytest

from netstack.leaktest.capture import Capture
from tests.integration.util import cli, in_ns, nft_counter, send

pytestmark = [pytest.mark.root, pytest.mark.fresh_host]

WEB, DNS = "198.51.100.80", "198.51.100.53"
ISP_ADDR = "192.0.2.2"
WORK, PERSONAL, FIREWALL = "10.137.0.4", "10.137.0.3", "10.137.0.2"


def ns(stack, qube):
    return f"nst-{stack}-{qube}"


def marker():
    return "nstk-" + secrets.token_hex(6)


def with_marker(pkts, m):
    return [p for p in pkts if bytes(p).find(m.encode()) >= 0]


def log_lines(stack, name):
    with open(f"/run/netstack/{stack}/{name}.log") as f:
        return [json.loads(x) for x in f]


def test_status_json_lists_qubes_and_lab(basic_stack):
    s = json.loads(cli("--stack", basic_stack, "status", "--json").stdout)
    q = {x["name"]: x for x in s["qubes"]}
    assert set(q) == {"sys-net", "sys-firewall", "work", "personal"}
    assert q["work"]["kind"] == "app" and q["work"]["netvm"] == "sys-firewall"
    assert q["work"]["label"] == "blue" and q["work"]["addresses"] == [WORK]
    assert q["work"]["netns"] == ns(basic_stack, "work")
    assert [i["name"] for i in q["work"]["interfaces"]] == ["eth0"]
    assert q["work"]["interfaces"][0]["addresses"] == [f"{WORK}/32"]
    assert s["lab"]["hosts"]["web"]["address"] == WEB
    assert s["lab"]["hosts"]["dns"]["address"] == DNS
    assert s["lab"]["capture"]["isp_link"] == {"netns": ns(basic_stack, "sys-net"),
                                               "interface": "uplink", "address": ISP_ADDR}
    assert all(p["alive"] for p in s["processes"])


def test_work_fetches_the_lab_page_and_server_sees_the_isp_address(basic_stack):
    before = len(log_lines(basic_stack, "lab-http"))
    out = cli("--stack", basic_stack, "exec", "work", "--",
              "curl", "-sS", "--max-time", "5", f"http://{WEB}/").stdout
    assert out.strip() == ISP_ADDR
    seen = log_lines(basic_stack, "lab-http")[before:]
    assert [r["client"] for r in seen] == [ISP_ADDR]


def test_name_lookup_goes_through_virtual_dns_to_the_lab_dns(basic_stack):
    before = len(log_lines(basic_stack, "lab-dns"))
    out = cli("--stack", basic_stack, "exec", "work", "--", "getent", "hosts",
              "web.lab.test").stdout
    assert out.split()[0] == WEB
    assert in_ns(ns(basic_stack, "work"), "cat", "/etc/resolv.conf").stdout.startswith(
        "nameserver 10.139.1.1")
    seen = log_lines(basic_stack, "lab-dns")[before:]
    assert seen and {r["client"] for r in seen} == {ISP_ADDR}
    assert {r["name"] for r in seen} == {"web.lab.test"}
    # and the page by name, end to end
    out = cli("--stack", basic_stack, "exec", "work", "--", "curl", "-sS", "--max-time", "5",
              "http://web.lab.test/").stdout
    assert out.strip() == ISP_ADDR


def test_exec_runs_as_the_given_user(basic_stack):
    out = cli("--stack", basic_stack, "exec", "work", "--user", "nobody", "--", "id", "-u")
    assert out.stdout.strip() == "65534"
    p = cli("--stack", basic_stack, "exec", "nope", "--", "true", check=False)
    assert p.returncode == 2 and "no qube 'nope'" in p.stderr


def test_app_qubes_cannot_reach_each_other(basic_stack):
    """TCP, UDP and ICMP from work to personal die at sys-firewall: nothing reaches
    personal's link, while a control packet to the lab does leave sys-firewall."""
    m, ctl = marker(), marker()
    fw, per = ns(basic_stack, "sys-firewall"), ns(basic_stack, "personal")
    with Capture(per, "eth0", f"/tmp/{m}-personal.pcap") as c_per, \
            Capture(fw, "vif3", f"/tmp/{m}-vif3.pcap") as c_vif, \
            Capture(fw, "eth0", f"/tmp/{m}-fw-up.pcap") as c_up:
        send(ns(basic_stack, "work"), [
            {"dst": PERSONAL, "proto": "tcp", "dport": 22, "payload": m},
            {"dst": PERSONAL, "proto": "udp", "dport": 53, "payload": m},
            {"dst": PERSONAL, "proto": "icmp", "payload": m},
            {"dst": FIREWALL, "proto": "udp", "dport": 9, "payload": m},  # hop to its gateway
            {"dst": WEB, "proto": "udp", "dport": 9, "payload": ctl},
        ])
        # A real client too: a TCP connect from work to personal must fail.
        p = in_ns(ns(basic_stack, "work"), "curl", "-sS", "--max-time", "1",
                  f"http://{PERSONAL}:80/", check=False)
        assert p.returncode != 0
        ping = in_ns(ns(basic_stack, "work"), "ping", "-c", "1", "-W", "1", PERSONAL,
                     check=False)
        assert ping.returncode != 0
    from scapy.layers.inet import IP

    for c in (c_per, c_vif):
        pkts = c.packets()
        assert not [p for p in pkts if IP in p and p[IP].src == WORK], c.path
    assert not with_marker(c_up.packets(), m)
    assert with_marker(c_up.packets(), ctl), "control packet missing: capture is blind"


def test_spoofed_source_is_dropped_at_sys_firewall(basic_stack):
    fw = ns(basic_stack, "sys-firewall")
    m, ctl = marker(), marker()
    before = nft_counter(fw, "antispoof work")
    with Capture(fw, "eth0", f"/tmp/{m}-fw-up.pcap") as cap:
        send(ns(basic_stack, "work"), [
            {"src": PERSONAL, "dst": WEB, "proto": "udp", "dport": 9, "payload": m, "count": 3},
            {"src": FIREWALL, "dst": WEB, "proto": "udp", "dport": 9, "payload": m},
            {"src": "198.51.100.53", "dst": WEB, "proto": "tcp", "flags": "S", "payload": m},
            {"dst": WEB, "proto": "udp", "dport": 9, "payload": ctl},
        ])
    pkts = cap.packets()
    assert not with_marker(pkts, m), "a spoofed packet got beyond sys-firewall"
    assert with_marker(pkts, ctl), "control packet missing: capture is blind"
    assert nft_counter(fw, "antispoof work") - before >= 5


def test_invalid_tcp_never_leaves_sys_net(basic_stack):
    net, fw = ns(basic_stack, "sys-net"), ns(basic_stack, "sys-firewall")
    m, ctl = marker(), marker()
    before = nft_counter(fw, "drop INVALID")
    with Capture(net, "uplink", f"/tmp/{m}-isp.pcap") as cap:
        send(ns(basic_stack, "work"), [
            {"dst": WEB, "proto": "tcp", "dport": 80, "sport": 41001, "flags": "F",
             "payload": m},
            {"dst": WEB, "proto": "tcp", "dport": 80, "sport": 41002, "flags": "R",
             "payload": m},
            {"dst": WEB, "proto": "tcp", "dport": 80, "sport": 41003, "flags": "FA",
             "payload": m},
            {"dst": WEB, "proto": "tcp", "dport": 80, "sport": 41004, "flags": "S",
             "payload": ctl},
        ])
    pkts = cap.packets()
    assert not with_marker(pkts, m), "INVALID TCP left sys-net"
    seen = with_marker(pkts, ctl)
    assert seen, "control SYN missing: capture is blind"
    from scapy.layers.inet import IP

    assert seen[0][IP].src == ISP_ADDR  # masqueraded at sys-net
    assert nft_counter(fw, "drop INVALID") - before >= 3


def test_no_veth_end_shares_its_peers_index(basic_stack):
    """The kernel gives a veth its queue at once only when its index differs from its
    peer's: with the same index (2 and 2, the first device after lo in two fresh
    namespaces) a qube's eth0 dropped what it sent for up to a second after `up`
    (rtnl.fixed_index; docs/field-notes.md "veth links and the kernel's linkwatch")."""
    from netstack import netns

    seen = 0
    for name in netns.list_names():
        if not name.startswith((f"nst-{basic_stack}-", f"nsl-{basic_stack}-")):
            continue
        links = json.loads(in_ns(name, "ip", "-j", "-d", "link", "show").stdout)
        for lk in links:
            if lk.get("linkinfo", {}).get("info_kind") == "veth":
                assert lk["ifindex"] != lk.get("link_index"), (name, lk["ifname"])
                assert lk["operstate"] == "UP", (name, lk["ifname"], lk["operstate"])
                seen += 1
    assert seen >= 6
