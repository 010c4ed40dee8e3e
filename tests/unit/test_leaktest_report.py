"""leaktest's verdict words and exit codes, and what counts as sent (no root)."""

from __future__ import annotations

import pytest

from netstack import cli
from netstack.leaktest import battery
from netstack.leaktest.battery import Report, unproven
from netstack.leaktest.catalogue import Case
from netstack.leaktest.prober import Sent


def report(leaks: int, errors: list[str]) -> Report:
    return Report("t", "ws", "tor", "steady", None, "/tmp/x", 1.0, 3,
                  [{"case": "c", "sent": 1, "planned": 1, "verdict": "ok", "seen_on": [],
                    "leaked_on": []}], [], leaks, errors)


@pytest.mark.parametrize("leaks, errors, rc, word", [
    (0, [], 0, "PASS"), (2, [], 1, "LEAK"), (0, ["c: 1 of 1 probes not sent"], 6, "ERROR"),
    (1, ["c: 1 of 1 probes not sent"], 1, "LEAK")])
def test_exit_codes(monkeypatch, capsys, leaks, errors, rc, word):
    monkeypatch.setattr(battery, "run", lambda *a, **k: report(leaks, errors))
    assert cli.main(["leaktest"]) == rc
    assert capsys.readouterr().out.splitlines()[-1].startswith(word + ":")


def test_inject_fault_is_not_an_option(capsys):
    assert cli.main(["leaktest", "--inject-fault", "no-kill-switch"]) == 2


CASE = Case("c", "p", [{"dst": "x", "payload": "m"}, {"dst": "y", "payload": "m"}])


@pytest.mark.parametrize("sent, seen, why", [
    (Sent(2), True, None),
    (Sent(1, ["packet 2: OSError: no route"]), True, "1 of 2 probes not sent (packet 2"),
    (Sent(0, ["the probe sender died (exit 1)"]), False, "2 of 2 probes not sent"),
    (Sent(2, ["packet 1: x"]), True, "0 of 2 probes not sent"),
    (Sent(2), False, "never carried them"),
])
def test_a_case_proves_something_only_if_its_probes_left(sent, seen, why):
    got = unproven(CASE, sent, seen)
    assert (got is None) if why is None else (got is not None and why in got)


def test_bare_and_tool_cases_need_no_marker_on_the_link():
    bare = Case("nd", "p", [{"dst": "x", "bare": True}])
    tool = Case("curl", "p", [], ["curl", "x"])
    assert unproven(bare, Sent(1), False) is None
    assert unproven(tool, Sent(1), False) is None
    assert "1 of 1" in (unproven(tool, Sent(0, ["curl did not run"]), False) or "")
