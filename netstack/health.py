"""The status verdict, from live facts only: per qube (its namespace, every link of the plan
present and up, its ruleset present and equal to what `up` loaded, what its role checks:
tunnel, Tor, daemons) and for the stack (plus the supervisor that restarts the daemons).
up: nothing wrong; degraded: what and why; down: nothing of the stack is there."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from netstack.errors import count

IFF_UP, IFF_LOWER_UP = 0x1, 0x10000


@dataclass
class Verdict:
    state: str  # up | degraded | down
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "problems": list(self.problems)}


def ruleset_digest(doc: dict[str, Any]) -> str | None:
    """A ruleset as the kernel lists it, without what changes by itself at run time (handles,
    counters, the elements of named sets that are filled after `up`); None without our
    table."""
    from netstack.rules.nft import TABLE

    if not any(i.get("table", {}).get("name") == TABLE for i in doc.get("nftables", [])):
        return None
    items = []
    for item in doc.get("nftables", []):
        if "metainfo" in item:
            continue
        (kind, body), = item.items()
        body = {k: v for k, v in body.items() if k not in ("handle", "elem")}
        if kind == "rule":
            body["expr"] = [{"counter": None} if "counter" in e else e for e in body["expr"]]
        items.append([kind, body])
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def qube_verdict(entry: dict[str, Any], planned_ifaces: list[str], want_digest: str | None,
                 live_digest: str | None, role_problems: list[str]) -> Verdict:
    if not entry["running"]:
        return Verdict("down", ["namespace missing"])
    problems = []
    links = {i["name"]: i for i in entry["interfaces"]}
    for name in planned_ifaces:
        link = links.get(name)
        if link is None:
            problems.append(f"link {name} missing")
        elif not (link.get("flags", 0) & IFF_UP):
            problems.append(f"link {name} is down")
        elif not (link.get("flags", 0) & IFF_LOWER_UP):
            problems.append(f"link {name} has no carrier (its other end is gone)")
    if want_digest is not None:
        if live_digest is None:
            problems.append("ruleset missing")
        elif live_digest != want_digest:
            problems.append("ruleset differs from the one `up` loaded "
                            "(`netstack audit --drift` shows how)")
    problems += role_problems
    return Verdict("degraded" if problems else "up", problems)


def stack_verdict(qubes: dict[str, Verdict], extra: list[str]) -> Verdict:
    if qubes and all(v.state == "down" for v in qubes.values()):
        return Verdict("down", ["no qube of the stack is there"] + extra)
    problems = [f"{name}: {p}" for name, v in qubes.items() for p in v.problems] + extra
    return Verdict("degraded" if problems else "up", problems)


# --- what status cannot afford to miss: rules one by one, run-time sets, other tables -------

def _our_items(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    from netstack.rules.nft import TABLE

    out = []
    for item in doc.get("nftables", []):
        if "metainfo" in item:
            continue
        (kind, body), = item.items()
        if body.get("family") == "inet" and body.get("table", body.get("name")) == TABLE:
            out.append((kind, body))
    return out


def _rule_digest(r: dict[str, Any]) -> str:
    """One rule as listed, without its handle and counter values (they change by
    themselves)."""
    body = {k: v for k, v in r.items() if k != "handle"}
    body["expr"] = [{"counter": None} if "counter" in e else e for e in body.get("expr", [])]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def rule_digests(doc: dict[str, Any]) -> dict[str, list[str]]:
    """Our table's chains, each with the digests of its rules in order: what `up` (and
    every live change) records, so `status` can name the rule that changed."""
    out: dict[str, list[str]] = {}
    for kind, body in _our_items(doc):
        if kind == "chain":
            out.setdefault(body["name"], [])
        elif kind == "rule":
            out.setdefault(body["chain"], []).append(_rule_digest(body))
    return out


def rule_problems(want: dict[str, list[str]], doc: dict[str, Any]) -> list[str]:
    """Each chain and rule of our table that is not what was recorded: a chain added or
    gone, a rule added, gone or changed (by its handle and comment, as `nft -a list`
    shows it)."""
    import difflib

    rules: dict[str, list[dict[str, Any]]] = {}
    for kind, body in _our_items(doc):
        if kind == "chain":
            rules.setdefault(body["name"], [])
        elif kind == "rule":
            rules.setdefault(body["chain"], []).append(body)

    def name(r: dict[str, Any]) -> str:
        c = f" \"{r['comment']}\"" if r.get("comment") else ""
        return f"rule #{r.get('handle', '?')}{c}"
    out = []
    for chain in sorted(set(want) | set(rules)):
        if chain not in rules:
            out.append(f"chain {chain} is gone")
            continue
        if chain not in want:
            out.append(f"chain {chain} ({count(len(rules[chain]), 'rule')}) not made by netstack")
            continue
        live = [_rule_digest(r) for r in rules[chain]]
        sm = difflib.SequenceMatcher(a=want[chain], b=live, autojunk=False)
        for op, a0, a1, b0, b1 in sm.get_opcodes():
            if op == "equal":
                continue
            for r in rules[chain][b0:b1]:
                out.append(f"chain {chain}: {name(r)} "
                           + ("changed" if op == "replace" else "not made by netstack"))
            if a1 - a0 > b1 - b0:
                out.append(f"chain {chain}: {a1 - a0 - (b1 - b0)} rule(s) netstack loaded "
                           f"are gone (from position {a0 + 1})")
    return out


def element_text(e: Any) -> str:
    """A set element as `nft list set` prints it (timeouts left out: they run down)."""
    if isinstance(e, dict) and "elem" in e:
        e = e["elem"].get("val")
    if isinstance(e, dict) and "concat" in e:
        return " . ".join(element_text(x) for x in e["concat"])
    if isinstance(e, dict) and "prefix" in e:
        return f"{e['prefix']['addr']}/{e['prefix']['len']}"
    if isinstance(e, dict) and "range" in e:
        return "-".join(element_text(x) for x in e["range"])
    return str(e)


def live_sets(doc: dict[str, Any]) -> dict[str, tuple[set[str], bool]]:
    """Our table's named sets: elements, and whether elements time out (then one may be
    gone by itself: only an element more is wrong)."""
    return {b["name"]: ({element_text(e) for e in b.get("elem", [])},
                        "timeout" in b.get("flags", []))
            for kind, b in _our_items(doc) if kind == "set"}


def sets_from_commands(cmds: list[dict[str, Any]]) -> dict[str, set[str]]:
    """The sets a transaction of flush + add element commands leaves (set_commands)."""
    out: dict[str, set[str]] = {}
    for c in cmds:
        if "flush" in c and "set" in c["flush"]:
            out[c["flush"]["set"]["name"]] = set()
        elif "add" in c and "element" in c["add"]:
            el = c["add"]["element"]
            out.setdefault(el["name"], set()).update(element_text(e) for e in el["elem"])
    return out


def set_problems(want: dict[str, set[str]], doc: dict[str, Any]) -> list[str]:
    """Each element a set holds that netstack did not put there (the kill switch would
    admit it), and each it put there that is gone."""
    out = []
    live = live_sets(doc)
    for name in sorted(want):
        if name not in live:
            out.append(f"set {name} is gone")
            continue
        got, timeouts = live[name]
        for e in sorted(got - want[name]):
            out.append(f"set {name} holds {e}, which netstack did not set")
        if not timeouts:
            for e in sorted(want[name] - got):
                out.append(f"set {name} lacks {e}, which netstack set")
    for name in sorted(set(live) - set(want)):
        out.append(f"set {name} not made by netstack")
    return out


def expected_sets(plan: Any, resolved: dict[str, dict[str, list[str]]], store: Any,
                  started: float, now: float) -> dict[str, dict[str, set[str]]]:
    """Per namespace, each named set as netstack last filled it: the generated ruleset's
    elements, the VPN kill switch's endpoint sets as the current server's transport (what
    `up` and the failover watcher load), the per-qube rules' run-time sets as the names
    store and the clock fill them (what the supervisor's watcher loads)."""
    from netstack.rules import names
    from netstack.vpn.info import VpnInfo, current_index, transport

    out: dict[str, dict[str, set[str]]] = {}
    for n in plan.namespaces:
        if n.qube is None or not n.ruleset:
            continue
        out[n.name] = {i["set"]["name"]: {element_text(e) for e in i["set"].get("elem", [])}
                       for i in n.ruleset.get("nftables", []) if "set" in i}
    for q in plan.qubes:
        want = out.setdefault(q.netns, {})
        if isinstance(q.info, VpnInfo):
            from netstack.vpn.info import endpoint_set_commands_for

            info = q.info.server(current_index(q.info))
            want.update(sets_from_commands(endpoint_set_commands_for(
                transport(info, resolved.get(q.name, {})))["nftables"]))
            if info.forwards:  # the NAT-PMP ports the renewer holds (vpn/portfwd.py)
                from netstack.vpn import portfwd

                want.update(sets_from_commands(portfwd.held_set_commands(
                    info.forwards, portfwd.read_state(portfwd.state_path(info.state_dir,
                                                                         info.qube)),
                    now, grace=EXPIRY_GRACE + 1.0)))
        if q.clients and q.traits.provides_network:
            sets = sets_from_commands(names.fill(plan, q.name, store, started, now))
            # an expiring rule's element was given ceil(seconds left) when filled, so the
            # kernel keeps it up to a second past the rule's end: what netstack set a moment
            # ago is still its own (else `status` cried DRIFT for that second)
            for name, elems in sets_from_commands(
                    names.fill(plan, q.name, store, started, now - EXPIRY_GRACE)).items():
                sets.setdefault(name, set()).update(elems)
            want.update(sets)
    return out


EXPIRY_GRACE = 1.2  # seconds: the kernel's set timeouts round up to whole seconds
