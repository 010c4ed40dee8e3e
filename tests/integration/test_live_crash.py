"""kill -9 of a live change at several moments (root): `firewall add`, `attach` and `run` are
killed while they work; the next command that changes the stack repairs what was left
(netstack.live) and works, and afterwards the firewall list, the plan, the kernel and
`status` agree and `audit` passes. Before the transactions, a crash left the plan ahead of
the kernel and every later change was refused as "config changed"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.util import BASIC, ROOT, cli, in_ns

pytestmark = pytest.mark.root

DELAYS = (0.05, 0.12, 0.2, 0.3, 0.5)  # seconds after the command started


def killed_after(delay: float, *args: str) -> None:
    p = subprocess.Popen([sys.executable, "-m", "netstack.cli", *args], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)  # the moment of the crash is what the test varies
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


def agree(s: str) -> None:
    """List, plan, kernel and status agree; the audit passes."""
    listed = json.loads(cli("--stack", s, "firewall", "work", "list", "--json").stdout)
    rules = listed["rules"] or []
    chain = in_ns(f"nst-{s}-sys-firewall", "nft", "list", "ruleset").stdout
    for r in rules:
        assert f"work rule {r['number']}: " in chain, (r, chain[-2000:])
    assert f"work rule {len(rules) + 1}: " not in chain
    st = json.loads(cli("--stack", s, "status", "--json", check=False).stdout)
    assert st["health"]["state"] == "up", st["health"]
    audit = cli("--stack", s, "audit", check=False)
    assert audit.returncode == 0, audit.stdout[-1500:]


def test_a_killed_firewall_add_is_repaired_by_the_next_change(own_stack):
    s = own_stack("kf")
    cli("--stack", s, "up", BASIC, "--lab")
    for i, delay in enumerate(DELAYS):
        killed_after(delay, "--stack", s, "firewall", "work", "add", "action=accept",
                     f"dsthost=192.0.2.{10 + i}", "proto=tcp", "dstports=443")
        cli("--stack", s, "firewall", "work", "add", "action=drop", f"dsthost=203.0.113.{i + 1}")
        agree(s)
    cli("--stack", s, "firewall", "work", "reset")
    agree(s)


def test_a_killed_attach_is_repaired_by_the_next_change(own_stack):
    s = own_stack("ka")
    cli("--stack", s, "up", BASIC, "--lab")
    for delay in DELAYS:
        killed_after(delay, "--stack", s, "attach", "work", "sys-net")
        cli("--stack", s, "attach", "work", "sys-firewall")  # repairs, then moves (or not)
        out = cli("--stack", s, "exec", "work", "--", "curl", "-sS", "--max-time", "5",
                  "http://198.51.100.80/").stdout
        assert out.strip() == "192.0.2.2"
        plan = json.loads(cli("--stack", s, "status", "--json").stdout)
        work = next(q for q in plan["qubes"] if q["name"] == "work")
        assert work["netvm"] == "sys-firewall"
        agree(s)


def test_a_killed_run_is_repaired_by_the_next_run(own_stack):
    s = own_stack("kr")
    cli("--stack", s, "up", BASIC, "--lab")
    for delay in DELAYS:
        killed_after(delay, "--stack", s, "run", "-q", "--", "sleep", "30")
        p = cli("--stack", s, "run", "-q", "--", "true", check=False)
        assert p.returncode == 0, p.stderr
        agree(s)
    st = json.loads(cli("--stack", s, "status", "--json").stdout)
    assert not [q for q in st["qubes"] if q["name"].startswith("disp")]  # orphans gone
