"""`netstack status` aligns its label columns on visible width (issue 23 item 7): the
colour escape codes take no column, whatever their length (orange `38;5;208`, black
`30;47`), with colour forced on."""

from __future__ import annotations

import argparse
import io
import re
import sys

import pytest

from netstack import cli, stack

ESC = re.compile(r"\x1b\[[0-9;]*m")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def fake_status(_stack: str) -> dict:
    qubes = [{"name": f"q-{label}", "kind": "firewall", "netvm": "sys-net", "label": label,
              "addresses": ["10.137.0.9"], "interfaces": [{"name": "eth0", "state": "up"}],
              "health": {"state": "up", "problems": []}}
             for label in cli.LABEL_COLOURS]
    return {"stack": "t", "config": "/x.toml", "health": {"state": "up", "problems": []},
            "qubes": qubes, "processes": []}


@pytest.mark.parametrize("colour", [True, False])
def test_label_columns_align_on_visible_width(monkeypatch, colour):
    monkeypatch.setattr(stack, "status", lambda name, k=None: fake_status(name))
    out = Tty() if colour else io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert cli.cmd_status(argparse.Namespace(stack="t", json=False, kernel=None)) == 0
    lines = [x for x in out.getvalue().splitlines() if "q-" in x]
    assert len(lines) == len(cli.LABEL_COLOURS)
    for label, line in zip(cli.LABEL_COLOURS, lines, strict=True):
        codes = ESC.findall(line)
        if colour:  # every colour really is on, with its own code
            assert f"\x1b[{cli.LABEL_COLOURS[label]}m" in codes
        else:
            assert not codes
    visible = [ESC.sub("", x) for x in lines]
    kind_col = {v.index("firewall") for v in visible}
    netvm_col = {v.index("netvm=") for v in visible}
    assert len(kind_col) == 1 and len(netvm_col) == 1, visible
    longest = max(len(f"q-{label}") for label in cli.LABEL_COLOURS)
    assert kind_col == {2 + 1 + 1 + longest + 1}  # "  ■ " + the longest name + " "


def test_padding_is_outside_the_colour(monkeypatch):
    monkeypatch.setattr(sys, "stdout", Tty())
    monkeypatch.delenv("NO_COLOR", raising=False)
    s = cli.colour("black", "work", 8)
    assert s == "\x1b[30;47mwork\x1b[0m    "  # black's white background stops at the name
    assert cli.colour("black", "a-very-long-name", 4).endswith("name\x1b[0m")


def test_template_and_tags_show_in_the_text_too(monkeypatch):
    """review2 finding 19: a qube's template (and its tags) were only in --json."""
    def with_template(name: str) -> dict:
        s = fake_status(name)
        s["qubes"][0].update(kind="app", template="bookworm-tw", tags=["anon", "work"])
        return s
    monkeypatch.setattr(stack, "status", lambda name, k=None: with_template(name))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.cmd_status(argparse.Namespace(stack="t", json=False, kernel=None)) == 0
    lines = out.getvalue().splitlines()
    i = next(i for i, x in enumerate(lines) if "q-" in x)
    assert lines[i + 1].strip() == "template bookworm-tw; tags anon, work", lines
    assert "template" not in "\n".join(lines[i + 2:])
