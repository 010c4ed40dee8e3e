"""Reliability as a hostile user finds it (root): crashes in the windows where a process is
started but not yet recorded, one writer per stack, paths that lead elsewhere, a status
that tells the truth, and bad inputs that get one line and change nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from netstack.state import StackLock
from tests.integration.util import (
    BASIC,
    ROOT,
    VPN_CFG,
    children,
    cli,
    in_ns,
    load_ruleset,
    load_state,
    new_stack_name,
    reap_zombies,
    snapshot_host,
    stack_leftovers,
    supervisor_pid,
    wait_for,
)

pytestmark = pytest.mark.root


def supervisors_of(stack: str) -> list[int]:
    """Supervisor processes of a stack, found by their command line (test only)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        if b"netstack.supervisor" in cmd and f"/{stack}".encode() in b" ".join(cmd) \
                and stat[stat.rindex(")") + 2] != "Z":
            out.append(int(d))
    return out


def test_crash_after_the_supervisor_started_then_up_repairs_with_one_supervisor(own_stack):
    """`up` killed after starting the supervisor and before recording its pid: the next
    `up` finds it by its pidfile and ends it; one supervisor, a healthy stack."""
    s = own_stack("k")
    p = cli("--stack", s, "up", VPN_CFG, "--lab", check=False,
            env={"NETSTACK_TEST_CRASH_AT": "supervisor-started"})
    assert p.returncode == -9
    orphan = wait_for(lambda: supervisors_of(s), 5, 0.02, "the orphaned supervisor")
    p = cli("--stack", s, "up", VPN_CFG, "--lab")
    assert "repaired" in p.stderr
    assert not any(os.path.exists(f"/proc/{x}") and x in supervisors_of(s) for x in orphan)
    assert supervisors_of(s) == [supervisor_pid(s)]
    st = json.loads(cli("--stack", s, "status", "--json").stdout)
    assert st["health"]["state"] == "up", st["health"]
    assert all(c.restarts == 0 for c in children(s).values())  # no fight over devices


def test_crash_after_the_lab_keys_then_down_removes_them(own_stack):
    s = own_stack("k")
    p = cli("--stack", s, "up", VPN_CFG, "--lab", check=False,
            env={"NETSTACK_TEST_CRASH_AT": "lab-made"})
    assert p.returncode == -9
    assert any(Path(f"/run/netstack/{s}/lab").iterdir())  # the private keys are there
    p = cli("--stack", s, "down")
    assert "down" in p.stdout
    reap_zombies()
    assert not stack_leftovers(s)


def test_sigterm_mid_up_undoes_it_as_ctrl_c_does(own_stack):
    """systemd and `timeout` end a command with SIGTERM: mid-`up` it undoes what it made
    and says so in one line (it exited silently, leaving a half-made stack)."""
    s = own_stack("t")
    before = snapshot_host()
    p = cli("--stack", s, "up", VPN_CFG, "--lab", check=False,
            env={"NETSTACK_TEST_CRASH_AFTER": "6", "NETSTACK_TEST_CRASH_SIGNAL": "15"})
    assert p.returncode == 143, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("netstack: terminated (SIGTERM)")
    reap_zombies()
    assert not [x for x in stack_leftovers(s) if not x.startswith("/var/lib/netstack/")]
    assert snapshot_host() == before


def test_one_writer_per_stack(own_stack):
    s = own_stack("l")
    before = snapshot_host()
    with StackLock(s):  # another netstack is changing the stack
        for args in (("up", BASIC, "--lab"), ("down", "--wait", "0")):
            p = cli("--stack", s, *args, check=False)
            assert p.returncode == 3, p.stderr
            assert f"stack {s!r} is being changed by pid {os.getpid()}" in p.stderr
            assert len(p.stderr.strip().splitlines()) == 1
    assert snapshot_host() == before


def test_down_waits_for_a_change_in_progress(own_stack):
    """`down` (`systemctl stop`, a user) during a live change or a disposable being made
    waits for it, saying whose it is, then takes the stack down: never "being changed"."""
    s = own_stack("w")
    cli("--stack", s, "up", BASIC, "--lab")
    lock = StackLock(s).__enter__()  # another netstack is changing the stack
    down = subprocess.Popen([sys.executable, "-m", "netstack.cli", "--stack", s, "down",
                             "--wait", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = down.stderr.readline()  # it says it waits before it waits
        assert f"waiting up to 30 s for pid {os.getpid()}" in line, line
        assert down.poll() is None
    finally:
        lock.__exit__(None, None, None)
    out, err = down.communicate(timeout=60)
    assert down.returncode == 0, err
    reap_zombies()
    assert not stack_leftovers(s)


def test_two_ups_at_once_never_interleave(own_stack):
    s = own_stack("l")
    cmd = [sys.executable, "-m", "netstack.cli", "--stack", s, "up", BASIC, "--lab"]
    for _ in range(4):
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        results = [(p.wait(60), p.stderr.read()) for p in procs]
        codes = sorted(rc for rc, _ in results)
        assert codes == [0, 3], results
        loser = next(err for rc, err in results if rc == 3)
        # (the lock holder is named by pid once it wrote it; a few ms earlier, "another")
        assert "being changed by" in loser or "already up" in loser
        assert "Traceback" not in loser
        st = json.loads(cli("--stack", s, "status", "--json").stdout)
        assert st["health"]["state"] == "up"
        cli("--stack", s, "down")
        reap_zombies()
        assert not stack_leftovers(s)


@pytest.mark.parametrize("name", ["..", "/", "", "Main", "a/b", "x" * 9])
def test_bad_stack_names_are_refused_by_every_command(name):
    for args in (["down"], ["status"], ["up", "--lab"], ["audit"], ["tor", "status"],
                 ["leaktest"], ["exec", "work", "--", "true"], ["plan", "--lab"]):
        p = cli("--stack", name, *args, check=False)
        assert p.returncode == 2 and "--stack" in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1


def test_a_symlinked_stack_directory_is_never_followed(tmp_path):
    """A run directory whose stack entry is a symlink to somewhere else: `down` refuses
    and deletes nothing there."""
    run, victim = tmp_path / "run", tmp_path / "victim"
    run.mkdir()
    victim.mkdir()
    (victim / "state.json").write_text(json.dumps({"schema": 2, "stack": "s1",
                                                   "status": "partial"}))
    (victim / "precious.txt").write_text("keep me")
    (run / "s1").symlink_to(victim)
    env = {"NETSTACK_RUN_DIR": str(run)}
    for args in (("down",), ("up", BASIC, "--lab")):
        p = cli("--stack", "s1", *args, check=False, env=env)
        assert p.returncode == 3 and "symlink" in p.stderr, p.stderr
    assert (victim / "precious.txt").read_text() == "keep me"
    assert (victim / "state.json").exists()


def test_a_symlinked_run_directory_is_fine(tmp_path, own_stack):
    """The run directory itself may be a symlink (e.g. /run -> /var/run): paths are
    compared resolved."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "run").symlink_to(real)
    s = own_stack("y")
    env = {"NETSTACK_RUN_DIR": str(tmp_path / "run")}
    cli("--stack", s, "up", BASIC, "--lab", env=env)
    cli("--stack", s, "down", env=env)
    reap_zombies()
    assert not list(real.iterdir())


@pytest.fixture(scope="module")
def vpn_health():
    s = new_stack_name("hv")
    cli("--stack", s, "up", VPN_CFG, "--lab")
    try:
        yield s
    finally:
        cli("--stack", s, "down", check=False)
        reap_zombies()
    assert not stack_leftovers(s)


def status_of(s: str) -> tuple[int, dict, str]:
    pj = cli("--stack", s, "status", "--json", check=False)
    pt = cli("--stack", s, "status", check=False)
    assert pj.returncode == pt.returncode
    return pj.returncode, json.loads(pj.stdout), pt.stdout


def test_status_tells_the_truth(vpn_health):
    """Healthy, then each break is named in both formats with a non-zero exit."""
    s = vpn_health
    rc, st, text = status_of(s)
    assert rc == 0 and st["health"] == {"state": "up", "problems": []}
    assert text.startswith(f"stack {s}: UP")
    fw = f"nst-{s}-sys-firewall"
    # a ruleset flushed by hand
    good = load_state(s).plan.ns(fw).ruleset
    in_ns(fw, "nft", "flush", "ruleset")
    rc, st, text = status_of(s)
    assert rc == 1 and st["health"]["state"] == "degraded"
    assert "sys-firewall: ruleset missing" in st["health"]["problems"]
    assert text.startswith(f"stack {s}: DEGRADED") and "ruleset missing" in text
    load_ruleset(fw, good)
    assert status_of(s)[0] == 0
    # a rule added by hand: present, but not what `up` loaded
    in_ns(fw, "nft", "insert", "rule", "inet", "netstack", "forward", "accept")
    rc, st, _ = status_of(s)
    assert rc == 1 and any("ruleset differs" in x for x in st["health"]["problems"])
    load_ruleset(fw, good)
    # an app qube that lost its interface (and its netvm the other end)
    in_ns(f"nst-{s}-work", "ip", "link", "del", "eth0")
    rc, st, _ = status_of(s)
    assert rc == 1
    assert "work: link eth0 missing" in st["health"]["problems"]
    assert "sys-proxyvm: link vif4 missing" in st["health"]["problems"]
    # the supervisor killed, then the tunnel: nobody restarts it
    os.kill(supervisor_pid(s), signal.SIGKILL)
    os.kill(children(s)["vpn-sys-proxyvm"].pid, signal.SIGKILL)
    wait_for(lambda: subprocess.run(["ip", "-n", f"nst-{s}-sys-proxyvm", "link", "show",
                                     f"wg3-{s}"], capture_output=True).returncode, 5, 0.02,
             "the tunnel device to go")
    rc, st, text = status_of(s)
    problems = st["health"]["problems"]
    assert rc == 1 and "supervisor not running: nothing restarts the daemons" in problems
    assert "sys-proxyvm: daemon vpn-sys-proxyvm not running" in problems
    assert any(p.startswith("sys-proxyvm: tunnel wg3-") and "not running" in p
               for p in problems)
    # a namespace deleted by hand
    subprocess.run(["ip", "netns", "del", f"nst-{s}-work"], check=True)
    rc, st, _ = status_of(s)
    assert rc == 1 and "work: namespace missing" in st["health"]["problems"]
    p = cli("--stack", s, "audit", check=False)
    assert p.returncode == 3 and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr


def test_status_pipe_closed_early(vpn_health):
    p = subprocess.run(f"{sys.executable} -m netstack.cli --stack {vpn_health} status | head -1",
                       shell=True, capture_output=True, text=True, cwd=ROOT)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr


BAD_TOML_UTF16 = '[qubes.sys-net]\nkind = "net"\n'.encode("utf-16")


def provider_cases(tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    """name -> (CLI args, exit code, text of the one-line message)."""
    from tests.unit.test_vpn_parsers import OVPN_INLINE, WG_MULLVAD_LIKE

    cases: dict[str, tuple[list[str], int, str]] = {}

    def vpn_cfg(name: str, provider: str, kind: str = "wireguard", extra: str = "") -> str:
        cfg = tmp / f"{name}.toml"
        cfg.write_text((ROOT / "configs/vpn.toml").read_text()
                       .replace('type = "wireguard"', f'type = "{kind}"')
                       .replace('"lab:wireguard"', f'"{provider}"') + extra)
        return str(cfg)

    def ovpn(name: str, line: str) -> str:
        f = tmp / f"{name}.ovpn"
        f.write_text(OVPN_INLINE.replace("verb 3", line))
        return vpn_cfg(name, str(f), "openvpn")

    def wg(name: str, endpoint: str) -> str:
        f = tmp / f"{name}.conf"
        f.write_text(WG_MULLVAD_LIKE.replace("185.65.134.1:51820", endpoint))
        return vpn_cfg(name, str(f))

    latin = tmp / "latin1.toml"
    latin.write_bytes('[qubes.sys-net]\nkind = "net"\nlabel = "r\xe9d"\n'.encode("latin-1"))
    utf16 = tmp / "utf16.conf"
    utf16.write_bytes(WG_MULLVAD_LIKE.encode("utf-16"))
    cases["non-utf8 toml"] = (["up", str(latin), "--lab"], 2, "not UTF-8")
    cases["utf16 provider"] = (["up", vpn_cfg("u16", str(utf16)), "--lab"], 2, "not UTF-8")
    cases["auth-user-pass /etc/shadow"] = (["up", ovpn("shadow", "auth-user-pass /etc/shadow"),
                                           "--lab"], 2, "outside the provider file's folder")
    cases["ca /etc/shadow"] = (["up", ovpn("ca", "ca /etc/shadow"), "--lab"], 2,
                               "outside the provider file's folder")
    cases["endpoint list"] = (["up", wg("list", "a.example:1,b.example:2"), "--lab"], 2,
                              "neither an address nor a host name")
    cases["endpoint in the chain"] = (["up", wg("chain", "10.137.0.9:51820"), "--lab"], 2,
                                      "netstack's own range")
    cases["endpoint loopback"] = (["up", wg("lo", "127.0.0.1:51820"), "--lab"], 2, "loopback")
    d6 = tmp / "dns6.toml"
    d6.write_text((ROOT / "configs/vpn.toml").read_text().replace(
        'config = "lab:wireguard"', 'config = "lab:wireguard"\ndns = ["2001:db8::53"]'))
    cases["vpn dns of the wrong family"] = (["up", str(d6), "--lab"], 2, "not an IPv4 address")
    cases["unknown command"] = (["frobnicate"], 2, "invalid choice")
    cases["status of a stack that is not up"] = (["--stack", "nosuch", "status", "--json"], 3,
                                                 "is not up")
    cases["down of a stack that is not up"] = (["--stack", "nosuch", "down"], 3, "is not up")
    cases["audit of a ruleset file that is not JSON"] = (
        ["audit", "--ruleset", str(latin)], 2, "cannot read it")
    return cases


def test_bad_inputs_get_one_line_and_change_nothing(tmp_path, own_stack):
    before = snapshot_host()
    for name, (args, code, needle) in provider_cases(tmp_path).items():
        s = own_stack("b")
        p = cli(*(["--stack", s] if "--stack" not in args else []), *args, check=False)
        assert p.returncode == code, (name, p.returncode, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("netstack: ") and needle in lines[0], \
            (name, p.stderr)
        assert "Traceback" not in p.stderr
        if "--json" in args:
            assert json.loads(p.stdout) == {"ok": False, "error": lines[0][10:],
                                            "exit_code": code}
        assert snapshot_host() == before, name
        assert not os.path.exists(f"/run/netstack/{s}")


def test_commands_that_need_root_say_so_first(tmp_path):
    """As an unprivileged user: one line, exit 2, and no pcaps folder made."""
    pw = shutil.which("setpriv")
    assert pw
    for args in (["status"], ["down"], ["audit"], ["leaktest", "--pcaps", str(tmp_path / "p")],
                 ["tor", "status"], ["up", BASIC, "--lab"]):
        p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-m", "netstack.cli", *args], capture_output=True,
                           text=True, cwd=ROOT)
        assert p.returncode == 2 and "needs root" in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_ctrl_c_while_waiting_for_tor_leaves_the_stack_up_and_says_so(monkeypatch, tmp_path,
                                                                     own_stack):
    # a cold lab Tor network of its own, so there is a wait to interrupt (a warm one from
    # the run's cache can be ready before the first progress line)
    monkeypatch.setenv("NETSTACK_LAB_TOR_CACHE", str(tmp_path / "labtor"))
    s = own_stack("w")
    p = subprocess.Popen([sys.executable, "-m", "netstack.cli", "--stack", s, "up", "--lab"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stderr is not None
    import re

    for line in p.stderr:  # not a tty: one progress line per step; an early one, so the
        m = re.match(r"tor sys-whonix \[[# .]*\]\s+(\d+)%", line)  # wait is still on
        if m and int(m.group(1)) < 50:
            break
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(30) == 130
    last = rest.strip().splitlines()[-1]
    assert last.startswith("netstack: stopped waiting; stack") and "is left up" in last
    assert f"netstack --stack {s} down" in last and "Traceback" not in rest
    st = json.loads(cli("--stack", s, "status", "--json", check=False).stdout)
    assert st["status"] == "up" and all(q["running"] for q in st["qubes"])
