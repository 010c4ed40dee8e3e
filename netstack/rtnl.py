"""A small rtnetlink client for the calls netstack makes on every command: links (veths,
up, delete), addresses and routes, sent as batches (many requests in one write, one ack
each), and the dumps `status` reads (links, addresses, routes, qdiscs, policy rules).

Why not pyroute2 here: importing its IPRoute costs about 60 ms per command and each call
goes through an asyncio loop (docs/field-notes.md, "pyroute2 0.9"); bring-up makes about 60
requests. pyroute2 stays for what is rare or rich (moving a physical device, tc filters,
conntrack), imported only there.

A socket belongs to the network namespace of the thread that made it: make an Rtnl inside
the namespace (netns.entered) and it keeps acting there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterable
from typing import Any

# message types and flags (linux/netlink.h, linux/rtnetlink.h)
NLMSG_ERROR, NLMSG_DONE = 2, 3
F_REQUEST, F_MULTI, F_ACK = 0x1, 0x2, 0x4
F_DUMP = 0x300
F_REPLACE, F_EXCL, F_CREATE = 0x100, 0x200, 0x400
F_CAPPED, F_ACK_TLVS = 0x100, 0x200  # in an ack
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_GETRULE = 34
RTM_GETQDISC = 38
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
NLMSGERR_ATTR_MSG = 1

IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER, IFLA_OPERSTATE = 1, 3, 10, 16
IFLA_LINKINFO, IFLA_STATS64, IFLA_NET_NS_FD, IFLA_XDP = 18, 23, 28, 43
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_XDP_ATTACHED = 2
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
RT_TABLE_MAIN, RTPROT_STATIC, RTN_UNICAST = 254, 4, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
TCA_KIND = 1
FRA_PRIORITY, FRA_TABLE = 6, 15
OPERSTATES = ("UNKNOWN", "NOTPRESENT", "DOWN", "LOWERLAYERDOWN", "TESTING", "DORMANT", "UP")

_HDR = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
_IFI = struct.Struct("=BxHiII")
_IFA = struct.Struct("=BBBBI")
_RTM = struct.Struct("=BBBBBBBBI")  # rtmsg and fib_rule_hdr share this layout
_TCM = struct.Struct("=BxxxiIII")
_U32 = struct.Struct("=I")
_STATS64 = struct.Struct("=QQQQ")  # rx_packets, tx_packets, rx_bytes, tx_bytes first
MAX_BATCH = 32 * 1024  # bytes per write (the socket's send buffer is about 200 KiB)


class NetlinkError(OSError):
    """The kernel refused a request: errno, what it was, the kernel's own message."""


def attr(kind: int, data: bytes) -> bytes:
    n = _ATTR.size + len(data)
    return _ATTR.pack(n, kind) + data + b"\0" * (-n % 4)


def name_attr(kind: int, name: str) -> bytes:
    return attr(kind, name.encode() + b"\0")


def u32_attr(kind: int, v: int) -> bytes:
    return attr(kind, _U32.pack(v))


def parse_attrs(buf: bytes | memoryview, off: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= end:
        n, kind = _ATTR.unpack_from(buf, off)
        if n < 4:
            break
        out.setdefault(kind & 0x3FFF, bytes(buf[off + 4:off + n]))  # NLA_F_* bits off
        off += (n + 3) & ~3
    return out


def _str(b: bytes | None) -> str | None:
    return b.split(b"\0", 1)[0].decode() if b is not None else None


def _u32(b: bytes | None) -> int | None:
    return _U32.unpack_from(b)[0] if b is not None and len(b) >= 4 else None


def _ip(family: int, b: bytes | None) -> str | None:
    return socket.inet_ntop(family, b) if b is not None else None


class Msg:
    """A parsed message: header fields by name and attributes by pyroute2's names (only
    those netstack reads), so pathfacts.kernel_facts reads it as it reads pyroute2's."""

    __slots__ = ("fields", "attrs")

    def __init__(self, fields: dict[str, Any], attrs: dict[str, Any]) -> None:
        self.fields, self.attrs = fields, attrs

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def get_attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


def parse_link(buf: bytes, off: int, end: int) -> Msg:
    fam, kind, index, flags, _change = _IFI.unpack_from(buf, off)
    a = parse_attrs(buf, off + _IFI.size, end)
    attrs: dict[str, Any] = {"IFLA_IFNAME": _str(a.get(IFLA_IFNAME)),
                             "IFLA_MASTER": _u32(a.get(IFLA_MASTER))}
    if IFLA_OPERSTATE in a:
        st = a[IFLA_OPERSTATE][0]
        attrs["IFLA_OPERSTATE"] = OPERSTATES[st] if st < len(OPERSTATES) else "UNKNOWN"
    if IFLA_ADDRESS in a:
        attrs["IFLA_ADDRESS"] = ":".join(f"{x:02x}" for x in a[IFLA_ADDRESS])
    if IFLA_STATS64 in a and len(a[IFLA_STATS64]) >= _STATS64.size:
        rxp, txp, rxb, txb = _STATS64.unpack_from(a[IFLA_STATS64])
        attrs["IFLA_STATS64"] = {"rx_packets": rxp, "tx_packets": txp, "rx_bytes": rxb,
                                 "tx_bytes": txb}
    if IFLA_LINKINFO in a:
        li = parse_attrs(a[IFLA_LINKINFO], 0, len(a[IFLA_LINKINFO]))
        attrs["IFLA_LINKINFO"] = Msg({}, {"IFLA_INFO_KIND": _str(li.get(IFLA_INFO_KIND))})
    if IFLA_XDP in a:
        x = parse_attrs(a[IFLA_XDP], 0, len(a[IFLA_XDP]))
        att = x.get(IFLA_XDP_ATTACHED)
        attrs["IFLA_XDP"] = Msg({}, {"IFLA_XDP_ATTACHED": att[0] if att else 0})
    return Msg({"family": fam, "ifi_type": kind, "index": index, "flags": flags}, attrs)


def parse_addr(buf: bytes, off: int, end: int) -> Msg:
    fam, plen, flags, scope, index = _IFA.unpack_from(buf, off)
    a = parse_attrs(buf, off + _IFA.size, end)
    return Msg({"family": fam, "prefixlen": plen, "flags": flags, "scope": scope,
                "index": index},
               {"IFA_ADDRESS": _ip(fam, a.get(IFA_ADDRESS)),
                "IFA_LOCAL": _ip(fam, a.get(IFA_LOCAL))})


def parse_route(buf: bytes, off: int, end: int) -> Msg:
    fam, dlen, slen, tos, table, proto, scope, kind, flags = _RTM.unpack_from(buf, off)
    a = parse_attrs(buf, off + _RTM.size, end)
    return Msg({"family": fam, "dst_len": dlen, "src_len": slen, "tos": tos, "table": table,
                "proto": proto, "scope": scope, "type": kind, "flags": flags},
               {"RTA_DST": _ip(fam, a.get(RTA_DST)), "RTA_OIF": _u32(a.get(RTA_OIF)),
                "RTA_GATEWAY": _ip(fam, a.get(RTA_GATEWAY)),
                "RTA_PRIORITY": _u32(a.get(RTA_PRIORITY)),
                "RTA_TABLE": _u32(a.get(RTA_TABLE))})


def parse_rule(buf: bytes, off: int, end: int) -> Msg:
    fam, dlen, slen, tos, table, _r1, _r2, action, flags = _RTM.unpack_from(buf, off)
    a = parse_attrs(buf, off + _RTM.size, end)
    return Msg({"family": fam, "dst_len": dlen, "src_len": slen, "tos": tos, "table": table,
                "action": action, "flags": flags},
               {"FRA_PRIORITY": _u32(a.get(FRA_PRIORITY)), "FRA_TABLE": _u32(a.get(FRA_TABLE))})


def parse_qdisc(buf: bytes, off: int, end: int) -> Msg:
    fam, index, handle, parent, info = _TCM.unpack_from(buf, off)
    a = parse_attrs(buf, off + _TCM.size, end)
    return Msg({"family": fam, "index": index, "handle": handle, "parent": parent,
                "info": info}, {"TCA_KIND": _str(a.get(TCA_KIND))})


# --- requests --------------------------------------------------------------------------------

def fixed_index(name: str) -> int:
    """The interface index a veth end of ours asks for (0: the kernel's choice).

    Why: the kernel treats a link event as urgent, and gives the device its queue at
    once, only when its index differs from its peer's (linkwatch_urgent_event). Both ends
    of a veth between two fresh namespaces get index 2 (the first after lo), so the
    carrier of a qube's eth0 was handled on linkwatch's 1-s tick: for up to a second
    after `up` (and after every `run`, `attach`) it dropped what it sent (noop qdisc) and
    `status` said DOWN (measured: docs/field-notes.md, "veth links and the kernel's
    linkwatch"). Each name below occurs once in a namespace of ours, and its number is
    different from every other's, so two ends never share an index."""
    if name in _FIXED:
        return _FIXED[name]
    for prefix, base in (("vif", 1_100_000), ("h", 1_200_000)):
        rest = name[len(prefix):].split("-", 1)[0]
        if name.startswith(prefix) and rest.isascii() and rest.isdigit() and \
                (prefix == "vif" or "-" in name) and len(rest) <= 5:
            return base + int(rest)
    return 0


_FIXED = {"eth0": 1_000_000, "uplink": 1_000_001, "cust0": 1_000_002}


def veth(if_a: str, if_b: str, ns_b_fd: int, index_a: int = 0,
         index_b: int = 0) -> tuple[int, int, bytes]:
    """A veth pair made down: if_a in the socket's namespace, its peer if_b in the
    namespace of the open file ns_b_fd; with the indexes asked for (0: the kernel's
    choice; the peer's is taken only when if_a's is given)."""
    peer = _IFI.pack(0, 0, index_b, 0, 0) + name_attr(IFLA_IFNAME, if_b) + \
        u32_attr(IFLA_NET_NS_FD, ns_b_fd)
    info = name_attr(IFLA_INFO_KIND, "veth") + attr(IFLA_INFO_DATA,
                                                      attr(VETH_INFO_PEER, peer))
    return (RTM_NEWLINK, F_CREATE | F_EXCL,
            _IFI.pack(0, 0, index_a, 0, 0) + name_attr(IFLA_IFNAME, if_a)
            + attr(IFLA_LINKINFO, info))


def link_up(index: int) -> tuple[int, int, bytes]:
    return RTM_NEWLINK, 0, _IFI.pack(0, 0, index, IFF_UP, IFF_UP)


def link_down(index: int) -> tuple[int, int, bytes]:
    return RTM_NEWLINK, 0, _IFI.pack(0, 0, index, 0, IFF_UP)


def link_del(index: int) -> tuple[int, int, bytes]:
    return RTM_DELLINK, 0, _IFI.pack(0, 0, index, 0, 0)


def addr_add(index: int, cidr: str) -> tuple[int, int, bytes]:
    ip, plen = cidr.split("/")
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    raw = socket.inet_pton(fam, ip)
    # IPv6: IFA_F_NODAD, our fixed addresses are unique by design (no 1 s tentative wait)
    return (RTM_NEWADDR, F_CREATE | F_EXCL,
            _IFA.pack(fam, int(plen), IFA_F_NODAD if fam == socket.AF_INET6 else 0, 0, index)
            + attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw))


def route(add: bool, oif: int, dst: str, via: str | None, metric: int | None
          ) -> tuple[int, int, bytes]:
    """`ip route replace` (add) or `del` of a main-table route: dst a CIDR or
    default/default6; with via a gateway route, else a link-scope one."""
    if dst in ("default", "default6"):
        fam, raw, plen = (socket.AF_INET6 if dst == "default6" else socket.AF_INET), b"", 0
    else:
        ip, _, p = dst.partition("/")
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        raw = socket.inet_pton(fam, ip)
        plen = int(p) if p else len(raw) * 8
    body = _RTM.pack(fam, plen, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC,
                     RT_SCOPE_UNIVERSE if via else RT_SCOPE_LINK, RTN_UNICAST, 0)
    if raw:
        body += attr(RTA_DST, raw)
    body += u32_attr(RTA_OIF, oif)
    if via:
        body += attr(RTA_GATEWAY, socket.inet_pton(socket.AF_INET6 if ":" in via
                                                   else socket.AF_INET, via))
    if metric is not None:
        body += u32_attr(RTA_PRIORITY, metric)
    return (RTM_NEWROUTE, F_CREATE | F_REPLACE, body) if add else (RTM_DELROUTE, 0, body)


# --- the socket ------------------------------------------------------------------------------

class Rtnl:
    """One NETLINK_ROUTE socket, in the namespace current when it was made."""

    def __init__(self, ns: str | None = None) -> None:
        self.ns = ns  # its name, for the pyroute2 handle get_filters opens there
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):  # short acks, the kernel's reason
            with contextlib.suppress(OSError):
                self.sock.setsockopt(SOL_NETLINK, opt, 1)
        self.seq = 0
        self._filters: Any = None  # pyroute2, for tc filters only (get_filters)

    def close(self) -> None:
        self.sock.close()
        if self._filters is not None:
            with contextlib.suppress(Exception):  # closing a helper
                self._filters.close()

    def _recv(self) -> Iterable[tuple[int, int, int, bytes, int, int]]:
        """(type, flags, seq, buffer, body offset, end) of each message of one read."""
        data = self.sock.recv(65536)
        off = 0
        while off + _HDR.size <= len(data):
            n, kind, flags, seq, _pid = _HDR.unpack_from(data, off)
            if n < _HDR.size:
                break
            yield kind, flags, seq, data, off + _HDR.size, off + n
            off += (n + 3) & ~3

    def batch(self, requests: list[tuple[int, int, bytes]], what: list[str]) -> None:
        """Send every request (type, flags, body) with an ack asked for, as few writes as
        fit, and read every ack. The kernel goes on after a refused request; the first
        refusal is raised (NetlinkError naming what[i])."""
        if not requests:
            return
        first_seq = self.seq + 1
        failed: dict[int, tuple[int, str]] = {}
        buf, pending = bytearray(), set()
        for i, (kind, flags, body) in enumerate(requests):
            self.seq += 1
            buf += _HDR.pack(_HDR.size + len(body), kind, flags | F_REQUEST | F_ACK,
                             self.seq, 0) + body
            pending.add(self.seq)
            if len(buf) >= MAX_BATCH or i == len(requests) - 1:
                # each write's acks are read before the next: they never fill the socket
                self.sock.send(bytes(buf))
                buf = bytearray()
                while pending:
                    for mkind, mflags, seq, data, off, end in self._recv():
                        if mkind != NLMSG_ERROR or seq not in pending:
                            continue
                        pending.discard(seq)
                        code = -struct.unpack_from("=i", data, off)[0]
                        if code:
                            failed[seq] = (code, _ext_msg(data, off, end, mflags))
        if failed:
            seq = min(failed)
            code, msg = failed[seq]
            raise NetlinkError(code, f"{what[seq - first_seq]}: {os.strerror(code)}"
                               + (f" ({msg})" if msg else ""))

    def request(self, kind: int, flags: int, body: bytes, what: str) -> None:
        self.batch([(kind, flags, body)], [what])

    def dump(self, kind: int, body: bytes) -> list[tuple[bytes, int, int]]:
        """(buffer, body offset, end) of every message a dump request answers."""
        self.seq += 1
        seq = self.seq
        self.sock.send(_HDR.pack(_HDR.size + len(body), kind, F_REQUEST | F_DUMP, seq, 0)
                       + body)
        out = []
        while True:
            for mkind, _flags, mseq, data, off, end in self._recv():
                if mseq != seq:
                    continue
                if mkind == NLMSG_DONE:
                    return out
                if mkind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, off)[0]
                    if code:
                        raise NetlinkError(code, f"dump {kind}: {os.strerror(code)}")
                    return out
                out.append((data, off, end))

    # --- reads, named as pyroute2's IPRoute names them (the subset netstack uses) ---------
    def get_links(self) -> list[Msg]:
        return [parse_link(*m) for m in self.dump(RTM_GETLINK, _IFI.pack(0, 0, 0, 0, 0))]

    def get_addr(self) -> list[Msg]:
        return [parse_addr(*m) for m in self.dump(RTM_GETADDR, _IFA.pack(0, 0, 0, 0, 0))]

    def get_routes(self, family: int = 0, table: int | None = None) -> list[Msg]:
        out = [parse_route(*m) for m in self.dump(RTM_GETROUTE,
                                             _RTM.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))]
        if table is not None:
            out = [r for r in out if (r.get_attr("RTA_TABLE") or r["table"]) == table]
        return out

    def get_rules(self, family: int = 0) -> list[Msg]:
        return [parse_rule(*m) for m in self.dump(RTM_GETRULE,
                                             _RTM.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))]

    def get_qdiscs(self) -> list[Msg]:
        return [parse_qdisc(*m) for m in self.dump(RTM_GETQDISC, _TCM.pack(0, 0, 0, 0, 0))]

    def get_filters(self, index: int, parent: int) -> Any:
        """tc filters with their classifiers' options parsed: pyroute2's, opened in this
        socket's namespace (asked only where a qdisc can hold filters, which netstack never
        makes: status and audit pay for it only then)."""
        if self._filters is None:
            from netstack import netns

            with netns.entered(self.ns):
                self._filters = iproute_class()()
        return self._filters.get_filters(index=index, parent=parent)

    def link_index(self, name: str) -> int | None:
        for link in self.get_links():
            if link.get_attr("IFLA_IFNAME") == name:
                return int(link["index"])
        return None


def _ext_msg(data: bytes, off: int, end: int, flags: int) -> str:
    """The kernel's extended ack message (NETLINK_EXT_ACK), if it sent one."""
    if not flags & F_ACK_TLVS:
        return ""
    inner = off + 4
    if flags & F_CAPPED:
        inner += _HDR.size
    else:
        inner += _HDR.unpack_from(data, inner)[0]
    return _str(parse_attrs(data, inner, end).get(NLMSGERR_ATTR_MSG)) or ""


def is_missing(e: BaseException) -> bool:
    """A refusal because the object is not there (a delete of what is gone)."""
    return isinstance(e, OSError) and e.errno in (errno.ENODEV, errno.ESRCH, errno.ENOENT)


def iproute_class() -> Any:
    """pyroute2's IPRoute without running pyroute2/__init__ (it imports ipdb, ndb and
    conntrack: ~35 ms more per command). A later `from pyroute2 import X` still works: the
    package stub runs the real __init__ on first attribute access."""
    import importlib.util
    import sys
    import types

    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        assert spec and spec.loader and spec.submodule_search_locations is not None
        stub = types.ModuleType("pyroute2")
        stub.__path__ = list(spec.submodule_search_locations)
        stub.__spec__ = spec
        stub.__file__ = spec.origin

        def full(name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            if importlib.util.find_spec(f"pyroute2.{name}") is not None:
                return importlib.import_module(f"pyroute2.{name}")  # a submodule: no more
            del stub.__dict__["__getattr__"]
            spec.loader.exec_module(stub)  # type: ignore[union-attr]
            return getattr(stub, name)

        stub.__getattr__ = full  # type: ignore[attr-defined]
        sys.modules["pyroute2"] = stub
    from pyroute2.iproute.linux import IPRoute

    return IPRoute
