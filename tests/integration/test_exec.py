"""`netstack exec` and `netstack run` through the one executor, with real sandboxes (root):
the shell's exit codes (127 for a program not found, 126 for one not executable, 128+N for
a command killed by signal N), SIGTERM to either handed on to the command, which is gone
after; the command's pid in the stack's state while it runs, and `down` ending it after a
kill -9 of exec; and ping from an app qube to a lab host (ping_group_range), with the
kernel's default as the anti-test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from tests.integration.test_disposable import leftovers, ns_processes
from tests.integration.util import (
    cli,
    in_ns,
    load_state,
    reap_zombies,
    stack_leftovers,
    wait_for,
)

pytestmark = pytest.mark.root

WEB = "198.51.100.80"
PY = "/usr/bin/python3"


def netstack(stack: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "netstack.cli", "--stack", stack, *args]


def code(stack: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(netstack(stack, *args), capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, SUDO_USER=""))


@pytest.mark.parametrize("how", [("exec", "work"), ("exec", "sys-net"), ("run", "-q")])
def test_the_shells_exit_codes(basic_stack, how):
    p = code(basic_stack, *how, "--", "no-such-program-here", "-x")
    assert p.returncode == 127 and "no-such-program-here" in p.stderr, p.stderr
    p = code(basic_stack, *how, "--", "/etc/hostname")  # there, not executable
    assert p.returncode == 126, p.stderr
    p = code(basic_stack, *how, "--", "sh", "-c", "exit 7")
    assert p.returncode == 7
    p = code(basic_stack, *how, "--", "sh", "-c", "kill -KILL $$")
    assert p.returncode == 137
    assert leftovers(basic_stack) == []


def programs(stack: str) -> list:
    """The commands recorded in the stack's state (pid, start time) for `down`."""
    from netstack.state import ProcessRec

    return [o for o in load_state(stack).objects
            if isinstance(o, ProcessRec) and o.name.startswith(("exec in", "run in"))]


@pytest.mark.parametrize("how", [("exec", "work"), ("exec", "sys-firewall"), ("run", "-q")])
def test_sigterm_is_handed_on_and_the_code_is_143_for_exec_and_run(basic_stack, how):
    marker = f"nstk-exec-{os.getpid()}-{how[1]}"
    p = subprocess.Popen(netstack(basic_stack, *how, "--", PY, "-c",
                                  "import time; time.sleep(600)", marker),
                         env=dict(os.environ, SUDO_USER=""))

    def mine() -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/cmdline", "rb") as f:
                        argv = f.read().split(b"\0")
                except OSError:
                    continue
                if argv[0] == PY.encode() and marker.encode() in argv:
                    out.append(int(d))
        return out
    pids = wait_for(mine, 30, 0.05, "the command")
    recs = wait_for(lambda: programs(basic_stack), 10, 0.05, "its record in the state")
    # the pid started (bubblewrap, or the command itself in a service qube) is recorded
    assert any(r.pid in [pids[0], *_ancestors(pids[0])] for r in recs), (recs, pids)
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 143
    assert mine() == [] and programs(basic_stack) == []
    assert leftovers(basic_stack) == []


def _ancestors(pid: int) -> list[int]:
    from netstack.kernel import proc_fields

    out = []
    while pid > 1 and (rest := proc_fields(pid)) is not None:
        pid = int(rest[1])
        out.append(pid)
    return out


def test_down_ends_an_exec_whose_netstack_was_killed(own_stack):
    """kill -9 of `netstack exec`: its sandbox dies with it (bubblewrap --die-with-parent),
    its record stays for `down`, which leaves nothing."""
    from tests.integration.util import BASIC

    s = own_stack("ex")
    cli("--stack", s, "up", BASIC, "--lab")
    p = subprocess.Popen(netstack(s, "exec", "work", "--", "sleep", "600"),
                         env=dict(os.environ, SUDO_USER=""))
    netns = load_state(s).plan.qube("work").netns
    wait_for(lambda: programs(s), 30, 0.05, "the command in the state")
    wait_for(lambda: len(ns_processes(netns)) >= 2, 30, 0.05, "its sandbox")
    p.kill()
    p.wait()
    reap_zombies()
    assert programs(s)  # nobody retired the record: `down` ends it by pid and start time
    wait_for(lambda: ns_processes(netns) == [], 10, 0.05, "the sandbox to end")
    cli("--stack", s, "down", "--purge")
    reap_zombies()
    assert not stack_leftovers(s)


def test_an_app_qube_pings_a_lab_host_and_the_kernels_default_would_refuse(basic_stack):
    ok = code(basic_stack, "exec", "work", "--", "ping", "-c", "1", "-W", "3", WEB)
    assert ok.returncode == 0 and "1 received" in ok.stdout, ok.stdout + ok.stderr
    ws = load_state(basic_stack).plan.qube("work").netns
    assert in_ns(ws, "sysctl", "-n", "net.ipv4.ping_group_range").stdout.split() == \
        ["0", "2147483647"]
    # anti-test: the kernel's default in the same namespace, the same command refused
    in_ns(ws, "sysctl", "-w", "net.ipv4.ping_group_range=1 0")
    try:
        no = code(basic_stack, "exec", "work", "--", "ping", "-c", "1", "-W", "3", WEB)
        assert no.returncode != 0 and "1 received" not in no.stdout
    finally:
        in_ns(ws, "sysctl", "-w", "net.ipv4.ping_group_range=0 2147483647")
    # a disposable is an app qube: it pings too
    d = code(basic_stack, "run", "-q", "--", "ping", "-c", "1", "-W", "3", WEB)
    assert d.returncode == 0, d.stdout + d.stderr


def at_terminal(stack: str, args: list[str], keys: bytes, after: float = 1.5
                ) -> tuple[int | None, bytes]:
    """`netstack ARGS` on a terminal of its own (a pty), `keys` typed after a moment: its
    exit code (None: still running after 30 s, then killed) and what the terminal showed."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child (SUDO_USER empty, as cli() runs it)
        os.environ["SUDO_USER"] = ""
        os.execv(sys.executable, netstack(stack, *args))
    out, code, end = b"", None, time.monotonic() + 30
    try:
        time.sleep(after)
        os.write(fd, keys)
        while time.monotonic() < end:
            if select.select([fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):  # every holder of the terminal is gone
                    chunk = os.read(fd, 4096)
                    out += chunk
                    if chunk:
                        continue
            if code is not None:  # exited, and what it wrote has been read
                break
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
    finally:
        if code is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    return code, out


@pytest.mark.parametrize("qube", ["work", "sys-net"])
def test_at_a_terminal_ctrl_c_ends_the_command_and_input_reaches_it(basic_stack, qube):
    """A service qube's command is the terminal's job (Ctrl-C reaches it directly), an app
    qube's sandbox is not (netstack hands Ctrl-C on): 130 either way, and what is typed is
    read by the command."""
    assert at_terminal(basic_stack, ["exec", qube, "--", "sleep", "600"], b"\x03") == \
        (130, b"^C")
    code, out = at_terminal(basic_stack, ["exec", qube, "--", "sh", "-c",
                                          "read x; echo got $x"], b"typed\n")
    assert code == 0 and b"got typed" in out
