"""netstack installed like a system tool (issue 29 item 5), in scripts/test-host's VM: the
Debian package built on the host from the project at HEAD (scripts/build-deb, staged by
tests/host/stage-deb.sh with the Debian packages it depends on that the image lacks) is
installed with `dpkg -i`, which refuses it if a declared dependency is missing; then, with
the installed files only (/usr/bin/netstack, never the checkout's venv):

- `netstack --help`, the man pages (one per command), a shipped config found by name;
- `systemctl start netstack@debt`: the template unit brings up /etc/netstack/debt.toml
  (the shipped vpn.toml: the lab's WireGuard provider, so daemons that the supervisor starts
  as `sys.executable -m netstack...` run in the package's environment too; `up debt` found
  the file there) with the uplink of /etc/netstack/debt.env; its records are in the journal
  with netstack's fields (up, each daemon's start, the tunnel ready, connected); Debian's
  python3-prometheus-client serves `metrics`; an anti-test: a NAME with no config fails
  the unit at once (exit 2, no restart loop), its one error record has the fields, and the
  unit's output has no plain copy of the line;
- bash completion, through the installed hook, of a qube name of the running stack
  (anti-test: no such name while the stack is down);
- `dpkg -r` removes the command and leaves the user's configs."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.util import stack_leftovers, wait_for

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
STAGED = ROOT / "tests" / "host" / ".deb"  # put in the input tar by tests/host/stage-deb.sh
STACK = "debt"
BAD = "debtno"  # a NAME with no config anywhere
ETC = Path("/etc/netstack")
NETSTACK = "/usr/bin/netstack"


def sh(*cmd: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def journal(*match: str) -> list[dict]:
    out = sh("journalctl", *match, "-o", "json", "--no-pager", check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def netstack_records(stack: str, event: str) -> list[dict]:
    """By netstack's own fields (a record of a process that exited at once may lack
    journald's _SYSTEMD_UNIT: it reads the sender's cgroup from /proc after the fact)."""
    return [r for r in journal(f"NETSTACK_STACK={stack}", f"NETSTACK_EVENT={event}")
            if r.get("SYSLOG_IDENTIFIER") == "netstack"]


def complete(line: str) -> list[str]:
    """What bash's completion of `line` offers through the installed hook (the function
    bash calls on TAB, with the variables bash sets), as the user's shell runs it."""
    script = (
        "source /usr/share/bash-completion/completions/netstack\n"
        f"COMP_LINE={line!r}\nCOMP_POINT=${{#COMP_LINE}}\n"
        "read -r -a COMP_WORDS <<<\"$COMP_LINE\"\n"
        "[[ $COMP_LINE == *' ' ]] && COMP_WORDS+=('')\n"
        "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )) COMP_TYPE=9\n"
        "_python_argcomplete netstack\n"
        "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"  # the installed command, not the venv's
    p = sh("bash", "--norc", "--noprofile", "-c", script, env=env, timeout=60)
    return [w.strip() for w in p.stdout.splitlines() if w.strip()]


@pytest.fixture(scope="module")
def installed():
    if (STAGED / "not-staged").exists():
        pytest.skip("scripts/test-host ran with NETSTACK_TEST_HOST_DEB=0: no package staged")
    debs = sorted(STAGED.glob("netstack_*.deb"))
    deps = sorted((STAGED / "deps").glob("*.deb"))
    assert debs, (f"no package in {STAGED}: scripts/test-host stages it (tests/host/"
                  "stage-deb.sh; its log is stage-deb.log in the run's logs)")
    assert not Path(NETSTACK).exists(), f"{NETSTACK} before the install"
    p = sh("dpkg", "-i", *map(str, deps), str(debs[-1]), check=False)
    assert p.returncode == 0, f"dpkg -i failed:\n{p.stdout}\n{p.stderr}"
    try:
        yield debs[-1]
    finally:
        for unit in (f"netstack@{STACK}.service", f"netstack@{BAD}.service"):
            sh("systemctl", "stop", unit, check=False)
            sh("systemctl", "reset-failed", unit, check=False)
        for f in (f"{STACK}.toml", f"{STACK}.env", f"{BAD}.env"):
            (ETC / f).unlink(missing_ok=True)
        sh("dpkg", "-r", "netstack", check=False)
        names = [Path(d).name.split("_")[0] for d in deps]
        sh("dpkg", "-r", *names, check=False)


def test_installed_command_help_and_man_pages(installed):
    p = sh(NETSTACK, "--help", cwd="/")
    assert p.stdout.startswith("usage: netstack"), p.stdout[:200]
    # the installed command runs the package's own environment, not the checkout's venv
    py = sh("/usr/lib/netstack/bin/python3", "-c",  # cwd /: not the checkout in /opt
            "import netstack, pyroute2, argcomplete, stem, prometheus_client; "
            "print(netstack.__file__, pyroute2.__file__, stem.__file__)", cwd="/").stdout
    assert "/usr/lib/netstack/lib/" in py.split()[0] and "/usr/lib/netstack/" in py.split()[1]
    assert py.split()[2].startswith("/usr/lib/python3/dist-packages/"), py  # Debian's
    listed = sh("dpkg", "-L", "netstack").stdout.split()
    commands = json.loads(sh("/usr/lib/netstack/bin/python3", "-c",
                             "import json; from netstack.cli import parser; "
                             "from netstack.completion import _subparsers; "
                             "print(json.dumps(list(_subparsers(parser()))))").stdout)
    assert "firewall" in commands and len(commands) > 10
    for c in ["netstack", *(f"netstack-{c}" for c in commands)]:
        page = f"/usr/share/man/man1/{c}.1.gz"
        assert page in listed, f"{page} not installed"
    text = gzip.decompress(Path("/usr/share/man/man1/netstack-firewall.1.gz").read_bytes())
    assert text.decode().startswith('.TH NETSTACK\\-FIREWALL 1 ')
    if shutil.which("man"):  # the image has no man-db: tests/unit/test_deb.py renders them
        out = sh("man", "-P", "cat", "netstack-firewall").stdout
        assert "netstack-firewall" in out
    for f in ("/usr/share/bash-completion/completions/netstack",
              "/usr/share/zsh/vendor-completions/_netstack",
              "/lib/systemd/system/netstack@.service"):
        assert f in listed
    assert Path("/etc/netstack").is_dir() and Path("/var/lib/netstack").is_dir()
    assert sh("getent", "passwd", "netstack-qube").returncode == 0


def test_shipped_config_found_by_name(installed, tmp_path):
    """`plan NAME` from a directory with no configs: /etc/netstack has no tor.toml, so
    the package's /usr/share/netstack/configs/tor.toml is the one."""
    p = sh(NETSTACK, "plan", "tor", "--lab", "--json", cwd=str(tmp_path))
    assert any(q["kind"] == "tor" for q in json.loads(p.stdout)["qubes"]), p.stdout[:300]


def test_template_unit_up_journal_and_completion(installed):
    unit = f"netstack@{STACK}.service"
    assert not [n for n in complete(f"netstack --stack {STACK} firewall ") if n == "work"], \
        "a qube name completed while no stack runs"
    # the lab's WireGuard provider: daemons the supervisor starts as `sys.executable -m
    # netstack...`, which must run in the package's environment too
    shutil.copy("/usr/share/netstack/configs/vpn.toml", ETC / f"{STACK}.toml")
    # the VPN's readiness deadline (default 30 s) is longer under TCG, as test_readme's is
    (ETC / f"{STACK}.env").write_text("NETSTACK_UP_OPTIONS=--lab --vpn-timeout 600\n")
    sh("systemctl", "daemon-reload")
    sh("systemctl", "start", unit, timeout=400)  # Type=notify: returns once READY=1
    assert sh("systemctl", "is-active", unit, check=False).stdout.strip() == "active"
    st = json.loads(sh(NETSTACK, "--stack", STACK, "status", "--json", check=False).stdout)
    assert st["config"] == str(ETC / f"{STACK}.toml"), st.get("config")
    rec = wait_for(lambda: netstack_records(STACK, "up"), timeout=30, what="the up record")
    assert rec[0]["NETSTACK_STACK"] == STACK
    assert rec[0]["NETSTACK_CONFIG"] == str(ETC / f"{STACK}.toml")
    assert rec[0]["NETSTACK_UPLINK_MODE"] == "lab"
    assert {"work", "sys-proxyvm"} <= set(rec[0]["NETSTACK_QUBES"].split())
    assert rec[0]["PRIORITY"] == "5" and rec[0]["_SYSTEMD_UNIT"] == unit
    # said once: the record, not also the plain line on stdout (the journal too there)
    assert not [r for r in journal("-u", unit) if r.get("MESSAGE") == rec[0]["MESSAGE"]
                and "NETSTACK_EVENT" not in r]
    started = netstack_records(STACK, "daemon-start")
    assert started and all(r["NETSTACK_PID"].isdigit() and r["NETSTACK_DAEMON"]
                           for r in started), started
    done = wait_for(lambda: netstack_records(STACK, "connected"), timeout=180,
                    what="the tunnel connected (its record)")
    ready = netstack_records(STACK, "ready")
    assert [r["NETSTACK_QUBE"] for r in ready] == ["sys-proxyvm"], ready
    assert ready[0]["NETSTACK_KIND"] == "vpn" and float(ready[0]["NETSTACK_SECONDS"]) >= 0
    assert done[0]["PRIORITY"] == "5"
    assert not [r for r in journal("-u", unit) if r.get("MESSAGE") == ready[0]["MESSAGE"]
                and "NETSTACK_EVENT" not in r], "the ready line said twice"
    # Debian's python3-prometheus-client (older than the venv's) serves `metrics`
    m = sh(NETSTACK, "--stack", STACK, "metrics")
    assert "netstack_" in m.stdout
    # completion of a qube name of the running stack, through the installed hook
    assert "work" in complete(f"netstack --stack {STACK} firewall w")
    assert {"work", "sys-proxyvm"} <= set(complete(f"netstack --stack {STACK} firewall "))
    sh("systemctl", "stop", unit, timeout=120)
    assert not stack_leftovers(STACK), stack_leftovers(STACK)


def test_template_unit_without_config_fails_once_with_an_error_record(installed):
    unit = f"netstack@{BAD}.service"
    (ETC / f"{BAD}.env").write_text("NETSTACK_UP_OPTIONS=--lab\n")
    p = sh("systemctl", "start", unit, check=False, timeout=120)
    assert p.returncode != 0
    def ups() -> list[dict]:
        return [r for r in netstack_records(BAD, "error") if r["NETSTACK_COMMAND"] == "up"]

    rec = wait_for(ups, timeout=30, what="the error record of up")
    assert len(rec) == 1, rec
    assert rec[0]["PRIORITY"] == "3" and rec[0]["NETSTACK_EXIT_CODE"] == "2"
    assert f"{BAD}.toml" in rec[0]["MESSAGE"]
    # the clean-up before the start (`down` of a stack that is not up) is a notice
    downs = [r for r in netstack_records(BAD, "error") if r["NETSTACK_COMMAND"] == "down"]
    assert downs and {r["PRIORITY"] for r in downs} == {"5"}, downs
    # stderr is the journal there: the line is not in the unit's output a second time
    plain = [r for r in journal("-u", unit) if r.get("MESSAGE") == rec[0]["MESSAGE"]
             and "NETSTACK_EVENT" not in r]
    assert not plain, plain
    show = sh("systemctl", "show", unit, "-p", "NRestarts", "-p", "ExecMainStatus").stdout
    assert "NRestarts=0" in show and "ExecMainStatus=2" in show, show


def test_remove_keeps_configs(installed):
    (ETC / "kept.toml").write_text("# the user's\n")
    try:
        sh("dpkg", "-r", "netstack")
        assert not Path(NETSTACK).exists() and not Path("/usr/lib/netstack").exists()
        assert (ETC / "kept.toml").exists()
    finally:
        (ETC / "kept.toml").unlink(missing_ok=True)
