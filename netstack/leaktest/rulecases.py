"""`netstack leaktest --rules`: cases derived from each qube's own rule list (Qubes'
qvm-firewall), proven with real connections from inside the qube:

- every rule's target (an address, a prefix's lab host, a name's resolved addresses, the
  virtual DNS for specialtarget=dns) is probed with the rule's protocol and first port,
  and must be reachable exactly when the list (first match wins) accepts it;
- destinations no rule names (the lab's hosts on other ports) must be unreachable;
- a rule with expire=+3 is added in front: its target is reachable at once and then,
  polled with a deadline, unreachable once the kernel ended the rule; the list is put back.

Reached: TCP connected or refused by the host, a DNS answer (any rcode), an ICMP echo reply
or error from beyond the netvm, UDP refused by the host; unreachable: silence until the
timeout. Every probe targets a host of the lab only."""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from netstack import netns
from netstack.addressing import VIRTUAL_DNS
from netstack.kernel import Kernel
from netstack.rules import qubefw

TIMEOUT = 1.5  # seconds of silence that mean "dropped" (the lab answers in milliseconds)
EXPIRE = 3  # seconds the temporary rule lives


@dataclass
class RuleCase:
    name: str
    why: str
    proto: str  # tcp | udp | icmp | dns
    dst: str
    dport: int | None = None
    expect: bool = True  # reachable?
    got: str = ""  # what the probe saw
    reached: bool | None = None

    @property
    def ok(self) -> bool:
        return self.reached is self.expect

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


@dataclass
class QubeReport:
    qube: str
    netvm: str
    cases: list[RuleCase] = field(default_factory=list)
    expiry: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases) and self.expiry.get("ok", True)

    def to_json(self) -> dict[str, Any]:
        return {"qube": self.qube, "netvm": self.netvm, "ok": self.ok,
                "cases": [c.to_json() for c in self.cases], "expiry": self.expiry}


# --- deriving the cases (pure) ---------------------------------------------------------

def _first_port(r: Any, default: int) -> int:
    return r.dstports[0] if r.dstports else default


def derive(rules: tuple[Any, ...], names: dict[str, list[str]], hosts: list[str],
           started: float, now: float, tor: bool) -> list[RuleCase]:
    """The cases of one list, each with the outcome the list itself predicts. hosts: the
    lab's host addresses (the only destinations probed). Behind a Tor gateway only TCP
    and DNS are probed (nothing else ever passes a gateway)."""
    def expect(proto: str, dst: str, dport: int | None, icmp: int | None = None) -> bool:
        return qubefw.allows(rules, dst, proto, dport, icmp, VIRTUAL_DNS, names, started,
                             now)

    out: list[RuleCase] = []
    seen: set[tuple[str, str, int | None]] = set()

    def add(name: str, why: str, proto: str, dst: str, dport: int | None) -> None:
        key = (proto, dst, dport)
        if key in seen or (tor and proto not in ("tcp", "dns")):
            return
        seen.add(key)
        if proto == "dns":
            want = expect("udp", dst, 53)
        elif proto == "icmp":
            want = expect("icmp", dst, None, 8)
        else:
            want = expect(proto, dst, dport)
        out.append(RuleCase(name, why, proto, dst, dport, want))
    for i, r in enumerate(rules):
        label = f"rule {i + 1}"
        end = r.deadline(started)
        if end is not None and end - now < 1:
            continue  # ended: its target is a non-listed one now
        if r.specialtarget == "dns":
            add(f"{label}-dns", r.describe(), "dns", VIRTUAL_DNS[0], 53)
            continue
        if r.host_is_name:
            targets = [a for a in names.get(r.dsthost or "", []) if a in hosts]
        elif r.dsthost is not None:
            net = ipaddress.ip_network(r.dsthost, strict=False)
            targets = [h for h in hosts if ipaddress.ip_address(h) in net]
        else:
            targets = list(hosts)
        for dst in targets[:2]:
            if r.proto == "icmp" and r.icmptype not in (None, 8):
                continue  # only echo requests are probed
            proto = r.proto or "tcp"
            port = None if proto == "icmp" else _first_port(r, 80 if proto == "tcp" else 53)
            add(f"{label}-{proto}-{dst}", r.describe(), proto, dst, port)
    for dst in hosts:  # what no rule names: the lab's hosts on a port nobody lists
        for port in (81, 65000):
            if not any(_names(r, dst, "tcp", port, names) for r in rules
                       if (end := r.deadline(started)) is None or end - now >= 1):
                add(f"unlisted-tcp-{dst}:{port}", "no rule names it: dropped", "tcp", dst,
                    port)
                break
    return out


def _names(r: Any, dst: str, proto: str, port: int, names: dict[str, list[str]]) -> bool:
    """Does rule `r` speak of this destination at all (whatever its action and clock)?"""
    import dataclasses

    as_accept = dataclasses.replace(r, action="accept", expire=None, expire_at=None)
    return qubefw.allows((as_accept,), dst, proto, port, None, VIRTUAL_DNS, names)


# --- probing from inside the qube (real sockets, lab hosts only) -------------------------

def probe(ns: str, c: RuleCase, timeout: float = TIMEOUT) -> tuple[bool, str]:
    """(reached, what was seen) for one case, from inside namespace `ns`."""
    if c.proto == "dns":
        from netstack.dnswire import lookup_in
        from netstack.errors import ApplyError

        try:
            lookup_in(ns, c.dst, "web.lab.test", 53, timeout, 1)
            return True, "answered"
        except ApplyError as e:
            return ("no answer" not in str(e)), str(e)
    if c.proto == "icmp":
        return _ping(ns, c.dst, timeout)
    kind = socket.SOCK_STREAM if c.proto == "tcp" else socket.SOCK_DGRAM
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, kind)
    try:
        s.settimeout(timeout)
        if c.proto == "tcp":
            try:
                s.connect((c.dst, c.dport or 0))
                return True, "connected"
            except ConnectionRefusedError:
                return True, "refused by the host"
            except TimeoutError:
                return False, "no answer"
            except OSError as e:
                return True, f"error from beyond: {e.strerror}"
        s.connect((c.dst, c.dport or 0))
        s.send(b"netstack rule probe")
        try:
            s.recv(512)
            return True, "answered"
        except ConnectionRefusedError:
            return True, "refused by the host (ICMP port unreachable)"
        except TimeoutError:
            return False, "no answer"
    finally:
        s.close()


def _ping(ns: str, dst: str, timeout: float) -> tuple[bool, str]:
    """One ICMP echo from inside `ns` (scapy builds it, checksum included, and reads the
    reply); a raw socket of the namespace sends it, so the qube's own rules see it."""
    from scapy.layers.inet import ICMP, IP

    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        ident = int(time.monotonic() * 1000) & 0xFFFF
        s.sendto(bytes(ICMP(type=8, id=ident, seq=1) / b"netstack"), (dst, 0))
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                pkt, (src, _) = s.recvfrom(1500)
            except TimeoutError:
                break
            reply = IP(pkt)
            if src == dst and ICMP in reply and reply[ICMP].type == 0 and \
                    reply[ICMP].id == ident:
                return True, "echo reply"
        return False, "no answer"
    finally:
        s.close()


# --- the run ------------------------------------------------------------------------------

def run(stack: str, qube: str | None = None, expiry: bool = True, *, kernel: Kernel
        ) -> list[QubeReport]:
    """The rule cases of every qube with a list (or `qube`), on a running lab stack."""
    from netstack import firewall_live
    from netstack.errors import UsageError
    from netstack.rules import names as rnames
    from netstack.stack import require

    st = require(stack)
    plan = st.plan
    assert plan is not None
    if plan.lab is None:
        raise UsageError("leaktest --rules probes the lab's hosts only: bring the stack up "
                         "with --lab")
    # what an earlier run killed midway left: its temporary rule, expired (then the plan
    # in force is the one without it)
    if firewall_live.drop_leaktest_rules(stack, kernel=kernel, now=time.time()):
        st = require(stack)
        plan = st.plan
        assert plan is not None
    hosts = sorted(h.address for h in plan.lab.hosts.values())
    store = rnames.load(st.dir)
    with_lists = [q for q in plan.qubes if q.firewall is not None
                  and q.netvm and (qube is None or q.name == qube)]
    if qube is not None and not with_lists and plan.has_qube(qube) \
            and plan.qube(qube).cut_off:
        raise UsageError(f"--qube {qube!r} has no netvm (cut off with `attach {qube} none`): "
                         f"its rules are enforced nowhere until it is attached (fix: netstack "
                         f"--stack {stack} attach {qube} NETVM first)")
    if qube is not None and not with_lists:
        raise UsageError(f"--qube {qube!r} has no rule list (see `netstack firewall {qube} "
                         "list`)")
    out = []
    for q in with_lists:
        rules = q.firewall
        tor = plan.qube(q.netvm).traits.protection == "tor"  # TCP and DNS only
        rep = QubeReport(q.name, q.netvm)
        rep.cases = derive(rules, rnames.addresses(store, q.netvm), hosts, st.data.started,
                           time.time(), tor)
        for c in rep.cases:
            c.reached, c.got = probe(q.netns, c)
        if expiry:
            rep.expiry = expiry_case(stack, q.name, q.netns, rep.cases, hosts, tor, kernel)
        out.append(rep)
    return out


def expiry_case(stack: str, qube: str, ns: str, cases: list[RuleCase], hosts: list[str],
                tor: bool, kernel: Kernel) -> dict[str, Any]:
    """A rule with expire=+3 in front, for a target the list drops: open at once, closed
    by the kernel on time (polled with a deadline); then the list is put back."""
    from netstack import firewall_live

    blocked = next((c for c in cases if c.proto == "tcp" and not c.expect and c.ok), None)
    if blocked is None:
        return {"ok": True, "skipped": "no dropped TCP target to open for a while"}
    # marked as leaktest's (its comment) with an expiry: if this run is killed before the
    # `finally`, the next `leaktest --rules` or `firewall QUBE list` removes it
    firewall_live.change(stack, qube, "add", [
        "action=accept", f"dsthost={blocked.dst}", "proto=tcp", f"dstports={blocked.dport}",
        f"expire=+{EXPIRE}", f"comment={firewall_live.LEAKTEST_MARK}"], number=1,
        kernel=kernel)
    t0 = time.monotonic()
    try:
        opened, seen = probe(ns, blocked)
        closed_after = None
        while time.monotonic() - t0 < EXPIRE + 5:
            reached, _ = probe(ns, blocked, 0.5)
            if not reached:
                closed_after = round(time.monotonic() - t0, 2)
                break
            time.sleep(0.2)  # the next probe: the kernel's element timeout is the event
    finally:  # by its mark, not its number (the list back as it was, the config's again
        # if it was the config's)
        firewall_live.drop_leaktest_rules(stack, kernel=kernel, qubes=[qube])
    ok = opened and closed_after is not None and closed_after >= EXPIRE - 1
    return {"ok": ok, "target": f"{blocked.dst}:{blocked.dport}", "open_at_once": opened,
            "seen": seen, "closed_after_s": closed_after, "expire_s": EXPIRE}
