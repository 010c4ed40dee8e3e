"""Invariants the user declares (issue 28 item 4), no root: the config's `tags` and
`[[invariant]]` tables parsed with one-line errors naming the field and the fix; the pure
judgement of a plan (each qube's way out); `up` refusing a config that breaks one; and every
live change (`attach`, `run`, `firewall`: netstack/live.py's commit) refusing a plan that
would, on the recording fake, with nothing changed (no kernel event, the plan in force
kept)."""

from __future__ import annotations

import pytest

from netstack import disposable, firewall_live, invariants, sandbox
from netstack.attach import attach
from netstack.config import parse
from netstack.errors import ConfigError, InvariantError
from netstack.kinds.registry import SPECS
from netstack.model import Invariant
from netstack.plan import build, load_inputs
from tests.unit.test_disposable import plan_of, up
from tests.unit.test_reconcile import LAB, ROOT

CFG = "configs/invariants.toml"


@pytest.fixture(autouse=True)
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(sandbox, "HOME_ROOT", str(tmp_path / "lib"))


def text() -> str:
    return (ROOT / CFG).read_text()


def plan_for(t: str):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(t)
        f.flush()
        return build(load_inputs(f.name, "main", LAB, SPECS), "main", LAB)


def test_the_example_config_holds_and_each_qube_has_its_way_out():
    p = plan_for(text())
    assert p.qube("anon-whonix").tags == ("anon",)
    assert [i.title for i in p.invariants] == ["invariant 1 (anon only through Tor)",
                                               "invariant 2 (work never in clear)"]
    v = invariants.evaluate(p)
    assert [(x.qube, x.ok) for x in v] == [("anon-whonix", True), ("work", True)]
    assert "tor (anon-whonix -> sys-whonix -> sys-proxyvm" in v[0].reason
    ways = {q.name: invariants.way_out(p, q.name) for q in p.qubes}
    assert ways == {"sys-net": "clearnet", "sys-firewall": "clearnet", "sys-proxyvm": "vpn",
                    "sys-whonix": "tor", "anon-whonix": "tor", "work": "vpn"}


@pytest.mark.parametrize("edit,where,fix", [
    ('tags = ["anon"]', "qube 'anon-whonix' field 'tags'", None),
    ('tags = "anon"', "qube 'anon-whonix' field 'tags'", 'tags = ["anon"]'),
    ('tags = ["Anon!"]', "qube 'anon-whonix' field 'tags'", "a-z"),
])
def test_tags_are_checked(edit, where, fix):
    t = text().replace('tags = ["anon"]', edit)
    if fix is None:
        parse(t, SPECS)
        return
    with pytest.raises(ConfigError) as e:
        parse(t, SPECS)
    assert e.value.where == where and fix in e.value.fix and "\n" not in str(e.value)


@pytest.mark.parametrize("edit,where,fix", [
    ('qubes = "@tag:anon"\nreach = ["tor"]', None, None),
    ('qubes = "anon-whonx"\nreach = ["tor"]', "invariant 1 field 'qubes'", "anon-whonix"),
    ('qubes = "@colour:red"\nreach = ["tor"]', "invariant 1 field 'qubes'", "@tag:NAME"),
    ('qubes = "@label:pink"\nreach = ["tor"]', "invariant 1 field 'qubes'", "red"),
    ('qubes = "@tag:anon"\nreach = ["i2p"]', "invariant 1 field 'reach'", "tor, vpn, clearnet"),
    ('qubes = "@tag:anon"\nreach = []', "invariant 1 field 'reach'", 'reach = ["tor"]'),
    ('qubes = "@tag:anon"\nreach = ["tor"]\nnever = ["tor"]', "invariant 1 field 'never'",
     "one of them"),
    ('qubes = "@tag:anon"', "invariant 1", "add reach, never or netvm_in"),
    ('reach = ["tor"]', "invariant 1 field 'qubes'", "@tag:anon"),
    ('qubes = "@tag:anon"\nreach = ["tor"]\nvia = "x"', "invariant 1", "allowed keys"),
    ('qubes = "@tag:anon"\nnetvm_in = ["sys-whonx"]', "invariant 1 field 'netvm_in'",
     "sys-whonix"),
])
def test_invariant_tables_are_checked(edit, where, fix):
    t = text().split("[[invariant]]")[0] + "[[invariant]]\n" + edit + "\n"
    if where is None:
        assert parse(t, SPECS).invariants[0].reach == ("tor",)
        return
    with pytest.raises(ConfigError) as e:
        parse(t, SPECS)
    assert e.value.where == where, str(e.value)
    assert fix in e.value.fix, str(e.value)


@pytest.mark.parametrize("netvm,ok,words", [
    ("sys-whonix", True, "way out: tor"),
    ("sys-proxyvm", False, "reaches the outside by vpn"),
    ("sys-firewall", False, "clearnet (anon-whonix -> sys-firewall -> sys-net)"),
])
def test_reach_judges_the_way_out(netvm, ok, words):
    t = text().replace('netvm = "sys-whonix"\nlabel = "red"', f'netvm = "{netvm}"\nlabel = "red"')
    t = t.replace('netvm_in = ["@kind:tor"]\n', "")
    v = invariants.evaluate(plan_for(t))[0]
    assert v.ok is ok and words in v.reason, v.reason


def test_never_netvm_in_and_selectors():
    p = plan_for(text())
    inv = Invariant(9, "@anyvm", never=("clearnet",))
    bad = [v.qube for v in invariants.evaluate(p, [inv]) if not v.ok]
    assert bad == ["sys-net", "sys-firewall"]
    inv = Invariant(9, "@label:red", netvm_in=("sys-whonix",))
    assert [(v.qube, v.ok) for v in invariants.evaluate(p, [inv])] == [
        ("sys-net", True), ("anon-whonix", True)]  # the net qube has no netvm to judge
    inv = Invariant(9, "work", netvm_in=("@tag:none",))
    v = invariants.evaluate(p, [inv])[0]
    assert not v.ok and "has netvm sys-proxyvm, netvm_in allows only @tag:none" in v.reason


def test_up_refuses_a_config_that_breaks_one(tmp_path):
    from netstack.stack import up as stack_up
    from tests.fakekernel import FakeKernel

    cfg = tmp_path / "c.toml"
    cfg.write_text(text().replace('label = "blue"', 'label = "blue"\nnetvm = "sys-firewall"')
                   .replace('netvm = "sys-proxyvm"\nlabel = "blue"', 'label = "blue"'))
    fk = FakeKernel()
    with pytest.raises(InvariantError) as e:
        stack_up(str(cfg), "main", LAB, fk)
    msg = str(e.value)
    assert msg.startswith(f"up of {cfg} refused: invariant 2 (work never in clear)")
    assert "work reaches the outside by clearnet" in msg and "fix:" in msg
    assert "\n" not in msg and not fk.events


def test_attach_run_and_firewall_refuse_what_breaks_one_and_change_nothing():
    fk, st = up(CFG)
    before, n = plan_of(), len(fk.events)
    with pytest.raises(InvariantError) as e:
        attach("main", "anon-whonix", "sys-firewall", kernel=fk)
    msg = str(e.value)
    assert msg.startswith("attach anon-whonix sys-firewall refused: invariant 1 (anon only "
                          "through Tor)") and "netvm_in allows only @kind:tor" in msg
    with pytest.raises(InvariantError, match="invariant 2 .* work reaches the outside by "
                       "clearnet"):
        attach("main", "work", "sys-firewall", kernel=fk)
    # a disposable made like anon-whonix carries its tags, so its invariants
    with pytest.raises(InvariantError, match=r"run \(disp1\) refused: invariant 1"):
        disposable.add("main", "sys-firewall", None, kernel=fk, like="anon-whonix")
    assert len(fk.events) == n and plan_of() == before
    # what keeps them is allowed: cut off, or another Tor gateway's path
    d = disposable.add("main", None, None, kernel=fk, like="anon-whonix")
    assert d.tags == ("anon",) and d.netvm == "sys-whonix"
    assert attach("main", "anon-whonix", "none", kernel=fk)["changed"]
    firewall_live.change("main", "work", "add", ["action=accept", "dsthost=192.0.2.7"],
                        kernel=fk)


def test_the_call_layer_hook_names_the_policy_line():
    p = plan_for(text())
    edges = [invariants.CallEdge("anon-whonix", "work", "qubes.Filecopy", "policy.d/30.policy:4"),
             invariants.CallEdge("work", "anon-whonix", "qubes.Filecopy", "policy.d/30.policy:5")]
    v = invariants.judge_calls(p, edges)
    assert [(x.qube, x.ok) for x in v] == [("anon-whonix", False), ("work", True)]
    assert "policy.d/30.policy:4" in v[0].line() and "way out is vpn" in v[0].reason
