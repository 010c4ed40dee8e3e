"""What a `template create` killed midway left (`.NAME.building`) is swept once nothing
builds it any more, never while a create (or a builder of a killed one: cp, mmdebstrap,
which hold the build lock) still runs; a second create of the same name is refused in one
line while the first runs (review findings: 178 MB left behind; two creates racing)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from netstack import template_cmd, templates
from netstack.errors import UsageError


def test_a_dead_builders_leftover_goes_a_live_ones_stays(tmp_path, monkeypatch):
    monkeypatch.setattr(templates, "TEMPLATE_ROOT", str(tmp_path))
    for name in ("gone", "busy"):
        (tmp_path / f".{name}.building" / "root").mkdir(parents=True)
    held = template_cmd.build_lock("busy")
    assert held is not None
    # a builder that outlived its create holds the lock through the inherited descriptor
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE, pass_fds=(held,))
    os.close(held)
    try:
        assert template_cmd.sweep_stale() == ["gone"]
        assert sorted(x for x in os.listdir(tmp_path) if x != ".locks") == [".busy.building"]
        with pytest.raises(UsageError, match="'busy' is being made by another"):
            monkeypatch.setattr(os, "geteuid", lambda: 0)
            template_cmd.create("busy", source=str(tmp_path))
    finally:
        child.communicate(b"")
    assert template_cmd.sweep_stale() == ["busy"]


def test_from_a_missing_directory_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(templates, "TEMPLATE_ROOT", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(UsageError, match="--from /nonexistent: no such directory"):
        template_cmd.create("tx", source="/nonexistent")
    assert sorted(os.listdir(tmp_path)) == [".locks"]
