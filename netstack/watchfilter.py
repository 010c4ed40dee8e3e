"""What may leave sys-net's uplink, and the kernel filter that passes everything else.

The uplink watch (netstack/watch.py, issue 29) reads sys-net's uplink through an AF_PACKET
socket whose classic BPF filter drops, in the kernel, every packet the chain allows out:
the socket wakes only for what should never be there, so a chain that behaves costs one
short filter run per packet and no copy to user space. This module is the pure part:

- `allowed(...)`: the allowed set, from the plan in force and the live facts the caller
  read (each VPN qube's current server, the uplink's own addresses, the resolvers, a
  public-network Tor gateway's guards). Data in, data out; every allowance carries the
  reason it exists (`Allowed.why`), which `netstack watch --status` prints.
- `program(allowed)`: the classic BPF program (what SO_ATTACH_FILTER takes) for a packet
  socket of type SOCK_DGRAM: offsets count from the network header, the ethertype comes
  from the kernel's `skb->protocol` (an ancillary load), and only outgoing packets
  (PACKET_OUTGOING) can pass. Return 0 = allowed (dropped by the filter), ALARM = copied
  to the watch.
- `run(prog, ...)`: the same program interpreted in Python, with the kernel's semantics
  (an out-of-bounds load ends the program with 0). The watch re-judges a packet the kernel
  passed with the program made from freshly read facts, so a filter that lagged behind a
  failover or a new guard never raises a false alarm: the judge and the kernel filter are
  one program by construction.

Fail closed: a malformed or truncated IPv4/IPv6 header, an unknown ethertype, a VLAN tag,
IPv6 extension headers (outside a plain chain), a fragment to a peer nothing allows: all
pass the filter, i.e. are alarms. Docs: README "Watching the uplink", docs/security.md.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from netstack.model import Plan, QubeInfo

Transport = tuple[str, str, int]  # (address, proto, port), as the kill switch's sets

# --- classic BPF (linux/filter.h, linux/bpf_common.h) ---
LD, LDX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, LEN, MSH = 0x00, 0x20, 0x40, 0x80, 0xA0
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
ADD, AND, RSH = 0x00, 0x50, 0x70
K, X = 0x00, 0x08
TAX, TXA = 0x00, 0x80
SKF_AD_OFF = 0xFFFFF000  # -0x1000 as the u32 `k` of an ancillary load
AD_PROTOCOL, AD_PKTTYPE, AD_VLAN_TAG_PRESENT = 0, 4, 48
ETH_HLEN = 14
PACKET_OUTGOING = 4
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
ALARM = 0x40000  # bytes copied of a passing packet: a whole GSO super-packet
MAX_INSNS = 4096  # BPF_MAXINSNS: the kernel refuses a longer classic program
PROTO = {"tcp": 6, "udp": 17}
# ICMPv6 a link needs (MLD 130-132 and 143, router/neighbour solicitation and
# advertisement 133-136), allowed only with the hop limit the RFCs require (255 for ND,
# 1 for MLD): a routed packet never has those
LINK_ICMP6 = (130, 131, 132, 133, 134, 135, 136, 143)

Insn = tuple[int, int, int, int]  # (code, jt, jf, k): struct sock_filter


@dataclass(frozen=True)
class Allowed:
    """What may leave the uplink. `own`: the uplink's addresses (the source of anything a
    plain chain sends, masqueraded); `transport`: VPN transport (to the server each VPN
    qube uses now); `relays`: TCP to a Tor gateway's guards, relays or bridges;
    `dns`: resolvers sys-net's own lookups go to (a VPN endpoint given by name);
    `dhcp`: the DHCP client's requests; `plain`: an app qube reaches the uplink through no
    VPN or Tor, so anything from `own` is its traffic; `ipv6`: the link's ND and MLD (the
    stack has IPv6 on). ARP is always allowed. `why`: one line per allowance."""

    own: tuple[str, ...] = ()
    transport: frozenset[Transport] = frozenset()
    relays: frozenset[tuple[str, int]] = frozenset()
    dns: frozenset[str] = frozenset()
    dhcp: bool = False
    plain: bool = False
    ipv6: bool = False
    why: tuple[str, ...] = field(default=(), compare=False)

    def digest(self) -> str:
        """Names this allowed set (the watch re-attaches its filter when it changes)."""
        key = repr((sorted(self.own), sorted(self.transport), sorted(self.relays),
                    sorted(self.dns), self.dhcp, self.plain, self.ipv6))
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {"own": list(self.own), "transport": [list(t) for t in sorted(self.transport)],
                "relays": [list(r) for r in sorted(self.relays)], "dns": sorted(self.dns),
                "dhcp": self.dhcp, "plain": self.plain, "ipv6": self.ipv6,
                "why": list(self.why), "digest": self.digest()}


def outermost(plan: Plan, name: str) -> QubeInfo | None:
    """The VPN or Tor qube nearest sys-net on `name`'s path (itself included): what the
    uplink sees of the qube's traffic is that gateway's transport. None: nothing
    encapsulates it, it leaves in clear."""
    found = None
    for q in plan.chain(name):
        if q.traits.protection:
            found = q
    return found


def bridge_peers(lines: Iterable[str], plan: Plan) -> set[tuple[str, int]]:
    """(address, port) of a gateway's bridge lines; `lab:obfs4` is the lab's bridge."""
    from netstack.tor.obfs4 import LAB_REF, OBFS4_PORT

    out = set()
    for line in lines:
        if line == LAB_REF:
            if plan.lab:
                out |= {(n.address, OBFS4_PORT) for n in plan.lab.tor_nodes.values()
                        if n.role == "bridge"}
            continue
        words = line.split()
        if len(words) >= 2:
            host, _, port = words[1].rpartition(":")
            if port.isdigit():
                out.add((host.strip("[]"), int(port)))
    return out


def allowed(plan: Plan, *, own: Iterable[str], transport: dict[str, list[Transport]],
            resolvers: Iterable[str] = (), tor_peers: dict[str, set[tuple[str, int]]]
            | None = None) -> Allowed:
    """The allowed set of the uplink, from the plan in force and live facts: `own` the
    uplink's addresses now, `transport` each VPN qube's transport to the server it uses now
    (the failover state, resolved as `up` resolved it), `resolvers` what sys-net's own
    lookups go to (the plan's or the DHCP lease's), `tor_peers` a public-network Tor
    gateway's guards and the relays it is connected to (tor's control port). A gateway
    of the lab's private network may reach the lab's relays; one with bridges, only them.
    A qube with no gateway below it makes the chain plain; a net or firewall qube's own
    traffic is never a reason to allow anything (a compromised one is what we watch)."""
    why: list[str] = ["ARP (the link's own)"]
    gates: dict[str, QubeInfo] = {}
    plain_by: list[str] = []
    for q in plan.qubes:
        if q.traits.owns_uplink or q.cut_off:
            continue
        g = outermost(plan, q.name)
        if g is not None:
            gates.setdefault(g.name, g)
        elif not q.traits.provides_network:
            plain_by.append(q.name)
    trans: set[Transport] = set()
    relays: set[tuple[str, int]] = set()
    names = False
    for g in gates.values():
        if g.traits.protection == "vpn":
            got = transport.get(g.name, [])
            trans |= set(got)
            why += [f"{pr} to {a} port {po}: VPN qube {g.name}'s current server"
                    for a, pr, po in got]
            eps = getattr(g.info, "endpoints", [])
            names = names or any(not _is_ip(e.host) for e in eps)
        elif g.traits.protection == "tor":
            lines = list(getattr(g.info, "bridges", []))
            if lines:
                got_r = bridge_peers(lines, plan)
                what = "bridge"
            elif getattr(g.info, "lab_network", False) and plan.lab:
                got_r = {(n.address, p) for n in plan.lab.tor_nodes.values()
                         if n.role != "bridge" for p in (n.or_port, n.dir_port)}
                what = "relay of the lab's Tor network"
            else:
                got_r = set((tor_peers or {}).get(g.name, set()))
                what = "guard or connected relay"
            relays |= got_r
            why += [f"tcp to {a} port {p}: Tor gateway {g.name}'s {what}"
                    for a, p in sorted(got_r)]
    dns: set[str] = set()
    if names:
        dns = {r for r in resolvers if _is_ip(r)}
        why += [f"DNS to {r}: a VPN endpoint is a name sys-net resolves" for r in sorted(dns)]
    dhcp = type(plan.net.info).__name__ == "DhcpInfo"
    if dhcp:
        why.append("DHCP requests (udp 68 -> 67): sys-net's lease")
    if plain_by:
        why.append(f"anything from the uplink's address: {', '.join(plain_by)} reach(es) "
                   "it through no VPN or Tor gateway")
    if plan.ipv6:
        why.append("IPv6 neighbour discovery and MLD ([stack] ipv6 = true)")
    return Allowed(tuple(sorted(own)), frozenset(trans), frozenset(relays), frozenset(dns),
                   dhcp, bool(plain_by), plan.ipv6, tuple(why))


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


# --- the program ---

class _Asm:
    """Instructions with symbolic forward jumps, resolved at the end. A conditional jump
    reaches at most 255 instructions ahead: the program is built from short blocks, and a
    far target is reached with `ja` (32-bit)."""

    def __init__(self, l2: int = 0) -> None:
        self.l2 = l2  # bytes of link-layer header before the network header in the data
        self.code: list[tuple[int, Any, Any, int]] = []
        self.labels: dict[str, int] = {}
        self._n = 0

    def new(self, hint: str) -> str:
        self._n += 1
        return f"{hint}{self._n}"

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int = 0, jt: Any = 0, jf: Any = 0, raw: bool = False) -> None:
        """A packet load's offset counts from the network header (the link-layer header's
        length is added here, unless `raw`); an ancillary load's never moves."""
        cls, mode = code & 0x07, code & 0xE0
        if not raw and ((cls == LD and mode in (ABS, IND) and k < SKF_AD_OFF)
                        or (cls == LDX and mode == MSH)):
            k += self.l2
        self.code.append((code, jt, jf, k & 0xFFFFFFFF))

    def ret(self, v: int) -> None:
        self.op(RET | K, v)

    def ja(self, label: str) -> None:
        self.code.append((JMP | JA, 0, 0, label))  # type: ignore[arg-type]

    def done(self) -> list[Insn]:
        out: list[Insn] = []
        for i, (code, jt, jf, k) in enumerate(self.code):
            if code == JMP | JA and isinstance(k, str):
                out.append((code, 0, 0, self.labels[k] - (i + 1)))
            else:
                out.append((code, self._off(jt, i), self._off(jf, i), k))
        return out

    def _off(self, t: Any, i: int) -> int:
        if isinstance(t, int):
            return t
        d = self.labels[t] - (i + 1)
        if not 0 <= d <= 255:
            raise ValueError(f"jump to {t} is {d} instructions away")
        return d


def _v4(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


def _v6_words(a: str) -> list[int]:
    b = ipaddress.IPv6Address(a).packed
    return list(struct.unpack("!4I", b))


def program(al: Allowed, l2: int = 0) -> list[Insn]:
    """The classic BPF program: 0 for what `al` allows (and for every packet that is not
    outgoing), ALARM for the rest. `l2`: ETH_HLEN for an Ethernet uplink read whole
    (SOCK_RAW: the ethertype is the frame's own, so a VLAN tag the kernel would look past
    is seen), 0 for a device without link header (SOCK_DGRAM, the ethertype the kernel
    says). A tag kept out of band (VLAN offload) is an alarm either way. Raises
    ValueError when the allowed set does not fit in the kernel's 4096 instructions (a few
    hundred flows)."""
    a = _Asm(l2)
    a.op(LD | W | ABS, SKF_AD_OFF + AD_PKTTYPE)
    a.op(JMP | JEQ | K, PACKET_OUTGOING, 1, 0)
    a.ret(0)  # what arrives or loops back: not ours to judge
    a.op(LD | W | ABS, SKF_AD_OFF + AD_VLAN_TAG_PRESENT)
    a.op(JMP | JEQ | K, 0, 1, 0)
    a.ret(ALARM)
    if l2:
        a.op(LD | W | LEN)
        a.op(JMP | JGE | K, l2, 1, 0)
        a.ret(ALARM)
        a.op(LD | H | ABS, 12, raw=True)
    else:
        a.op(LD | W | ABS, SKF_AD_OFF + AD_PROTOCOL)
    a.op(JMP | JEQ | K, ETH_P_ARP, 0, 1)
    a.ret(0)
    a.op(JMP | JEQ | K, ETH_P_IP, 1, 0)
    a.ja("v6")
    _ipv4(a, al)
    a.label("v6")
    a.op(JMP | JEQ | K, ETH_P_IPV6, 1, 0)
    a.ret(ALARM)  # any other ethertype (a VLAN tag, raw LLC, ...)
    _ipv6(a, al)
    out = a.done()
    if len(out) > MAX_INSNS:
        raise ValueError(f"the uplink's allowed set needs {len(out)} filter instructions, "
                         f"more than the kernel's {MAX_INSNS}")
    return out


def _ipv4(a: _Asm, al: Allowed) -> None:
    # a sane header: at least 20 bytes, version 4, IHL >= 5; and, unless a later fragment,
    # the first 4 bytes of the transport header present (ports, ICMP type)
    a.op(LD | W | LEN)
    a.op(JMP | JGE | K, a.l2 + 20, 1, 0)
    a.ret(ALARM)
    a.op(LD | B | ABS, 0)
    a.op(ALU | AND | K, 0xF0)
    a.op(JMP | JEQ | K, 0x40, 1, 0)
    a.ret(ALARM)
    a.op(LDX | B | MSH, 0)
    a.op(MISC | TXA)
    a.op(JMP | JGE | K, 20, 1, 0)
    a.ret(ALARM)
    frag = a.new("frag")
    a.op(LD | H | ABS, 6)
    a.op(JMP | JSET | K, 0x1FFF, frag, 0)
    a.op(MISC | TXA)
    a.op(ALU | ADD | K, a.l2 + 4)
    a.op(MISC | TAX)
    a.op(LD | W | LEN)
    a.op(JMP | JGE | X, 0, frag, 0)
    a.ret(ALARM)
    a.label(frag)
    if al.plain:
        for o in al.own:
            if ":" not in o:
                nxt = a.new("n")
                a.op(LD | W | ABS, 12)
                a.op(JMP | JEQ | K, _v4(o), 0, nxt)
                a.ret(0)
                a.label(nxt)
    flows = [(addr, PROTO[pr], po) for addr, pr, po in sorted(al.transport) if ":" not in addr]
    flows += [(addr, 6, po) for addr, po in sorted(al.relays) if ":" not in addr]
    flows += [(addr, p, 53) for addr in sorted(al.dns) if ":" not in addr for p in (17, 6)]
    for addr, proto, port in flows:
        nxt = a.new("n")
        a.op(LD | W | ABS, 16)
        a.op(JMP | JEQ | K, _v4(addr), 0, nxt)
        a.op(LD | B | ABS, 9)
        a.op(JMP | JEQ | K, proto, 0, nxt)
        a.op(LD | H | ABS, 6)
        a.op(JMP | JSET | K, 0x1FFF, 0, 1)  # a later fragment to the peer: no ports
        a.ret(0)
        a.op(LDX | B | MSH, 0)
        a.op(LD | H | IND, 2)
        a.op(JMP | JEQ | K, port, 0, nxt)
        a.ret(0)
        a.label(nxt)
    if al.dhcp:
        nxt = a.new("n")
        a.op(LD | B | ABS, 9)
        a.op(JMP | JEQ | K, 17, 0, nxt)
        a.op(LD | H | ABS, 6)
        a.op(JMP | JSET | K, 0x1FFF, nxt, 0)
        a.op(LDX | B | MSH, 0)
        a.op(LD | W | IND, 0)
        a.op(JMP | JEQ | K, (68 << 16) | 67, 0, nxt)
        a.ret(0)
        a.label(nxt)
    # an ICMP error (unreachable, time exceeded) to a peer we may talk to: what the
    # transport's own socket answers to a server's late packet
    peers = sorted({f[0] for f in flows})
    if peers:
        nxt, miss, body = a.new("n"), a.new("m"), a.new("b")
        a.op(LD | B | ABS, 9)
        a.op(JMP | JEQ | K, 1, 0, miss)
        a.op(LD | H | ABS, 6)
        a.op(JMP | JSET | K, 0x1FFF, miss, 0)
        a.op(LDX | B | MSH, 0)
        a.op(LD | B | IND, 0)
        a.op(JMP | JEQ | K, 3, body, 0)
        a.op(JMP | JEQ | K, 11, body, miss)
        a.label(miss)
        a.ja(nxt)  # past the peers, however many: a conditional jump reaches 255
        a.label(body)
        a.op(LD | W | ABS, 16)
        for p in peers:
            a.op(JMP | JEQ | K, _v4(p), 0, 1)
            a.ret(0)
        a.label(nxt)
    a.ret(ALARM)


def _ipv6(a: _Asm, al: Allowed) -> None:
    a.op(LD | W | LEN)
    a.op(JMP | JGE | K, a.l2 + 44, 1, 0)
    a.ret(ALARM)
    a.op(LD | B | ABS, 0)
    a.op(ALU | AND | K, 0xF0)
    a.op(JMP | JEQ | K, 0x60, 1, 0)
    a.ret(ALARM)
    if al.ipv6:
        nxt = a.new("n")
        a.op(LD | B | ABS, 6)
        a.op(JMP | JEQ | K, 58, 0, nxt)
        a.op(LD | B | ABS, 7)
        a.op(JMP | JEQ | K, 255, 1, 0)
        a.op(JMP | JEQ | K, 1, 0, nxt)
        a.op(LD | B | ABS, 40)
        for i, t in enumerate(LINK_ICMP6):
            last = i == len(LINK_ICMP6) - 1
            a.op(JMP | JEQ | K, t, len(LINK_ICMP6) - i - 1, nxt if last else 0)
        a.ret(0)
        a.label(nxt)
        # MLD reports carry a hop-by-hop header (the router alert): 8 bytes, then
        # ICMPv6 type 130-132 or 143 at 48, hop limit 1
        nxt = a.new("n")
        a.op(LD | W | LEN)
        a.op(JMP | JGE | K, a.l2 + 49, 0, nxt)
        a.op(LD | B | ABS, 6)
        a.op(JMP | JEQ | K, 0, 0, nxt)
        a.op(LD | H | ABS, 40)
        a.op(JMP | JEQ | K, (58 << 8) | 0, 0, nxt)
        a.op(LD | B | ABS, 7)
        a.op(JMP | JEQ | K, 1, 0, nxt)
        a.op(LD | B | ABS, 48)
        mld = (130, 131, 132, 143)
        for i, t in enumerate(mld):
            last = i == len(mld) - 1
            a.op(JMP | JEQ | K, t, len(mld) - i - 1, nxt if last else 0)
        a.ret(0)
        a.label(nxt)
    if al.plain and al.ipv6:
        for o in al.own:
            if ":" in o:
                words = _v6_words(o)
                nxt = a.new("n")
                for j, wd in enumerate(words):
                    a.op(LD | W | ABS, 8 + 4 * j)
                    a.op(JMP | JEQ | K, wd, 0, nxt)
                a.ret(0)
                a.label(nxt)
    for addr, pr, po in sorted(al.transport):
        if ":" not in addr:
            continue
        nxt = a.new("n")
        for j, wd in enumerate(_v6_words(addr)):
            a.op(LD | W | ABS, 24 + 4 * j)
            a.op(JMP | JEQ | K, wd, 0, nxt)
        a.op(LD | B | ABS, 6)  # the next header: no extension header allowed here
        a.op(JMP | JEQ | K, PROTO[pr], 0, nxt)
        a.op(LD | H | ABS, 42)
        a.op(JMP | JEQ | K, po, 0, nxt)
        a.ret(0)
        a.label(nxt)
    a.ret(ALARM)


def pack(prog: list[Insn]) -> bytes:
    """The program as an array of struct sock_filter (u16 code, u8 jt, u8 jf, u32 k)."""
    return b"".join(struct.pack("=HBBI", c, jt, jf, k) for c, jt, jf, k in prog)


def run(prog: list[Insn], data: bytes, *, proto: int, pkttype: int, vlan: bool = False
        ) -> int:
    """Interpret `prog` on a packet as the kernel does for a packet socket (`data` as the
    socket reads it: from the link header for SOCK_RAW, the network header for
    SOCK_DGRAM; `proto` skb->protocol; `pkttype` PACKET_*; `vlan` a tag out of band):
    returns what the kernel would (0: dropped, else the bytes kept). An out-of-bounds
    load ends the program with 0, as in the kernel."""
    acc = xr = 0
    pc = 0
    n = len(data)
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls in (LD, LDX):
            mode, size = code & 0xE0, code & 0x18
            if cls == LDX:
                if mode == MSH:
                    if k >= n:
                        return 0
                    xr = (data[k] & 0x0F) * 4
                elif mode == IMM:
                    xr = k
                elif mode == LEN:
                    xr = n
                else:
                    raise ValueError(f"ldx mode {mode:#x}")
                continue
            if mode == LEN:
                acc = n
                continue
            if mode == IMM:
                acc = k
                continue
            off = k if mode == ABS else (xr + k) & 0xFFFFFFFF
            if mode == ABS and k >= SKF_AD_OFF:
                ad = k - SKF_AD_OFF
                if ad == AD_PROTOCOL:
                    acc = proto
                elif ad == AD_PKTTYPE:
                    acc = pkttype
                elif ad == AD_VLAN_TAG_PRESENT:
                    acc = int(vlan)
                else:
                    raise ValueError(f"ancillary load {ad}")
                continue
            width = {W: 4, H: 2, B: 1}[size]
            if off + width > n:
                return 0
            acc = int.from_bytes(data[off:off + width], "big")
        elif cls == ALU:
            src = xr if code & X else k
            op = code & 0xF0
            if op == ADD:
                acc = (acc + src) & 0xFFFFFFFF
            elif op == AND:
                acc &= src
            elif op == RSH:
                acc >>= src
            else:
                raise ValueError(f"alu op {op:#x}")
        elif cls == JMP:
            op = code & 0xF0
            if op == JA:
                pc += k
                continue
            src = xr if code & X else k
            hit = {JEQ: acc == src, JGT: acc > src, JGE: acc >= src, JSET: bool(acc & src)}[op]
            pc += jt if hit else jf
        elif cls == RET:
            return k
        elif cls == MISC:
            if code & 0xF8 == TAX:
                xr = acc
            else:
                acc = xr
        else:
            raise ValueError(f"instruction class {cls}")


# --- what a packet that passed looks like (the alarm's decoded headers) ---

def decode(data: bytes, proto: int) -> dict[str, Any]:
    """The headers of a packet that passed, for the log and `status`: addresses, protocol,
    ports or ICMP type, length, and a one-line summary. Never fails: what cannot be read is
    said so."""
    out: dict[str, Any] = {"ethertype": f"{proto:#06x}", "length": len(data)}
    try:
        if proto == ETH_P_IP and len(data) >= 20:
            ihl = (data[0] & 0x0F) * 4
            p = data[9]
            out.update(family="ipv4", src=str(ipaddress.IPv4Address(data[12:16])),
                       dst=str(ipaddress.IPv4Address(data[16:20])), proto=p, ttl=data[8])
            frag = struct.unpack("!H", data[6:8])[0] & 0x1FFF
            if frag:
                out["fragment_offset"] = frag * 8
            _l4(out, data, ihl, p, frag == 0)
        elif proto == ETH_P_IPV6 and len(data) >= 40:
            p = data[6]
            out.update(family="ipv6", src=str(ipaddress.IPv6Address(data[8:24])),
                       dst=str(ipaddress.IPv6Address(data[24:40])), proto=p,
                       hop_limit=data[7])
            _l4(out, data, 40, p, True)
        elif proto == ETH_P_ARP:
            out["family"] = "arp"
        else:
            out["family"] = "other"
    except (ValueError, struct.error):
        out["family"] = "malformed"
    out["summary"] = summary(out)
    return out


def _l4(out: dict[str, Any], data: bytes, off: int, p: int, first: bool) -> None:
    names = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
    out["l4"] = names.get(p, str(p))
    if not first or len(data) < off + 4:
        return
    if p in (6, 17):
        out["sport"], out["dport"] = struct.unpack("!HH", data[off:off + 4])
        if p == 6 and len(data) >= off + 14:
            flags = data[off + 13]
            out["tcp_flags"] = "".join(c for c, bit in zip("FSRPAUEC", range(8), strict=True)
                                       if flags & (1 << bit))
    elif p in (1, 58):
        out["icmp_type"], out["icmp_code"] = data[off], data[off + 1]


def summary(d: dict[str, Any]) -> str:
    """`udp 192.0.2.2:40000 -> 198.51.100.80:53 (72 bytes)` and the like."""
    fam = d.get("family")
    if fam in ("ipv4", "ipv6"):
        l4 = d.get("l4", "?")
        if "sport" in d:
            s = f"{l4} {d['src']}:{d['sport']} -> {d['dst']}:{d['dport']}"
            if d.get("tcp_flags"):
                s += f" [{d['tcp_flags']}]"
        elif "icmp_type" in d:
            s = f"{l4} {d['src']} -> {d['dst']} type {d['icmp_type']} code {d['icmp_code']}"
        else:
            s = f"{l4} {d['src']} -> {d['dst']}"
        return f"{s} ({d['length']} bytes)"
    return f"{fam} ethertype {d['ethertype']} ({d['length']} bytes)"


# --- the watch's file (written by netstack/watch.py, read by `status` and `watch`) ---

@dataclass
class Alarm:
    """One packet the chain does not allow, seen leaving the uplink."""

    at: float  # when the watch judged it (wall clock)
    packet_at: float  # the kernel's timestamp of the packet
    headers: dict[str, Any]
    pcap_index: int | None  # its place in the pcap file (None: the file was full)
    cut_at: float | None = None  # when the watch set the uplink down for it


@dataclass
class WatchFile:
    """`watch.json` in the stack's state directory: who watches, what it allows, and the
    alarms (the first ones kept, all counted) until `netstack watch --clear`."""

    pid: int
    start: int | None  # the watcher's process start time (pid reuse)
    by: str  # supervisor | command
    on_leak: str  # log | cut
    started_at: float
    heartbeat: float  # refreshed every second while it watches
    device: str
    netns: str
    allowed: dict[str, Any]
    instructions: int
    reattached: int = 0  # how often the allowed set changed (failover, guards)
    alarms: list[Alarm] = field(default_factory=list)
    count: int = 0
    cut: bool = False  # the watch set the uplink down
    pcap: str = ""
    stopped: bool = False  # it ended cleanly (Ctrl-C, `--for`, the supervisor stopping)


@dataclass
class Cleared:
    """`watch-cleared.json`: alarms judged before `at` are forgotten (`watch --clear`)."""

    at: float


STALE_S = 5.0  # a heartbeat older than this: the watcher is gone or stuck


def problems(w: WatchFile | None, *, wanted: bool, alive: bool, now: float) -> list[str]:
    """What `status` says of the watch: every alarm is DEGRADED until cleared; a watch
    the config asks for (`watch = true`) that does not run is DEGRADED too."""
    out = []
    if w is not None and w.count:
        last = w.alarms[-1].headers.get("summary", "?") if w.alarms else "?"
        out.append(f"uplink watch: {w.count} packet(s) the chain does not allow left the "
                   f"uplink (last: {last}); pcap {w.pcap}"
                   + ("; the watch set the uplink down" if w.cut else "")
                   + "; fix: read the pcap, then `netstack watch --clear`")
    running = w is not None and alive and not w.stopped and now - w.heartbeat < STALE_S
    if wanted and not running:
        out.append("uplink watch not running (the config says watch = true); fix: "
                   "`netstack down` and `up` again")
    return out
