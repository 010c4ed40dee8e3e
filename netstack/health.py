"""The status verdict, from live facts only: per qube (its namespace, every link of the plan
present and up, its ruleset present and equal to what `up` loaded, what its role checks:
tunnel, Tor, daemons) and for the stack (plus the supervisor that restarts the daemons).
up: nothing wrong; degraded: what and why; down: nothing of the stack is there."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

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
