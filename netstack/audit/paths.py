"""Every way a packet can take through a qube's namespace, so that no property is proven
on a picture with a path missing. The properties read the inet/ip/ip6 hooks; a packet can
also be moved, copied or redirected before, after or beside them:

- nftables tables of other families (arp, bridge) and chains on the device hooks (netdev
  or inet ingress, netdev egress), with statements that move a packet out of a device
  (`fwd`), copy it (`dup`) or hand it to a program (`queue`);
- outside nftables: tc filters on a link's qdiscs (mirred/redirect actions, BPF
  classifiers: they run before the ingress hook and after egress), XDP programs attached to
  a link (they see a frame before the kernel's stack), links netstack did not make
  (bridges, bonds, macvlan/ipvlan, tunnels: each a path beside the veth the plan knows),
  policy routing rules (`ip rule`: another table decides where a packet goes) and routes
  through links the plan does not have.

netdev ingress and egress chains are modelled (the evaluator explores them: drop ends a
packet, fwd sends it out of another device past every hook of the namespace, dup sends a
copy so; both are then followed by the properties and the end-to-end walk). Everything
else is named: UNPROVEN, with the construct, the table or object and the link."""

from __future__ import annotations

from typing import Any

from netstack.audit.evaluator import (
    DEVICE_HOOKS,
    MOVES,
    Evaluator,
    Ruleset,
    Step,
    packet_of,
)
from netstack.audit.properties import QubeView, Result
from netstack.audit.space import humanize
from netstack.pathfacts import Finding, foreign_objects, kernel_facts, kernel_findings, nft_findings

PROPERTY = "every path through the qube is modelled"
__all__ = ["PROPERTY", "Finding", "foreign_objects", "kernel_facts", "kernel_findings",
           "nft_findings", "paths_result", "unproven_beside"]


# --- the property ------------------------------------------------------------------------------

def device_moves(q: QubeView) -> tuple[list[tuple[dict[str, Any], str, list[Step]]],
                                       list[str]]:
    """The classes of packets a device hook (netdev ingress or egress) sends or copies out
    of a device, each with a witness and its trace; and the constructs it met but could
    not follow."""
    rs: Ruleset = q.evaluator().rs
    found: list[tuple[dict[str, Any], str, list[Step]]] = []
    unknown: list[str] = []
    ev = Evaluator(rs, q.domains())
    for hook in DEVICE_HOOKS:
        if not rs.has_hook(hook):
            continue

        def leaf(e: Evaluator, verdict: str, trace: list[Step], nat: list,
                 taint: list[str], hook: str = hook) -> None:
            if taint:
                unknown.extend(taint)
                return
            if not verdict.startswith(MOVES):
                return
            w = e.point()
            if isinstance(w, dict):
                found.append((packet_of(humanize(w, e.dom, q.prefer("forward"))).describe(),
                              f"{hook}: {verdict}", trace))
        ev.explore(hook, {}, leaf)
    return found, sorted(set(unknown))


def planned(q: QubeView) -> list[str]:
    """The links netstack gave the qube: the plan's and its tunnel's (the view's
    interfaces also hold every live link, the ones nobody planned included)."""
    return list(q.qube.interfaces) + ([q.tunnel] if q.tunnel else [])


def unproven_beside(results: list[Result], paths: dict[str, Result],
                    chains: dict[str, list[str]]) -> list[Result]:
    """A PASS of a qube with a path the properties do not see is not a proof: UNPROVEN,
    naming the path; the end-to-end property likewise for every qube on its chain
    (chains: workstation -> the qubes its packets cross)."""
    out = []
    for r in results:
        where = chains.get(r.qube, [r.qube]) if r.property.startswith("end to end") \
            else [r.qube]
        bad = [paths[n] for n in where if n in paths and paths[n].status == "UNPROVEN"]
        if r.status == "PASS" and bad and r.property != PROPERTY:
            r = Result(r.property, r.qube, "UNPROVEN", "not proven: a path it does not see: "
                       + "; ".join(f"{b.qube}: {b.reason}" for b in bad)[:600],
                       None, [], r.classes)
        out.append(r)
    return out


def paths_result(q: QubeView, facts: dict[str, Any] | None) -> Result:
    """FAIL when a device hook moves or copies a packet out of a device (a path around the
    inet hooks: the witness and its trace), UNPROVEN naming each construct not modelled,
    PASS otherwise (with what was looked at: the reason says whether the kernel's other
    paths were read, or only the ruleset)."""
    moves, unknown = device_moves(q)
    finds = nft_findings(q.ruleset)
    if facts is not None:
        finds += kernel_findings(facts, planned(q))
    if moves:
        pkt, verdict, trace = moves[0]
        return Result(PROPERTY, q.name, "FAIL", verdict, pkt,
                      [f"{q.name} -> {verdict.split(':')[0]} -> {s}" for s in trace])
    if finds or unknown:
        return Result(PROPERTY, q.name, "UNPROVEN", "not modelled: " + "; ".join(
            [str(f) for f in finds] + unknown[:3]))
    where = "nftables, links, tc, XDP and routing rules read" if facts is not None else \
        "the ruleset only: links, tc, XDP and routing rules are read from a live stack"
    dev = [c for k, c in q.evaluator().rs.chains.items() if c.get("hook") in DEVICE_HOOKS]
    return Result(PROPERTY, q.name, "PASS", f"every path is one the properties follow ({where})"
                  + (f"; {len(dev)} device chains modelled, none moves or copies a packet"
                     if dev else ""))
