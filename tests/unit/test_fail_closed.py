"""A check that cannot load what it compares against has failed (issue 23 item 7):
`audit --drift` with a config that is gone, invalid, or recorded relative; a damaged
plan.json; status with no recorded ruleset or a damaged failover file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from netstack import state
from netstack.audit import firewall_drift
from netstack.errors import StateError
from netstack.kinds.registry import RUNTIMES, SPECS
from netstack.model import UplinkSpec
from netstack.plan import build, load_inputs

ROOT = Path(__file__).resolve().parents[2]
LAB = UplinkSpec("lab")


@pytest.fixture
def basic(tmp_path, monkeypatch):
    # no overlay of a real stack
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))
    cfg = tmp_path / "basic.toml"
    shutil.copy(ROOT / "configs" / "basic.toml", cfg)
    return cfg, build(load_inputs(str(cfg), "u1", LAB, SPECS, overlay={}), "u1", LAB)


def test_a_config_that_loads_compares(basic):
    cfg, plan = basic
    rows = firewall_drift("u1", plan, str(cfg))
    assert not any(r["drift"] for r in rows)


@pytest.mark.parametrize("case", ["removed", "invalid", "relative", "none"])
def test_a_config_that_cannot_be_compared_is_drift(basic, case):
    cfg, plan = basic
    path: str | None = str(cfg)
    if case == "removed":
        cfg.unlink()
    elif case == "invalid":
        cfg.write_text("[qubes.sys-net\nkind =")
    elif case == "relative":
        path = "basic.toml"  # recorded by an older netstack: relative to where `up` ran
    else:
        path = None
    rows = firewall_drift("u1", plan, path)
    bad = [r for r in rows if r["drift"]]
    assert len(bad) == 1 and bad[0]["qube"] == "-", rows
    why = bad[0]["why"]
    assert "\n" not in why
    assert ("no longer loads" in why and str(cfg) in why) if case in ("removed", "invalid") \
        else ("relative" in why if case == "relative" else "records no config" in why)
    assert "fix" in why and "down" in why and "up" in why


def test_a_damaged_plan_is_a_state_error_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path))
    st = state.State("u2")
    st.create()
    Path(st.plan_path).write_text("{damaged")
    with pytest.raises(StateError, match="plan.json is damaged.*fix: `netstack --stack u2 "
                                         "down`"):
        _ = state.State.load("u2").plan


def test_a_damaged_failover_file_is_a_status_problem(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))
    text = (ROOT / "configs" / "vpn.toml").read_text().replace(
        'config = "lab:wireguard"', 'config = ["lab:wireguard", "lab:wireguard2"]')
    cfg = tmp_path / "fo.toml"
    cfg.write_text(text)
    plan = build(load_inputs(str(cfg), "u3", LAB, SPECS, overlay={}), "u3", LAB)
    q = plan.qube("sys-proxyvm")
    info = q.info
    assert info.state_dir.startswith(str(tmp_path))
    Path(info.state_dir).mkdir(parents=True, exist_ok=True)
    Path(info.server_file).write_text("{damaged")
    try:
        from netstack.kinds.runtime import LiveFacts
        from tests.fakekernel import FakeKernel

        role = RUNTIMES[q.kind]
        entry = role.status(q, LiveFacts([], {}, {}), FakeKernel())
        assert "is damaged" in entry["vpn"]["failover"]["error"]
        problems = role.health(entry)
        assert any("which server the kill switch admits is unknown" in p for p in problems)
        Path(info.server_file).write_text(json.dumps({"current": 1, "since": 1.0,
                                                      "history": []}))
        entry = role.status(q, LiveFacts([], {}, {}), FakeKernel())
        assert "error" not in entry["vpn"]["failover"]
    finally:
        Path(info.server_file).unlink(missing_ok=True)


def test_status_takes_the_kernel_it_is_given(tmp_path, monkeypatch):
    """status once made its own RealKernel and could not run on the recording fake; now it
    is handed the entry's kernel, and on the fake it reads what the fake made (an empty
    listing where rules were loaded: named as a changed ruleset, never healthy)."""
    from netstack import stack
    from tests.fakekernel import FakeKernel
    from tests.unit.test_reconcile import bring_up

    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))
    fk = FakeKernel()
    bring_up("configs/basic.toml", fk)
    s = stack.status("main", fk)
    assert [q["name"] for q in s["qubes"]] == ["sys-net", "sys-firewall", "personal", "work"]
    assert all(q["running"] for q in s["qubes"])
    assert s["health"]["state"] != "up"  # the fake lists no rules: not what was loaded
