"""The user's invariants (netstack/invariants.py) proven on rulesets, live or generated:
every packet a selected qube could send (the whole region, as audit/e2e.py walks it hop by
hop with each hop's live ruleset and routes) must end in a way out the invariant allows.

A class of packets ends:
- blocked (a drop, no route, forwarding off): no way out;
- delivered to a local socket of a qube Q (its input accepts it): it leaves, if at all,
  the way Q's own traffic does (`invariants.way_out`: Q's protection, else its netvm's),
  and only if Q's own properties hold: every audit result of Q must PASS (for a Tor
  gateway, "gateway output only from tor": only its tor process sends), else the
  invariant fails with Q's counterexample;
- VPN transport on the uplink: `vpn`; in clear on the uplink: `clearnet`;
- forwarded to another client of a netvm: another qube, which no `reach` allows.

`reach = ["tor"]` is then: no packet from the qube reaches the uplink, or any qube past
the gateway, except as what the gateway's tor process sends. A class that ends otherwise
is a FAIL with its packet and its path through the rules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from netstack.audit.e2e import Done, Walk, chain_evaluator, walk_from
from netstack.audit.evaluator import Evaluator, Explosion, Ruleset, packet_of
from netstack.audit.properties import Result
from netstack.audit.space import Unsupported
from netstack.invariants import evaluate, way_out
from netstack.model import Invariant, Plan, QubeInfo


class _Ways(Walk):
    """The e2e walk, each end judged by the invariant's ways out."""

    inv: Invariant
    results: dict[str, list[Result]]
    proxies: set[str]

    def allowed(self, way: str) -> bool:
        return (self.inv.reach is None or way in self.inv.reach) and way not in self.inv.never

    def input(self, q: QubeInfo, trace: list[str], taint: list[str]) -> None:
        def leaf(ev: Evaluator, verdict: str, tr: list, nat: list, tn: list[str]) -> None:
            t = trace + [f"{q.name}: input {verdict}" + (f" ({tr[-1]})" if tr else "")]
            if verdict != "accept":
                self.end("blocked", t, taint + tn)
                return
            self.end(f"proxied {q.name}", t, taint + tn)
        self.ev.explore("input", {}, leaf, rs=self.rulesets[q.netns])

    def end(self, what: str, trace: list[str], taint: list[str]) -> None:
        w = self.ev.point()
        if w is None:
            return
        if what.startswith("proxied "):
            q = what.split(" ", 1)[1]
            way = way_out(self.plan, q)
            self.proxies.add(q)
            key = f"into {q} ({way})"
        else:
            way = {"LEAK": "clearnet", "transport": "vpn", "elsewhere": "another qube"
                   }.get(what)
            key = what if way is None else f"{what} ({way})"
        self.tally[key] = self.tally.get(key, 0) + 1
        bad = way is not None and not (way != "another qube" and self.allowed(way))
        if bad and not taint and isinstance(w, dict):
            self.fail = ("FAIL", packet_of(w), trace + [f"way out: {way}"])
            raise Done
        if (bad or what == "unknown" or taint) and self.fail is None:
            self.fail = ("UNPROVEN", packet_of(w) if isinstance(w, dict) else None,
                         trace + [f"not understood: {'; '.join(taint) or 'a hop'}"])


def prove(plan: Plan, rulesets: dict[str, dict[str, Any]],
          endpoints: set[tuple[str, str, int]], net: dict[str, dict[str, Any]] | None,
          others: Iterable[Result]) -> list[Result]:
    """One result per invariant and qube it selects: the plan's verdict first (a plan that
    breaks it fails without a walk), then the walk over the rulesets. `others`: the audit's
    other results, of which the proxies' must PASS."""
    by_qube: dict[str, list[Result]] = {}
    for r in others:
        by_qube.setdefault(r.qube, []).append(r)
    compiled = {ns: Ruleset(rs) for ns, rs in rulesets.items()}
    out = []
    for v in evaluate(plan):
        inv, ws = v.invariant, plan.qube(v.qube)
        name = f"{inv.title}: {_says(inv)}"
        if not v.ok:
            out.append(Result(name, ws.name, "FAIL", f"the plan breaks it: {v.reason}"))
            continue
        if inv.reach is None and not inv.never:  # netvm_in only: the plan is the proof
            out.append(Result(name, ws.name, "PASS", v.reason))
            continue
        out.append(_walk(plan, compiled, endpoints, net, inv, ws, name, by_qube))
    return out


def _named(bad: list[Result]) -> str:
    """The failing properties, the first with its reason (its counterexample is shown)."""
    more = "".join(f", '{r.property}' {r.status}" for r in bad[1:4])
    return f"'{bad[0].property}' {bad[0].status} ({bad[0].reason}){more}" + \
        (f" and {len(bad) - 4} more" if len(bad) > 4 else "")


def _says(inv: Invariant) -> str:
    parts = []
    if inv.reach is not None:
        parts.append(f"reach only {'/'.join(inv.reach)}")
    if inv.never:
        parts.append(f"never {'/'.join(inv.never)}")
    if inv.netvm_in is not None:
        parts.append(f"netvm in {', '.join(inv.netvm_in)}")
    return "; ".join(parts)


def _walk(plan: Plan, compiled: dict[str, Ruleset], endpoints: set[tuple[str, str, int]],
          net: dict[str, dict[str, Any]] | None, inv: Invariant, ws: QubeInfo, name: str,
          by_qube: dict[str, list[Result]]) -> Result:
    if ws.traits.provides_network or ws.netvm is None:
        # a gateway's own way out is its kind's properties (its output chain), a qube cut
        # off has no link: both are proven by the audit's other results for the qube
        mine = by_qube.get(ws.name, [])
        bad = [r for r in mine if r.status != "PASS"]
        if bad:
            return Result(name, ws.name, bad[0].status, f"its own properties do not hold: "
                          f"{_named(bad)}", bad[0].counterexample, bad[0].trace)
        return Result(name, ws.name, "PASS", f"its own properties hold ({len(mine)} PASS)")
    ev = chain_evaluator(plan, compiled, endpoints, net, ws, plan.chain(ws.name)[1:])
    w = _Ways(plan, compiled, endpoints, net, ev)
    w.inv, w.proxies = inv, set()
    try:
        walk_from(ev, w, plan, ws)
    except (Explosion, Unsupported) as e:
        return Result(name, ws.name, "UNPROVEN", f"not understood: {e}")
    n = sum(w.tally.values())
    if w.fail:
        status, pkt, trace = w.fail
        why = trace[-1] if trace else "?"
        return Result(name, ws.name, status, f"a packet of {ws.name} leaves by another way "
                      f"({why})" if status == "FAIL" else "a hop was not understood",
                      pkt.describe() if pkt else None, trace, n)
    for p in sorted(w.proxies):  # what a qube's local socket took leaves as that qube sends
        bad = [r for r in by_qube.get(p, []) if r.status != "PASS"]
        if bad:
            return Result(name, ws.name, bad[0].status, f"{ws.name}'s packets end in {p}, "
                          f"whose own properties do not hold: {_named(bad)}",
                          bad[0].counterexample, bad[0].trace, n)
    return Result(name, ws.name, "PASS", ", ".join(
        f"{v} {k}" for k, v in sorted(w.tally.items())) + f" of {n} classes", classes=n)
