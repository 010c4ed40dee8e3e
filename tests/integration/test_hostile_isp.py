"""A hostile ISP in the lab (issue 29 item 4; netstack/lab/isp.py, docs/isp.md): each
scenario with real packets, the workstation trying every way out while sys-net's uplink is
captured, and the capture judged as leaktest judges its ISP link (battery.flow_allowed on
the link's zone, plus a marker that must never appear in clear). Anti-tests break the kill
switch under the same scenario and show the same judge catches the leak (root).

One stack per scenario: each one breaks the network on purpose."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest

from netstack.lab.isp import FORGED
from netstack.leaktest.capture import Capture
from tests.integration.faults import broken
from tests.integration.util import (
    ROOT,
    cli,
    in_ns,
    kernel,
    nft_counter,
    reap_zombies,
    stack_leftovers,
    wait_for,
)

pytestmark = pytest.mark.root

VPN, WEB, DNS = "203.0.113.10", "198.51.100.80", "198.51.100.53"
ISP_CA = "Hostile ISP interception CA"


def config(tmp_path: Path, vpn_type: str = "wireguard", servers: list[str] | None = None,
           failover_after: int | None = None) -> str:
    """configs/vpn.toml with the VPN qube's type and lab servers replaced."""
    servers = servers or ["lab:wireguard"]
    conf = json.dumps(servers) if len(servers) > 1 else json.dumps(servers[0])
    text = (ROOT / "configs" / "vpn.toml").read_text().replace(
        'type = "wireguard"', f'type = "{vpn_type}"').replace(
        'config = "lab:wireguard"', f"config = {conf}"
        + (f"\nfailover_after = {failover_after}" if failover_after else ""))
    p = tmp_path / "isp.toml"
    p.write_text(text)
    return str(p)


def up(own_stack, cfg: str, *isp: str, wait: bool = False) -> str:
    s = own_stack("i")
    cli("--stack", s, "up", cfg, "--lab", *(x for i in isp for x in ("--isp", i)),
        *(() if wait else ("--no-wait",)), timeout=120)
    return s


def status(s: str) -> tuple[int, dict]:
    p = cli("--stack", s, "status", "--json", check=False)
    return p.returncode, json.loads(p.stdout)


def qube(doc: dict, name: str) -> dict:
    return next(q for q in doc["qubes"] if q["name"] == name)


def workload(ns: str, marker: str, rounds: int = 1) -> None:
    """What a workstation's programs send, each carrying `marker`: HTTP by address and by
    name, TLS-port TCP, a UDP datagram to the DNS host, a DNS query, ICMP echo."""
    for _ in range(rounds):
        in_ns(ns, "curl", "-sS", "-m", "2", "-H", f"X-Marker: {marker}",
              f"http://{WEB}/{marker}", check=False)
        in_ns(ns, "curl", "-sS", "-m", "2", "-H", f"X-Marker: {marker}",
              f"http://web.lab.test/{marker}", check=False)
        in_ns(ns, "curl", "-sS", "-m", "2", f"http://{VPN}:443/{marker}", check=False)
        in_ns(ns, "python3", "-c", "import socket,sys; s=socket.socket(2,2); "
              f"s.sendto(sys.argv[1].encode(), ('{DNS}', 5300))", marker, check=False)
        in_ns(ns, "ping", "-c", "1", "-W", "1", "-p", marker.encode().hex()[:32], WEB,
              check=False)


def isp_judge(s: str):
    """How leaktest judges the stack's ISP link, read now (before any fault): its
    context (the kill switches' live sets and failover timelines) and the link's zone."""
    from netstack.leaktest import battery

    k = kernel()
    try:
        ctx = battery.context(s, "work", k)
        zone = next(lk.zone for lk in battery.links(ctx) if lk.name == "isp-link")
    finally:
        k.close()
    return ctx, zone


def judge(s: str, cap: Capture, marker: str, how=None) -> list[str]:
    """The capture of sys-net's uplink judged as leaktest judges its ISP link: every
    packet its zone does not allow (battery.flow_allowed, with the swaps made meanwhile),
    and every packet carrying the workstation's marker in clear."""
    from netstack.leaktest import battery

    ctx, zone = how or isp_judge(s)
    ctx.refresh_transport()
    bad = []
    needle = marker.encode()
    for p in cap.packets():
        if not battery.flow_allowed(ctx, zone, p):
            bad.append(f"not allowed on the ISP link ({zone}): {p.summary()}")
        if needle in bytes(p) or needle.hex()[:32].encode() in bytes(p).hex().encode():
            bad.append(f"marker in clear: {p.summary()}")
    return bad


def leak_run(s: str, tmp_path: Path, name: str, how=None) -> tuple[list[str], int]:
    """The workload under the capture; (the judge's findings, packets captured)."""
    marker = f"isp29{secrets.token_hex(4)}"
    how = how or isp_judge(s)
    with Capture(f"nst-{s}-sys-net", "uplink", str(tmp_path / f"{name}.pcap")) as cap:
        workload(f"nst-{s}-work", marker)
    return judge(s, cap, marker, how), len(cap.packets())


def anti_test(s: str, tmp_path: Path) -> None:
    """The kill switch broken under the same hostile ISP: the judge must see the leak."""
    how = isp_judge(s)  # what the intact stack allows, as leaktest reads it at its start
    with broken(s, "work", "no-kill-switch"):
        bad, _ = leak_run(s, tmp_path, "anti", how)
    assert bad, "the judge saw nothing with the kill switch gone: it would miss a leak"
    assert any("marker in clear" in b for b in bad), bad  # each detector on its own
    assert any("not allowed" in b for b in bad), bad


def test_udp_blocked_wireguard_stays_closed(own_stack, tmp_path):
    s = up(own_stack, config(tmp_path), "udp-blocked")
    isp = f"nsl-{s}-isp"
    wait_for(lambda: nft_counter(isp, "udp-blocked: no UDP out but DNS") > 0, 15, 0.2,
             "WireGuard's handshake to meet the ISP's UDP block")
    bad, n = leak_run(s, tmp_path, "steady")
    assert n > 0
    assert bad == []
    rc, doc = status(s)
    assert rc == 1 and qube(doc, "sys-proxyvm")["health"]["state"] == "degraded"
    assert in_ns(f"nst-{s}-work", "curl", "-sS", "-m", "2", f"http://{WEB}/",
                 check=False).returncode != 0
    anti_test(s, tmp_path)


def test_udp_blocked_openvpn_fails_over_to_tcp_443(own_stack, tmp_path):
    cfg = config(tmp_path, "openvpn", ["lab:openvpn", "lab:openvpn-tcp"], failover_after=3)
    s = up(own_stack, cfg, "udp-blocked", wait=True)  # `up` waits: it connects over TCP
    info = json.loads(cli("--stack", s, "status", "--json").stdout)
    vpn = qube(info, "sys-proxyvm")
    assert vpn["health"]["state"] == "up", vpn["health"]
    assert nft_counter(f"nsl-{s}-isp", "udp-blocked: no UDP out but DNS") > 0
    work = f"nst-{s}-work"
    assert wait_for(lambda: in_ns(work, "curl", "-sS", "-m", "2", f"http://{WEB}/",
                                  check=False).stdout.strip(), 20, 0.2) == VPN
    from tests.integration.util import load_state

    server_file = load_state(s).plan.qube("sys-proxyvm").info.server_file
    hist = json.loads(Path(server_file).read_text())["history"]
    assert [(h["from"], h["to"]) for h in hist] == [(0, 1)]
    bad, _ = leak_run(s, tmp_path, "steady")
    assert bad == []
    # and leaktest's whole battery on this chain, behind this ISP (about 20 s)
    p = cli("--stack", s, "leaktest", "--pcaps", str(tmp_path / "battery"), "--json",
            check=False, timeout=240)
    rep = json.loads(p.stdout)
    assert p.returncode == 0 and rep["leaks"] == 0 and not rep["errors"], p.stdout[-2000:]


def test_dns_hijack_never_opens_to_the_forged_address(own_stack, tmp_path):
    s = up(own_stack, config(tmp_path), "dns-hijack")
    log = Path(f"/run/netstack/{s}/isp-dns-forger.log")
    wait_for(lambda: log.exists() and "vpn.lab.test" in log.read_text(), 15, 0.1,
             "the endpoint's name to be asked of the forger")
    # the kill switch admits the forged address only: the real server is never reached
    sets = in_ns(f"nst-{s}-sys-proxyvm", "nft", "-j", "list", "set", "inet", "netstack",
                 "vpn_endpoints").stdout
    assert FORGED in sets and VPN not in sets
    marker = f"isp29{secrets.token_hex(4)}"
    how = isp_judge(s)
    with Capture(f"nst-{s}-sys-net", "uplink", str(tmp_path / "hijack.pcap")) as cap:
        workload(f"nst-{s}-work", marker)
    assert judge(s, cap, marker, how) == []
    from scapy.layers.inet import IP

    assert not [p for p in cap.packets() if IP in p and VPN in (p[IP].src, p[IP].dst)]
    rc, doc = status(s)
    net, vpn = qube(doc, "sys-net"), qube(doc, "sys-proxyvm")
    assert rc == 1 and vpn["health"]["state"] == "degraded"
    assert net["connectivity"]["state"] == "limited"
    assert net["connectivity"]["address"] == FORGED
    anti_test(s, tmp_path)


def test_captive_portal_named_by_status_chain_closed_until_login(own_stack, tmp_path):
    s = up(own_stack, config(tmp_path), "captive-portal")
    rc, doc = status(s)
    net = qube(doc, "sys-net")
    assert rc == 1
    assert net["connectivity"]["state"] == "portal", net["connectivity"]
    assert any("captive portal" in p for p in net["health"]["problems"]), net["health"]
    bad, _ = leak_run(s, tmp_path, "portal")
    assert bad == []
    log = [json.loads(x) for x in
           Path(f"/run/netstack/{s}/isp-portal.log").read_text().splitlines()]
    assert any(e["ev"] == "redirect" and e["client"] == "192.0.2.2" for e in log)
    assert not any(e["ev"] == "login" for e in log)
    anti_test(s, tmp_path)  # behind the portal too: what leaves sys-net in clear is seen
    # the detector against the anti-case: after a login the check says full, the chain opens
    in_ns(f"nst-{s}-sys-net", "curl", "-sS", "-m", "3", "http://192.0.2.1:8081/login")
    _, doc = status(s)
    assert qube(doc, "sys-net")["connectivity"]["state"] == "full"
    assert wait_for(lambda: in_ns(f"nst-{s}-work", "curl", "-sS", "-m", "2",
                                  f"http://{WEB}/", check=False).stdout.strip(), 20, 0.2,
                    "the chain to open after the login") == VPN


def test_tls_intercept_openvpn_refuses_the_isp_certificate(own_stack, tmp_path):
    s = up(own_stack, config(tmp_path, "openvpn", ["lab:openvpn-tcp"]), "tls-intercept")
    client_log = Path(f"/run/netstack/{s}/vpn-sys-proxyvm.log")
    wait_for(lambda: client_log.exists() and "VERIFY ERROR" in client_log.read_text(), 20,
             0.1, "the VPN client to meet the ISP's certificate")
    text = client_log.read_text()
    assert ISP_CA in text and "certificate verify failed" in text
    box = Path(f"/run/netstack/{s}/isp-tls-box.log").read_text()
    assert '"impostor"' in box  # the ISP box took the connection and spoke for the server
    bad, _ = leak_run(s, tmp_path, "intercept")
    assert bad == []
    rc, doc = status(s)
    assert rc == 1 and qube(doc, "sys-proxyvm")["health"]["state"] == "degraded"
    # nothing of the chain trusts the ISP: its CA exists only in the ISP's own directory
    lab = Path(f"/run/netstack/{s}/lab")
    isp_ca = (lab / "isp" / "isp-ca.pem").read_bytes().decode().strip()
    trusted = [p for p in Path(f"/run/netstack/{s}").rglob("*") if p.is_file()
               and lab / "isp" not in p.parents and isp_ca[:200] in p.read_text(errors="ignore")]
    assert trusted == []
    # (no anti-test here: the fault's repair waits for a tunnel that never connects behind
    # this ISP, 60 s; the same judge's anti-tests run in the other scenarios)


def test_flapping_link_never_leaks_and_the_tunnel_comes_back(own_stack, tmp_path):
    s = up(own_stack, config(tmp_path), "flapping")
    work = f"nst-{s}-work"
    flaps = Path(f"/run/netstack/{s}/isp-flap.log")
    marker = f"isp29{secrets.token_hex(4)}"
    how = isp_judge(s)
    with Capture(f"nst-{s}-sys-net", "uplink", str(tmp_path / "flap.pcap")) as cap:
        t0 = time.time()
        # through one whole down/up at least, sending all the while
        wait_for(lambda: (workload(work, marker) or True) and flaps.exists() and any(
            json.loads(x)["ev"] == "up" and json.loads(x)["t"] > t0
            for x in flaps.read_text().splitlines()), 30, 0.0, "a flap of the ISP link")
    assert judge(s, cap, marker, how) == []
    events = [json.loads(x) for x in flaps.read_text().splitlines()]
    assert any(e["ev"] == "down" and e["t"] > t0 for e in events)
    assert wait_for(lambda: in_ns(work, "curl", "-sS", "-m", "2", f"http://{WEB}/",
                                  check=False).stdout.strip(), 30, 0.2,
                    "traffic through the tunnel between flaps") == VPN
    anti_test(s, tmp_path)
    # `down` takes the hostile ISP with it: its namespace, rules and daemons
    cli("--stack", s, "down")
    reap_zombies()
    assert stack_leftovers(s) == []


def test_isp_usage_errors():
    p = cli("up", "--lab", "--isp", "bogus", check=False)
    assert p.returncode == 2 and "no such scenario" in p.stderr
    p = cli("plan", "--isp", "flapping", check=False)
    assert p.returncode == 2 and "--isp is a mode of the lab" in p.stderr


def test_tls_intercept_tor_refuses_the_box_and_falls_back_to_its_bridge(own_stack, tmp_path):
    """Two gateways behind an ISP that blocks UDP and intercepts TLS: the one without a
    bridge never bootstraps (tor meets the box's certificate, not a relay's keys); the one
    with `bridges_fallback_after` tries the relays, is refused the same way, turns its
    obfs4 bridge on (random bytes, which the box passes) and gets a page through Tor. The
    ISP link carries only relay and bridge connections; the stuck gateway's workstation
    leaks nothing, and does when its gateway's protection is broken."""
    from netstack.addressing import LAB_BRIDGE
    from netstack.leaktest import battery
    from netstack.tor.obfs4 import OBFS4_PORT

    s = up(own_stack, str(ROOT / "tests" / "configs" / "tor-two-gateways.toml"),
           "udp-blocked,tls-intercept")
    from tests.integration.util import load_state

    plan = load_state(s).plan

    def page(ws: str) -> str | None:
        p = in_ns(f"nst-{s}-{ws}", "curl", "-sS", "--max-time", "10", f"http://{WEB}/",
                  check=False, timeout=20)
        return p.stdout.strip() if p.returncode == 0 else None

    assert wait_for(lambda: page("anon-whonix"), 120, 0.5, "a page through the bridge") \
        in plan.lab.exits
    box = Path(f"/run/netstack/{s}/isp-tls-box.log")
    relays = {(n.address, n.or_port) for n in plan.lab.tor_nodes.values()
              if n.role != "bridge"}
    wait_for(lambda: any(e["ev"] == "handshake" and (e["dst"], e["dport"]) in relays
                         for e in map(json.loads, box.read_text().splitlines())), 30, 0.2,
             "sys-whonix2's tor to meet the TLS box")
    _, doc = status(s)
    tor2 = qube(doc, "sys-whonix2")
    assert tor2["tor"]["bootstrap"] < 100 and tor2["health"]["state"] == "degraded", tor2
    tor1 = qube(doc, "sys-whonix")["tor"]
    assert tor1["bootstrap"] == 100
    fell_back = tor1["bridges_fallback"]["since"]
    assert fell_back, tor1  # it went straight first, then fell back
    log = Path(f"/run/netstack/{s}/tor-sys-whonix.log").read_text().splitlines()

    def first(text: str) -> int:
        return next(i for i, x in enumerate(log) if text in x)
    # its own story: bootstrapping straight to the relays (met by the box), stuck below
    # 100 %, then its bridges, then 100 %
    assert first("Bootstrapped ") < first('guard context "bridges"') \
        < first("Bootstrapped 100%")
    bridge = (LAB_BRIDGE[1], OBFS4_PORT)

    def how(ws: str):
        k = kernel()
        try:
            ctx = battery.context(s, ws, k)
            zone = next(lk.zone for lk in battery.links(ctx) if lk.name == "isp-link")
        finally:
            k.close()
        # leaktest's relay set knows the bridge's ORPort, not its obfs4 port: add it
        ctx.relays = ctx.relays | {bridge}
        return ctx, zone

    for ws in ("anon2", "anon-whonix"):
        marker = f"isp29{secrets.token_hex(4)}"
        h = how(ws)
        with Capture(f"nst-{s}-sys-net", "uplink", str(tmp_path / f"{ws}.pcap")) as cap:
            workload(f"nst-{s}-{ws}", marker)
        assert judge(s, cap, marker, h) == [], ws
    assert page("anon2") is None
    # anti-test: anon2's gateway reduced to a bare redirect; the judge sees the leak
    h = how("anon2")
    with broken(s, "anon2", "gateway-redirect-only"):
        marker = f"isp29{secrets.token_hex(4)}"
        with Capture(f"nst-{s}-sys-net", "uplink", str(tmp_path / "anti.pcap")) as cap:
            workload(f"nst-{s}-anon2", marker)
    bad = judge(s, cap, marker, h)
    assert any("marker in clear" in b for b in bad) and any("not allowed" in b for b in bad)
