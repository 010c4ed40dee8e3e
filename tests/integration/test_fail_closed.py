"""Fail closed where a check cannot run (issue 23 item 7): `up` keeps the config path
absolute, so `audit --drift` from another directory compares with the same file; a config
removed or made invalid after `up`, a damaged plan, a state without the recorded rulesets
make `audit --drift`, `status` and `leaktest` exit non-zero with one line naming what could
not be loaded and the fix (root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.util import ROOT, load_state

pytestmark = pytest.mark.root


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "netstack.cli", *args], capture_output=True,
                           text=True, cwd=cwd, env=env, timeout=120)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_checks_fail_closed(own_stack, tmp_path):
    s = own_stack("fc")
    here, elsewhere = tmp_path / "conf", tmp_path / "other"
    here.mkdir()
    elsewhere.mkdir()
    shutil.copy(ROOT / "configs" / "basic.toml", here / "basic.toml")
    p = run(here, "--stack", s, "up", "basic.toml", "--lab")  # a relative path
    assert p.returncode == 0, p.stderr
    cfg = here / "basic.toml"
    assert load_state(s).data.config == str(cfg)  # kept absolute

    st = json.loads(run(elsewhere, "--stack", s, "status", "--json").stdout)
    assert st["config"] == str(cfg)
    p = run(elsewhere, "--stack", s, "audit", "--drift")
    assert p.returncode == 0, p.stdout[-1500:]

    cfg.write_text("[qubes.sys-net\nkind =")  # invalid after `up`
    p = run(elsewhere, "--stack", s, "audit", "--drift")
    assert p.returncode == 1
    assert f"config {cfg} no longer loads" in p.stdout and "fix" in p.stdout
    cfg.unlink()  # removed after `up`
    p = run(elsewhere, "--stack", s, "audit", "--drift", "--json")
    assert p.returncode == 1
    rows = json.loads(p.stdout)["firewall_drift"]
    assert any(r["drift"] and "no longer loads" in r["why"] for r in rows), rows
    # status compares with the recorded rulesets, not the config: still up
    assert run(elsewhere, "--stack", s, "status").returncode == 0

    state_json = Path(load_state(s).path)
    saved = state_json.read_text()
    try:  # a path recorded relative (an older netstack) is not guessed
        data = json.loads(saved)
        data["config"] = "basic.toml"
        state_json.write_text(json.dumps(data))
        p = run(here, "--stack", s, "audit", "--drift")
        assert p.returncode == 1 and "recorded relative" in p.stdout, p.stdout[-800:]
        data["config"] = str(ROOT / "configs" / "basic.toml")
        data["digests"] = {}  # nothing recorded to compare the live rulesets with
        state_json.write_text(json.dumps(data))
        p = run(elsewhere, "--stack", s, "status")
        assert p.returncode == 1 and "no ruleset recorded" in p.stdout, p.stdout
    finally:
        state_json.write_text(saved)
    assert run(elsewhere, "--stack", s, "status").returncode == 0

    plan_json = Path(load_state(s).plan_path)
    saved = plan_json.read_text()
    try:
        plan_json.write_text("{damaged")
        for cmd in (["status"], ["audit", "--drift"], ["leaktest"]):
            p = run(elsewhere, "--stack", s, *cmd)
            assert p.returncode != 0, (cmd, p.stdout[-500:])
            line = one_line_error(p)
            assert "plan.json is damaged" in line and "fix:" in line, line
    finally:
        plan_json.write_text(saved)
    assert run(elsewhere, "--stack", s, "status").returncode == 0
