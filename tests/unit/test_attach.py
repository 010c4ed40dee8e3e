"""`netstack attach` on the recording fake kernel (no root): the order of a move (old link
gone first, every ruleset in place before the new link, the link's addresses and routes
made again), the move kept for later live changes until `down`, refusals in one line
that change nothing."""

from __future__ import annotations

import pytest

from netstack import disposable, firewall_live, sandbox
from netstack.attach import attach
from netstack.errors import ConfigError, UsageError
from tests.unit.test_disposable import plan_of, up


@pytest.fixture(autouse=True)
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(sandbox, "HOME_ROOT", str(tmp_path / "lib"))


def test_a_move_cuts_the_old_link_first_and_loads_rules_before_the_new_link():
    fk, _ = up("configs/tor-over-vpn.toml")
    p = plan_of()
    ws, fw, tor = p.qube("anon-whonix"), p.qube("sys-firewall"), p.qube("sys-whonix")
    n = len(fk.events)
    r = attach("main", "anon-whonix", "sys-firewall", kernel=fk)
    assert r["changed"] and r["from"] == "sys-whonix"
    ev = [e for e in fk.events[n:] if e[0] in ("link_del", "nft", "veth", "link_up",
                                               "addr_add", "route_add")]
    kinds = [e[0] for e in ev]
    first_del = kinds.index("link_del")
    loads = [i for i, e in enumerate(ev) if e[0] == "nft"]
    veth = kinds.index("veth")
    assert first_del < min(loads) and max(loads) < veth < kinds.index("link_up")
    assert {ev[i][1] for i in loads} >= {fw.netns, tor.netns}
    assert "antispoof anon-whonix" in str(plan_of().ns(fw.netns).ruleset)
    assert "antispoof anon-whonix" not in str(plan_of().ns(tor.netns).ruleset)
    # the moved link has its address and default route again, via the new gateway
    assert ("addr_add", ws.netns, "eth0", f"{ws.ipv4}/32") in [e[:4] for e in ev]
    assert any(e[0] == "route_add" and e[1] == ws.netns and fw.ipv4 in str(e) for e in ev)
    assert plan_of().qube("anon-whonix").netvm == "sys-firewall"


def test_the_move_holds_for_later_live_changes_and_none_cuts_the_qube_off():
    fk, st = up("configs/tor-over-vpn.toml")
    attach("main", "anon-whonix", "sys-proxyvm", kernel=fk)
    d = disposable.add("main", "sys-firewall", "red", kernel=fk)  # another live change
    assert plan_of().qube("anon-whonix").netvm == "sys-proxyvm"
    disposable.remove("main", [d.name], kernel=fk)
    r = attach("main", "anon-whonix", "none", kernel=fk)
    p = plan_of()
    assert r["netvm"] is None and p.qube("anon-whonix").netvm is None
    assert not [v for v in p.veths if "anon-whonix" in v.ns_b]
    assert p.net.name == "sys-net"
    assert attach("main", "anon-whonix", "sys-whonix", kernel=fk)["changed"]
    assert plan_of().qube("anon-whonix").netvm == "sys-whonix"


@pytest.mark.parametrize("qube,netvm,err,text", [
    ("anon-whonix", "anon-whonix", ConfigError, "not a qube that provides network"),
    ("anon-whonix", "nosuch", ConfigError, "not a qube that provides network"),
    ("sys-whonix", "sys-firewall", UsageError, "attach moves app qubes only"),
    ("nosuch", "sys-firewall", UsageError, "no qube 'nosuch'"),
])
def test_bad_moves_are_one_line_and_change_nothing(qube, netvm, err, text):
    fk, _ = up("configs/tor-over-vpn.toml")
    n, before = len(fk.events), plan_of()
    with pytest.raises(err, match=text):
        attach("main", qube, netvm, kernel=fk)
    assert fk.events[n:] == [] and plan_of() == before


def test_a_list_the_new_netvm_cannot_enforce_refuses_the_move():
    fk, _ = up("configs/tor-over-vpn.toml")
    attach("main", "anon-whonix", "sys-firewall", kernel=fk)
    firewall_live.change("main", "anon-whonix", "add", ["action=accept", "proto=udp"],
                         kernel=fk)
    n, before = len(fk.events), plan_of()
    with pytest.raises(ConfigError, match="cannot be enforced by 'sys-whonix'"):
        attach("main", "anon-whonix", "sys-whonix", kernel=fk)
    assert not [e for e in fk.events[n:] if e[0] in ("nft", "veth", "link_del")]
    assert plan_of() == before


def test_a_disposables_move_dies_with_it_and_never_reaches_the_next_one():
    """Regression (a hostile review): `attach disp1 sys-firewall` was kept by name after
    disp1 was gone, so the next disposable named disp1 went behind sys-firewall, around Tor
    and the VPN, even with `--netvm sys-whonix`."""
    from netstack import state

    fk, _ = up("configs/tor-over-vpn.toml")
    d = disposable.add("main", "sys-whonix", "red", kernel=fk)
    attach("main", d.name, "sys-firewall", kernel=fk)
    assert state.State.load("main").data.netvms == {d.name: "sys-firewall"}
    disposable.remove("main", [d.name], kernel=fk)
    assert state.State.load("main").data.netvms == {}  # the move went with the qube
    again = disposable.add("main", "sys-whonix", "red", kernel=fk)
    assert again.name == d.name and plan_of().qube(again.name).netvm == "sys-whonix"
    default = disposable.add("main", None, None, kernel=fk)  # the most private path
    assert plan_of().qube(default.name).netvm == "sys-whonix"


def test_a_stale_move_never_applies_to_a_new_disposable():
    """Even a move left in the state by an older netstack (or a crash) under a name a new
    disposable takes is not applied to it: a move is the moved qube's only."""
    from netstack import state

    fk, st = up("configs/tor-over-vpn.toml")
    st = state.State.load("main")
    st.data.netvms = {"disp1": "sys-firewall"}
    st.save()
    d = disposable.add("main", "sys-whonix", "red", kernel=fk)
    assert d.name == "disp1" and plan_of().qube("disp1").netvm == "sys-whonix"
    assert state.State.load("main").data.netvms == {}

