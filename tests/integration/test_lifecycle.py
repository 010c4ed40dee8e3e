"""Bring-up and tear-down: nothing left behind, crash recovery, invalid input changes
nothing, stacks side by side, a moved uplink (root)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from netstack import netns
from netstack.state import ProcessRec, State
from tests.integration.util import (
    BASIC,
    cli,
    in_ns,
    reap_zombies,
    snapshot_host,
    stack_leftovers,
    stand_in_host,
    wait_for,
)

pytestmark = pytest.mark.root


@pytest.mark.fresh_host
def test_down_leaves_nothing(own_stack):
    s = own_stack("d")
    before = snapshot_host()
    cli("--stack", s, "up", BASIC, "--lab")
    st = State.load(s)
    sup = [o for o in st.objects if isinstance(o, ProcessRec) and o.pid]
    assert sup and os.path.exists(f"/proc/{sup[0].pid}")
    want = {n.name for n in st.plan.namespaces}
    assert len(want) == 8  # 4 qubes + lab: isp, web, dns, vpn
    assert {n for n in netns.list_names() if f"-{s}-" in n} == want
    cli("--stack", s, "down")
    reap_zombies()
    assert not stack_leftovers(s)
    assert not os.path.exists(f"/proc/{sup[0].pid}"), "supervisor still there"
    after = snapshot_host()
    assert after == before
    # down of a stack that is not up is a clear error with its own exit code
    p = cli("--stack", s, "down", check=False)
    assert p.returncode == 3 and "not up" in p.stderr


@pytest.mark.parametrize("crash_after", [1, 4, 13, 22, "last"])
def test_crash_mid_up_then_down_leaves_nothing(own_stack, crash_after):
    s = own_stack("c")
    before = snapshot_host()
    if crash_after == "last":  # after the supervisor was started and recorded
        cli("--stack", s, "up", BASIC, "--lab")
        crash_after = len(State.load(s).objects)
        cli("--stack", s, "down")
        reap_zombies()
    p = cli("--stack", s, "up", BASIC, "--lab", check=False,
            env={"NETSTACK_TEST_CRASH_AFTER": str(crash_after)})
    assert p.returncode == -9
    st = State.load(s)
    assert st is not None and st.data.status == "partial"
    assert len(st.objects) == crash_after
    cli("--stack", s, "down")
    reap_zombies()
    assert not stack_leftovers(s)
    assert snapshot_host() == before


def test_up_repairs_a_half_made_stack(own_stack):
    s = own_stack("r")
    p = cli("--stack", s, "up", BASIC, "--lab", check=False,
            env={"NETSTACK_TEST_CRASH_AFTER": "10"})
    assert p.returncode == -9
    p = cli("--stack", s, "up", BASIC, "--lab")
    assert "repaired" in p.stderr
    out = cli("--stack", s, "exec", "work", "--", "curl", "-sS", "--max-time", "5",
              "http://198.51.100.80/").stdout
    assert out.strip() == "192.0.2.2"
    # a running stack is reported, never duplicated
    p = cli("--stack", s, "up", BASIC, "--lab", check=False)
    assert p.returncode == 3 and "already up" in p.stderr
    assert len([n for n in netns.list_names() if f"-{s}-" in n]) == 8


BAD_CONFIGS = {
    "unknown_netvm": '[qubes.sys-net]\nkind = "net"\n[qubes.w]\nkind = "app"\nnetvm = "x"\n',
    "cycle": ('[qubes.sys-net]\nkind = "net"\n[qubes.a]\nkind = "firewall"\nnetvm = "b"\n'
              '[qubes.b]\nkind = "firewall"\nnetvm = "a"\n'),
    "unknown_key": '[qubes.sys-net]\nkind = "net"\nfoo = 1\n',
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_invalid_config_changes_nothing(own_stack, tmp_path, name):
    s = own_stack("i")
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(BAD_CONFIGS[name])
    before = snapshot_host()
    p = cli("--stack", s, "up", str(cfg), "--lab", check=False)
    assert p.returncode == 2
    assert p.stderr.startswith("netstack: config: ") and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr
    assert snapshot_host() == before


def test_bad_cli_input_changes_nothing(own_stack):
    before = snapshot_host()
    for args, code in ((["--stack", "BAD!", "up", "--lab"], 2),
                       (["--stack", own_stack("u"), "up", BASIC], 2),
                       (["--stack", own_stack("u"), "up", BASIC, "--lab", "--uplink", "x"], 2),
                       (["--stack", own_stack("u"), "status"], 3)):
        p = cli(*args, check=False)
        assert p.returncode == code, (args, p.stderr)
        assert "Traceback" not in p.stderr and p.stderr.startswith("netstack: ")
    assert snapshot_host() == before


def test_two_stacks_side_by_side(basic_stack, own_stack):
    s = own_stack("s")
    cli("--stack", s, "up", BASIC, "--lab")
    for st in (basic_stack, s):
        out = cli("--stack", st, "exec", "work", "--", "curl", "-sS", "--max-time", "5",
                  "http://198.51.100.80/").stdout
        assert out.strip() == "192.0.2.2"
    cli("--stack", s, "down")
    reap_zombies()
    # the app qube's home is kept across down/up (like an app qube's private volume)...
    assert stack_leftovers(s) == [f"/var/lib/netstack/{s}"]
    cli("--stack", s, "down", "--purge")  # ...until purged
    assert not stack_leftovers(s)
    out = cli("--stack", basic_stack, "exec", "work", "--", "curl", "-sS", "--max-time", "5",
              "http://198.51.100.80/").stdout
    assert out.strip() == "192.0.2.2"


@pytest.mark.fresh_host
def test_uplink_move_with_a_stand_in_veth(own_stack, tmp_path):
    """--uplink DEV moves the device into sys-net and gives it back on down. Everything runs
    inside a throwaway 'host' namespace, so no real interface is touched."""
    s = own_stack("m")
    cfg = tmp_path / "moved.toml"
    cfg.write_text((Path(BASIC).read_text()).replace(
        'kind = "net"', 'kind = "net"\naddress = "192.0.2.2/24"\ngateway = "192.0.2.1"\n'
        'dns = ["192.0.2.1"]', 1))
    with stand_in_host(s) as (run, host, _router):
        p = run("up", str(cfg), "--uplink", "standin0")
        assert p.returncode == 0, p.stderr
        assert "standin0" not in in_ns(host, "ip", "-o", "link").stdout

        def uplink() -> tuple:
            p = run("status", "--json")
            assert p.returncode == 0, p.stderr
            net = next(q for q in json.loads(p.stdout)["qubes"] if q["name"] == "sys-net")
            return next((i["name"], i["state"].lower(), i["addresses"])
                        for i in net["interfaces"] if i["name"] == "uplink")
        # a moved device's carrier is the kernel's to report (linkwatch: up to a second
        # for a veth whose index equals its peer's, as this stand-in's may)
        wait_for(lambda: uplink() == ("uplink", "up", ["192.0.2.2/24"]), timeout=5,
                 what="the moved uplink up with its address")
        ping = in_ns(f"nst-{s}-work", "ping", "-c", "1", "-W", "2", "192.0.2.1", check=False)
        assert ping.returncode == 0, ping.stdout
        p = run("down")
        assert p.returncode == 0, p.stderr
        assert "standin0" in in_ns(host, "ip", "-o", "link").stdout  # given back, own name


def test_uplink_nat_mode_inside_a_stand_in_host(own_stack, tmp_path):
    """--uplink-mode nat adds a veth, forwarding and one table of ours to the namespace
    netstack runs in, and `down` takes all three back. Run inside a throwaway 'host'
    namespace (nsenter), so the real host's routing and ruleset are never touched."""
    from scapy.layers.inet import IP

    from netstack.leaktest.capture import Capture

    s = own_stack("n")
    cfg = tmp_path / "nat.toml"
    cfg.write_text(Path(BASIC).read_text().replace(
        'kind = "net"', 'kind = "net"\ndns = ["192.0.2.1"]', 1))
    with stand_in_host(s) as (run, host, router):
        in_ns(host, "ip", "addr", "add", "192.0.2.2/24", "dev", "standin0")
        in_ns(host, "ip", "link", "set", "standin0", "up")

        def host_state() -> dict:
            return {"links": in_ns(host, "ip", "-o", "link").stdout.count("\n"),
                    "routes": in_ns(host, "ip", "route").stdout,
                    "nft": in_ns(host, "nft", "list", "ruleset").stdout,
                    "fwd": in_ns(host, "sysctl", "-n", "net.ipv4.ip_forward").stdout}
        before = host_state()
        p = run("up", str(cfg), "--uplink", "standin0", "--uplink-mode", "nat")
        assert p.returncode == 0, p.stderr
        assert "table ip netstack_" in in_ns(host, "nft", "list", "ruleset").stdout
        with Capture(router, "rtr0", str(tmp_path / "rtr.pcap"), "icmp") as cap:
            ping = in_ns(f"nst-{s}-work", "ping", "-c", "1", "-W", "2", "192.0.2.1",
                         check=False)
        assert ping.returncode == 0, ping.stdout
        assert {x[IP].src for x in cap.packets() if IP in x} == {"192.0.2.1", "192.0.2.2"}
        p = run("down")
        assert p.returncode == 0, p.stderr
        assert host_state() == before


@pytest.mark.parametrize("mode", ["move", "nat"])
def test_an_uplink_device_that_does_not_exist_is_refused_before_anything_is_made(
        monkeypatch, tmp_path, own_stack, mode):
    """--uplink of a device the namespace netstack runs in does not have: one line naming
    --uplink and the fix, exit 2, and nothing made (no state, no namespace, the host's
    forwarding, links, routes and ruleset as they were). The device never exists, so the
    check fires before anything of the host is read for NAT. The stand-in tests above are
    the anti-tests: a device that exists is taken."""
    monkeypatch.setenv("NETSTACK_LAB_TOR_CACHE", str(tmp_path))  # own_stack purges it
    s = own_stack("x")
    dev = "nosuchdev0"
    assert dev not in snapshot_host()["link_names"]
    before = snapshot_host()
    fwd = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    p = cli("--stack", s, "up", BASIC, "--uplink", dev, "--uplink-mode", mode, check=False)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith(f"netstack: --uplink {dev}: no such network device")
    assert "fix:" in p.stderr
    assert not os.path.exists(f"/run/netstack/{s}")
    assert not stack_leftovers(s)
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == fwd
    assert snapshot_host() == before


def test_move_mode_gives_the_device_back_to_netstacks_own_namespace(own_stack, tmp_path):
    """Regression (issue 26): `down` gave a moved device to PID 1's namespace, and failed
    ("Permission denied: '/proc/1/ns/net'") where that is not readable. Here netstack runs
    in an unnamed namespace of its own (unshare --net) with PID 1's /proc entry hidden: the
    device comes back there, under its own name, and nothing of the stack is left."""
    import subprocess
    import sys

    s = own_stack("g")
    cfg = tmp_path / "moved.toml"
    cfg.write_text((Path(BASIC).read_text()).replace(
        'kind = "net"', 'kind = "net"\naddress = "192.0.2.2/24"\ngateway = "192.0.2.1"\n'
        'dns = ["192.0.2.1"]', 1))
    ns = [sys.executable, "-m", "netstack.cli", "--stack", s]
    script = (
        "set -u; mount -t tmpfs none /proc/1; "
        "ip link add standin0 type veth peer name standin0p; "
        f"trap '{' '.join(ns)} down >/dev/null 2>&1' EXIT; "
        f"{' '.join(ns)} up {cfg} --uplink standin0 || exit 11; "
        "ip -o link | grep -q standin0: && exit 12; "
        f"{' '.join(ns)} down || exit 13; trap - EXIT; "
        "ip -o link | grep -q 'standin0@' || exit 14; echo back")
    p = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("back"), (p.returncode, p.stderr)
    assert not stack_leftovers(s)


def test_down_ends_what_still_runs_inside_its_namespaces(own_stack, tmp_path):
    """A process the stack never recorded but that runs inside one of its namespaces (a
    sandbox whose `run` was killed while bubblewrap was starting: docs/field-notes.md) is
    ended by `down`; a process in a namespace of another stack is not (the anti-test)."""
    import subprocess

    s, other = own_stack("e"), own_stack("e")
    cli("--stack", s, "up", BASIC, "--lab", "--no-wait")
    cli("--stack", other, "up", BASIC, "--lab", "--no-wait")
    stray = subprocess.Popen(["ip", "netns", "exec", f"nst-{s}-work", "sleep", "600"])
    theirs = subprocess.Popen(["ip", "netns", "exec", f"nst-{other}-work", "sleep", "600"])
    try:
        cli("--stack", s, "down")
        assert stray.wait(timeout=10) == -9  # SIGKILLed by down, inside its namespace
        assert theirs.poll() is None  # the other stack's namespace was not swept
    finally:
        for p in (stray, theirs):
            if p.poll() is None:
                p.kill()
            p.wait()
        reap_zombies()
    assert not stack_leftovers(s)
