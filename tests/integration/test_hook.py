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
