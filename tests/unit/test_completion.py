"""Shell completion and man pages come from the one parser: a qube's name completes from
the namespaces of the stack named on the line (what any user may read, before sudo), and
every subcommand has a page that man renders."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from netstack import cli, completion


@pytest.fixture
def netns_dir(tmp_path):
    d = tmp_path / "netns"
    d.mkdir()
    for n in ("nst-main-sys-net", "nst-main-work", "nst-main-personal", "nst-t1-work2",
              "nsl-main-web", "other"):
        (d / n).write_text("")
    return str(d)


def complete(line: str, netns_dir: str, monkeypatch) -> set[str]:
    """argcomplete as the shell runs it: a process of its own, answers on fd 8 (it takes
    over fds 8 and 9, so never inside the test's own process)."""
    import os
    import sys

    env = dict(os.environ, _ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
               _ARGCOMPLETE_IFS="\n")
    code = ("from netstack import cli, completion; "
            f"completion.complete(cli.parser(), netns_dir={netns_dir!r})")
    p = subprocess.run(["sh", "-c", '"$0" -c "$1" 8>&1 9>/dev/null', sys.executable, code],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return {w.strip() for w in p.stdout.split("\n") if w.strip()}


def test_qube_names_of_the_stack_on_the_line(netns_dir, monkeypatch):
    assert complete("netstack exec ", netns_dir, monkeypatch) == {"sys-net", "work", "personal"}
    assert complete("netstack exec w", netns_dir, monkeypatch) == {"work"}
    assert complete("netstack --stack t1 firewall ", netns_dir, monkeypatch) == {"work2"}
    assert complete("netstack attach work ", netns_dir, monkeypatch) >= {"sys-net"}
    assert complete("netstack --stack ", netns_dir, monkeypatch) == {"main", "t1"}
    assert "firewall" in complete("netstack fi", netns_dir, monkeypatch)


def test_nothing_running_completes_no_qube(tmp_path, monkeypatch):
    assert complete("netstack exec ", str(tmp_path / "none"), monkeypatch) == set()


def test_shell_hooks():
    assert "netstack" in completion.shell_hook("bash")
    assert "compdef" in completion.shell_hook("zsh") or "netstack" in completion.shell_hook("zsh")


def test_a_page_per_command_that_man_renders(tmp_path):
    pages = completion.man_pages(cli.parser(), "1.0", "2026-12-06")
    subs = {"up", "down", "status", "firewall", "exec", "run", "audit", "metrics", "check"}
    assert {f"netstack-{s}.1" for s in subs} <= set(pages) and "netstack.1" in pages
    assert ".TH NETSTACK\\-FIREWALL 1" in pages["netstack-firewall.1"]
    if shutil.which("man"):
        for name in ("netstack.1", "netstack-firewall.1", "netstack-audit.1"):
            (tmp_path / name).write_text(pages[name])
            p = subprocess.run(["man", "-l", str(tmp_path / name)], capture_output=True,
                               text=True, env={"MANPAGER": "cat", "PATH": "/usr/bin:/bin",
                                               "MANWIDTH": "80"})
            assert p.returncode == 0 and "netstack" in p.stdout, p.stderr
            assert "warning" not in p.stderr.lower(), p.stderr
