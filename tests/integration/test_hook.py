"""The tunnel daemon's post-start hook, on its own in a scratch namespace (root): it is
driven by netlink events and the daemon's pidfd, gives up on an OpenVPN that never connects
at its deadline with the daemon's own last words, and notices the device vanishing."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from netstack.codec import dump
from netstack.vpn.runtime import HookRoute, TunnelSpec
from tests.integration.util import in_ns, new_stack_name

pytestmark = pytest.mark.root


@pytest.fixture
def scratch():
    ns = "nshk-" + new_stack_name("h")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def hook(ns: str, spec: TunnelSpec, tmp_path, pid: int | None = None) -> subprocess.Popen:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(dump(spec)))
    env = {"NETSTACK_DAEMON_PID": str(pid)} if pid else {}
    import os

    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m",
                             "netstack.vpn.hook", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def test_openvpn_that_never_connects_is_given_up_with_its_own_words(scratch, tmp_path):
    log = tmp_path / "openvpn.log"
    log.write_text("Initialization Sequence Started\nTLS Error: TLS key negotiation failed "
                   "to occur within 60 seconds (check your network connectivity)\n")
    in_ns(scratch, "ip", "tuntap", "add", "tun7", "mode", "tun")
    daemon = subprocess.Popen(["sleep", "30"])
    try:
        t0 = time.monotonic()
        p = hook(scratch, TunnelSpec("openvpn", "tun7", None, [], None, [], str(log), 1.0),
                 tmp_path, daemon.pid)
        out, err = p.communicate(timeout=20)
        took = time.monotonic() - t0
    finally:
        daemon.kill()
        daemon.wait()
    assert p.returncode == 1 and "configured" not in out
    assert "no connection within 1 s" in err and "TLS key negotiation failed" in err
    assert took < 5


def test_device_vanishing_is_noticed_from_the_kernel_event(scratch, tmp_path):
    in_ns(scratch, "ip", "tuntap", "add", "tun8", "mode", "tun")
    daemon = subprocess.Popen(["sleep", "30"])
    try:
        p = hook(scratch, TunnelSpec("openvpn", "tun8", None, [], None,
                                     [HookRoute("203.0.113.0/24", "tun8")], None, 10.0),
                 tmp_path, daemon.pid)
        in_ns(scratch, "ip", "link", "set", "tun8", "up")
        in_ns(scratch, "ip", "addr", "add", "10.67.0.9/24", "dev", "tun8")  # "connected"
        assert p.stdout.readline().strip() == "configured"
        assert "203.0.113.0/24 dev tun8" in in_ns(scratch, "ip", "route").stdout
        t0 = time.monotonic()
        in_ns(scratch, "ip", "link", "del", "tun8")
        rc = p.wait(timeout=10)
        assert rc == 3 and time.monotonic() - t0 < 2
        assert "vanished" in p.stderr.read()
    finally:
        daemon.kill()
        daemon.wait()


def test_daemon_exit_ends_the_watch(scratch, tmp_path):
    in_ns(scratch, "ip", "tuntap", "add", "tun9", "mode", "tun")
    in_ns(scratch, "ip", "addr", "add", "10.67.0.9/24", "dev", "tun9")
    daemon = subprocess.Popen(["sleep", "30"])
    p = hook(scratch, TunnelSpec("openvpn", "tun9", None, [], None, [], None, 10.0), tmp_path,
             daemon.pid)
    assert p.stdout.readline().strip() == "configured"
    t0 = time.monotonic()
    daemon.kill()
    daemon.wait()
    assert p.wait(timeout=10) == 0 and time.monotonic() - t0 < 2


def test_keeper_device_is_ours_only_and_goes_with_its_keeper(scratch, tmp_path):
    """Kernel WireGuard's keeper (netstack/vpn/kernelwg.py) marks its device; the kernel
    keeps a device whose keeper was killed with -9. The hook of the next keeper never
    configures the dead keeper's device (its successor deletes it and makes its own), only
    the one with its keeper's mark, and deletes that one the moment its keeper dies.
    Stand-ins: a TUN device for the kernel's, `sleep` for the keeper."""
    import select

    from netstack.vpn.kernelwg import mark

    def device(alias: str) -> None:
        in_ns(scratch, "ip", "tuntap", "add", "tun6", "mode", "tun")
        in_ns(scratch, "ip", "link", "set", "dev", "tun6", "alias", alias)
        in_ns(scratch, "ip", "addr", "add", "10.67.0.9/24", "dev", "tun6")

    device(mark(4194304))  # above pid_max: a keeper that cannot be alive
    keeper = subprocess.Popen(["sleep", "30"])
    try:
        p = hook(scratch, TunnelSpec("openvpn", "tun6", None, [], None, [], None, 10.0,
                                     keeper=True), tmp_path, keeper.pid)
        # the dead keeper's device has an address (what the hook waits for): not ours
        ready, _, _ = select.select([p.stdout], [], [], 1.5)
        assert not ready and p.poll() is None
        in_ns(scratch, "ip", "link", "del", "tun6")  # what the new keeper does first
        device(mark(keeper.pid))
        assert p.stdout.readline().strip() == "configured"
        t0 = time.monotonic()
        keeper.kill()  # -9: no keeper's own clean-up
        keeper.wait()
        assert p.wait(timeout=10) == 0
        took = time.monotonic() - t0
        assert "tun6" not in in_ns(scratch, "ip", "-o", "link").stdout
        assert took < 2, f"the device went {took:.2f} s after its keeper"
        assert f"deleted the device of keeper {keeper.pid}" in p.stderr.read()
    finally:
        keeper.kill()
        keeper.wait()


def test_keeper_device_is_left_alone_by_a_hook_without_the_mark(scratch, tmp_path):
    """The anti-test: another keeper's device (its mark) outlives this hook's keeper."""
    from netstack.vpn.kernelwg import mark

    in_ns(scratch, "ip", "tuntap", "add", "tun5", "mode", "tun")
    keeper = subprocess.Popen(["sleep", "30"])
    in_ns(scratch, "ip", "link", "set", "dev", "tun5", "alias", mark(keeper.pid))
    in_ns(scratch, "ip", "addr", "add", "10.67.0.9/24", "dev", "tun5")
    p = hook(scratch, TunnelSpec("openvpn", "tun5", None, [], None, [], None, 10.0,
                                 keeper=True), tmp_path, keeper.pid)
    assert p.stdout.readline().strip() == "configured"
    in_ns(scratch, "ip", "link", "set", "dev", "tun5", "alias", mark(4194304))
    keeper.kill()
    keeper.wait()
    assert p.wait(timeout=10) == 0
    assert "tun5" in in_ns(scratch, "ip", "-o", "link").stdout
