"""NETSTACK_SLOW_FACTOR (netstack.kernel.slow_factor): the deadlines netstack gives its own
daemons scale with it on a slow host (scripts/test-host's VM under emulation); a value that
is not a number from 1 to 100 is refused in one line, never silently taken as 1."""

from __future__ import annotations

import pytest

from netstack.errors import UsageError
from netstack.kernel import slow_factor


def test_default_is_one(monkeypatch):
    monkeypatch.delenv("NETSTACK_SLOW_FACTOR", raising=False)
    assert slow_factor() == 1.0
    monkeypatch.setenv("NETSTACK_SLOW_FACTOR", " ")
    assert slow_factor() == 1.0


def test_a_factor_is_taken(monkeypatch):
    monkeypatch.setenv("NETSTACK_SLOW_FACTOR", "5")
    assert slow_factor() == 5.0


@pytest.mark.parametrize("bad", ["fast", "0.5", "0", "-2", "1000", "nan"])
def test_a_bad_factor_is_refused_in_one_line(monkeypatch, bad):
    monkeypatch.setenv("NETSTACK_SLOW_FACTOR", bad)
    with pytest.raises(UsageError) as e:
        slow_factor()
    assert "\n" not in str(e.value) and "NETSTACK_SLOW_FACTOR" in str(e.value)
