"""The packet paths of a namespace besides the hooks the audit's properties read, named
from the nftables listing and the kernel's netlink facts (link kinds, XDP, tc filters,
policy routing rules). Light on purpose: `status` imports it on every run (the evaluator
stays out of its path, see the 0.3 s budget in docs/security.md); the audit's paths
property (netstack/audit/paths.py) builds on it."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

TABLE = "netstack"  # rules/nft.py's, not imported: that module pulls the rule builders in
MODELLED_FAMILIES = ("inet", "ip", "ip6", "netdev")  # evaluator.HOOK_FAMILIES
DEVICE_HOOKS = ("ingress", "egress")
MOVES = ("fwd", "dup")

INET_HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
# link kinds netstack makes in a qube (veth to each neighbour, the VPN's tunnel device)
OWN_KINDS = {None, "veth", "tun", "wireguard"}
# qdiscs a link gets by itself: no filter of ours hangs on them
DEFAULT_RULES = {  # family -> (priority, table) of the rules every namespace starts with
    socket.AF_INET: {(0, 255), (32766, 254), (32767, 253)},
    socket.AF_INET6: {(0, 255), (32766, 254)},
}
# qdiscs without classes take no filter (the kernel refuses `tc filter add` on them)
CLASSLESS = {"noqueue", "noop", "pfifo_fast", "fq_codel", "pfifo", "bfifo", "fq", "sfq",
             "tbf", "netem", "codel", "fq_pie", "pie", "red", "cake", "mq"}
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
        # not tproxy: it only gives the packet a socket; where it goes then is the routes'
        # (a local delivery needs a policy routing rule, which is a finding of its own)
        for k in ("fwd", "dup", "queue", "xt"):
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
    explore, and statements that hand a packet over (queue) or move or copy it
    where the evaluator does not follow them (fwd/dup outside a netdev table)."""
    out: list[Finding] = []
    chains: dict[tuple[str, str, str], dict[str, Any]] = {}
    for item in doc.get("nftables", []):
        if "table" in item:
            t = item["table"]
            if t.get("family") not in MODELLED_FAMILIES:
                out.append(Finding(f"table {t.get('family')} {t.get('name')}: "
                                   f"{t.get('family')} packets are not modelled"))
        elif "chain" in item:
            c = item["chain"]
            chains[(c["family"], c["table"], c["name"])] = c
            hook = c.get("hook")
            if hook and c["family"] in MODELLED_FAMILIES and hook not in INET_HOOKS + DEVICE_HOOKS:
                out.append(Finding(f"chain {c['family']} {c['table']} {c['name']} on hook "
                                   f"{hook}: not modelled"))
        elif "rule" in item:
            r = item["rule"]
            for s in sorted(set(_statements(r.get("expr", [])))):
                if r["family"] not in MODELLED_FAMILIES:
                    continue  # the whole table is named already
                if s in MOVES and r["family"] == "netdev":
                    continue  # modelled: the properties follow it
                out.append(Finding(
                    f"statement {s} in {r['family']} {r['table']} {r['chain']} "
                    f"#{r.get('handle', '?')}: " + ("the packet goes to a program in user "
                                                    "space" if s == "queue" else
                                                    "an iptables extension (iptables-nft), "
                                                    "not modelled" if s == "xt" else
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
    # one line per (link, direction, classifier, priority): u32 lists its hash table and
    # node entries under the same priority, only one of them with the actions
    found: dict[tuple[Any, ...], list[str]] = {}
    for q in ipr.get_qdiscs():
        kind = q.get_attr("TCA_KIND")
        if kind in CLASSLESS:
            continue  # no filter can hang on it: nothing to ask
        # an ingress qdisc answers for every minor: ask it for ingress only
        parents = [0xFFFFFFF2] if kind == "ingress" else list(PARENTS) if kind == "clsact" \
            else [q["handle"]]
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
                acts = found.setdefault(key, [])
                acts += [a for a in _actions(f.get_attr("TCA_OPTIONS")) if a not in acts]
    filters = [{"link": k[0], "where": k[1], "kind": k[2], "actions": a}
               for k, a in found.items()]
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


def legacy_tables(ns: str) -> list[str]:
    """The x_tables (iptables-legacy, ip6tables, arptables) tables a namespace has: rules
    a root could load with its own binary, run by the kernel beside nftables and absent
    from its listing. Read from the namespace's own /proc/net (the reading thread's)."""
    from netstack import netns

    out = []
    with netns.entered(ns):
        for fam in ("ip", "ip6", "arp"):
            try:
                with open(f"/proc/thread-self/net/{fam}_tables_names") as f:
                    out += [f"{fam} {t}" for t in f.read().split()]
            except OSError:
                continue  # no x_tables in this kernel: nothing can be loaded there
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
    for t in facts.get("legacy", []):
        out.append(Finding(f"x_tables table {t} (iptables-legacy): rules nftables does not "
                           "list"))
    for r in facts.get("rules", []):
        out.append(Finding(f"ip rule (IPv{r['family']}) priority {r['priority']} to table "
                           f"{r['table']}: routing the properties do not follow"))
    return out


def chain_devices(c: dict[str, Any]) -> list[str]:
    """The devices a base chain of a device hook is bound to (`dev` is a name or a list)."""
    d = c.get("dev")
    if d is None:
        return []
    return [d] if isinstance(d, str) else [x for x in d if isinstance(x, str)]


def list_ruleset(k: Any, ns: str) -> dict[str, Any]:
    """A namespace's ruleset as its kernel runs it, for the audit and status:
    - listed from inside the namespace: the binding turns the interface indexes of `fwd`,
      `dup` and `iif`/`oif` into names in the namespace current at listing time (listed
      from the host's, a qube's eth0 came back as the host's ifb0);
    - with each device chain's devices, which nft 1.0.6's JSON leaves out (the text
      listing has them): without them a chain would seem to run on every link."""
    import re

    from netstack.errors import StateError

    if not k.netns_exists(ns):
        raise StateError(f"namespace {ns} is gone: nothing to audit there; `netstack status` "
                         "names what is missing, `netstack down` and `up` rebuild it")
    with k.inside(ns):
        doc = k.nft_list(ns)
        for item in doc.get("nftables", []):
            c = item.get("chain")
            if not c or c.get("hook") not in DEVICE_HOOKS or "dev" in c:
                continue
            rc, out = k.nft_text(ns, f"list chain {c['family']} {c['table']} {c['name']}")
            m = re.search(r'hook \w+ (?:devices = \{([^}]*)\}|device "?([^"\s;]+)"?)', out) \
                if rc == 0 else None
            if m:
                devs = [d.strip().strip('"') for d in (m.group(1) or m.group(2)).split(",")]
                c["dev"] = devs[0] if len(devs) == 1 else devs
    return doc
