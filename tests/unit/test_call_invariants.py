"""The call layer is a way out too (issue 28 item 4): the audit judges every call path the
policy allows (policy.call_edges) against the user's invariants, and FAILs naming the
policy line that lets a qube under `reach = ["tor"]` hand data to a qube with another way
out. First match wins: an earlier deny takes a later allow's calls."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from netstack import policy
from netstack.audit import calls_results
from netstack.calls import facts
from netstack.kinds.registry import SPECS
from netstack.model import UplinkSpec
from netstack.plan import build, load_inputs

ROOT = Path(__file__).resolve().parents[2]
LAB = UplinkSpec("lab")


@pytest.fixture
def plan_with(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))

    def make(lines: str):
        cfg = tmp_path / "invariants.toml"
        shutil.copy(ROOT / "configs" / "invariants.toml", cfg)
        d = tmp_path / "invariants.policy.d"
        d.mkdir(exist_ok=True)
        (d / "50-test.policy").write_text(lines)
        p = build(load_inputs(str(cfg), "u1", LAB, SPECS, overlay={}), "u1", LAB)
        return p, policy.call_edges(policy.load(p.policy), facts(p))
    return make


def test_the_shipped_policy_keeps_anon_data_among_anon_qubes(plan_with):
    text = (ROOT / "configs" / "invariants.policy.d" / "50-anon.policy").read_text()
    p, edges = plan_with(text)
    assert ("work", "anon-whonix", "qubes.Filecopy") in {e[:3] for e in edges}
    assert not [e for e in edges if e[0] == "anon-whonix"]
    res = calls_results(p, edges)
    assert {(r.qube, r.status) for r in res} == {("anon-whonix", "PASS"), ("work", "PASS")}


def test_a_line_that_lets_anon_data_out_fails_naming_it(plan_with):
    p, edges = plan_with("qubes.Filecopy * @anyvm @anyvm ask\n")
    assert any(e[:3] == ("anon-whonix", "work", "qubes.Filecopy")
               and e[3].endswith("50-test.policy:1") for e in edges), edges
    bad = [r for r in calls_results(p, edges) if r.status == "FAIL"]
    assert [r.qube for r in bad] == ["anon-whonix"]
    assert "qubes.Filecopy in work" in bad[0].reason and "50-test.policy:1" in bad[0].reason


@pytest.mark.parametrize("lines,out", [
    # an earlier deny of every service takes the later allow
    ("* * @tag:anon @anyvm deny\nqubes.Filecopy * @anyvm @anyvm allow\n", False),
    # a deny of another service does not
    ("my.Other * @tag:anon @anyvm deny\nqubes.Filecopy * @anyvm @anyvm allow\n", True),
    # target= redirects the data to the named qube
    ("my.Svc * anon-whonix @anyvm allow target=work\n", True),
    # a new disposable like work is work's way out
    ("my.Svc * anon-whonix @dispvm:work allow\n", True),
    ("qubes.Filecopy * @anyvm @anyvm deny\n", False),
])
def test_first_match_and_redirects(plan_with, lines, out):
    _p, edges = plan_with(lines)
    assert any(e[0] == "anon-whonix" and e[1] == "work" for e in edges) == out, edges


def test_up_and_plan_refuse_a_policy_that_lets_anon_data_out(plan_with):
    from netstack.calls import enforce_policy
    from netstack.errors import InvariantError

    p, _ = plan_with("qubes.Filecopy * anon-whonix work allow\n")
    with pytest.raises(InvariantError) as e:
        enforce_policy(p, "up of x")
    line = str(e.value)
    assert "anon only through Tor" in line and "50-test.policy:1" in line and "\n" not in line


@pytest.mark.parametrize("lines,target", [
    ("qubes.Filecopy * anon-whonix work allow\n", "work"),
    ("qubes.OpenInVM * anon-whonix @dispvm:work allow\n", "@dispvm:work"),
])
def test_every_call_is_judged_when_it_is_made(plan_with, lines, target):
    """The policy is read at each call (it may be edited on a running stack): a call that
    would break an invariant is denied then, naming it, whatever `up` saw."""
    from netstack.calls import verdict

    p, _ = plan_with(lines)
    service = lines.split()[0]
    v = verdict(p, "anon-whonix", target, service, "")
    assert v.action == "deny" and "anon only through Tor" in v.reason, v
    assert verdict(p, "work", "anon-whonix", "qubes.Filecopy", "").action == "deny"  # no line
