"""Real-host tests: they run only inside scripts/test-host's VM (Debian 12's own kernel,
systemd as PID 1, the project installed by scripts/setup.sh), never on the development
machine, whose kernel has no modules and whose PID 1 is not systemd (tests/conftest.py
collects this directory only when NETSTACK_TEST_HOST=1, which tests/host/vm-run.sh sets).
Each test proves one thing the development machine cannot: issue 27."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.util import reap_zombies, stack_leftovers

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
NETSTACK = str(ROOT / "scripts" / "netstack")
WEB, VPN_SERVER = "198.51.100.80", "203.0.113.10"


def sh(*cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def host_view() -> dict[str, str]:
    """What the VM's root namespace has: a stack must leave it as it found it."""
    return {"links": sh("ip", "-o", "link", "show").stdout,
            "routes": sh("ip", "route", "show", "table", "all").stdout,
            "ruleset": sh("nft", "list", "ruleset").stdout,
            "netns": sh("ip", "netns", "list").stdout}


def test_pid1_is_systemd():
    assert Path("/proc/1/comm").read_text().strip() == "systemd"
    state = sh("systemctl", "is-system-running", check=False).stdout.strip()
    # the runner is itself a start-up job, so the system is still "starting" while it runs
    assert state in ("running", "starting", "degraded"), state


def test_debian_kernel_with_modules():
    release = os.uname().release
    assert release.endswith("-amd64"), release
    mods = Path(f"/lib/modules/{release}")
    for name in ("wireguard.ko", "nf_flow_table.ko", "nf_flow_table_inet.ko",
                 "mac80211_hwsim.ko"):
        assert list(mods.rglob(name + "*")), f"{name} not under {mods}"


def test_kernel_wireguard():
    sh("modprobe", "wireguard")
    assert Path("/sys/module/wireguard").is_dir()
    # in a namespace of its own, gone with the command
    p = sh("unshare", "--net", "sh", "-ec",
           "ip link add wgX type wireguard; ip -d link show wgX")
    assert "wireguard" in p.stdout
    from netstack.hostcaps import kernel_wireguard

    assert kernel_wireguard()


FLOWTABLE = """
table inet t {
  flowtable ft { hook ingress priority 0; devices = { va, vb }; }
  chain f { type filter hook forward priority 0; policy accept;
            ct state established meta l4proto { tcp, udp } flow add @ft; }
}
"""


def test_flowtable_loads():
    p = sh("unshare", "--net", "sh", "-ec",
           "ip link add va type veth peer name vb; ip link set va up; ip link set vb up; "
           f"nft -f - <<'NFT'\n{FLOWTABLE}\nNFT\nnft list flowtables")
    assert "flowtable ft" in p.stdout
    from netstack import fastpath

    assert fastpath.supported()


def test_mac80211_hwsim_loads():
    """Item 6 needs two simulated radios; here only that the module gives them."""
    before = set(os.listdir("/sys/class/ieee80211")) if os.path.isdir(
        "/sys/class/ieee80211") else set()
    sh("modprobe", "mac80211_hwsim", "radios=2")
    try:
        phys = set(os.listdir("/sys/class/ieee80211")) - before
        assert len(phys) == 2, phys
    finally:
        sh("modprobe", "-r", "mac80211_hwsim", check=False)


def diagnose(stack: str, name: str) -> None:
    """What a failed stack test needs to be understood from the host: each namespace's
    links, routes, rules, WireGuard state and ruleset, the stack's run files and the
    kernel's log, into the results (NETSTACK_TEST_HOST_OUT, set by vm-run.sh)."""
    out = os.environ.get("NETSTACK_TEST_HOST_OUT")
    if not out:
        return
    parts = []

    def run(*cmd: str) -> None:
        p = sh(*cmd, check=False, timeout=60)
        parts.append(f"$ {' '.join(cmd)}  -> {p.returncode}\n{p.stdout}{p.stderr}")

    run(NETSTACK, "--stack", stack, "status")
    for ns in sh("ip", "netns", "list").stdout.split():
        if f"-{stack}-" not in ns:
            continue
        run("ip", "-n", ns, "-d", "-s", "addr")
        run("ip", "-n", ns, "route", "show", "table", "all")
        run("ip", "-n", ns, "rule")
        run("ip", "netns", "exec", ns, "wg", "show", "all", "dump")
        run("ip", "netns", "exec", ns, "nft", "list", "ruleset")
    run("ps", "-eo", "pid,ppid,stat,cmd")
    for d in (f"/run/netstack/{stack}", f"/var/lib/netstack/{stack}"):
        for f in sorted(Path(d).rglob("*")) if os.path.isdir(d) else []:
            if f.is_file() and f.stat().st_size < 200_000:
                parts.append(f"== {f}\n{f.read_text(errors='replace')}")
    run("dmesg")
    Path(out, f"diag-{name}.txt").write_text("\n".join(parts))


def _vpn_entry(status: dict) -> dict:
    found = []

    def walk(x):
        if isinstance(x, dict):
            if isinstance(x.get("vpn"), dict) and "backend" in x["vpn"]:  # not the lab's
                found.append(x["vpn"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(status)
    assert len(found) == 1, status
    return found[0]


def test_vpn_kernel_backend_up_status_down(tmp_path):
    """`netstack --stack vm1 up configs/vpn.toml --lab` with `backend = "kernel"`: the
    tunnel is kernel WireGuard (a wireguard link, no wireguard-go), status shows it UP,
    traffic goes through it, and `down` leaves the host as it was."""
    stack = "vm1"
    cfg = (ROOT / "configs" / "vpn.toml").read_text()
    assert '\ntype = "wireguard"' in cfg
    cfg = cfg.replace('\ntype = "wireguard"', '\ntype = "wireguard"\nbackend = "kernel"')
    path = tmp_path / "vpn-kernel.toml"
    path.write_text(cfg)
    before = host_view()
    t0 = time.monotonic()
    try:
        try:
            sh(NETSTACK, "--stack", stack, "up", str(path), "--lab", timeout=600)
        except AssertionError:
            diagnose(stack, "vpn-kernel-up")
            raise
        up_s = time.monotonic() - t0
        st = sh(NETSTACK, "--stack", stack, "status", check=False)
        print(st.stdout)
        assert "wireguard (kernel)" in st.stdout and "tunnel UP" in st.stdout, st.stdout
        js = json.loads(sh(NETSTACK, "--stack", stack, "status", "--json", check=False).stdout)
        v = _vpn_entry(js)
        assert (v["backend"], v["tunnel"]) == ("kernel", "up"), v
        ns = f"nst-{stack}-sys-proxyvm"
        link = sh("ip", "-n", ns, "-d", "link", "show", v["dev"]).stdout
        assert "wireguard" in link, link
        # no wireguard-go owns it (the lab's server is one, in its own namespace)
        comms = [Path(f"/proc/{pid}/comm").read_text().strip()
                 for pid in sh("ip", "netns", "pids", ns).stdout.split()
                 if Path(f"/proc/{pid}").exists()]
        assert "wireguard-go" not in comms, comms
        assert not Path(f"/var/run/wireguard/{v['dev']}.sock").exists()
        got = sh("ip", "netns", "exec", f"nst-{stack}-work", "curl", "-sS", "--max-time",
                 "20", f"http://{WEB}/").stdout.strip()
        assert got == VPN_SERVER, got  # the lab web server saw the VPN server's address
        print(f"up took {up_s:.1f} s")
    finally:
        sh(NETSTACK, "--stack", stack, "down", "--purge", check=False, timeout=300)
        reap_zombies()
    assert not stack_leftovers(stack)
    after = host_view()
    assert after == before
