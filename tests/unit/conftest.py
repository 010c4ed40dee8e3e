"""Unit tests derive plans from their inputs only: the host's kernel (does it have
WireGuard, flowtables?) is pinned to "neither", and a test that wants the other answer
passes HostCaps itself."""

from __future__ import annotations

import pytest

from netstack import hostcaps


@pytest.fixture(autouse=True)
def _no_host_caps(monkeypatch):
    monkeypatch.setattr(hostcaps, "probe", lambda **_: hostcaps.HostCaps())


@pytest.fixture(autouse=True)
def _own_dirs(tmp_path, monkeypatch):
    """Unit tests never write the host's homes: firewall.json and the qubes' homes live in
    the test's own directory (tests that write state set the run directory themselves)."""
    from netstack import sandbox

    monkeypatch.setattr(sandbox, "HOME_ROOT", str(tmp_path / "lib"))
