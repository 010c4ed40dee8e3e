"""Invariants the user declares (issue 28 item 4): `tags = [...]` on a qube and
`[[invariant]]` tables that say which ways out the qubes they select may have.

```toml
[[invariant]]
name = "anon only through Tor"
qubes = "@tag:anon"        # @tag:T, @label:C, @kind:K, @anyvm, or a qube's name
reach = ["tor"]            # its only way out: a Tor gateway (or none: cut off)
never = ["clearnet"]       # ways out it must never have
netvm_in = ["sys-whonix"]  # the netvms it may be attached to (names or @tag:T)
```

A way out is what the nearest qube of the chain with a protection makes of the traffic:
`tor` behind a Tor gateway (it forwards nothing: only its tor process leaves), `vpn`
behind a VPN qube (its kill switch lets only tunnel transport out), `clearnet` when no
qube of the chain protects it; a qube cut off (`attach Q none`) has none and breaks no
`reach` or `never`. A gateway's own way out is its own protection.

Pure: parsing a config's tables (`parse`, called by netstack/config.py) and judging a plan
(`evaluate`, `enforce`): `up` refuses a config that breaks one, and netstack/live.py's
`commit` (the one live-change transaction: `attach`, `run`, `firewall`) refuses a plan
that would. The audit proves the same invariants on the live rulesets
(netstack/audit/invariants.py). The policy of the call layer (issue 28 item 1) hands its
allowed calls to `judge_calls`: a call from a qube under `reach` to a qube with another
way out is a way out too."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from netstack.errors import ConfigError, InvariantError
from netstack.model import Invariant, Plan, QubeInfo

WAYS = ("tor", "vpn", "clearnet")
KEYS = {"qubes", "name", "reach", "never", "netvm_in"}
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MAX_TAGS = 32
SELECTOR_FORMS = "@tag:NAME, @label:COLOR, @kind:KIND, @anyvm or a qube's name"


# --- parsing (config) -------------------------------------------------------------------
def parse_tags(qube: str, value: Any) -> tuple[str, ...]:
    """`tags = ["anon", ...]` of a qube's table: a list of short names (as Qubes' tags)."""
    where = f"qube {qube!r} field 'tags'"
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ConfigError(where, f"{value!r} is not a list of strings",
                          'write tags = ["anon"]')
    if len(value) > MAX_TAGS:
        raise ConfigError(where, f"{len(value)} tags, at most {MAX_TAGS}", "drop some")
    for t in value:
        if not TAG_RE.match(t):
            raise ConfigError(where, f"{t!r} is not a tag name",
                              "use 1-32 characters a-z, 0-9, '-' and '_'")
    return tuple(dict.fromkeys(value))


def _ways(where: str, value: Any, fix: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(w, str) for w in value):
        raise ConfigError(where, f"{value!r} is not a list of ways out", fix)
    for w in value:
        if w not in WAYS:
            raise ConfigError(where, f"{w!r} is not a way out", f"use {', '.join(WAYS)}")
    return tuple(dict.fromkeys(value))


def _check_selector(where: str, sel: Any, names: set[str], labels: Iterable[str],
                    kinds: Iterable[str]) -> str:
    if not isinstance(sel, str) or not sel:
        raise ConfigError(where, f"{sel!r} is not a selector", f"use {SELECTOR_FORMS}")
    if sel == "@anyvm":
        return sel
    for prefix, allowed in (("@tag:", None), ("@label:", labels), ("@kind:", kinds)):
        if sel.startswith(prefix):
            arg = sel[len(prefix):]
            if allowed is None:
                if not TAG_RE.match(arg):
                    raise ConfigError(where, f"{arg!r} is not a tag name",
                                      "use 1-32 characters a-z, 0-9, '-' and '_'")
            elif arg not in allowed:
                raise ConfigError(where, f"{arg!r} is not a {prefix[1:-1]}",
                                  f"use one of {', '.join(sorted(allowed))}")
            return sel
    if sel.startswith("@"):
        raise ConfigError(where, f"{sel!r} is not a selector", f"use {SELECTOR_FORMS}")
    if sel not in names:
        raise ConfigError(where, f"unknown qube {sel!r}",
                          f"use one of {', '.join(sorted(names))}, or {SELECTOR_FORMS}")
    return sel


def parse(raw: Any, names: set[str], labels: Iterable[str],
          kinds: Mapping[str, Any]) -> tuple[Invariant, ...]:
    """The config's `[[invariant]]` array of tables, validated (qubes and kinds named must
    exist; each table says at least one of reach, never, netvm_in)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("invariant", "must be an array of tables",
                          'write [[invariant]] with qubes = "@tag:anon" and reach = ["tor"]')
    out = []
    for i, body in enumerate(raw, 1):
        where = f"invariant {i}"
        if not isinstance(body, dict):
            raise ConfigError(where, "must be a table", "write [[invariant]]")
        for key in body:
            if key not in KEYS:
                raise ConfigError(where, f"unknown key {key!r}",
                                  f"allowed keys: {', '.join(sorted(KEYS))}")
        if "qubes" not in body:
            raise ConfigError(f"{where} field 'qubes'", "missing",
                              'say which qubes it holds for, e.g. qubes = "@tag:anon"')
        sel = _check_selector(f"{where} field 'qubes'", body["qubes"], names, labels, kinds)
        name = body.get("name", "")
        if not isinstance(name, str) or len(name) > 80 or "\n" in name:
            raise ConfigError(f"{where} field 'name'", "must be one line of at most 80 "
                              "characters")
        reach = _ways(f"{where} field 'reach'", body["reach"], 'write reach = ["tor"]') \
            if "reach" in body else None
        never = _ways(f"{where} field 'never'", body["never"], 'write never = ["clearnet"]') \
            if "never" in body else ()
        netvm_in = None
        if "netvm_in" in body:
            v = body["netvm_in"]
            if not isinstance(v, list) or not v:
                raise ConfigError(f"{where} field 'netvm_in'", f"{v!r} is not a list of qubes",
                                  'write netvm_in = ["sys-whonix"] (names or "@tag:T")')
            netvm_in = tuple(_check_selector(f"{where} field 'netvm_in'", s, names, labels,
                                             kinds) for s in v)
        if reach is None and not never and netvm_in is None:
            raise ConfigError(where, "says nothing", "add reach, never or netvm_in")
        both = set(reach or ()) & set(never)
        if both:
            raise ConfigError(f"{where} field 'never'", f"{', '.join(sorted(both))} is in "
                              "reach too", "keep each way out in one of them")
        out.append(Invariant(i, sel, name, reach, never, netvm_in))
    return tuple(out)


# --- judging a plan ---------------------------------------------------------------------
def selects(sel: str, q: QubeInfo) -> bool:
    if sel == "@anyvm":
        return True
    if sel.startswith("@tag:"):
        return sel[5:] in q.tags
    if sel.startswith("@label:"):
        return q.label == sel[7:]
    if sel.startswith("@kind:"):
        return q.kind == sel[6:]
    return q.name == sel


def way_out(plan: Plan, name: str) -> str | None:
    """How the qube's traffic leaves the stack (module docstring); None: cut off."""
    q = plan.qube(name)
    if q.cut_off:
        return None
    for c in plan.chain(name):
        if c.traits.protection in ("tor", "vpn"):
            return c.traits.protection
        if c.cut_off:
            return None
    return "clearnet"


def path(plan: Plan, name: str) -> str:
    return " -> ".join(c.name for c in plan.chain(name))


@dataclass(frozen=True)
class Verdict:
    invariant: Invariant
    qube: str
    ok: bool
    reason: str  # one line: what holds, or what breaks it

    def line(self) -> str:
        return f"{self.invariant.title} (qubes = {self.invariant.qubes!r}): {self.qube} " \
               f"{self.reason}"


def judge(plan: Plan, inv: Invariant, q: QubeInfo) -> Verdict:
    """One invariant for one qube it selects."""
    way = way_out(plan, q.name)
    where = "cut off (no way out)" if way is None else f"{way} ({path(plan, q.name)})"
    if inv.netvm_in is not None and q.netvm is not None and not any(
            sel == q.netvm or (sel.startswith("@") and selects(sel, plan.qube(q.netvm)))
            for sel in inv.netvm_in):
        return Verdict(inv, q.name, False, f"has netvm {q.netvm}, netvm_in allows only "
                       f"{', '.join(inv.netvm_in)}")
    if way is not None and inv.reach is not None and way not in inv.reach:
        return Verdict(inv, q.name, False, f"reaches the outside by {where}; reach allows "
                       f"only {', '.join(inv.reach)}")
    if way is not None and way in inv.never:
        return Verdict(inv, q.name, False, f"reaches the outside by {where}; never forbids "
                       f"{way}")
    return Verdict(inv, q.name, True, f"way out: {where}")


def evaluate(plan: Plan, invariants: Iterable[Invariant] | None = None) -> list[Verdict]:
    """Every invariant (the plan's own unless given) for every qube it selects, in
    invariant and then qube order. An invariant that selects no qube yields nothing."""
    out = []
    for inv in plan.invariants if invariants is None else invariants:
        out.extend(judge(plan, inv, q) for q in plan.qubes if selects(inv.qubes, q))
    return out


def broken(plan: Plan) -> list[Verdict]:
    return [v for v in evaluate(plan) if not v.ok]


def enforce(plan: Plan, action: str, fix: str) -> None:
    """Refuse `plan` when it breaks an invariant: one line naming the action, the first
    invariant broken and its qube, and the fix (nothing has changed yet)."""
    bad = broken(plan)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise InvariantError(f"{action} refused: {bad[0].line()}{more}; fix: {fix}")


# --- the call layer's hook (issue 28 item 1) ------------------------------------------
@dataclass(frozen=True)
class CallEdge:
    """A call the policy allows: `source` may hand data to `target` (service, and where
    the policy says so: file and line)."""

    source: str
    target: str
    service: str
    where: str


def judge_calls(plan: Plan, edges: Iterable[CallEdge]) -> list[Verdict]:
    """A call path is a way out: data a qube under `reach` (or `never`) hands to a qube
    whose own way out is another breaks its invariant, named by the policy line. The call
    layer's policy check hands its allowed (source, target) pairs here; calls to a qube of
    the same way out (or one cut off) pass."""
    out = []
    for inv in plan.invariants:
        for e in edges:
            if not plan.has_qube(e.source) or not selects(inv.qubes, plan.qube(e.source)):
                continue
            if not plan.has_qube(e.target):
                continue
            way = way_out(plan, e.target)
            bad = way is not None and ((inv.reach is not None and way not in inv.reach)
                                       or way in inv.never)
            out.append(Verdict(inv, e.source, not bad,
                               f"may call {e.service} in {e.target} ({e.where}), whose way "
                               f"out is {way or 'none'}" + ("" if not bad else
                                                          ": data handed there leaves by it")))
    return out
