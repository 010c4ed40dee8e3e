"""Live changes and proofs at their edges (root): on a `[stack] ipv6 = true` stack every
live change ends cleanly (the conntrack cut after it reads IPv6 sources), and a qube cut
off with `attach QUBE none` is audited for what it is and refused by leaktest in one line;
never a traceback."""

from __future__ import annotations

import json

import pytest

from tests.integration.util import ROOT, cli

pytestmark = pytest.mark.root


def clean(p) -> None:
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    assert "warning" not in p.stderr, p.stderr


def test_ipv6_stack_live_changes_and_a_cut_off_qube(own_stack, tmp_path):
    cfg = tmp_path / "v6.toml"
    cfg.write_text("[stack]\nipv6 = true\n\n" + (ROOT / "configs" / "basic.toml").read_text())
    s = own_stack("v6")
    cli("--stack", s, "up", str(cfg), "--lab")
    # a conntrack entry of work's IPv6 source in sys-firewall, for the cut to read
    cli("--stack", s, "exec", "work", "--", "ping", "-6", "-c", "1", "-W", "1",
        "fd09:24ef:4179::a89:2", check=False)
    for args in (["firewall", "work", "add", "action=accept", "dsthost=198.51.100.80"],
                 ["firewall", "work", "reset"],
                 ["attach", "work", "none"]):
        p = cli("--stack", s, *args)
        clean(p)
    assert "netvm sys-firewall -> none" in p.stdout
    # the cut-off qube: audited for what it is, in each form of the audit
    p = cli("--stack", s, "audit", check=False)
    clean(p)
    assert p.returncode == 0, p.stdout
    line = next(x for x in p.stdout.splitlines() if "cut off: no link" in x)
    assert "work" in line and "PASS" in line and "reaches nothing" in line, line
    p = cli("--stack", s, "audit", "--drift", check=False)
    clean(p)
    assert p.returncode == 0, p.stdout
    p = cli("--stack", s, "audit", "--json", check=False)
    clean(p)
    res = json.loads(p.stdout)["results"]
    assert {r["property"] for r in res if r["qube"] == "work"} >= {"cut off: no link",
                                                                   "default drop"}
    p = cli("--stack", s, "leaktest", "--qube", "work", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "has no netvm" in p.stderr, p.stderr
    clean(cli("--stack", s, "attach", "work", "sys-firewall"))
