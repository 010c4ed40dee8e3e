"""Findings of the second hostile-user review (review2), at the command line: `calls` in text
says what --json says of a call's notify= (finding 18):
a call the policy told the journal about is marked, others are not."""

from __future__ import annotations

import argparse
import io
import sys

from netstack import calls, cli


def _call(notify: bool, verdict: str) -> dict:
    return {"id": "ab12cd34", "time": 0.0, "source": "work", "target": "personal",
            "service": "qubes.Filecopy", "argument": "", "verdict": verdict,
            "rule": "policy.d/30.policy:1", "reason": "the policy says deny",
            "bytes_in": 0, "bytes_out": 0, "exit": 126, "notify": notify}


def test_notify_is_shown_in_the_text(monkeypatch):
    monkeypatch.setattr(calls, "listing", lambda stack, last: {
        "pending": [], "clipboard": None, "policy": "/p", "policy_problem": None,
        "calls": [_call(True, "deny"), _call(False, "allow")]})
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.cmd_calls(argparse.Namespace(stack="t", last=20, json=False)) == 0
    told, quiet = out.getvalue().splitlines()[-2:]
    assert told.endswith("[notify: to the host's journal]") and "deny" in told
    assert "journal" not in quiet


def test_a_name_with_a_newline_is_refused_before_anything_runs():
    """review2 finding 10: a newline in a copied file's name gave the receiver's misleading
    last line; now one line naming the cause, before the stack is even read."""
    import pytest

    from netstack.errors import UsageError

    for what in (False, True):
        for name in ("a\nb.txt", "c\x85d", "e\u2028f", "g\x1bh"):  # NEL, LS, ESC
            with pytest.raises(UsageError, match="newline or another control character"):
                calls.copy(None, "no-such-stack", f"work:{name}", "personal", move=what)


def test_options_that_mean_nothing_are_refused_or_used(monkeypatch):
    """review2 finding 14: `watch --clear --on-leak cut` ignored --on-leak; `template list
    NAME` ignored NAME (now lists that one, or says there is none)."""
    import pytest

    from netstack import template_cmd
    from netstack.errors import UsageError

    for flag in ("clear", "status"):
        for on_leak, secs in (("cut", None), ("log", None), (None, 5.0)):
            ns = argparse.Namespace(stack="t", kernel=None, json=False, clear=flag == "clear",
                                    status=flag == "status", on_leak=on_leak, seconds=secs)
            with pytest.raises(UsageError, match="belong to the watch in the foreground"):
                cli.cmd_watch(ns)
    one = {"name": "tw", "suite": "bookworm", "variant": "minbase", "include": [],
           "created": "x", "updated": None, "path": "/p"}
    monkeypatch.setattr(template_cmd, "listing", lambda: [one, {**one, "name": "other"}])
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.cmd_template(argparse.Namespace(action="list", name="tw", json=False)) == 0
    assert out.getvalue().startswith("tw: ") and "other" not in out.getvalue()
    with pytest.raises(UsageError, match="no such template"):
        cli.cmd_template(argparse.Namespace(action="list", name="nope", json=False))


def test_a_purge_that_cannot_remove_the_cache_says_so_after_what_it_did(tmp_path,
                                                                          monkeypatch,
                                                                          capsys):
    """hostile review 2026-12-07: a symlinked cache root made `down --purge` print only the
    error (exit 4) after the stack was down and its homes gone. Now the trouble is a line
    of its own and exit 1; what was done is said."""
    from netstack.tor import network

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setattr(network, "CACHE_ROOT", str(link))
    lab, trouble = cli.purge_lab_tor("hz1")
    assert not lab and trouble and "symlink" in trouble
    assert cli.purge_trouble(trouble) == 1 and "symlink" in capsys.readouterr().err
    assert cli.purge_trouble(None) == 0
