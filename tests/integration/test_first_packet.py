"""The first handshake is never lost: the first packet through the tunnel arrives within
one handshake round trip of the tunnel's start, not after WireGuard's 5 s retry (issue 16).
The bound is generous (2.5 s from the command's start) yet fails on the retry, and the
anti-test shows it does: a lab rule drops one handshake initiation and the same
measurement goes past the bound (root)."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from netstack import netns
from tests.integration.util import (
    ROOT,
    cli,
    in_ns,
    load_state,
    new_stack_name,
    reap_zombies,
    stack_leftovers,
)

pytestmark = pytest.mark.root

WEB = "198.51.100.80"
BOUND = 2.5  # one handshake round trip in the lab is ~1 ms; the retry is 5 s
RUNS = 3


def first_connect(ns: str, t0: float, limit: float = 12.0) -> float:
    """Seconds from t0 to the first TCP connect from `ns` to the lab web server."""
    while True:
        with netns.entered(ns):
            s = socket.socket()
        s.settimeout(0.1)
        try:
            s.connect((WEB, 80))
            return time.monotonic() - t0
        except OSError:
            if time.monotonic() - t0 > limit:
                raise
            time.sleep(0.002)
        finally:
            s.close()


def up_and_measure(kind: str, tmp_path) -> tuple[str, float]:
    stack, t, _ = up_and_phases(kind, tmp_path)
    return stack, t


def up_and_phases(kind: str, tmp_path) -> tuple[str, float, dict[str, float | None]]:
    """`up --no-wait`, then the first connect through the tunnel; with the phases in
    seconds after `up` began (where the time went when the bound is missed): `up`
    returned, the tunnel's daemon started, its hook configured the device, the latest
    handshake (WireGuard, whole seconds), the first connect."""
    backend = "openvpn" if kind == "openvpn" else (kind.partition("-")[2] or "wireguard-go")
    cfg = (ROOT / "configs" / "vpn.toml").read_text()
    if kind == "openvpn":
        cfg = cfg.replace('type = "wireguard"', 'type = "openvpn"').replace(
            "lab:wireguard", "lab:openvpn")
    else:
        cfg = cfg.replace('\ntype = "wireguard"',
                          f'\ntype = "wireguard"\nbackend = "{backend}"')
    path = tmp_path / f"{kind}.toml"
    path.write_text(cfg)
    stack = new_stack_name("fp")
    t0, w0 = time.monotonic(), time.time()
    cli("--stack", stack, "up", str(path), "--lab", "--no-wait")
    up_s = time.monotonic() - t0
    try:
        # give up 12 s after `up` returned (it alone took over 12 s in the loaded VM; the
        # suite's slowness factor there: the hook, a Python process, starts that much later)
        t = first_connect(f"nst-{stack}-work", t0,
                          up_s + 12.0 * float(os.environ.get("NETSTACK_TEST_SLOW", "1")))
    except BaseException:
        down(stack)
        raise
    phases: dict[str, float | None] = {"up": up_s}
    try:
        from tests.integration.util import children, wait_for

        # the supervisor records the hook's "configured" when it reads the line: on a
        # loaded host the first connect can come before that (CI 2026-12-07: None)
        c = wait_for(lambda: (x := children(stack)["vpn-sys-proxyvm"]).configured_at and x,
                     10 * float(os.environ.get("NETSTACK_TEST_SLOW", "1")), 0.02,
                     "the supervisor to record the tunnel configured")
        phases["daemon"] = c.started_at - w0
        phases["configured"] = c.configured_at - w0 if c.configured_at else None
        if kind != "openvpn":
            info = load_state(stack).plan.qube("sys-proxyvm").info
            hs = in_ns(info.netns, "wg", "show", info.dev, "latest-handshakes").stdout.split()
            phases["handshake"] = int(hs[1]) - w0 if len(hs) > 1 and hs[1] != "0" else None
    except Exception as e:  # the phases explain; the measurement is what is asserted
        phases["error"] = None
        print(f"phases of {stack}: {e!r}")
    phases["connect"] = t
    return stack, t, {k: round(v, 2) if v is not None else None for k, v in phases.items()}


def down(stack: str) -> None:
    cli("--stack", stack, "down", "--purge", check=False)
    reap_zombies()
    assert stack_leftovers(stack) == []


@pytest.mark.parametrize("kind", ["wireguard", "openvpn", "wireguard-kernel"])
def test_first_packet_within_a_round_trip_of_up(kind, tmp_path):
    """From `up` (not waiting for the tunnel) to the first connect through it, each run
    under the bound: the lab's server answers before the client's go signal and the route
    to it exists before the tunnel device goes up. "wireguard" is wireguard-go, proven on
    every host; "wireguard-kernel" the kernel's WireGuard, where the kernel has it."""
    if kind == "wireguard-kernel":
        from tests.integration.test_vpn import kernel_wireguard

        if why := kernel_wireguard():
            pytest.skip(why)
    took, phases = [], []
    for _ in range(RUNS):
        stack, t, ph = up_and_phases(kind, tmp_path)
        try:
            s = json.loads(cli("--stack", stack, "status", "--json").stdout)
        finally:
            down(stack)
        took.append(round(t, 2))
        phases.append(ph)
        v = next(q for q in s["qubes"] if q["name"] == "sys-proxyvm")["vpn"]
        assert v["backend"] == {"wireguard": "wireguard-go", "openvpn": "openvpn",
                                "wireguard-kernel": "kernel"}[kind]
    print(f"{kind}: phases (s after `up` began): {phases}")
    # The lost initiation's signature: WireGuard retries 5 s after it, so the first packet
    # comes 5 s after the tunnel's start instead of one round trip (~ms) after it. Measured
    # from the hook's "configured" (device up, routes set), this holds on any host, however
    # slow: not scaled.
    after = [round(p["connect"] - p["configured"], 2) for p in phases
             if p.get("configured") is not None]
    assert len(after) == RUNS and max(after) < BOUND, \
        f"first packet {after} s after the tunnel's start: a first handshake was lost " \
        f"(phases, s after `up` began: {phases})"
    # From `up`'s start: on the development machine the bound itself; in scripts/test-host's
    # VM (TCG, every process start ~5-10x slower) scaled by this run's own slowness, the
    # time `up` took to start the tunnel's daemon against the development machine's
    # (docs/field-notes.md, "qemu and Debian's kernel").
    # Each run by its own slowness: a cold first run in the VM reached its daemon in 16.9 s
    # against 8.4 s for the next, and the median's scale failed it with its handshake
    # 0.1 s after the tunnel's start (test-host, 2026-12-07)
    for t, run in zip(took, phases, strict=True):
        scale = vm_factor([run["daemon"]] if run.get("daemon") is not None else [])
        assert t < BOUND * scale, \
            f"first packet after {took} s (bound {BOUND} x {scale:.1f}): a first " \
            f"handshake was lost (phases, s after `up` began: {phases})"


DEV_DAEMON_S = 1.7  # `up` to the tunnel daemon's start: development machine, median, load 11


def vm_factor(daemon_s: list[float]) -> float:
    """1 off the VM; in scripts/test-host's VM how much slower `up` reached the tunnel's
    daemon than on the development machine (median of this test's runs)."""
    import os
    import statistics

    if os.environ.get("NETSTACK_TEST_HOST") != "1" or not daemon_s:
        return 1.0
    return max(1.0, statistics.median(daemon_s) / DEV_DAEMON_S)


def test_anti_a_lost_initiation_is_caught(tmp_path):
    """The lab's VPN server drops the first handshake initiation of each source once; the
    client's peer is set again so it must handshake anew: the measurement now passes the
    bound (WireGuard's retry), and without the drop the same measurement is within it."""
    stack, _ = up_and_measure("wireguard", tmp_path)
    try:
        st = load_state(stack)
        info = st.plan.qube("sys-proxyvm").info
        vpn_ns, lab_ns = info.netns, f"nsl-{stack}-vpn"
        work = f"nst-{stack}-work"
        peer = in_ns(vpn_ns, "wg", "show", info.dev, "peers").stdout.split()[0]

        def rehandshake() -> float:
            in_ns(vpn_ns, "wg", "set", info.dev, "peer", peer, "remove")
            t0 = time.monotonic()
            in_ns(vpn_ns, "wg", "setconf", info.dev, info.conf_path)
            return first_connect(work, t0)

        assert rehandshake() < BOUND
        in_ns(lab_ns, "nft", "-f", "-", input=(
            "table inet fp {\n set seen { type ipv4_addr; flags dynamic; }\n"
            " chain in {\n  type filter hook input priority 0;\n"
            "  udp dport 51820 @th,64,8 1 ip saddr @seen accept\n"
            "  udp dport 51820 @th,64,8 1 add @seen { ip saddr } drop\n }\n}\n"))
        lost = rehandshake()
        assert lost > BOUND, f"a lost initiation went unnoticed ({lost:.2f} s)"
        dropped = in_ns(lab_ns, "nft", "list", "set", "inet", "fp", "seen").stdout
        assert "elements" in dropped  # the drop did happen
    finally:
        down(stack)
