"""The Tor-over-VPN chain over the lab's private Tor network (root): anon-whonix ->
sys-whonix (Tor) -> sys-proxyvm (VPN) -> sys-firewall -> sys-net. One shared stack with two
workstations; the tests that break it (anti-test, tor killed) run last and repair it."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time

import pytest

from netstack.leaktest.capture import Capture
from tests.integration.util import (
    ROOT,
    cli,
    in_ns,
    kernel,
    load_ruleset,
    supervisor_pid,
    wait_for,
)

pytestmark = pytest.mark.root

WEB, LAB_DNS, VPN_SERVER, ISP = "198.51.100.80", "198.51.100.53", "203.0.113.10", "192.0.2.2"
WS1, WS2, GW = "10.137.0.5", "10.137.0.6", "10.137.0.4"
CFG = str(ROOT / "tests" / "configs" / "tor-two-workstations.toml")


@pytest.fixture(scope="module")
def lab(tor_lab):
    return tor_lab


def marker() -> str:
    return "nstk-" + secrets.token_hex(6)


def with_marker(pkts, m):
    return [p for p in pkts if m.encode() in bytes(p)]


def test_fetch_by_ip_and_name_server_sees_only_exits(lab):
    web_before, dns_before = len(lab.log("lab-http")), len(lab.log("lab-dns"))
    # a name no exit has cached yet: its lookup must reach the lab DNS, from an exit only
    fresh = f"nstk{secrets.token_hex(4)}.lab.test"
    in_ns(lab.ns["anon-whonix"], "timeout", "10", "getent", "hosts", fresh, check=False)
    assert lab.get("anon-whonix", WEB) in lab.exits
    assert lab.get("anon-whonix", "web.lab.test") in lab.exits
    assert lab.get("anon-whonix2", "web.lab.test") in lab.exits
    web = {r["client"] for r in lab.log("lab-http")[web_before:]}
    assert web and web <= lab.exits
    dns = [r for r in lab.log("lab-dns")[dns_before:] if r["name"] == fresh]
    assert dns and {r["client"] for r in dns} <= lab.exits
    assert {r["client"] for r in lab.log("lab-dns")[dns_before:]} <= lab.exits
    s = json.loads(cli("--stack", lab.stack, "status", "--json").stdout)
    tor = next(q for q in s["qubes"] if q["name"] == "sys-whonix")["tor"]
    assert tor["bootstrap"] == 100 and tor["circuits_built"] > 0
    assert lab.up_s < 60


def test_isp_link_holds_only_vpn_transport_and_vpn_server_only_relays(lab, tmp_path):
    """During page loads by IP and by name from both workstations."""
    from scapy.layers.inet import IP, TCP, UDP

    net, vpn = lab.ns["sys-net"], lab.plan.lab.vpn_server.netns
    with Capture(net, "uplink", str(tmp_path / "isp.pcap")) as isp, \
            Capture(vpn, "eth0", str(tmp_path / "vpn-egress.pcap")) as egress:
        for ws in ("anon-whonix", "anon-whonix2"):
            assert lab.get(ws, WEB) in lab.exits
            assert lab.get(ws, "web.lab.test") in lab.exits
    bad_isp, n_isp = [], 0
    for p in isp.packets():
        if IP not in p:
            continue
        n_isp += 1
        ip = p[IP]
        ok = UDP in p and ((ip.src, ip.dst, p[UDP].dport) == (ISP, VPN_SERVER, 51820)
                           or (ip.src, ip.dst, p[UDP].sport) == (VPN_SERVER, ISP, 51820))
        if not ok:
            bad_isp.append(p.summary())
    assert n_isp > 10 and not bad_isp
    bad_vpn, to_relays = [], 0
    for p in egress.packets():
        if IP not in p:
            continue
        ip = p[IP]
        if UDP in p and {ip.src, ip.dst} == {ISP, VPN_SERVER} and 51820 in (p[UDP].sport,
                                                                           p[UDP].dport):
            continue  # the tunnel's own transport arrives on the same link
        if TCP in p and ((ip.src == VPN_SERVER and (ip.dst, p[TCP].dport) in lab.relay_ports)
                         or (ip.dst == VPN_SERVER and (ip.src, p[TCP].sport)
                             in lab.relay_ports)):
            to_relays += 1
            continue
        bad_vpn.append(p.summary())
    assert to_relays > 0 and not bad_vpn


def test_two_workstations_use_different_circuits(lab):
    from stem.control import EventType

    from netstack.tor.control import connect

    c = connect(lab.tor.control_socket)
    source: dict[str, str] = {}  # stream id -> workstation (SOURCE_ADDR comes with NEW only)
    seen: dict[str, set[str]] = {}  # workstation -> circuits its streams were attached to

    def on_stream(ev) -> None:
        if ev.status == "NEW" and ev.source_address:
            source[ev.id] = ev.source_address
        elif ev.status in ("SENTCONNECT", "SUCCEEDED") and ev.circ_id and ev.id in source:
            seen.setdefault(source[ev.id], set()).add(ev.circ_id)

    c.add_event_listener(on_stream, EventType.STREAM)
    try:
        for _ in range(2):
            assert lab.get("anon-whonix", WEB) in lab.exits
            assert lab.get("anon-whonix2", WEB) in lab.exits
        wait_for(lambda: WS1 in seen and WS2 in seen, 5, 0.05, "stream events")
    finally:
        c.close()
    assert seen[WS1] and seen[WS2] and not seen[WS1] & seen[WS2]


def hostile(m: str) -> list[dict]:
    return [
        {"dst": WEB, "proto": "udp", "dport": 9, "payload": m},
        {"dst": WEB, "proto": "udp", "dport": 123, "payload": m},
        {"dst": WEB, "proto": "udp", "dport": 443, "payload": m},
        {"dst": LAB_DNS, "proto": "udp", "dport": 53, "payload": m},
        {"dst": WEB, "proto": "icmp", "payload": m},
        {"dst": WEB, "proto": "tcp", "dport": 80, "sport": 41001, "flags": "F", "payload": m},
        {"dst": WEB, "proto": "tcp", "dport": 80, "sport": 41002, "flags": "R", "payload": m},
        {"dst": WEB, "proto": "tcp", "dport": 80, "sport": 41003, "flags": "FA", "payload": m},
        {"dst": WEB, "proto": "tcp", "dport": 80, "sport": 41004, "flags": "A", "payload": m},
        {"dst": WEB, "proto": "tcp", "dport": 80, "sport": 41005, "flags": "", "payload": m},
        {"dst": GW, "proto": "tcp", "dport": 9051, "flags": "S", "payload": m},
        {"dst": GW, "proto": "tcp", "dport": 9040, "flags": "S", "payload": m},
        {"dst": "10.137.0.3", "proto": "tcp", "dport": 22, "flags": "S", "payload": m},
        {"dst": "ff02::1", "proto": "udp6", "dport": 9, "payload": m},
        {"dst": "fd09:24ef:4179::a89:4", "proto": "icmp6", "payload": m},
        {"dst": "2001:db8::80", "proto": "tcp6", "dport": 80, "payload": m},
    ]


def beyond_gateway_violations(lab, pkts) -> list[str]:
    """On sys-whonix's uplink only tor's own connections may appear: the gateway's
    address talking to relay OR/Dir ports."""
    from scapy.layers.inet import IP, TCP

    bad = []
    for p in pkts:
        if IP not in p:
            if p.type == 0x86DD:  # IPv6 never
                bad.append(p.summary())
            continue
        ip = p[IP]
        if TCP in p and ((ip.src == GW and (ip.dst, p[TCP].dport) in lab.relay_ports)
                         or (ip.dst == GW and (ip.src, p[TCP].sport) in lab.relay_ports)):
            continue
        bad.append(p.summary())
    return bad


def test_hostile_packets_fail_and_never_appear_beyond_the_gateway(lab, tmp_path):
    m = marker()
    whonix = lab.ns["sys-whonix"]
    with Capture(whonix, "eth0", str(tmp_path / "beyond.pcap")) as cap:
        sent = lab.prober.send(hostile(m)).sent
        # real clients too: the control port and the gateway's ports are unreachable
        for port in (9051, 9040, 5400, 22):
            p = in_ns(lab.ns["anon-whonix"], "curl", "-sS", "--max-time", "2",
                      f"http://{GW}:{port}/", check=False)
            assert p.returncode != 0
        assert lab.get("anon-whonix", WEB) in lab.exits  # while Tor itself works
    assert sent == len(hostile(m))
    pkts = cap.packets()
    assert not with_marker(pkts, m)
    assert not beyond_gateway_violations(lab, pkts)
    assert len(pkts) > 5  # tor's own traffic was seen: the capture is not blind


def test_anti_forwarding_gateway_is_caught(lab, tmp_path):
    """The detector can fail: a gateway that forwards (rules replaced, forwarding on)
    lets the hostile packets out, and the capture beyond it shows them."""
    from netstack.rules.nft import accept_all

    whonix = lab.ns["sys-whonix"]
    bad_rs = accept_all(masquerade_to="eth0")
    good = lab.plan.ns(whonix)
    m = marker()
    k = kernel()
    try:
        load_ruleset(whonix, bad_rs.to_json())
        k.sysctl(whonix, "net/ipv4/ip_forward", "1")
        with Capture(whonix, "eth0", str(tmp_path / "anti.pcap")) as cap:
            lab.prober.send(hostile(m)[:5])
        pkts = cap.packets()
    finally:
        load_ruleset(whonix, good.ruleset)
        k.sysctl(whonix, "net/ipv4/ip_forward", "0")
        k.close()
    assert with_marker(pkts, m), "a forwarding gateway leaked nothing: the detector is blind"
    assert beyond_gateway_violations(lab, pkts)


def test_tor_killed_fails_closed_then_recovers(lab, tmp_path):
    from netstack.tor.control import wait_bootstrap

    m = marker()
    whonix = lab.ns["sys-whonix"]
    c = lab.child("tor-sys-whonix")
    from netstack.kernel import proc_alive

    sup = supervisor_pid(lab.stack)
    os.kill(sup, signal.SIGSTOP)  # hold the restart back: tor stays dead while we probe
    try:
        with Capture(whonix, "eth0", str(tmp_path / "killed.pcap")) as cap:
            _probe_while_dead(lab, c, m)
    finally:
        os.kill(sup, signal.SIGCONT)
    pkts = cap.packets()
    from scapy.layers.inet import IP

    assert not with_marker(pkts, m)
    assert not [p for p in pkts if IP in p and p[IP].src in (WS1, WS2)]
    assert not beyond_gateway_violations(lab, pkts)  # only the dead tor's relay sessions
    # the supervisor restarts tor; traffic recovers
    wait_for(lambda: lab.child("tor-sys-whonix").pid != c.pid, 10, 0.05, "tor restart")
    wait_bootstrap(lab.tor.control_socket, 60)
    lab.get("anon-whonix", WEB)
    assert proc_alive(lab.child("tor-sys-whonix").pid, None)


def _probe_while_dead(lab, c, m):
    from netstack.kernel import proc_alive

    os.kill(c.pid, signal.SIGKILL)
    wait_for(lambda: not proc_alive(c.pid, c.start), 5, 0.01, "tor to die")
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        lab.prober.send([{"dst": WEB, "proto": "tcp", "dport": 80, "flags": "S",
                          "payload": m},
                         {"dst": "10.139.1.1", "proto": "udp", "dport": 53, "payload": m},
                         {"dst": WEB, "proto": "udp", "dport": 9, "payload": m},
                         {"dst": WEB, "proto": "icmp", "payload": m}])
    assert lab.fetch("anon-whonix", WEB, timeout=2) is None
    ws = in_ns(lab.ns["anon-whonix"], "timeout", "3", "getent", "hosts", "web.lab.test",
               check=False)
    assert ws.returncode != 0
