"""A step after a live change is in force (cutting connections from conntrack, asking the
rules' names) that fails is one warning line, never a traceback, and the change holds
(the IPv6 stack's conntrack dump failed with EINVAL after every `firewall`, `attach`,
`reset`; no root: the recording fake with a conntrack that refuses)."""

from __future__ import annotations

import pytest

from netstack import firewall_live, sandbox
from netstack.attach import attach
from tests.unit.test_disposable import plan_of, up


@pytest.fixture(autouse=True)
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(sandbox, "HOME_ROOT", str(tmp_path / "lib"))


class Refused(Exception):
    pass


def refusing(fk):
    def conntrack_list(ns, src):
        raise Refused("(22, 'Invalid argument')")
    fk.conntrack_list = conntrack_list
    return fk


def test_firewall_add_and_reset_hold_when_the_cut_fails(capsys):
    fk, _ = up("configs/basic.toml")
    refusing(fk)
    n, _ = firewall_live.change("main", "work", "add",
                                ["action=accept", "dsthost=198.51.100.80"], kernel=fk)
    assert n == 1 and len(firewall_live.rules_of(plan_of(), "work")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["netstack: warning: the change is in force, but cutting work's connections "
                   "the new rules forbid failed: (22, 'Invalid argument')"]
    firewall_live.change("main", "work", "reset", kernel=fk)
    assert firewall_live.rules_of(plan_of(), "work") is None
    assert "cutting work's connections" in capsys.readouterr().err


def test_attach_holds_when_the_cut_fails(capsys):
    fk, _ = up("configs/basic.toml")
    refusing(fk)
    r = attach("main", "work", "none", kernel=fk)
    assert r["changed"] and r["cut"] == 0 and plan_of().qube("work").netvm is None
    assert "but cutting work's connections failed" in capsys.readouterr().err


def test_files_that_cannot_be_written_after_the_kernel_changed_are_one_line(monkeypatch):
    """The kernel holds the change; writing its files fails (here: reading the digests
    back): one ApplyError line, never a traceback, and the next live change finishes it."""
    from netstack import live, reconcile
    from netstack.errors import ApplyError
    from netstack.state import State

    fk, _ = up("configs/basic.toml")
    real = reconcile.record_digests
    calls = []

    def failing(plan, st, k):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("No space left on device")
        return real(plan, st, k)
    monkeypatch.setattr(reconcile, "record_digests", failing)
    with pytest.raises(ApplyError, match="^the change is in force, but writing its files "
                       "failed: No space left on device; the next live change"):
        firewall_live.change("main", "work", "add", ["action=accept"], kernel=fk)
    st = State.load("main")
    assert live.pending(st) is not None  # the intent stays, phase applied
    firewall_live.change("main", "work", "add", ["action=drop"], kernel=fk)
    assert live.pending(State.load("main")) is None
    assert [r.action for r in firewall_live.rules_of(plan_of(), "work")] == ["accept", "drop"]
