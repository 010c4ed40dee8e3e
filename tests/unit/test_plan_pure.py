"""`netstack plan` is pure: no process, no key, no passwd or state read, for every config;
and every error it can hit is one line with the usage exit code."""

from __future__ import annotations

import builtins
import json
import re
import subprocess
from pathlib import Path

import pytest

from netstack import cli, names

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(str(p) for p in [*ROOT.glob("configs/*.toml"), *ROOT.glob("tests/configs/*.toml")])


@pytest.fixture
def sealed(monkeypatch, tmp_path):
    """Any process, passwd lookup or read of the state directory fails the test."""
    def refuse(*a, **kw):
        raise AssertionError(f"`plan` is not pure: {a[:1]}")

    for name in ("Popen", "run", "check_output", "call"):
        monkeypatch.setattr(subprocess, name, refuse)
    import os
    import pwd

    monkeypatch.setattr(pwd, "getpwnam", refuse)
    monkeypatch.setattr(pwd, "getpwuid", refuse)
    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setenv("PATH", str(tmp_path))  # no wg, openssl, tor on PATH
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))
    real_open = builtins.open

    def guarded(path, *a, **kw):
        p = str(path)
        if p.startswith((str(tmp_path / "run"), "/run/netstack", "/etc/passwd")):
            raise AssertionError(f"`plan` read {p}")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_plan_is_pure(sealed, cfg, capsys):
    assert cli.main(["plan", cfg, "--lab", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["schema"] and p["qubes"]
    assert not (Path(names.RUN_DIR)).exists()


@pytest.mark.parametrize("args,needle", [
    (["plan", "/nonexistent.toml", "--lab"], "cannot read"),
    (["plan", "configs/basic.toml"], "--lab"),
    (["--stack", "BAD", "plan", "--lab"], "--stack"),
])
def test_plan_errors_are_one_line(sealed, args, needle, capsys):
    rc = cli.main([a if not a.startswith("configs/") else str(ROOT / a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err
    assert err.startswith("netstack: ") and "Traceback" not in err


def test_plan_error_for_a_non_utf8_config(sealed, tmp_path, capsys):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[qubes.sys-net]\nkind = "net"\nlabel = "r\xe9d"\n'.encode("latin-1"))
    assert cli.main(["plan", str(bad), "--lab"]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and len(err.strip().splitlines()) == 1


def test_plan_accepts_a_byte_order_mark(sealed, tmp_path, capsys):
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + (ROOT / "configs/basic.toml").read_bytes())
    assert cli.main(["plan", str(bom), "--lab"]) == 0


def test_plan_columns_line_up_for_long_names_coloured_or_not(sealed, tmp_path, capsys,
                                                              monkeypatch):
    cfg = tmp_path / "long.toml"
    cfg.write_text('[qubes.sys-net]\nkind = "net"\n[qubes.a-very-long-firewall-name-x]\n'
                   'kind = "firewall"\nnetvm = "sys-net"\nlabel = "black"\n[qubes.w]\n'
                   'kind = "app"\nnetvm = "a-very-long-firewall-name-x"\n')
    for tty in (False, True):
        monkeypatch.setattr(cli.sys.stdout, "isatty", lambda tty=tty: tty)
        monkeypatch.delenv("NO_COLOR", raising=False)
        assert cli.main(["plan", str(cfg), "--lab"]) == 0

        rows = [re.sub(r"\033\[[0-9;]*m", "", x)
                for x in capsys.readouterr().out.splitlines()]
        assert len(rows) == 3
        assert len({r.index("netvm=") for r in rows}) == 1, rows  # after the name column
        assert len({r.index(" 10.137.") for r in rows}) == 1, rows  # after the netvm column
