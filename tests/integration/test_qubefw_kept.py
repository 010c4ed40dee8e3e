"""A rule list `netstack firewall` kept for the next `up` (/var/lib/netstack/STACK/
firewall.json) must never lock a user out: when the config no longer has the qube, `up`
refuses in one line naming `firewall QUBE reset`, and that reset works while the stack is
down (it used to answer "stack is not up"), after which `up` goes ahead (root: the stack's
lock and directory are the real ones; nothing is brought up)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from netstack.rules import qubefw
from tests.integration.util import cli, new_stack_name, stack_leftovers

pytestmark = pytest.mark.root


@pytest.fixture
def stack():
    name = new_stack_name("fk")
    yield name
    shutil.rmtree(f"/var/lib/netstack/{name}", ignore_errors=True)
    assert stack_leftovers(name) == []


def test_a_kept_list_of_a_removed_qube_is_reset_while_down(stack, tmp_path):
    qubefw.save_overlay(stack, {"ghost": [{"action": "drop"}], "work": [{"action": "drop"}]})
    cfg = tmp_path / "c.toml"
    cfg.write_text('[qubes.sys-net]\nkind = "net"\n[qubes.sys-firewall]\nkind = "firewall"\n'
                   'netvm = "sys-net"\n[qubes.work]\nkind = "app"\nnetvm = "sys-firewall"\n')
    p = cli("--stack", stack, "plan", str(cfg), "--lab", check=False)
    assert p.returncode == 2 and "netstack firewall ghost reset" in p.stderr, p.stderr
    p = cli("--stack", stack, "firewall", "ghost", "reset", "--json")
    assert json.loads(p.stdout)["ok"] is True
    # only ghost's list went; work's kept list is still the one the next `up` takes
    assert qubefw.load_overlay(stack) == {"work": [{"action": "drop"}]}
    p = cli("--stack", stack, "firewall", "ghost", "reset", check=False)
    assert p.returncode == 2 and "no rules kept" in p.stderr and "\n" not in p.stderr.strip()
    plan = json.loads(cli("--stack", stack, "plan", str(cfg), "--lab", "--json").stdout)
    assert plan  # the config plans again
    cli("--stack", stack, "firewall", "work", "reset")
    assert not os.path.exists(qubefw.overlay_path(stack))
