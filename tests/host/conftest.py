"""Boots of scripts/test-host's VM: a test that must see the VM come back from a reboot
(systemd at boot, issue 27 item 5) is marked `@pytest.mark.boot(N)` and runs on the VM's
N-th boot; unmarked tests run on the first. tests/host/vm-run.sh runs pytest once per boot
with the same arguments and NETSTACK_TEST_HOST_BOOT=N; here each run keeps only the tests of
its boot (the others are reported deselected), and when the selection has tests for a later
boot, asks vm-run.sh for it by writing its number to NETSTACK_TEST_HOST_STATE/request-boot.
The VM's root is one qcow2 overlay for all its boots (scripts/test-host), so what a test of
boot 1 writes (a unit installed, a config) is there on boot 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def current_boot() -> int:
    return int(os.environ.get("NETSTACK_TEST_HOST_BOOT", "1"))


def boot_of(item: pytest.Item) -> int:
    m = item.get_closest_marker("boot")
    return int(m.args[0]) if m else 1


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "boot(n): runs on the n-th boot of scripts/test-host's VM (default 1)")


@pytest.hookimpl(trylast=True)  # after -k and -m have chosen
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    now = current_boot()
    keep = [i for i in items if boot_of(i) == now]
    later = sorted({boot_of(i) for i in items if boot_of(i) > now})
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if boot_of(i) != now])
        items[:] = keep
    state = os.environ.get("NETSTACK_TEST_HOST_STATE")
    if later and state:
        Path(state).mkdir(parents=True, exist_ok=True)
        Path(state, "request-boot").write_text(f"{later[0]}\n")
