"""leaktest after a VPN failover (issue 23 item 6): the verdict on the uplinks uses the
transport the kill switch admitted at each packet's time (the live endpoint set, then the
failover history), not what `up` resolved. After a failover `vpn-killed` is PASS (its
killed tunnel usually triggers another failover mid-run, whose handshakes are legitimate);
a datagram to the old server, which the set no longer holds, is a leak (root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netstack.leaktest import battery
from netstack.leaktest.battery import Ctx, Fault
from tests.integration.test_failover import VPN, backend_of, config, fetch
from tests.integration.util import cli, in_ns, load_state, send, wait_for
from tests.realkernel import KERNEL

pytestmark = pytest.mark.root

FIRST, SECOND = 51820, 51821


def _current(server_file: str) -> int | None:
    try:
        return json.loads(Path(server_file).read_text())["current"]
    except (OSError, ValueError, KeyError):
        return None


def _on_second(s: str, server_file: str) -> None:
    """Until the second server is current and carries traffic."""
    wait_for(lambda: _current(server_file) == 1 and fetch(f"nst-{s}-work") == VPN, 30, 0.1,
             "traffic through the second server")


def _stale_datagram(ctx: Ctx):
    """The VPN qube's root sends to the first server's transport past its own output
    rules (AF_PACKET): the kill switch no longer admits that server, so the uplinks must
    not carry it."""
    vpn = next(q for q in ctx.chain if q.kind == "vpn")
    assert send(vpn.netns, [{"dst": VPN, "proto": "udp", "sport": 40123, "dport": FIRST,
                             "payload": "stale-server"}]) == 1
    return lambda: None


@pytest.mark.parametrize("param", ["wireguard", "wireguard-kernel"])
def test_leaktest_after_failover(own_stack, tmp_path, param):
    s = own_stack("lf")
    cfg = tmp_path / "failover.toml"
    cfg.write_text(config(*backend_of(param)))
    cli("--stack", s, "up", str(cfg), "--lab")
    info = load_state(s).plan.qube("sys-proxyvm").info
    assert fetch(f"nst-{s}-work") == VPN
    in_ns(f"nsl-{s}-vpn", "nft", "add table inet blk; add chain inet blk in { type filter "
          "hook prerouting priority -300; }; add rule inet blk in udp dport "
          f"{FIRST} drop")
    _on_second(s, info.server_file)
    before = len(json.loads(Path(info.server_file).read_text())["history"])

    r = battery.run(s, "work", scenario="vpn-killed", pcaps_dir=str(tmp_path), kernel=KERNEL)
    bad = {lk["link"]: lk["violations"][:3] for lk in r.links if lk["violations"]}
    assert r.leaks == 0 and not r.errors, (bad, r.errors)
    isp = next(lk for lk in r.links if lk["link"] == "isp-link")
    assert isp["packets"] > 0  # the restarted tunnel's handshakes were judged, not absent
    hist = json.loads(Path(info.server_file).read_text())["history"]
    print(f"failovers during the run: {len(hist) - before}")

    # anti-test: transport to a server the live set does not hold is a leak
    _on_second(s, info.server_file)
    live = in_ns(info.netns, "nft", "list", "set", "inet", "netstack", "vpn_endpoints").stdout
    assert f"{VPN} . udp . {SECOND}" in live and f". {FIRST} " not in live
    r = battery.run(s, "work", fault=Fault("stale-server", _stale_datagram),
                    pcaps_dir=str(tmp_path), kernel=KERNEL)
    stale = {lk["link"]: [v for v in lk["violations"] if f"{VPN}:{FIRST}" in v]
             for lk in r.links}
    assert r.leaks >= 1
    assert stale["sys-proxyvm:eth0"] and stale["isp-link"], stale
    assert all(f":{SECOND}" not in v for lk in r.links for v in lk["violations"]), r.links

    # fail closed: which server the kill switch admits cannot be read
    Path(info.server_file).write_text("{damaged")
    p = cli("--stack", s, "leaktest", check=False)
    assert p.returncode == 1, p.stdout[-500:]
    assert "cannot read which server VPN qube sys-proxyvm uses" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = cli("--stack", s, "status", check=False)
    assert p.returncode == 1 and "is damaged" in p.stdout, p.stdout
