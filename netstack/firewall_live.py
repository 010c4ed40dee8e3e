"""`netstack firewall QUBE list|add|del|reset` (Qubes' qvm-firewall) on a running stack:
the qube's new list is validated as if the config said it, kept in the stack's overlay
(/var/lib/netstack/STACK/firewall.json, root only, survives down/up until `reset` or
`down --purge`), and applied through the one live-change path: the netvm's ruleset is
replaced in one transaction (with what `up` filled in at run time)."""

from __future__ import annotations

import sys
import time
from typing import Any

from netstack.errors import UsageError
from netstack.kernel import Kernel
from netstack.model import Plan
from netstack.rules import qubefw


def rules_of(plan: Plan, qube: str) -> tuple[qubefw.FwRule, ...] | None:
    """The list in force (None: the qube has none, the plain behaviour)."""
    if not plan.has_qube(qube):
        raise UsageError(f"no qube {qube!r} in stack {plan.stack!r}; qubes: "
                         + ", ".join(q.name for q in plan.qubes))
    return plan.qube(qube).firewall


def listing(stack: str, qube: str) -> dict[str, Any]:
    from netstack.stack import require

    st = require(stack)
    assert st.plan is not None
    rules = rules_of(st.plan, qube)
    overlay = qubefw.load_overlay(stack)
    now = time.time()

    def ended(r: qubefw.FwRule) -> bool:
        end = r.deadline(st.data.started)
        return end is not None and end <= now
    from netstack.addressing import VIRTUAL_DNS

    dead = dict(qubefw.shadowed(rules, tuple(VIRTUAL_DNS)))
    return {"qube": qube, "netvm": st.plan.qube(qube).netvm,
            "source": "netstack firewall" if qube in overlay else "config",
            "rules": None if rules is None else [
                {"number": i + 1, "rule": r.describe(), "expired": ended(r),
                 "shadowed_by": dead.get(i + 1),
                 **{k: v for k, v in r.__dict__.items() if v is not None}}
                for i, r in enumerate(rules)]}


def raw_of(plan: Plan, qube: str, number: int) -> str:
    """Rule `number` (1-based) of the qube's list in words: which rule it is across a
    change that renumbers the list."""
    return (plan.qube(qube).firewall or ())[number - 1].describe()


def shadow_warnings(plan: Plan, qubes: list[str] | None = None) -> list[str]:
    """One line per rule that can never match (qubefw.shadowed), for `plan`, `up` and
    `firewall add`: a rule put where it can never act is a mistake worth saying at once."""
    from netstack.addressing import VIRTUAL_DNS

    out = []
    for q in plan.qubes:
        if qubes is not None and q.name not in qubes:
            continue
        rules = q.firewall or ()
        for j, i in qubefw.shadowed(rules, tuple(VIRTUAL_DNS)):
            out.append(f"{q.name}: rule {j} ({rules[j - 1].describe()}) can never match: rule "
                       f"{i} ({rules[i - 1].describe()}) comes first and matches all it would")
    return out


def reset_down(stack: str, qube: str) -> bool:
    """`firewall QUBE reset` on a stack that is down: the qube's list goes back to the
    config's in the kept overlay, so the next `up` uses it. Without this, a list kept for a
    qube the config no longer has (or whose new netvm cannot enforce it) would refuse `up`,
    and `reset` would refuse a stack that is not up. Returns False when the stack is up (the
    caller makes a live change instead). Under the stack's lock, as `up` takes it."""
    from netstack.state import StackLock, State, require_root

    require_root("firewall reset")
    with StackLock(stack):
        st = State.load(stack)
        if st is not None and st.plan is not None:
            return False
        overlay = qubefw.load_overlay(stack)
        if qube not in overlay:
            raise UsageError(f"{qube} has no rules kept from `netstack firewall`: the stack is "
                             "down and the config's list is already the one `up` uses")
        del overlay[qube]
        qubefw.save_overlay(stack, overlay)
        return True


def change(stack: str, qube: str, action: str, words: list[str] | None = None,
           number: int | None = None, *, kernel: Kernel) -> tuple[int, float]:
    """add (at the end, or before rule `number`), del (rule `number`) or reset. Returns the
    number of rules now in force and the seconds the apply took (lock to digests)."""
    from netstack.disposable import disposables, rebuild
    from netstack.live import after_applied, commit, live

    with live(stack, "firewall", kernel) as (st, cur, k):
        t0 = time.perf_counter()
        current = rules_of(cur, qube)
        if cur.qube(qube).settings.get("disposable"):
            raise UsageError(
                f"{qube} is a disposable: it takes its template's rules when `run` makes it "
                f"and cannot be given rules live (fix: give the rules to an app qube and "
                f"start the disposable with `netstack run --like QUBE -- CMD`)")
        raw = [r.to_raw() for r in cur.qube(qube).firewall or ()]
        old = qubefw.load_overlay(stack)
        new = dict(old)
        if action == "reset":
            new.pop(qube, None)
        elif action == "add":
            given = qubefw.rule_from_words(words or [])
            if "action" not in given:
                raise UsageError("firewall add: give action=accept or action=drop, then what "
                                 "it matches (e.g. action=accept dsthost=192.0.2.7 proto=tcp "
                                 "dstports=443)")
            rule = qubefw.absolute_expiry(given, time.time())
            at_ = qubefw.parse(qube, [rule])[0].expire_at  # (validated again below)
            if at_ is not None and at_ <= time.time():
                raise UsageError(f"firewall add: expire={at_} is in the past; give a later "
                                 "Unix time or expire=+SECONDS")
            at = len(raw) if number is None else _index(number, len(raw) + 1)
            raw.insert(at, rule)
            new[qube] = raw
        elif action == "del":
            if current is None:
                raise UsageError(f"{qube} has no rules to delete")
            raw.pop(_index(number, len(raw)))
            new[qube] = raw
        else:
            raise UsageError(f"firewall: unknown action {action!r}")
        desired = rebuild(stack, cur, st.data.config, disposables(cur), overlay=new,
                          netvms=st.data.netvms)
        commit(st, cur, desired, k, f"firewall {qube} {action}", overlay=new)
        after = desired.qube(qube).firewall
        took = time.perf_counter() - t0
        netvm = desired.qube(qube).netvm
        if netvm:  # names of the new list: through the chain's resolver
            from netstack.rules import names

            after_applied(f"asking the names of {qube}'s rules",
                          lambda: names.refresh(st.dir, desired, st.data.started, k,
                                                netvms=[netvm]))
        after_applied(f"cutting {qube}'s connections the new rules forbid",
                      lambda: cut(desired, qube, k, st), [])
        if action == "add":  # what this rule made dead, or left dead itself
            from netstack.addressing import VIRTUAL_DNS

            dns = tuple(VIRTUAL_DNS)
            before = {(raw_of(cur, qube, j), raw_of(cur, qube, i))
                      for j, i in qubefw.shadowed(cur.qube(qube).firewall, dns)}
            for w, (j, i) in zip(shadow_warnings(desired, [qube]),
                                 qubefw.shadowed(desired.qube(qube).firewall, dns),
                                 strict=True):
                if (raw_of(desired, qube, j), raw_of(desired, qube, i)) not in before:
                    print(f"netstack: WARNING: {w}", file=sys.stderr)
        return (len(after) if after is not None else 0), took


# the comment of the temporary rule `leaktest --rules` puts in front of a list (an
# expire=+N rule it removes when done): a run killed before that leaves it behind
LEAKTEST_MARK = "leaktest expiry"


def is_leaktest_rule(raw: dict[str, Any], now: float | None) -> bool:
    """A rule of the overlay (a config table) that `leaktest --rules` put there: its comment
    and an expiry, passed by `now` (None: passed or not)."""
    at = raw.get("expire")
    if raw.get("comment") != LEAKTEST_MARK or not isinstance(at, str | int) \
            or not str(at).isascii() or not str(at).isdigit():
        return False
    return now is None or int(at) <= now


def drop_leaktest_rules(stack: str, *, kernel: Kernel, qubes: list[str] | None = None,
                        now: float | None = None) -> dict[str, int]:
    """Remove from the kept lists (of `qubes`, or all) the temporary rules `leaktest --rules`
    made and left behind when it was killed (and, with `now`, only those whose expiry has
    passed: a running leaktest's own rule stays until it removes it). A list that is then
    the config's again goes back to being the config's (as `reset`). One live change for
    all of them; {qube: rules removed}."""
    from netstack.disposable import disposables, rebuild
    from netstack.live import commit, live

    old = qubefw.load_overlay(stack)
    if not any(is_leaktest_rule(r, now) for q, rules in old.items()
               if qubes is None or q in qubes for r in rules):
        return {}  # nothing to do: no lock, no transaction
    with live(stack, "firewall", kernel) as (st, cur, k):
        old = qubefw.load_overlay(stack)
        new = dict(old)
        gone: dict[str, int] = {}
        for q, rules in old.items():
            if qubes is not None and q not in qubes or not cur.has_qube(q):
                continue
            keep = [r for r in rules if not is_leaktest_rule(r, now)]
            if len(keep) == len(rules):
                continue
            gone[q] = len(rules) - len(keep)
            plain = {x: v for x, v in new.items() if x != q}
            configured = rebuild(stack, cur, st.data.config, disposables(cur), overlay=plain,
                                 netvms=st.data.netvms).qube(q).firewall
            new[q] = keep
            if configured is not None and configured == qubefw.parse(q, keep):
                del new[q]  # the config's list again: its source is the config (an empty
                # list is never taken for no list: that would let everything through)
        if not gone:
            return {}
        desired = rebuild(stack, cur, st.data.config, disposables(cur), overlay=new,
                          netvms=st.data.netvms)
        commit(st, cur, desired, k, "firewall drop leaktest rules", overlay=new)
        return gone


def cut(plan: Plan, qube: str, k: Kernel, st: Any) -> list[Any]:
    """Changed rules cut what they forbid: the qube's connections in its netvm's conntrack
    that the new list would not let out are removed, so their next packet meets the rules
    as a new one (and is dropped). Returns the flows removed."""
    from netstack.addressing import VIRTUAL_DNS

    q = plan.qube(qube)
    if q.netvm is None:
        return []
    from netstack.rules import names

    rules = rules_of(plan, qube)
    netvm = plan.qube(q.netvm).netns
    resolved, now = names.addresses(names.load(st.dir), q.netvm), time.time()

    def forbidden() -> list[Any]:
        return [f for src in (a for a in (q.ipv4, q.ipv6) if a)
                for f in k.conntrack_list(netvm, src)
                if f.src == src and not qubefw.allows(rules, f.dst, f.proto, f.dport,
                                                      f.icmp_type, VIRTUAL_DNS, resolved,
                                                      st.data.started, now)]
    if has_flowtable(k, netvm):
        return cut_offloaded(k, netvm, forbidden)
    gone = []
    for f in forbidden():
        try:
            k.conntrack_delete(netvm, f)
        except Exception:  # noqa: BLE001 - the change holds; this one entry stays
            continue  # until conntrack times it out
        gone.append(f)
    return gone


def _ours(items: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    from netstack.rules.nft import FAMILY, TABLE

    return [i[kind] for i in items if kind in i
            and (i[kind].get("family"), i[kind].get("table")) == (FAMILY, TABLE)]


def has_flowtable(k: Kernel, ns: str) -> bool:
    return bool(_ours(k.nft_list(ns).get("nftables", []), "flowtable"))


def cut_offloaded(k: Kernel, ns: str, forbidden: Any, timeout: float = 3.0) -> list[Any]:
    """Cut the forbidden connections of a netvm that has a flowtable. An offloaded flow
    goes past every hook, the new rules included, its entry's timeout renewed while
    packets flow; a live rule change reloads the table, and the flows of the old
    flowtable go back on the new one at their next packet, before the cut. Measured in
    scripts/test-host's VM (docs/field-notes.md "Flowtables"): deleting the entries then
    left a forbidden flow going. Upstream Linux before 6.4 also refuses to delete an
    offloaded entry (EBUSY). So: the flowtable and its `flow add` rule go (one
    transaction: every flow on it is torn down, nothing new goes on it), the forbidden
    entries are listed and deleted until none is left (the kernel frees the old flows
    after the transaction), and both come back where they were (allowed flows go on the
    fast path again at their next packet). The rest of the ruleset, the run-time sets
    included, is not touched. Returns the flows removed."""
    from netstack.rules.nft import FAMILY, TABLE

    items = k.nft_list(ns).get("nftables", [])
    fts, rules = _ours(items, "flowtable"), _ours(items, "rule")
    offload = [n for n, r in enumerate(rules)
               if any(isinstance(x, dict) and "flow" in x for x in r["expr"])]
    back: list[dict[str, Any]] = [
        {"add": {"flowtable": {x: v for x, v in f.items() if x != "handle"}}} for f in fts]
    for n in offload:
        r = {x: v for x, v in rules[n].items() if x != "handle"}
        after = next((rules[m] for m in range(n + 1, len(rules))
                      if rules[m]["chain"] == r["chain"] and m not in offload), None)
        back.append({"insert": {"rule": {**r, "handle": after["handle"]}}} if after else
                    {"add": {"rule": r}})
    k.nft(ns, {"nftables": [
        *({"delete": {"rule": {"family": FAMILY, "table": TABLE, "chain": rules[n]["chain"],
                               "handle": rules[n]["handle"]}}} for n in offload),
        *({"delete": {"flowtable": {"family": FAMILY, "table": TABLE, "name": f["name"]}}}
          for f in fts)]})
    gone: list[Any] = []
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                left = forbidden()
            except Exception:  # noqa: BLE001 - listed again below, until the deadline
                left = [None]
            for f in left:
                if f is None:
                    continue
                try:
                    k.conntrack_delete(ns, f)
                    gone.append(f)
                except Exception:  # noqa: BLE001 - still held by the old flowtable
                    continue
            if not left or time.monotonic() > end:
                break
            time.sleep(0.01)
    finally:
        k.nft(ns, {"nftables": back})
    return gone


def _index(number: int | None, count: int) -> int:
    if number is None or not 1 <= number <= count:
        raise UsageError(f"rule number {number}: give one of 1-{count}" if count else
                         "the list is empty")
    return number - 1
