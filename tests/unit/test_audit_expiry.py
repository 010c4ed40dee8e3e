"""The live audit waits out the moment an expiring per-qube rule ends: its reference drops
the rule up to a second before its end, the kernel's set element goes up to a second after,
and an audit in between failed a whole chain (seen in a full run: "work reaches exactly
what its rules allow" FAIL 6 s after `up` with an `expire = "+6"` rule)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from netstack.audit import EXPIRY_WINDOW, expiry_settle
from netstack.rules.qubefw import parse


def plan(*lists):
    return SimpleNamespace(qubes=[SimpleNamespace(firewall=parse("q", x) if x else None)
                                  for x in lists])


@pytest.mark.parametrize("now,wait", [
    (100.0, 0.0),                       # long before: nothing to wait for
    (106 - EXPIRY_WINDOW, EXPIRY_WINDOW * 2),  # the window opens: wait past its end
    (106.0, EXPIRY_WINDOW),            # at the end
    (106 + EXPIRY_WINDOW - 0.1, 0.1),
    (106 + EXPIRY_WINDOW, 0.0),        # past: the kernel and the reference agree
])
def test_wait_only_around_an_end(now, wait):
    p = plan([{"action": "accept", "expire": "+6"}, {"action": "drop"}], None)
    assert expiry_settle(p, 100.0, now) == pytest.approx(wait)


def test_absolute_expiry_and_the_latest_end_in_the_window():
    p = plan([{"action": "accept", "expire": 1_700_000_010}],
             [{"action": "accept", "expire": "+10"}])  # from `up`: also at 1_700_000_010
    assert expiry_settle(p, 1_700_000_000, 1_700_000_010) == pytest.approx(EXPIRY_WINDOW)
    assert expiry_settle(plan(None, [{"action": "drop"}]), 0.0, 5.0) == 0.0
