"""What a `template create` killed midway left (`.NAME.building`) is swept once its builder
is gone, never while it runs (review finding: 178 MB left behind, unseen by `list`)."""

from __future__ import annotations

import os
import subprocess

from netstack import template_cmd, templates


def test_a_dead_builders_leftover_goes_a_live_ones_stays(tmp_path, monkeypatch):
    monkeypatch.setattr(templates, "TEMPLATE_ROOT", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name, pid in (("gone", dead.pid), ("busy", os.getpid()), ("nopid", None)):
        d = tmp_path / f".{name}.building"
        (d / "root").mkdir(parents=True)
        if pid is not None:
            (d / template_cmd.BUILDER).write_text(f"{pid}\n")
    assert sorted(template_cmd.sweep_stale()) == ["gone", "nopid"]
    assert sorted(os.listdir(tmp_path)) == [".busy.building"]
