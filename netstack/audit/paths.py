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

import socket
from dataclasses import dataclass
from typing import Any

from netstack.audit.evaluator import (
    DEVICE_HOOKS,
    HOOK_FAMILIES,
    MOVES,
    Evaluator,
    Ruleset,
    Step,
    chain_devices,
    packet_of,
)
from netstack.audit.properties import QubeView, Result
from netstack.audit.space import humanize
from netstack.rules.nft import TABLE

PROPERTY = "every path through the qube is modelled"
INET_HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
# link kinds netstack makes in a qube (veth to each neighbour, the VPN's tunnel device)
OWN_KINDS = {None, "veth", "tun", "wireguard"}
# qdiscs a link gets by itself: no filter of ours hangs on them
DEFAULT_RULES = {  # family -> (priority, table) of the rules every namespace starts with
    socket.AF_INET: {(0, 255), (32766, 254), (32767, 253)},
    socket.AF_INET6: {(0, 255), (32766, 254)},
}
PARENTS = {0xFFFFFFF2: "ingress", 0xFFFFFFF3: "egress"}  # clsact/ingress qdisc minor


@dataclass(frozen=True)
class Finding:
    """One construct on a path the properties do not model."""

    what: str  # the construct, its table or object and link, in one line

    def __str__(self) -> str:
        return self.what


# --- nftables ---------------------------------------------------------------------------------

def _statements(x: Any) -> list[str]:
    """The kinds of the statements of a rule that move, copy or hand off a packet."""
    out: list[str] = []
    if isinstance(x, dict):
        for k in ("fwd", "dup", "queue", "tproxy"):
            if k in x:
                out.append(k)
        for v in x.values():
            out += _statements(v)
    elif isinstance(x, list):
        for v in x:
            out += _statements(v)
    return out


def nft_findings(doc: dict[str, Any]) -> list[Finding]:
    """The nftables objects of a listing that the properties cannot follow: tables of the
    families the evaluator does not read (arp, bridge), base chains on a hook it does not
    explore, and statements that hand a packet over (queue, tproxy) or move or copy it
    where the evaluator does not follow them (fwd/dup outside a netdev table)."""
    out: list[Finding] = []
    chains: dict[tuple[str, str, str], dict[str, Any]] = {}
    for item in doc.get("nftables", []):
        if "table" in item:
            t = item["table"]
            if t.get("family") not in HOOK_FAMILIES:
                out.append(Finding(f"table {t.get('family')} {t.get('name')}: "
                                   f"{t.get('family')} packets are not modelled"))
        elif "chain" in item:
            c = item["chain"]
            chains[(c["family"], c["table"], c["name"])] = c
            hook = c.get("hook")
            if hook and c["family"] in HOOK_FAMILIES and hook not in INET_HOOKS + DEVICE_HOOKS:
                out.append(Finding(f"chain {c['family']} {c['table']} {c['name']} on hook "
                                   f"{hook}: not modelled"))
        elif "rule" in item:
            r = item["rule"]
            for s in sorted(set(_statements(r.get("expr", [])))):
                if r["family"] not in HOOK_FAMILIES:
                    continue  # the whole table is named already
                if s in MOVES and r["family"] == "netdev":
                    continue  # modelled: the properties follow it
                out.append(Finding(
                    f"statement {s} in {r['family']} {r['table']} {r['chain']} "
                    f"#{r.get('handle', '?')}: " + ("the packet goes to a program in user "
                                                    "space" if s == "queue" else
                                                    "not modelled")))
    return out


def foreign_objects(doc: dict[str, Any]) -> list[str]:
    """Tables netstack did not make, each with its chains (hook and devices): what
    `status` names when a ruleset differs."""
    out = []
    chains: dict[tuple[str, str], list[str]] = {}
    for item in doc.get("nftables", []):
        c = item.get("chain")
        if c:
            where = f" ({c['hook']}" + (f" on {','.join(chain_devices(c))}"
                                        if chain_devices(c) else "") + ")" \
                if c.get("hook") else ""
            chains.setdefault((c["family"], c["table"]), []).append(c["name"] + where)
    for item in doc.get("nftables", []):
        t = item.get("table")
        if t and (t.get("family"), t.get("name")) != ("inet", TABLE):
            cs = chains.get((t["family"], t["name"]), [])
            out.append(f"table {t['family']} {t['name']} not made by netstack"
                       + (f": chains {', '.join(cs)}" if cs else ""))
    return out


# --- outside nftables --------------------------------------------------------------------------

def kernel_facts(ipr: Any) -> dict[str, Any]:
    """What a namespace's kernel does to packets besides nftables, read with a pyroute2
    IPRoute opened in it: link kinds and XDP attachment, tc filters per link and
    direction, policy routing rules. A plain structure, so tests can hand one in."""
    links = []
    names = {}
    for link in ipr.get_links():
        li = link.get_attr("IFLA_LINKINFO")
        xdp = link.get_attr("IFLA_XDP")
        attached = xdp.get_attr("IFLA_XDP_ATTACHED") if xdp is not None else None
        name = link.get_attr("IFLA_IFNAME")
        names[link["index"]] = name
        master = link.get_attr("IFLA_MASTER")
        links.append({"name": name, "kind": li.get_attr("IFLA_INFO_KIND") if li else None,
                      "xdp": bool(attached), "master": master})
    for x in links:
        x["master"] = names.get(x["master"]) if x["master"] else None
    filters: list[dict[str, Any]] = []
    seen = set()
    for q in ipr.get_qdiscs():
        kind = q.get_attr("TCA_KIND")
        parents = list(PARENTS) if kind in ("ingress", "clsact") else [q["handle"]]
        for parent in parents:
            try:
                got = ipr.get_filters(index=q["index"], parent=parent)
            except Exception:  # noqa: BLE001 - no such direction on this qdisc
                continue
            for f in got:
                fk = f.get_attr("TCA_KIND")
                if not fk or f.get_attr("TCA_OPTIONS") is None:
                    continue  # the chain's head entry, no classifier of its own
                key = (names.get(q["index"]), PARENTS.get(parent, f"qdisc {kind}"), fk,
                       f["info"])
                if key in seen:
                    continue
                seen.add(key)
                filters.append({"link": key[0], "where": key[1], "kind": fk,
                                "actions": _actions(f.get_attr("TCA_OPTIONS"))})
    rules = []
    for fam in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_rules(family=fam):
            prio = r.get_attr("FRA_PRIORITY") or 0
            table = r.get_attr("FRA_TABLE") or r["table"]
            if (prio, table) not in DEFAULT_RULES[fam] or r["src_len"] or r["dst_len"]:
                rules.append({"family": 6 if fam == socket.AF_INET6 else 4, "priority": prio,
                              "table": table})
    return {"links": links, "filters": filters, "rules": rules}


def _actions(opts: Any) -> list[str]:
    """The kinds of a classifier's actions (mirred, bpf...), as far as pyroute2 parses."""
    out = []
    for name in ("TCA_U32_ACT", "TCA_BPF_ACT", "TCA_FLOWER_ACT", "TCA_MATCHALL_ACT",
                 "TCA_BASIC_ACT", "TCA_FW_ACT", "TCA_ROUTE4_ACT"):
        try:
            a = opts.get_attr(name)
        except Exception:  # noqa: BLE001 - another classifier's options
            a = None
        if not a:
            continue
        for _k, act in a.get("attrs", []):
            kind = act.get_attr("TCA_ACT_KIND") if hasattr(act, "get_attr") else None
            if kind:
                out.append(kind)
    return out


def kernel_findings(facts: dict[str, Any], planned: list[str]) -> list[Finding]:
    """Each packet path outside nftables, named: a tc filter (and its actions) on a link,
    an XDP program, a link netstack did not make or of a kind it never makes, a link
    enslaved to another (a bridge or bond beside the rules), a policy routing rule."""
    out = []
    own = set(planned) | {"lo"}
    for x in facts.get("links", []):
        if x["xdp"]:
            out.append(Finding(f"XDP program attached to link {x['name']}: it sees frames "
                               "before the kernel's stack and may redirect them"))
        if x["name"] not in own:
            out.append(Finding(f"link {x['name']} ({x['kind'] or 'no kind'}) not made by "
                               "netstack: a path beside the ones the rules know"))
        elif x["kind"] not in OWN_KINDS:
            out.append(Finding(f"link {x['name']} is a {x['kind']}: netstack makes none"))
        if x.get("master"):
            out.append(Finding(f"link {x['name']} enslaved to {x['master']}: frames cross "
                               f"{x['master']} without the IP hooks"))
    for f in facts.get("filters", []):
        acts = f" with action {', '.join(f['actions'])}" if f["actions"] else ""
        out.append(Finding(f"tc filter {f['kind']}{acts} on {f['where']} of link "
                           f"{f['link']}: it may redirect, mirror or drop past nftables"))
    for r in facts.get("rules", []):
        out.append(Finding(f"ip rule (IPv{r['family']}) priority {r['priority']} to table "
                           f"{r['table']}: routing the properties do not follow"))
    return out


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
