"""`netstack attach QUBE NETVM|none` (Qubes' `qvm-prefs QUBE netvm OTHER`): move a running
qube to another netvm of the stack, or cut it off.

Through the one live-change path (netstack.live, a transaction): the qube's old link goes
first (from then on nothing of it reaches the old netvm), the rulesets of both netvms and
of the qube are reloaded (the new netvm's anti-spoofing and the qube's own rule list,
enforced there, before any link to it exists), then the new link is made and brought up.
The qube's connections are cut: their entries in the old netvm's and its own conntrack are
deleted, so nothing it opened before continues as if it had not moved. The move holds
until `down` (the config is the one that `up` reads: write `netvm = ...` there to keep
it)."""

from __future__ import annotations

import time
from typing import Any

from netstack.errors import UsageError
from netstack.kernel import Kernel

NONE = "none"


def attach(stack: str, qube: str, netvm: str, kernel: Kernel
           ) -> dict[str, Any]:
    from netstack.disposable import disposables, rebuild
    from netstack.live import after_applied, commit, live
    from netstack.rules import names

    with live(stack, "attach", kernel) as (st, cur, k):
        t0 = time.perf_counter()
        if not cur.has_qube(qube):
            raise UsageError(f"no qube {qube!r} in stack {stack!r}; qubes: "
                             + ", ".join(q.name for q in cur.qubes))
        q = cur.qube(qube)
        if q.traits.provides_network:
            raise UsageError(f"{qube} provides network to others; attach moves app "
                             "qubes only (move its clients instead)")
        target = None if netvm == NONE else netvm
        if target == q.netvm:
            return {"qube": qube, "netvm": target, "from": q.netvm, "changed": False,
                    "applied_s": 0.0, "cut": 0}
        moves = dict(st.data.netvms)
        moves[qube] = target
        desired = rebuild(stack, cur, st.data.config, disposables(cur),
                          netvms=st.data.netvms, moved={qube: target})
        old = q.netvm
        commit(st, cur, desired, k, f"attach {qube} {netvm}", netvms=moves)
        took = time.perf_counter() - t0
        gone = after_applied(f"cutting {qube}'s connections", lambda: cut(cur, q, old, k), 0)
        if target is not None:
            after_applied(f"asking the names of {qube}'s rules",
                          lambda: names.refresh(st.dir, desired, st.data.started, k,
                                                netvms=[target]))
        return {"qube": qube, "netvm": target, "from": old, "changed": True,
                "applied_s": round(took, 4), "cut": gone}


def cut(cur: Any, q: Any, old: str | None, k: Kernel) -> int:
    """The qube's connections end with the move: its entries in the old netvm and in its own
    namespace are deleted (a later packet of one is new, and meets the new netvm's rules)."""
    n = 0
    for ns in ([cur.qube(old).netns] if old else []) + [q.netns]:
        for src in (a for a in (q.ipv4, q.ipv6) if a):
            for f in k.conntrack_list(ns, src):
                k.conntrack_delete(ns, f)
                n += 1
    return n
