"""`netstack firewall` on the recording fake kernel: add/del/reset change only the netvm's
ruleset, in one transaction, keep the change in the overlay that the next `up` (and the
disposables' rebuild) reads, refuse bad rules with one line before anything changes (no
root)."""

from __future__ import annotations

import pytest

from netstack import disposable, firewall_live, sandbox, state
from netstack.errors import ConfigError, UsageError
from netstack.plan import build, load_inputs
from netstack.rules import qubefw
from netstack.state import State
from tests.unit.test_disposable import plan_of, up
from tests.unit.test_reconcile import LAB


@pytest.fixture(autouse=True)
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(sandbox, "HOME_ROOT", str(tmp_path / "lib"))


def fw_loads(fk, start):
    fw = plan_of().qube("sys-firewall").netns
    return [e for e in fk.events[start:] if e[0] == "nft"], fw


def test_add_del_reset_touch_only_the_netvm_in_one_transaction():
    fk, _ = up("configs/basic.toml")
    n = len(fk.events)
    count, took = firewall_live.change("main", "work", "add",
                                       ["action=accept", "dsthost=198.51.100.80",
                                        "proto=tcp", "dstports=80"], kernel=fk)
    loads, fw = fw_loads(fk, n)
    assert count == 1 and took < 1 and [e[1] for e in loads] == [fw]
    assert "fw-work" in str(loads[0][2]) and not [e for e in fk.events[n:] if e[0] in (
        "veth", "netns_create", "link_del")]
    assert qubefw.load_overlay("main") == {"work": [{"action": "accept",
                                                     "dsthost": "198.51.100.80",
                                                     "proto": "tcp", "dstports": 80}]}
    firewall_live.change("main", "work", "add", ["action=drop", "dsthost=198.51.100.0/24"],
                         number=1, kernel=fk)
    rules = firewall_live.rules_of(plan_of(), "work")
    assert [r.action for r in rules] == ["drop", "accept"]
    assert firewall_live.change("main", "work", "del", number=1, kernel=fk)[0] == 1
    listing = firewall_live.listing("main", "work")
    assert listing["source"] == "netstack firewall" and listing["rules"][0]["number"] == 1
    assert listing["rules"][0]["rule"] == \
        "action=accept dsthost=198.51.100.80 proto=tcp dstports=80"
    firewall_live.change("main", "work", "reset", kernel=fk)
    assert firewall_live.rules_of(plan_of(), "work") is None
    assert qubefw.load_overlay("main") == {}
    assert "fw-work" not in str(plan_of().ns(fw).ruleset)


def test_the_overlay_is_what_the_next_up_and_a_disposable_see():
    fk, st = up("configs/basic.toml")
    firewall_live.change("main", "work", "add", ["action=accept", "specialtarget=dns"],
                         kernel=fk)
    again = build(load_inputs(st.data.config, "main", LAB), "main", LAB)
    assert "fw-work" in str(again.ns(plan_of().qube("sys-firewall").netns).ruleset)
    q = disposable.add("main", None, "red", kernel=fk)  # the rebuild agrees with the plan
    assert "fw-work" in str(plan_of().ns(plan_of().qube("sys-firewall").netns).ruleset)
    disposable.remove("main", [q.name], kernel=fk)


@pytest.mark.parametrize(("action", "words", "number", "err", "text"), [
    ("add", ["action=allow"], None, ConfigError, "'allow' is not an action"),
    ("add", ["dsthost"], None, ConfigError, "is not key=value"),
    ("del", [], 3, UsageError, "the list is empty"),
    ("add", ["action=accept"], 5, UsageError, "give one of 1-1"),
])
def test_bad_changes_are_one_line_and_change_nothing(action, words, number, err, text):
    fk, _ = up("configs/basic.toml")
    before, n = plan_of(), len(fk.events)
    if action == "del":
        firewall_live.change("main", "work", "add", ["action=accept"], kernel=fk)
        firewall_live.change("main", "work", "del", number=1, kernel=fk)
        before, n = plan_of(), len(fk.events)
    with pytest.raises(err) as e:
        firewall_live.change("main", "work", action, words, number, kernel=fk)
    assert text in str(e.value) and "\n" not in str(e.value)
    assert fk.events[n:] == [] and plan_of() == before


def test_a_qube_behind_a_vpn_is_refused():
    fk, _ = up("configs/tor-over-vpn.toml")
    with pytest.raises(ConfigError, match="does not enforce per-qube rules yet"):
        firewall_live.change("main", "anon-whonix", "add", ["action=accept"], kernel=fk)
    assert qubefw.load_overlay("main") == {}
    assert State.load("main") is not None
