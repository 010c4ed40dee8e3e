"""Shared fixtures. Root-only tests skip without root, except under CI (NETSTACK_REQUIRE_ROOT=1)
where a skip would hide a missing proof, so they fail instead."""

from __future__ import annotations

import ctypes
import os
import signal

import pytest

PR_SET_CHILD_SUBREAPER = 36

# scripts/test runs the suite on two pytest-xdist workers. Each worker's stacks get a
# letter of its own after NETSTACK_TEST_STACK_PREFIX, so that what one worker's test checks
# on the host (tests/integration/util.py snapshot_host) can tell the other's stacks from
# its own. Set at import, before a test makes a name.
WORKER_LETTERS = "xyzuvw"
# An xdist worker starts with SIGINT ignored, and so does a pytest a non-interactive shell
# started in the background (a CI runner's `cmd &`): every program a test starts would
# inherit that (Ctrl-C tests, a prompt dismissed with Ctrl-C: nothing happened). Python's
# handler is put back; a handler is reset to the default at exec, as under a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN or \
        os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    signal.signal(signal.SIGINT, signal.default_int_handler)
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    _n = int(os.environ["PYTEST_XDIST_WORKER"][2:])
    os.environ.setdefault("NETSTACK_TEST_BASE_PREFIX",
                          os.environ.get("NETSTACK_TEST_STACK_PREFIX", ""))
    os.environ["NETSTACK_TEST_STACK_PREFIX"] = (os.environ["NETSTACK_TEST_BASE_PREFIX"]
                                                + WORKER_LETTERS[_n % len(WORKER_LETTERS)])

# tests/host runs only inside scripts/test-host's VM (a Debian kernel with modules, systemd
# as PID 1): tests/host/vm-run.sh sets NETSTACK_TEST_HOST=1 there
collect_ignore = [] if os.environ.get("NETSTACK_TEST_HOST") == "1" else ["host"]

if os.geteuid() == 0:
    # Daemons that `netstack up` detaches are re-parented to us rather than to a PID 1 that
    # may never reap them; tests reap them after `down` (see reap_zombies).
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def pytest_configure(config):
    # pyproject.toml keys scripts/test-host's image cache, so the marker is declared here
    config.addinivalue_line(
        "markers", "fresh_host: a small representative set of root tests that "
        "tests/host/test_readme.py runs through `scripts/test` on a fresh Debian in "
        "scripts/test-host's VM (`-m 'not root or fresh_host'`): the basic chain with real "
        "packets, up/down leaving nothing, a moved uplink")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    if os.environ.get("NETSTACK_REQUIRE_ROOT") == "1":
        raise pytest.UsageError("NETSTACK_REQUIRE_ROOT=1 but not running as root")
    skip = pytest.mark.skip(reason="needs root (namespaces, nftables, packets)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
