"""How much slower this host runs Python than the development machine, for the few unit
tests that guard against a blow-up (a class explosion: 60 s for a 139-line ruleset) with a
bound on CPU seconds. The targets themselves live in bench/; these bounds only catch an
order-of-magnitude regression, and must hold on a slow host too: scripts/test-host's VM
under emulation ran the same audit 40x slower (69.6 s for 1.77 s here). The reference is
a fixed pure-Python workload timed in the same process, its best of three."""

from __future__ import annotations

import functools
import time

DEV_REFERENCE_S = 0.025  # the workload's CPU on the development machine (0.023-0.024 s)


def _workload() -> int:
    d: dict[int, int] = {}
    for i in range(200_000):
        d[i % 1009] = d.get(i % 1009, 0) + (i ^ (i >> 3))
    return sum(sorted(d.values())[:10])


@functools.cache
def factor() -> float:
    """At least 1: the host's time for the reference over the development machine's."""
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        _workload()
        best = min(best, time.process_time() - t0)
    return max(1.0, best / DEV_REFERENCE_S)
