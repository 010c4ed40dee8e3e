"""The uplink watch (issue 29 item 1) with real packets on a lab stack (root).

- A packet sent in clear from sys-net (as a compromised process there would, an ordinary
  socket and a raw AF_PACKET one) is an alarm: in watch.json with its headers, in the
  pcap, `status` DEGRADED with exit 1; with on_leak = "cut" the uplink goes down. The
  anti-test: the same packet with no watch leaves the uplink (the lab's router sees it)
  and `status` stays UP, so the alarm is the watch's doing, about a real packet.
- Normal lab traffic through the VPN (HTTP, DNS, ping) raises none.
- A failover (the allowed set changes under the watch) raises none, and the watch still
  catches a leak after it.
- The kernel runs the program as netstack/watchfilter.run does: crafted frames (ARP,
  VLAN, IPv6, fragments, IP options, the VPN's own port) pass or not as the interpreter
  says.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netstack import watchfilter
from tests.integration.util import ROOT, cli, in_ns, wait_for

pytestmark = pytest.mark.root

VPN, WEB = "203.0.113.10", "198.51.100.80"


def config(watch: bool, on_leak: str = "log", failover: bool = False) -> str:
    text = (ROOT / "configs" / "vpn.toml").read_text()
    if failover:
        text = text.replace('config = "lab:wireguard"',
                            'config = ["lab:wireguard", "lab:wireguard2"]\nfailover_after = 3')
    head = (f'[stack]\nwatch = true\non_leak = "{on_leak}"\n\n' if watch
            else '[stack]\nwatch = false\n\n')  # on_leak without a watch is refused
    return head + text


def up(own_stack, tmp_path, prefix: str, **kw) -> str:
    s = own_stack(prefix)
    cfg = tmp_path / f"{s}.toml"
    cfg.write_text(config(**kw))
    cli("--stack", s, "up", str(cfg), "--lab")
    return s


def watch_file(s: str) -> dict:
    return json.loads(Path(f"/run/netstack/{s}/watch.json").read_text())


def running(s: str) -> dict:
    """The supervisor's watch writes its heartbeat (whatever it allows)."""
    def ok():
        try:
            w = watch_file(s)
        except (OSError, ValueError):
            return None
        return w if time.time() - w["heartbeat"] < 3 else None
    return wait_for(ok, 20, 0.05, "the uplink watch")


def watching(s: str) -> dict:
    """The supervisor's watch runs and its filter admits the VPN's current transport."""
    def ok():
        try:
            w = watch_file(s)
        except (OSError, ValueError):
            return None
        return w if w["allowed"]["transport"] and time.time() - w["heartbeat"] < 3 else None
    return wait_for(ok, 20, 0.05, "the uplink watch with the VPN's transport allowed")


def fetch(s: str) -> str:
    return in_ns(f"nst-{s}-work", "curl", "-sS", "--max-time", "5", f"http://{WEB}/").stdout


def leak_udp(s: str, port: int = 9999) -> float:
    """A datagram in clear from a process of sys-net (its own output is allowed out by
    its ruleset: exactly what a compromised sys-net process could send)."""
    p = in_ns(f"nst-{s}-sys-net", sys.executable, "-c",
              "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
              f"t = time.time(); s.sendto(b'leak', ('{WEB}', {port})); print(t)")
    return float(p.stdout)


def status(s: str) -> tuple[int, dict]:
    p = cli("--stack", s, "status", "--json", check=False)
    return p.returncode, json.loads(p.stdout)


def test_a_leak_from_sys_net_is_an_alarm_and_cut_sets_the_uplink_down(own_stack, tmp_path):
    s = up(own_stack, tmp_path, "wc", watch=True, on_leak="cut")
    watching(s)
    for _ in range(3):  # normal traffic through the VPN: no alarm
        assert fetch(s).strip() == VPN
    in_ns(f"nst-{s}-work", "getent", "hosts", "web.lab.test")
    in_ns(f"nst-{s}-work", "ping", "-c", "2", "-i", "0.2", "-W", "2", WEB)
    time.sleep(0.3)  # anything the filter passed is judged by now (the watch polls 0.25 s)
    assert watch_file(s)["count"] == 0, watch_file(s)["alarms"]
    rc, st = status(s)
    assert rc == 0 and st["watch"]["running"], st["health"]
    p = cli("--stack", s, "watch", "--for", "1", check=False)
    assert p.returncode == 3 and "already watched by the supervisor" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1

    sent = leak_udp(s)
    w = wait_for(lambda: (x := watch_file(s))["count"] and x, 2, 0.02, "the alarm")
    (a,) = w["alarms"]
    assert a["headers"]["dst"] == WEB and a["headers"]["dport"] == 9999
    assert a["packet_at"] - sent < 0.5 and a["at"] - a["packet_at"] < 1.0
    assert a["cut_at"] is not None and a["cut_at"] - a["packet_at"] < 0.1
    assert w["cut"]
    link = next(x for x in status(s)[1]["qubes"][0]["interfaces"] if x["name"] == "uplink")
    assert not link["flags"] & 0x1, "the uplink is still up"
    rc, st = status(s)
    assert rc == 1 and any("uplink watch: 1 packet" in p for p in st["health"]["problems"])
    pcap = subprocess.run(["tcpdump", "-nr", w["pcap"]], capture_output=True, text=True)
    assert f"> {WEB}.9999: UDP" in pcap.stdout, pcap.stdout + pcap.stderr
    # the read form says so too (exit 1 while there are alarms)
    p = cli("--stack", s, "watch", "--status", "--json", check=False)
    assert p.returncode == 1 and json.loads(p.stdout)["count"] == 1

    out = json.loads(cli("--stack", s, "watch", "--clear", "--json").stdout)
    assert out == {"cleared": 1, "uplink_up_again": True}
    assert status(s)[0] == 0
    assert wait_for(lambda: fetch(s).strip() == VPN, 15, 0.2, "traffic after --clear")
    # the socket was hooked again when the link came back: the next leak is seen too
    leak_udp(s, 9998)
    w = wait_for(lambda: (x := watch_file(s))["count"] and x, 2, 0.02, "the second alarm")
    assert w["alarms"][0]["headers"]["dport"] == 9998


def test_anti_without_the_watch_the_same_leak_goes_unseen(own_stack, tmp_path):
    """The leak is real (the lab's router receives it) and only the watch sees it."""
    from netstack.leaktest.capture import Capture

    s = up(own_stack, tmp_path, "wa", watch=False)
    assert fetch(s).strip() == VPN
    with Capture(f"nsl-{s}-isp", "cust0", str(tmp_path / "isp.pcap")) as cap:
        leak_udp(s)
        time.sleep(0.5)
    from scapy.layers.inet import IP, UDP

    assert any(IP in p and p[IP].dst == WEB and UDP in p and p[UDP].dport == 9999
               for p in cap.packets()), "the leak did not leave the uplink"
    rc, st = status(s)
    assert rc == 0, st["health"]
    assert not Path(f"/run/netstack/{s}/watch.json").exists()
    # the same leak, now with `netstack watch` in the foreground
    p = subprocess.Popen([sys.executable, "-m", "netstack.cli", "--stack", s, "watch",
                          "--for", "4", "--json"], stdout=subprocess.PIPE, text=True)
    running(s)
    leak_udp(s)
    out, _ = p.communicate(timeout=30)
    lines = [json.loads(x) for x in out.splitlines()]
    assert p.returncode == 1, out
    assert lines[0]["alarm"]["headers"]["dport"] == 9999
    assert lines[-1]["alarms"] == 1 and not lines[-1]["cut"]
    assert status(s)[0] == 1  # the alarm stays until --clear, the watch gone or not
    cli("--stack", s, "watch", "--clear")
    assert status(s)[0] == 0


def test_failover_raises_no_alarm_and_the_watch_follows(own_stack, tmp_path):
    s = up(own_stack, tmp_path, "wf", watch=True, on_leak="log", failover=True)
    w = watching(s)
    assert [t[2] for t in w["allowed"]["transport"]] == [51820]
    assert fetch(s).strip() == VPN
    in_ns(f"nsl-{s}-vpn", "nft", "add table inet blk; add chain inet blk in { type filter "
          "hook prerouting priority -300; }; add rule inet blk in udp dport 51820 drop")
    wait_for(lambda: fetch_or_none(s) == VPN and
             [t[2] for t in watch_file(s)["allowed"]["transport"]] == [51821],
             40, 0.2, "traffic through the second server, the filter following")
    for _ in range(3):
        assert fetch(s).strip() == VPN
    time.sleep(0.3)
    w = watch_file(s)
    assert w["count"] == 0, w["alarms"]
    assert w["reattached"] >= 1
    leak_udp(s)  # still watching after the change
    wait_for(lambda: watch_file(s)["count"] == 1, 2, 0.02, "the alarm after the failover")


def fetch_or_none(s: str) -> str | None:
    p = in_ns(f"nst-{s}-work", "curl", "-sS", "--max-time", "1", f"http://{WEB}/",
              check=False)
    return p.stdout.strip() if p.returncode == 0 else None


def test_the_kernel_runs_the_filter_as_the_interpreter_does(own_stack, tmp_path):
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
    from scapy.layers.l2 import ARP, Dot1Q, Ether

    from netstack import watch
    from netstack.state import require
    from tests.integration.util import kernel

    s = up(own_stack, tmp_path, "wk", watch=True, on_leak="log")
    watching(s)
    k = kernel()
    try:
        prog = watchfilter.program(watch.facts(require(s), k), watchfilter.ETH_HLEN)
    finally:
        k.close()
    own = "192.0.2.2"
    l3s = [
        ARP(psrc=own, pdst="192.0.2.1"),
        IP(src=own, dst=VPN) / UDP(sport=40000, dport=51820),  # the transport: allowed
        IP(src=own, dst=VPN) / UDP(sport=40000, dport=51821),
        IP(src=own, dst=VPN, options=b"\x01\x01\x01\x00") / UDP(sport=1, dport=51820),
        IP(src=own, dst=VPN, options=b"\x01\x01\x01\x00") / UDP(sport=51820, dport=7),
        IP(src=own, dst=VPN, proto=17, frag=50) / b"z",  # a later fragment to the server
        IP(src=own, dst=WEB, proto=17, frag=50) / b"z",
        IP(src=own, dst=WEB) / TCP(dport=443, flags="S"),
        IP(src=own, dst=VPN) / TCP(dport=51820, flags="S"),
        IPv6(src="fe80::1", dst="ff02::1", hlim=255) / IPv6ExtHdrHopByHop() / UDP(),
        IPv6(src="fe80::1", dst="2001:db8::1") / UDP(dport=51820),
        # a VLAN tag around the allowed transport: the kernel looks past it, we do not
        Dot1Q(vlan=7) / IP(src=own, dst=VPN) / UDP(sport=40000, dport=51820),
    ]
    frames, expect = [], {}
    for i, l3 in enumerate(l3s):
        pad = b"\0" * (7 * i)  # every frame its own length: the alarms name them
        f = Ether(dst="ff:ff:ff:ff:ff:ff") / l3 / pad
        frames.append(f)
        data = bytes(f)
        proto = int.from_bytes(data[12:14], "big")
        expect[len(data) - 14] = watchfilter.run(prog, data, proto=proto,
                                                 pkttype=watchfilter.PACKET_OUTGOING) != 0
    assert sum(expect.values()) >= 7 and not all(expect.values())
    assert expect[len(bytes(frames[-1])) - 14], "the tagged frame is not an alarm"
    hexes = [bytes(f).hex() for f in frames]
    in_ns(f"nst-{s}-sys-net", sys.executable, "-c",
          "import socket, sys; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); "
          "s.bind(('uplink', 0)); [s.send(bytes.fromhex(h)) for h in sys.argv[1:]]", *hexes)
    want = {n for n, alarm in expect.items() if alarm}
    end = time.monotonic() + 3
    while time.monotonic() < end and watch_file(s)["count"] < len(want):
        time.sleep(0.05)
    time.sleep(0.3)
    got = {a["headers"]["length"] for a in watch_file(s)["alarms"]}
    assert got == want, (sorted(got - want), sorted(want - got))


@pytest.mark.parametrize("bridge", [True, False], ids=["obfs4-bridge", "lab-relays"])
def test_a_tor_gateway_through_the_watch_raises_none(own_stack, tmp_path, bridge):
    """configs/tor.toml (no VPN): the uplink carries only the gateway's connections to its
    bridge, or to the lab's relays without one; pages through Tor raise no alarm, and a
    datagram in clear still does."""
    text = (ROOT / "configs" / "tor.toml").read_text()
    if not bridge:
        text = text.replace('bridges = ["lab:obfs4"]', "")
    s = own_stack("wt")
    cfg = tmp_path / "tor.toml"
    cfg.write_text('[stack]\nwatch = true\non_leak = "log"\n\n' + text)
    cli("--stack", s, "up", str(cfg), "--lab", timeout=240)
    w = running(s)
    assert w["allowed"]["relays"] and not w["allowed"]["transport"]
    if bridge:
        assert len(w["allowed"]["relays"]) == 1
    ws = f"nst-{s}-anon-whonix"
    page = wait_for(lambda: (p := in_ns(ws, "curl", "-sS", "--max-time", "10",
                                        f"http://{WEB}/", check=False, timeout=20)).returncode
                    == 0 and p.stdout.strip(), 90, 0.5, "a page through Tor")
    assert page
    for _ in range(3):
        in_ns(ws, "curl", "-sS", "--max-time", "10", f"http://{WEB}/", timeout=20)
    time.sleep(0.3)
    w = watch_file(s)
    assert w["count"] == 0, w["alarms"]
    leak_udp(s)
    wait_for(lambda: watch_file(s)["count"] == 1, 2, 0.02, "the alarm")


@pytest.mark.parametrize("cfg", ["vpn.toml", "basic.toml"])
def test_with_ipv6_on_the_links_own_chatter_raises_none(own_stack, tmp_path, cfg):
    """`ipv6 = true`: the uplink's own IPv6 chatter (on the lab: an MLD report from "::"
    with a hop-by-hop header when the link comes up; tests/unit/test_watchfilter.py judges
    ND and MLD one by one) and a VPN chain's or a plain chain's traffic raise nothing."""
    s = own_stack("w6")
    c = tmp_path / cfg
    c.write_text('[stack]\nipv6 = true\nwatch = true\n\n' + (ROOT / "configs" / cfg)
                 .read_text())
    cli("--stack", s, "up", str(c), "--lab")
    w = running(s)
    assert w["allowed"]["ipv6"]
    for _ in range(3):
        in_ns(f"nst-{s}-work", "curl", "-sS", "--max-time", "5", f"http://{WEB}/")
    time.sleep(2)
    w = watch_file(s)
    assert w["count"] == 0, w["alarms"]
    leak_udp(s)
    if cfg == "vpn.toml":
        wait_for(lambda: watch_file(s)["count"] == 1, 2, 0.02, "the alarm")
    else:  # a plain chain: anything from the uplink's address is its clients' traffic
        time.sleep(0.5)
        assert watch_file(s)["count"] == 0
