"""An app qube's commands run in a bubblewrap sandbox: no host unix socket, its own PIDs and
hostname, an unprivileged account (never host root; --root is root of its own user
namespace only), a persistent home, and still only the chain's network (root)."""

from __future__ import annotations

import os
import pwd
import secrets

import pytest

from tests.integration.test_basic_chain import ns
from tests.integration.util import cli, in_ns

pytestmark = pytest.mark.root

WEB, ISP_ADDR = "198.51.100.80", "192.0.2.2"


def run(stack: str, *args: str, check: bool = True):
    return cli("--stack", stack, "exec", "work", *args, check=check, env={"SUDO_USER": ""})


@pytest.fixture
def host_socket():
    """A stand-in for a host service on a unix socket (nscd, resolved's varlink, D-Bus, an
    X server), the one leaktest starts: it answers anyone who connects."""
    from netstack.leaktest.local import stand_in

    with stand_in() as path:
        yield path


CONNECT = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
           "print(s.recv(64).decode().strip())")


def test_a_host_unix_socket_is_out_of_reach(basic_stack, host_socket):
    # anti-test: a bare namespace (what app qubes were) reaches the host's service
    bare = in_ns(ns(basic_stack, "work"), "setpriv", "--reuid=65534", "--regid=65534",
                 "--clear-groups", "--", "/usr/bin/python3", "-c", CONNECT, host_socket)
    assert bare.stdout.strip() == "stand-in host service"
    p = run(basic_stack, "--", "/usr/bin/python3", "-c", CONNECT, host_socket, check=False)
    assert p.returncode != 0 and "stand-in host service" not in p.stdout
    assert "No such file" in p.stderr or "FileNotFoundError" in p.stderr


def test_the_sandbox_is_its_own_little_machine(basic_stack):
    out = run(basic_stack, "--", "sh", "-c",
              "id -u; hostname; cat /etc/hostname; ls /proc | grep -c '^[0-9]'; "
              "ls -A /run /tmp; test -e /run/netstack && echo STATE-VISIBLE; "
              "test -e /var/lib/netstack && echo HOMES-VISIBLE; echo end").stdout.split("\n")
    account = pwd.getpwnam("netstack-qube")
    assert out[0] == str(account.pw_uid)  # no sudo user: the dedicated account
    assert out[1] == "work" and out[2] == "work"
    assert int(out[3]) <= 4  # sh, ls, grep, and bwrap's init: no host process
    assert "STATE-VISIBLE" not in out and "HOMES-VISIBLE" not in out
    assert out[-2] == "end"


def test_root_inside_is_not_root_outside(basic_stack):
    p = run(basic_stack, "--root", "--", "sh", "-c",
            "id -u; cat /etc/shadow >/dev/null 2>&1 && echo READ-SHADOW; "
            "ip link add nstkx type veth peer name nstky 2>&1 || echo NO-NET-ADMIN; "
            "ip addr add 10.137.0.99/32 dev eth0 2>&1 || echo NO-ADDR")
    lines = p.stdout.split("\n")
    assert lines[0] == "0"
    assert "READ-SHADOW" not in p.stdout
    assert "NO-NET-ADMIN" in p.stdout and "NO-ADDR" in p.stdout
    assert "nstkx" not in in_ns(ns(basic_stack, "work"), "ip", "-o", "link").stdout


def test_never_host_root(basic_stack):
    for user in ("root", "0"):
        p = run(basic_stack, "--user", user, "--", "id", "-u", check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--root" in p.stderr


def test_home_persists_and_the_network_is_the_chain(basic_stack):
    m = secrets.token_hex(4)
    run(basic_stack, "--", "sh", "-c", f"echo {m} > ~/note")
    assert run(basic_stack, "--", "cat", "note").stdout.strip() == m  # cwd is the home
    host = f"/var/lib/netstack/{basic_stack}/work/home/note"
    with open(host) as f:
        assert f.read().strip() == m
    assert os.stat(host).st_uid == pwd.getpwnam("netstack-qube").pw_uid
    out = run(basic_stack, "--", "curl", "-sS", "--max-time", "5", f"http://{WEB}/").stdout
    assert out.strip() == ISP_ADDR


def test_state_and_logs_are_root_only(basic_stack):
    """Even outside a sandbox, an unprivileged user cannot read the stack's state, plan
    (the ISP-facing address in --uplink mode) or daemon logs."""
    d = f"/run/netstack/{basic_stack}"
    for root, _dirs, files in os.walk(d):
        if root == os.path.join(d, "public") or root.startswith(os.path.join(d, "public/")):
            # what sandboxes read: ids, the seccomp filter (sandbox.PUBLIC), the call
            # layer's client and sockets (a caller outside the qube is refused: test_calls)
            continue
        for name in files:
            mode = os.stat(os.path.join(root, name)).st_mode
            assert not mode & 0o044 or root != d and not os.stat(root).st_mode & 0o005, \
                (root, name, oct(mode))
    p = in_ns(ns(basic_stack, "work"), "setpriv", "--reuid=65534", "--regid=65534",
              "--clear-groups", "--", "cat", f"{d}/plan.json", check=False)
    assert p.returncode != 0 and "Permission denied" in p.stderr


def test_an_ephemeral_home_is_gone_after_each_command(own_stack, tmp_path):
    from tests.integration.util import ROOT

    cfg = tmp_path / "eph.toml"
    cfg.write_text((ROOT / "configs" / "basic.toml").read_text().replace(
        "[qubes.work]\n", '[qubes.work]\nhome = "ephemeral"\n'))
    s = own_stack("e")
    cli("--stack", s, "up", str(cfg), "--lab")
    env = {"SUDO_USER": ""}
    out = cli("--stack", s, "exec", "work", "--", "sh", "-c",
              "pwd; ls -A ~ | wc -l; echo x > ~/f && cat ~/f", env=env).stdout.split()
    assert out == ["/home/user", "0", "x"]
    assert cli("--stack", s, "exec", "work", "--", "ls", "-A", "/home/user",
               env=env).stdout == ""
    assert not os.path.exists(f"/var/lib/netstack/{s}/work")


def test_status_shows_what_each_app_qube_is_given(basic_stack):
    import json

    s = json.loads(cli("--stack", basic_stack, "status", "--json").stdout)
    q = {x["name"]: x for x in s["qubes"]}
    assert q["work"]["sandbox"] == {"kind": "bubblewrap", "home": "persistent",
                                    "home_path": f"/var/lib/netstack/{basic_stack}/work/home",
                                    "grants": [], "warnings": []}
    assert "sandbox" not in q["sys-firewall"]
    out = cli("--stack", basic_stack, "status").stdout
    assert "sandbox: bubblewrap, persistent home" in out and "grants: none" in out
