"""netstack.executor without root: the command line and environment it builds for an app
qube (its sandbox) and a service qube (its namespace) on the recording fake kernel, the
shell's exit codes, and, with a local stand-in for the qube's command line, the signals it
hands on, the timeout, the grace before SIGKILL and the output it keeps."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time

import pytest

from netstack import executor
from netstack.errors import StateError, UsageError
from tests.unit.test_disposable import up


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))


# --- exit codes -------------------------------------------------------------------------

@pytest.mark.parametrize("returncode,code", [
    (0, 0), (7, 7), (126, 126), (127, 127), (255, 255),
    (-signal.SIGTERM, 143), (-signal.SIGINT, 130), (-signal.SIGHUP, 129),
    (-signal.SIGKILL, 137)])
def test_exit_codes_are_the_shells(returncode, code):
    assert executor.exit_code(returncode) == code


# --- the command line -------------------------------------------------------------------

def setenv(argv: list[str]) -> dict[str, str]:
    return {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "--setenv"}


def test_an_app_qubes_command_runs_in_its_sandbox_through_env():
    fk, st = up("configs/tor.toml")
    q = executor.qube(st, "anon-whonix")
    cmd = ["-x", "a b", "$HOME", "--"]  # handed over word for word, options and all
    argv = executor.argv(fk, st, q, cmd, user="nobody", environ={"TERM": "vt100"})
    assert argv[:4] == ["ip", "netns", "exec", q.netns]
    assert "bwrap" in argv and "--clearenv" in argv and "--die-with-parent" in argv
    # bubblewrap's program is env: 127 for a program not found, 126 for one not executable
    i = argv.index("--cap-drop")  # bubblewrap's last option
    assert argv[i:] == ["--cap-drop", "ALL", "--", "env", "--", *cmd]
    env = setenv(argv)
    # the call layer's client comes last on PATH (netstack.calls), its directory read-only
    assert env["PATH"] == ("/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
                           ":/run/netstack-call")
    j = argv.index("/run/netstack-call")
    assert argv[j - 2] == "--ro-bind" and argv[j - 1].endswith("/public/calls/anon-whonix")
    assert env["HOME"] == "/home/user" and env["USER"] == "nobody"
    assert env["TOR_SOCKS_PORT"] == "9050" and "TOR_SOCKS_HOST" in env  # its netvm's
    uid = str(__import__("pwd").getpwnam("nobody").pw_uid)
    assert f"--reuid={uid}" in argv and "--no-new-privs" in argv


def test_root_inside_and_a_service_qube():
    fk, st = up("configs/basic.toml")
    work, net = executor.qube(st, "work"), executor.qube(st, "sys-net")
    argv = executor.argv(fk, st, work, ["id"], user="nobody", root_inside=True)
    assert setenv(argv)["USER"] == "root" and argv[argv.index("--uid") + 1] == "0"
    # a service qube: its namespace as root (environment untouched), or as --user
    assert executor.argv(fk, st, net, ["ip", "a"], environ={}) == \
        ["ip", "netns", "exec", net.netns, "env", "--", "ip", "a"]
    argv = executor.argv(fk, st, net, ["id"], user="nobody", environ={})
    assert argv[4] == "setpriv" and argv[-3:] == ["env", "--", "id"]
    assert executor.argv(fk, st, net, ["id"], environ={"SUDO_USER": "nobody"}) == argv
    with pytest.raises(UsageError, match="service qube"):
        executor.argv(fk, st, net, ["id"], root_inside=True)
    with pytest.raises(UsageError, match="no such user"):
        executor.argv(fk, st, net, ["id"], user="no-such-user-here")


def test_what_is_refused_before_anything_runs():
    fk, st = up("configs/basic.toml")
    with pytest.raises(UsageError, match="no qube 'nope'.*sys-net"):
        executor.qube(st, "nope")
    work = executor.qube(st, "work")
    with pytest.raises(UsageError, match="give a command"):
        executor.argv(fk, st, work, [])
    fk.namespaces.discard(work.netns)  # asked of the kernel it is handed
    with pytest.raises(StateError, match="is gone"):
        executor.argv(fk, st, work, ["true"], user="nobody")


def test_a_gui_qube_without_a_display_says_so(tmp_path):
    fk, st = up("configs/basic.toml")
    from dataclasses import replace

    work = executor.qube(st, "work")
    work = replace(work, settings={**work.settings, "gui": True})
    said: list[str] = []
    argv = executor.argv(fk, st, work, ["true"], user="nobody",
                         environ={"XDG_RUNTIME_DIR": str(tmp_path)}, warn=said.append)
    assert said and "no Wayland or X11 display" in said[0]
    assert "WAYLAND_DISPLAY" not in setenv(argv)


# --- running: a local stand-in for the qube's command line ------------------------------

class Q:  # the executor reads a qube's netns (to record the pid) and name
    netns, name = "not-a-stack-ns", "q"


@pytest.fixture
def local(monkeypatch):
    """executor.run with `argv` replaced: the command runs here, as a service qube's would
    (no sandbox), and its pid is recorded nowhere (the namespace is no stack's)."""
    monkeypatch.setattr(executor, "argv", lambda k, st, q, cmd, *a, **kw: list(cmd))
    monkeypatch.setattr(executor, "GRACE", 0.5)

    def run(cmd: list[str], **how):
        return executor.run(None, None, Q(), cmd, **how)  # type: ignore[arg-type]
    return run


def later(delay: float, fn) -> threading.Timer:
    t = threading.Timer(delay, fn)
    t.start()
    return t


def test_exit_status_and_output(local):
    o = local(["sh", "-c", "echo out; echo err >&2; exit 7"], capture=True)
    assert (o.code, o.stdout, o.stderr, o.ended_by) == (7, "out\n", "err\n", None)
    o = local(["sh", "-c", "kill -TERM $$"])
    assert o.code == 143 and o.ended_by is None
    o = local(["env", "--", "no-such-program-anywhere"], capture=True)
    assert o.code == 127 and "No such file" in o.stderr
    o = local(["env", "--", "/etc/passwd"], capture=True)
    assert o.code == 126
    assert local(["cat"], input="in\n", capture=True).stdout == "in\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_netstack_is_handed_on_and_the_code_is_128_plus_it(local, sig, tmp_path):
    pidfile = tmp_path / "pid"
    before = {s: signal.getsignal(s) for s in executor.FORWARDED}
    t = later(0.5, lambda: os.kill(os.getpid(), sig))
    o = local(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"])
    t.join()
    assert o.code == 128 + sig and o.ended_by == signal.Signals(sig).name
    pid = int(pidfile.read_text())
    assert not os.path.exists(f"/proc/{pid}")  # reaped: gone
    assert {s: signal.getsignal(s) for s in executor.FORWARDED} == before  # ours are back


def test_a_program_that_ignores_the_signal_is_killed_after_the_grace(local):
    t0 = time.monotonic()
    t = later(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    o = local(["sh", "-c", "trap '' TERM; sleep 30"])
    t.join()
    assert o.code == 137 and o.ended_by == "SIGTERM"
    assert 0.9 < time.monotonic() - t0 < 10


def test_a_timeout_ends_it_and_output_is_kept(local):
    o = local(["sh", "-c", "echo before; sleep 30"], capture=True, timeout=0.5)
    assert o.code == 143 and o.ended_by == "timeout" and o.stdout == "before\n"


def test_without_forwarding_an_interrupt_ends_the_command_and_propagates(local, tmp_path):
    pidfile = tmp_path / "pid"
    t = later(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        local(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], forward=(),
              capture=True)
    t.join()
    assert not os.path.exists(f"/proc/{int(pidfile.read_text())}")


def test_the_sandboxed_programs_group_is_found_below_bubblewrap():
    """What a signal is handed to in a sandbox: the group of the session leader below
    bubblewrap's pid (its init, with --new-session) once the program is in it; before,
    nothing (the signal waits: bubblewrap is not signalled while it starts)."""
    def leader_of(argv: list[str], want: bytes) -> tuple[subprocess.Popen, int | None]:
        p = subprocess.Popen(argv)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            for d in executor.descendants(p.pid):
                with contextlib.suppress(OSError), open(f"/proc/{d}/cmdline", "rb") as f:
                    if f.read() == want:  # the program itself, exec'd
                        return p, executor.sandbox_group(p.pid)
            time.sleep(0.01)
        raise AssertionError(f"{want!r} never started")

    def end(p: subprocess.Popen) -> None:
        for d in executor.descendants(p.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(d, signal.SIGKILL)
        p.kill()
        p.wait()
        for d in executor.descendants(p.pid):  # ours again if we are a subreaper
            with contextlib.suppress(ChildProcessError):
                os.waitpid(d, 0)

    # an init that leads its session, the program in its group
    p, leader = leader_of(["sh", "-c", "setsid sh -c 'sleep 31 & wait' & wait"],
                          b"sleep\x0031\x00")
    try:
        assert leader is not None and leader != p.pid
        assert executor.session_id(leader) == leader
        with open(f"/proc/{leader}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[:2] == [b"sh", b"-c"]
    finally:
        end(p)
    # a session leader alone in its group: no program yet
    p, leader = leader_of(["sh", "-c", "setsid sleep 32 & wait"], b"sleep\x0032\x00")
    try:
        assert leader is None
    finally:
        end(p)
    assert executor.sandbox_group(2 ** 22 + 12345) is None  # no such process


def test_app_qubes_may_ping_service_qubes_keep_the_kernels_default():
    """ICMP echo sockets for every group in an app qube's namespace (disposables are app
    qubes too); nothing changes where netstack's own daemons run."""

    fk, st = up("configs/tor-over-vpn.toml")
    for q in st.plan.qubes:
        want = "0 2147483647" if q.traits.sandboxed else None
        assert st.plan.ns(q.netns).sysctls.get("net/ipv4/ping_group_range") == want, q.name
        assert fk.sysctls.get((q.netns, "net/ipv4/ping_group_range")) == want, q.name
