"""Server failover's pure parts (issue 16): the plan of a qube with several provider
files, the switch's order (kill switch first), and the audit that catches a kill switch
admitting more than the current server."""

from __future__ import annotations

import json
import types

import pytest

from netstack import plan, stack
from netstack.errors import ConfigError
from netstack.kinds.vpn import ENDPOINT_SET, endpoint_set
from netstack.vpn import failover
from netstack.vpn.info import current_index
from tests.unit.test_rules import ROOT

LAB = plan.UplinkSpec("lab")
TWO = 'config = ["lab:wireguard", "lab:wireguard2"]\nfailover_after = 5'


def cfg(tmp_path, repl: str):
    p = tmp_path / "f.toml"
    p.write_text((ROOT / "configs/vpn.toml").read_text().replace('config = "lab:wireguard"',
                                                                 repl))
    return str(p)


def test_two_servers_in_the_plan(tmp_path):
    p = stack.plan_only(cfg(tmp_path, TWO), "main", LAB)
    info = p.qube("sys-proxyvm").info
    assert [s.endpoints[0].port for s in info.servers] == [51820, 51821]
    assert info.failover_after == 5 and info.server(1).tunnel_addresses == ["10.68.0.2/32"]
    d = next(d for d in p.daemons if d.name == "vpn-sys-proxyvm")
    assert d.monitor == ("netstack.vpn.failover:watch",
                         "/run/netstack/main/vpn-sys-proxyvm.failover.json")
    assert "lab-wireguard2" in {d.name for d in p.daemons}  # the lab's second server
    # the kill switch starts with the first server's transport only (literal: none here)
    assert current_index(info) == 0
    one = stack.plan_only(cfg(tmp_path, 'config = "lab:wireguard"'), "main", LAB)
    assert not one.qube("sys-proxyvm").info.servers
    assert "lab-wireguard2" not in {d.name for d in one.daemons}
    assert not [d for d in one.daemons if d.monitor and "failover" in d.monitor[0]]


@pytest.mark.parametrize("repl,field,why", [
    ('config = []', "config", "non-empty list"),
    ('config = ["lab:wireguard", "lab:wireguard"]', "config", "names a file twice"),
    ('config = ["lab:wireguard", 3]', "config", "non-empty list"),
    ('config = ["lab:wireguard", "lab:wireguard2"]\nfailover_after = 1', "failover_after",
     "2-3600"),
    ('config = ["lab:wireguard", "lab:wireguard2"]\nfailover_after = "x"', "failover_after",
     "not seconds"),
])
def test_bad_failover_config(tmp_path, repl, field, why):
    with pytest.raises(ConfigError, match=f"field '{field}'.*{why}"):
        stack.plan_only(cfg(tmp_path, repl), "main", LAB)


def test_servers_must_agree_on_dns(tmp_path):
    from tests.unit.test_vpn_parsers import WG_MULLVAD_LIKE

    (tmp_path / "a.conf").write_text(WG_MULLVAD_LIKE)
    (tmp_path / "b.conf").write_text(WG_MULLVAD_LIKE.replace("DNS = ", "DNS = 192.0.2.9, "))
    with pytest.raises(ConfigError, match="field 'dns'.*different DNS"):
        stack.plan_only(cfg(tmp_path, 'config = ["a.conf", "b.conf"]'), "main", LAB)
    ok = cfg(tmp_path, 'config = ["a.conf", "b.conf"]\ndns = ["192.0.2.9"]')
    assert stack.plan_only(ok, "main", LAB).qube("sys-proxyvm").info.dns == ["192.0.2.9"]


def test_switch_swaps_the_kill_switch_first(tmp_path):
    order = []
    files = []
    for i in range(2):
        conf, spec = tmp_path / f"c{i}", tmp_path / f"s{i}"
        conf.write_text(f"conf {i}")
        spec.write_text(f"spec {i}")
        files.append(failover.ServerFiles([["203.0.113.10", "udp", 51820 + i]], str(conf),
                                          str(spec), f"p{i}"))
    sp = failover.FailoverSpec("q", "ns", "198.51.100.53", 3, str(tmp_path / "conf"),
                               str(tmp_path / "spec"), str(tmp_path / "server"), files)

    def nft(cmds):
        order.append(("nft", (tmp_path / "conf").exists()))
        elems = [c["add"]["element"]["elem"] for c in cmds["nftables"] if "add" in c]
        order.append(("set", elems))

    st = failover.switch(sp, failover.ServerState(0, 1.0), "silent", nft)
    assert order == [("nft", False), ("set", [[{"concat": ["203.0.113.10", "udp", 51821]}]])]
    assert (tmp_path / "conf").read_text() == "conf 1" and (tmp_path / "spec").read_text() \
        == "spec 1"
    saved = json.loads((tmp_path / "server").read_text())
    assert saved["current"] == 1 and saved["history"][0]["why"] == "silent"
    assert saved["history"][0]["swap_start"] <= saved["history"][0]["swap_end"]
    st = failover.switch(sp, st, "again", nft)  # round robin back to the first
    assert st.current == 0 and (tmp_path / "conf").read_text() == "conf 0"
    assert len(st.history) == 2


def _view(elems):
    rs = {"nftables": [{"set": {"name": ENDPOINT_SET, "elem": [{"concat": e}
                                                               for e in elems]}}]}
    return types.SimpleNamespace(name="sys-proxyvm", ruleset=rs)


def test_audit_catches_a_kill_switch_admitting_the_old_server_too():
    now = {("203.0.113.10", "udp", 51821)}
    assert endpoint_set(_view([["203.0.113.10", "udp", 51821]]), now).status == "PASS"
    r = endpoint_set(_view([["203.0.113.10", "udp", 51820], ["203.0.113.10", "udp", 51821]]),
                     now)
    assert r.status == "FAIL" and "51820: not the current server's transport" in r.trace[0]


def test_a_silent_server_is_left(monkeypatch, tmp_path):
    """watch(): no answer for `after` seconds -> switch and restart; answers -> stay."""
    import threading

    files = [failover.ServerFiles([["203.0.113.10", "udp", 51820 + i]], str(tmp_path / "x"),
                                  str(tmp_path / "x"), f"p{i}") for i in range(2)]
    (tmp_path / "x").write_text("x")
    sp = failover.FailoverSpec("q", "ns", "198.51.100.53", 0.05, str(tmp_path / "conf"),
                               str(tmp_path / "spec"), str(tmp_path / "server"), files)
    path = tmp_path / "fo.json"
    from netstack.codec import dump

    path.write_text(json.dumps(dump(sp)))
    stop = threading.Event()
    restarts = []

    class K:
        def nft(self, ns, cmds):
            pass

        def close(self):
            pass

    monkeypatch.setattr(failover, "PROBE_EVERY", 0.01)
    monkeypatch.setattr(failover, "answers", lambda *a: False)

    def restart():
        restarts.append(1)
        if len(restarts) == 2:
            stop.set()
    failover.watch(str(path), report=lambda h: None, stopping=stop, restart=restart,
                   kernel=K())
    assert len(restarts) == 2 and failover.read_state(str(tmp_path / "server")).current == 0
    stop.clear()
    monkeypatch.setattr(failover, "answers", lambda *a: True)
    seen = []
    t = threading.Timer(0.3, stop.set)
    t.start()
    failover.watch(str(path), report=seen.append, stopping=stop, restart=restart,
                   kernel=K())
    assert len(restarts) == 2 and seen and all(h["answering"] for h in seen)
