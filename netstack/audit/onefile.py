"""`audit --ruleset FILE`: the generic properties of one namespace's ruleset that netstack
did not write (no chain context: default drop per hook, INVALID dropped, IPv6 egress), and
every construct in it the evaluator does not model, named with where it is. Whatever the
file holds, the answer is a list of results, never a traceback: a ruleset the evaluator
cannot read is UNPROVEN with the reason, never PASS."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from netstack.audit.evaluator import Ruleset
from netstack.audit.properties import (
    QubeView,
    Result,
    accepted,
    all_of,
    default_drop,
    none_of,
    not_sockets,
    one_of,
)
from netstack.audit.space import NO_IFACE
from netstack.model import QubeInfo

HOOKS = ("input", "forward", "output")


def invalid_dropped(q: QubeView) -> Result:
    """No packet in conntrack state INVALID is delivered, forwarded or sent: in input,
    forward and output it meets a drop (a rule's or the policy's)."""
    return all_of("INVALID dropped", q,
                  [(h, {**not_sockets(h), "ct_state": one_of("ct_state", "invalid")},
                    accepted) for h in HOOKS],
                  "ct state invalid is dropped in input, forward and output")


def no_ipv6_egress(q: QubeView) -> Result:
    """No IPv6 packet leaves by any interface but loopback, forwarded or locally sent
    (FAIL: the counterexample is IPv6 that does; right for a dual-stack host)."""
    return all_of("no IPv6 egress", q,
                  [(h, {**not_sockets(h), "family": one_of("family", "ipv6"),
                        "oif": none_of("oif", NO_IFACE, "lo")}, accepted)
                   for h in ("forward", "output")],
                  "IPv6 never leaves but to loopback")


CHECKS = (("default drop", default_drop), ("INVALID dropped", invalid_dropped),
          ("no IPv6 egress", no_ipv6_egress))


@dataclass
class FileAudit:
    name: str
    results: list[Result]
    unmodelled: list[dict[str, Any]] = field(default_factory=list)  # construct, where

    @property
    def ok(self) -> bool:
        return all(r.status == "PASS" for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {"ruleset": self.name, "ok": self.ok,
                "results": [r.to_json() for r in self.results],
                "unmodelled": self.unmodelled}


def view(doc: dict[str, Any], name: str) -> QubeView:
    """The file as a qube with no place in a chain: its interfaces are the names its rules
    use (the evaluator's classes come from the rules), eth0 its way out."""
    return QubeView(QubeInfo(name, "app", None, "gray", 0, "-", "192.0.2.7", None, None,
                             ["eth0"]), doc, local_any=True)


def audit(doc: dict[str, Any], path: str) -> FileAudit:
    name = os.path.basename(path)
    try:
        rs = Ruleset(doc)
    except Exception as e:  # noqa: BLE001 (a file from anywhere: never a traceback)
        why = f"the evaluator cannot read this ruleset ({type(e).__name__}: {e})"
        from netstack.audit.paths import PROPERTY

        return FileAudit(name, [Result(p, name, "UNPROVEN", why) for p, _ in CHECKS]
                         + [Result(PROPERTY, name, "UNPROVEN", why)],
                         [{"construct": why, "where": []}])
    q = view(doc, name)
    results = []
    for prop, fn in CHECKS:
        try:
            results.append(fn(q))
        except Exception as e:  # noqa: BLE001
            results.append(Result(prop, name, "UNPROVEN", f"the evaluator failed here "
                                  f"({type(e).__name__}: {e})"))
    # device hooks and tables of other families: a path beside the three hooks above
    from netstack.audit.paths import paths_result, unproven_beside

    paths = paths_result(q, None)
    results = unproven_beside(results, {name: paths}, {}) + [paths]
    return FileAudit(name, results, unmodelled(rs))


def unmodelled(rs: Ruleset) -> list[dict[str, Any]]:
    """Each construct the evaluator does not model, with the rules (chain #handle) it is
    in: a property any of them can influence is UNPROVEN, never PASS."""
    found: dict[str, list[str]] = {}
    # (a `route` chain is a filter chain that routes again after a change of mark or
    # address: the mangle statement that changes them is what is named)
    for rules in rs.compiled.values():
        for r in rules:
            where = f"{r.table} {r.chain} #{r.handle}"
            for u in r.unknown:
                found.setdefault(u, []).append(where)
            for s in r.stmts:
                if s and s[0] == "maybe":
                    found.setdefault(str(s[1]), []).append(where)
    return [{"construct": k, "where": v} for k, v in sorted(found.items())]
