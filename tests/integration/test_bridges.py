"""Tor through an obfs4 bridge, the Tails-like chain of configs/tor.toml (root, own stack):
the lab's private Tor network gets an obfs4 bridge (Debian's obfs4proxy, its identity made
by `up`), the gateway bootstraps through it, a page comes back through Tor, and the ISP
link carries only obfs4 traffic to the bridge's address: no relay or authority address ever
appears there. Bad bridge lines are refused with one line."""

from __future__ import annotations

import time

import pytest

from netstack.leaktest.capture import Capture
from tests.integration.util import ROOT, cli, in_ns, load_state, wait_for

pytestmark = pytest.mark.root

CFG = str(ROOT / "configs" / "tor.toml")


def test_the_gateway_reaches_tor_only_through_the_obfs4_bridge(own_stack, tmp_path):
    from netstack.addressing import LAB_BRIDGE
    from netstack.tor.obfs4 import OBFS4_PORT

    s = own_stack("br")
    t0 = time.monotonic()
    cli("--stack", s, "up", CFG, "--lab", "--no-wait")
    plan = load_state(s).plan
    isp = plan.lab.isp_link
    cap = Capture(isp.netns, isp.interface, str(tmp_path / "isp.pcap")).start()
    try:
        ws = plan.qube("anon-whonix").netns

        def page() -> str | None:
            p = in_ns(ws, "curl", "-sS", "--max-time", "10", "http://198.51.100.80/",
                      check=False, timeout=20)
            return p.stdout.strip() if p.returncode == 0 else None
        got = wait_for(page, 90, 0.5, "a page through the bridge")
        first_byte_s = time.monotonic() - t0
        assert got in plan.lab.exits
    finally:
        cap.stop()
    from scapy.layers.inet import IP, TCP

    relays = {n.address for n in plan.lab.tor_nodes.values() if n.role != "bridge"}
    bridge = LAB_BRIDGE[1]
    seen = [p for p in cap.packets() if IP in p]
    assert seen
    bad = [p.summary() for p in seen if not (TCP in p and (
        (p[IP].dst == bridge and p[TCP].dport == OBFS4_PORT) or
        (p[IP].src == bridge and p[TCP].sport == OBFS4_PORT)))]
    assert not bad, bad[:5]
    assert not relays & {a for p in seen for a in (p[IP].src, p[IP].dst)}
    print(f"first byte through the bridge {first_byte_s:.1f} s after `up`")
    assert first_byte_s < 90


@pytest.mark.parametrize("line,err", [
    ("meek_lite 192.0.2.7:443 url=https://x", "transport 'meek_lite' is not shipped"),
    ("obfs4 192.0.2.7 cert=x", "needs cert=|not an address:port"),
    ("obfs4 not-an-address:443 cert=" + "A" * 70, "not an address:port"),
    ("obfs4 192.0.2.7:443 iat-mode=0", "needs cert="),
])
def test_bad_bridge_lines_are_one_line_errors(tmp_path, line, err):
    cfg = tmp_path / "t.toml"
    cfg.write_text((ROOT / "configs" / "tor.toml").read_text().replace(
        '"lab:obfs4"', f'"{line}"'))
    p = cli("plan", str(cfg), "--lab", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "field 'bridges' line 1" in p.stderr
    import re

    assert re.search(err, p.stderr), p.stderr
