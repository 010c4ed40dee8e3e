"""Per-qube firewall rules in Qubes' words (qvm-firewall): an ordered list, first match
wins, nothing matched is dropped; enforced in the qube's netvm, outside the qube's reach.

    [qubes.work]
    firewall = [
      {action = "accept", specialtarget = "dns"},
      {action = "accept", dsthost = "198.51.100.0/24", proto = "tcp", dstports = "80-443"},
      {action = "accept", dsthost = "web.lab.test", proto = "tcp", dstports = 80, expire = "+3600"},
    ]

A qube without a `firewall` key keeps the netvm's plain behaviour. In the netvm, a client
with rules gets its own chain `fw-QUBE`, jumped to from forward for packets from its link.
Each rule's destination lives in a named set, so a hostname's addresses (resolved through
sys-net's resolver at `up` and on each change; a name that does not resolve leaves the set
empty, so the rule matches nothing: fail closed) and an `expire=`
(an element timeout: the kernel ends the rule on time, netstack running or not) change
only the set, never the rules."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import re
from typing import Any

from netstack.errors import ConfigError
from netstack.model import FwRule, is_net  # noqa: F401  (re-exported: the rule's type)

KEYS = {"action", "dsthost", "proto", "dstports", "icmptype", "specialtarget", "expire",
        "comment"}
MAX_RULES = 10_000
HOST_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
                     r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def parse(qube: str, raw: Any) -> tuple[FwRule, ...]:
    """The config's `firewall = [...]` of `qube`, or a ConfigError naming the rule and the
    field and saying how to fix it."""
    base = f"qube {qube!r} field 'firewall'"
    if not isinstance(raw, list):
        raise ConfigError(base, "must be a list of rules",
                          'write firewall = [{action = "accept", dsthost = "..."}]')
    if len(raw) > MAX_RULES:
        raise ConfigError(base, f"{len(raw)} rules, at most {MAX_RULES}")
    return tuple(_rule(f"{base} rule {i + 1}", r) for i, r in enumerate(raw))


def _rule(where: str, r: Any) -> FwRule:
    if not isinstance(r, dict):
        raise ConfigError(where, "must be a table", '{action = "accept", ...}')
    for k in r:
        if k not in KEYS:
            raise ConfigError(where, f"unknown key {k!r}",
                              f"allowed keys: {', '.join(sorted(KEYS))}")
    action = r.get("action")
    if action is None:
        raise ConfigError(f"{where} 'action'", "missing", 'add action = "accept" or "drop"')
    if action not in ("accept", "drop"):
        raise ConfigError(f"{where} 'action'", f"{action!r} is not an action",
                          'use action = "accept" or "drop"')
    host = r.get("dsthost")
    if host is not None:
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{where} 'dsthost'", "must be an address, prefix or hostname")
        host = host.strip().lower()
        if "%" in host:
            raise ConfigError(f"{where} 'dsthost'", f"{host!r} has an IPv6 scope (%...): a "
                              "rule's destination is beyond the netvm, never on one of its "
                              "links", "drop the %... part, or use a global address")
        last = host.rstrip(".").rsplit(".", 1)[-1]
        if not host.isascii() or (not is_net(host) and (
                not HOST_RE.match(host.rstrip("."))
                # a top-level label is never a number: "1.2.3" and "0x7f.1" are addresses
                # that inet_aton would read, not names
                or last.isdigit() or re.fullmatch(r"0x[0-9a-f]+", last))):
            raise ConfigError(f"{where} 'dsthost'", f"{host!r} is neither an address, a "
                              "prefix nor a hostname",
                              'e.g. "192.0.2.7", "198.51.100.0/24" or "example.org"')
        if is_net(host):
            try:  # host bits are a typo (198.51.100.80/0 would accept everything)
                net = ipaddress.ip_network(host, strict=True)
            except ValueError:
                raise ConfigError(f"{where} 'dsthost'", f"{host!r} has host bits set",
                                  f"write the network: {ipaddress.ip_network(host, False)}"
                                  ) from None
            if net.version == 6 and (net.network_address.ipv4_mapped is not None
                                     or net.network_address in ipaddress.ip_network(
                                         "::ffff:0:0/96")):
                raise ConfigError(f"{where} 'dsthost'", f"{host!r} is an IPv4 address "
                                  "written as IPv6", "write the IPv4 address itself")
            host = str(net) if net.num_addresses > 1 else str(net.network_address)
    proto = r.get("proto")
    if proto is not None and proto not in ("tcp", "udp", "icmp"):
        raise ConfigError(f"{where} 'proto'", f"{proto!r} is not a protocol",
                          'use proto = "tcp", "udp" or "icmp"')
    ports = _ports(where, r.get("dstports"))
    if ports and proto not in ("tcp", "udp"):
        raise ConfigError(f"{where} 'dstports'", "ports need a protocol with ports",
                          'add proto = "tcp" or "udp"')
    icmptype = r.get("icmptype")
    if icmptype is not None:
        if proto != "icmp":
            raise ConfigError(f"{where} 'icmptype'", "an ICMP type needs proto = \"icmp\"")
        if not isinstance(icmptype, int) or isinstance(icmptype, bool) or \
                not 0 <= icmptype <= 255:
            raise ConfigError(f"{where} 'icmptype'", f"{icmptype!r} is not 0-255")
    special = r.get("specialtarget")
    if special is not None:
        if special != "dns":
            raise ConfigError(f"{where} 'specialtarget'", f"{special!r} is not a target",
                              'use specialtarget = "dns"')
        if host or proto or ports:
            raise ConfigError(f"{where} 'specialtarget'", "stands alone",
                              "remove dsthost, proto and dstports from this rule")
    comment = r.get("comment")
    if comment is not None and (not isinstance(comment, str)
                                or len(comment.encode()) > COMMENT_BYTES
                                or not comment.isprintable()
                                or any(c in comment for c in '"\\')):
        raise ConfigError(f"{where} 'comment'", f"must be one line of text, printable, at "
                          f"most {COMMENT_BYTES} bytes in UTF-8, no quotes or backslashes",
                          "one line without quotes or backslashes, shorter if long (a "
                          "non-ASCII letter takes 2-4 bytes)")
    rel, at = _expire(where, r.get("expire"))
    return FwRule(action, host, proto, ports, icmptype, special, rel, at, comment)


def _ports(where: str, v: Any) -> tuple[int, int] | None:
    if v is None:
        return None
    fix = 'a port or a range: dstports = 443 or dstports = "8000-8080"'
    if isinstance(v, int) and not isinstance(v, bool):
        lo = hi = v
    elif isinstance(v, str) and re.fullmatch(r"[0-9]{1,5}(-[0-9]{1,5})?", v):
        lo, _, hi_s = v.partition("-")
        lo, hi = int(lo), int(hi_s or lo)
    else:
        raise ConfigError(f"{where} 'dstports'", f"{v!r} is not a port or a range", fix)
    if not (1 <= lo <= hi <= 65535):
        raise ConfigError(f"{where} 'dstports'", f"{v!r} is outside 1-65535 or backwards",
                          fix)
    return lo, hi


EPOCH_MIN = 1_000_000_000  # 2001: a smaller number is a typo, not a Unix time
# The kernel takes a set element's timeout in milliseconds below 2**64 / 10**6 (about 584
# years: nf_msecs_to_jiffies64, ERANGE above); a Unix time below 2**32 (the year 2106)
# keeps every expiry far inside that, whenever it is loaded.
EPOCH_MAX = 2**32
RELATIVE_MAX = 10**9 - 1  # "+SECONDS": about 31 years
# nftables keeps a rule's comment in its userdata, at most 256 bytes with its own framing
# (NFT_USERDATA_MAXLEN); libnftables aborts the whole process on a longer one. A user's
# comment gets half of it, and the rule's generated comment is cut to RULE_NOTE_BYTES.
COMMENT_BYTES = 128
RULE_NOTE_BYTES = 200


def _expire(where: str, v: Any) -> tuple[int | None, int | None]:
    """("+SECONDS" -> relative, or a Unix time -> absolute), as qvm-firewall's expire=."""
    if v is None:
        return None, None
    if isinstance(v, str) and re.fullmatch(r"\+[0-9]{1,9}", v) and int(v[1:]) > 0:
        return int(v[1:]), None
    if isinstance(v, str) and re.fullmatch(r"[0-9]{10}", v):
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool) and EPOCH_MIN <= v < EPOCH_MAX:
        return None, v
    raise ConfigError(f"{where} 'expire'", f"{v!r} is not an expiry",
                      f'use expire = "+SECONDS" (1-{RELATIVE_MAX}, from `up`) or a Unix time '
                      f"from {EPOCH_MIN} to {EPOCH_MAX - 1}, like 1767225600")


# --- the netvm's rules ----------------------------------------------------------------

def set_name(qid: int, i: int, six: bool, r: FwRule) -> str:
    """The rule's set: its qube, its number and a digest of the rule itself. A set's name
    changes with its content: a reload (one transaction deleting and re-adding the table)
    never re-creates a set under a name whose old elements or flags differ, which
    libnftables can refuse ("interval overlaps", "File exists") although the new list is
    valid (found by tests/integration/test_qubefw_limits.py)."""
    import hashlib

    digest = hashlib.sha256(r.describe().encode()).hexdigest()[:6]
    return f"fw{qid}_{i}_{digest}{'_6' if six else ''}"


def chain_name(qube: str) -> str:
    return f"fw-{qube}"


def add_client_rules(rs: Any, qid: int, qube: str, rules: tuple[FwRule, ...],
                     dns: tuple[str, ...], ipv6: bool = False) -> None:
    """The client's chain in its netvm: its rules in order, then drop (Qubes: nothing
    matched is dropped). common.client_firewalls jumps to it for the client's new
    connections in prerouting. With IPv6 on, neighbour discovery with the netvm returns
    first: it is the link itself, not a destination."""
    from netstack.rules import nft
    from netstack.rules.nft import ND_TYPES

    c = rs.chain(chain_name(qube))
    if ipv6:
        c.add(nft.match(nft.payload("icmpv6", "type"), {"set": ND_TYPES}), {"return": None},
              comment="IPv6 neighbour discovery")
    for i, r in enumerate(rules):
        verdict = nft.ACCEPT if r.action == "accept" else nft.DROP
        note = rule_note(qube, i + 1, r)
        if r.specialtarget == "dns":
            target = nft.ip_daddr({"set": list(dns)} if len(dns) > 1 else dns[0])
            if r.expires:  # the clock fills the set (fill_commands)
                name = set_name(qid, i + 1, False, r)
                rs.add_set(nft.NamedSet(name, "ipv4_addr", [], ["interval", "timeout"]))
                target = nft.in_set(nft.payload("ip", "daddr"), name)
            for proto in ("udp", "tcp"):
                c.add(target, nft.match(nft.payload(proto, "dport"), 53), nft.COUNTER,
                      verdict, comment=note)
            continue
        fams = [r.family()] if r.family() else ["ipv4", "ipv6"]
        for fam in fams:
            six = fam == "ipv6"
            exprs: list[Any] = []
            if r.dsthost is not None or r.expires:
                name = set_name(qid, i + 1, six, r)
                # a name or a clock: filled at run time (fill_commands), empty until then
                elems = [] if r.runtime_set else [_elem(_literal(r, six), None)]
                flags = ["interval"] + (["timeout"] if r.expires else [])
                rs.add_set(nft.NamedSet(name, "ipv6_addr" if six else "ipv4_addr", elems,
                                        flags))
                exprs.append(nft.in_set(nft.payload("ip6" if six else "ip", "daddr"), name))
            else:
                exprs.append(nft.nfproto(fam))
            if r.proto in ("tcp", "udp"):
                exprs.append(nft.l4proto(r.proto))
                if r.dstports:
                    lo, hi = r.dstports
                    exprs.append(nft.match(nft.payload(r.proto, "dport"),
                                           lo if lo == hi else {"range": [lo, hi]}))
            elif r.proto == "icmp":
                exprs.append(nft.l4proto("ipv6-icmp" if six else "icmp"))
                if r.icmptype is not None:
                    exprs.append(nft.match(nft.payload("icmpv6" if six else "icmp", "type"),
                                           r.icmptype))
            c.add(*exprs, nft.COUNTER, verdict, comment=note)
    c.add(nft.COUNTER, nft.DROP, comment=f"{qube}: nothing matched")


def rule_note(qube: str, number: int, r: FwRule) -> str:
    """The rule's nftables comment: its number and its words, cut (at a character, with
    "...") to RULE_NOTE_BYTES of UTF-8 so that no valid rule can exceed what libnftables
    takes (the whole rule stays in firewall.json and `firewall list`)."""
    # single quotes around a comment here: nft's text listing of a comment does not escape
    # a double quote, and what it prints must read back (`audit --ruleset` of a saved one)
    note = f"{qube} rule {number}: {r.describe()}".replace('"', "'")
    if len(note.encode()) <= RULE_NOTE_BYTES:
        return note
    cut = note.encode()[:RULE_NOTE_BYTES - 3].decode(errors="ignore")
    return cut + "..."


def _literal(r: FwRule, six: bool) -> str:
    return r.dsthost or ("::/0" if six else "0.0.0.0/0")


def _elem(host: str, expire: int | None) -> Any:
    net = ipaddress.ip_network(host, strict=False)
    val: Any = str(net.network_address) if net.num_addresses == 1 else \
        {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
    return {"elem": {"val": val, "timeout": expire}} if expire is not None else val


# --- run-time sets: hostnames resolved through the chain, expiry read off the clock --------

def client_lists(plan: Any, netvm: str) -> list[tuple[Any, tuple[FwRule, ...]]]:
    """(client, its rules) of every client of the netvm that has a list."""
    out = []
    for c in plan.qube(netvm).clients:
        rules = plan.qube(c.name).firewall
        if rules is not None:
            out.append((c, rules))
    return out


def plan_has_runtime_sets(plan: Any) -> bool:
    return any(r.host_is_name for q in plan.qubes if q.clients
               for _c, rules in client_lists(plan, q.name) for r in rules)


def hostnames(plan: Any, netvm: str) -> list[str]:
    """The hostnames the netvm's clients' rules name (to resolve, each once)."""
    return sorted({r.dsthost for _c, rules in client_lists(plan, netvm) for r in rules
                   if r.host_is_name and r.dsthost})


def fill_commands(plan: Any, netvm: str, names: dict[str, list[str]], started: float,
                  now: float) -> list[dict[str, Any]]:
    """Flush and fill every run-time set of the netvm's clients' rules, in one transaction:
    a name's addresses (IPv4: names are resolved to A records; unresolved: empty), and an
    expiring rule's elements with the time it has left (none once it ended). The kernel
    ends each element on time, netstack running or not."""
    from netstack.rules.nft import set_commands

    cmds: list[dict[str, Any]] = []
    for c, rules in client_lists(plan, netvm):
        for i, r in enumerate(rules):
            if not r.runtime_set:
                continue
            end = r.deadline(started)
            left = None if end is None else math.ceil(end - now)  # never early
            for six in ([r.family() == "ipv6"] if r.family() else
                        [False] if r.specialtarget else [False, True]):
                if r.specialtarget:
                    from netstack.addressing import VIRTUAL_DNS

                    hosts = list(VIRTUAL_DNS)
                elif r.host_is_name:
                    hosts = [] if six else names.get(r.dsthost or "", [])
                else:
                    hosts = [_literal(r, six)]
                elems = [] if left is not None and left < 1 else \
                    [_elem(h, left) for h in hosts]
                cmds += set_commands(set_name(c.qid, i + 1, six, r), elems)
    return cmds


# --- rules that can never match --------------------------------------------------------

def shadowed(rules: tuple[FwRule, ...] | None, dns: tuple[str, ...]) -> list[tuple[int, int]]:
    """(j, i), 1-based: rule j can never match because an earlier rule i, which never
    expires, matches every connection j would (first match wins). A typo Qubes users make
    (a catch-all `action=drop` put first with `firewall add --before 1`, an accept for a
    port inside an earlier drop of its range) is shown by `plan`, `up` and `firewall`
    instead of found later. A rule with a hostname is judged only by a catch-all (its
    addresses come at run time); an expiring rule shadows nothing (it ends)."""
    out: list[tuple[int, int]] = []
    for j, rj in enumerate(rules or ()):
        for i, ri in enumerate((rules or ())[:j]):
            if _covers(ri, rj, dns):
                out.append((j + 1, i + 1))
                break
    return out


def _covers(a: FwRule, b: FwRule, dns: tuple[str, ...]) -> bool:
    """Does rule `a` match every connection rule `b` matches?"""
    if a.expires:
        return False
    if a.specialtarget == "dns":
        return b.specialtarget == "dns"
    if b.specialtarget == "dns":  # udp and tcp port 53 to the virtual DNS addresses
        return a.proto is None and a.dstports is None and all(
            _host_covers(a.dsthost, d) for d in dns)
    if a.proto is not None and a.proto != b.proto:
        return False
    if a.dstports is not None and (b.dstports is None or not (
            a.dstports[0] <= b.dstports[0] and b.dstports[1] <= a.dstports[1])):
        return False
    if a.icmptype is not None and a.icmptype != b.icmptype:
        return False
    if a.dsthost is None:
        return True
    if b.host_is_name:  # its addresses are IPv4 (A records), known at run time only
        return a.dsthost == "0.0.0.0/0"
    if b.dsthost is None or a.host_is_name:
        return False
    return _host_covers(a.dsthost, b.dsthost)


def _host_covers(a: str | None, b: str) -> bool:
    """Does destination `a` (None: any; a name: not judged) hold every address of `b`?"""
    if a is None:
        return True
    if not is_net(a) or not is_net(b):
        return False
    na, nb = ipaddress.ip_network(a), ipaddress.ip_network(b)
    return na.version == nb.version and nb.subnet_of(na)  # type: ignore[arg-type]


# --- what a list allows (to cut the connections a change forbids) ----------------------

def allows(rules: tuple[FwRule, ...] | None, dst: str, proto: str, dport: int | None,
           icmp_type: int | None, dns: tuple[str, ...], names: dict[str, list[str]] | None
           = None, started: float = 0.0, now: float | None = None) -> bool:
    """Would the list let a new connection to (dst, proto, dport) out? First match wins,
    nothing matched is dropped, no list allows everything. A hostname rule matches the
    addresses its name resolved to (`names`; none known: nothing); an expired rule
    (at `now`) matches nothing."""
    if rules is None:
        return True
    addr = ipaddress.ip_address(dst)
    for r in rules:
        end = r.deadline(started)
        if end is not None and now is not None and end - now < 1:
            continue
        if r.specialtarget == "dns":
            if dst in dns and proto in ("udp", "tcp") and dport == 53:
                return r.action == "accept"
            continue
        if r.host_is_name:
            if dst not in (names or {}).get(r.dsthost or "", []):
                continue
        elif r.dsthost is not None:
            net = ipaddress.ip_network(r.dsthost, strict=False)
            if net.version != addr.version or addr not in net:
                continue
        if r.proto is not None and r.proto != ("icmp" if proto in ("icmp", "icmpv6")
                                               else proto):
            continue
        if r.dstports is not None and (dport is None or
                                       not r.dstports[0] <= dport <= r.dstports[1]):
            continue
        if r.icmptype is not None and icmp_type != r.icmptype:
            continue
        return r.action == "accept"
    return False


# --- the overlay: what `netstack firewall` changed, kept across down/up until `reset` ------

def overlay_path(stack: str) -> str:
    from netstack.names import check_stack
    from netstack.sandbox import HOME_ROOT

    return os.path.join(HOME_ROOT, check_stack(stack), "firewall.json")


def load_overlay(stack: str) -> dict[str, list[Any]]:
    """qube -> its rule list as `netstack firewall` left it (root only; nothing readable:
    no overlay)."""
    path = overlay_path(stack)
    try:
        with open(path) as f:  # not codec: rule tables in the config's own syntax (users
            data = json.load(f)  # may read them), checked by `parse` like the config
    except (FileNotFoundError, PermissionError):
        return {}
    except ValueError:
        raise ConfigError(path, "is damaged", "remove it (every qube's rules go back to the "
                          "config)") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ConfigError(path, "is not a table of rule lists", "remove it")
    return data


def save_overlay(stack: str, overlay: dict[str, list[Any]]) -> None:
    path = overlay_path(stack)
    if not overlay:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    from netstack.kernel import atomic_write

    atomic_write(path, json.dumps(overlay, indent=1, sort_keys=True))  # not codec: above


def rule_from_words(words: list[str]) -> dict[str, Any]:
    """qvm-firewall's `key=value` words as a config table (validated by `parse`)."""
    out: dict[str, Any] = {}
    for w in words:
        k, sep, v = w.partition("=")
        if not sep or not k:
            raise ConfigError(f"rule word {w!r}", "is not key=value",
                              "e.g. action=accept dsthost=192.0.2.7 proto=tcp dstports=443")
        if k in out:
            raise ConfigError(f"rule word {w!r}", f"gives {k} twice", "give each key once")
        # ASCII digits only: str.isdigit() is true of "²", which int() refuses
        out[k] = int(v) if k in ("icmptype", "dstports") and v.isascii() and v.isdigit() \
            else unquote_comment(v) if k == "comment" else v
    return out


def unquote_comment(v: str) -> str:
    """`comment="web only"` as `firewall list` shows it (model.quote_comment), given as one
    word with its quotes (quoted again, or not through a shell): the comment inside. A
    comment never holds a `"` itself (parse refuses it), so the quotes are never its own."""
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1].replace("\\$", "$").replace("\\`", "`")
    return v


def absolute_expiry(rule: dict[str, Any], now: float) -> dict[str, Any]:
    """`firewall add ... expire=+N` keeps the Unix time it ends (as qvm-firewall does), so a
    later reload or `up` never restarts its clock."""
    v = rule.get("expire")
    if isinstance(v, str) and re.fullmatch(r"\+[0-9]{1,9}", v) and int(v[1:]) > 0:
        return {**rule, "expire": str(int(now) + int(v[1:]))}
    return rule  # anything else is judged by `parse` as the config's would be ("+0": no)
