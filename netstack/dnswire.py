"""Just enough of the DNS wire format: the lab's authoritative server answers with it, and
`up` resolves VPN endpoint hostnames with it through sys-net's resolver (never the host's)."""

from __future__ import annotations

import os
import socket
import struct

from netstack import netns
from netstack.errors import ApplyError


def encode_name(name: str) -> bytes:
    if name == ".":
        return b"\0"  # the root
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("idna") if label else b""
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad DNS name {name!r}")
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def query(name: str, qtype: int = 1, qid: int | None = None) -> bytes:
    qid = int.from_bytes(os.urandom(2), "big") if qid is None else qid
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + \
        struct.pack("!HH", qtype, 1)


def parse_question(msg: bytes) -> tuple[int, int, str, int, int]:
    """(id, flags, qname, qtype, end offset of the question). Raises ValueError."""
    if len(msg) < 12:
        raise ValueError("short")
    qid, flags, qd = struct.unpack("!HHH", msg[:6])
    if qd != 1:
        raise ValueError("one question expected")
    labels, off = [], 12
    while True:
        n = msg[off]
        off += 1
        if n == 0:
            break
        if n & 0xC0:
            raise ValueError("compression in question")
        labels.append(msg[off:off + n].decode("ascii").lower())
        off += n
    qtype, _qclass = struct.unpack("!HH", msg[off:off + 4])
    return qid, flags, ".".join(labels), qtype, off + 4


def _skip_name(msg: bytes, off: int) -> int:
    while True:
        n = msg[off]
        if n & 0xC0 == 0xC0:
            return off + 2
        off += 1
        if n == 0:
            return off
        off += n


def parse_a_answers(msg: bytes, qid: int) -> tuple[int, list[str]]:
    """(rcode, IPv4 addresses) of a response to query `qid`."""
    rcode, addrs, _ttl = parse_a_ttl(msg, qid)
    return rcode, addrs


def parse_a_ttl(msg: bytes, qid: int) -> tuple[int, list[str], int]:
    """(rcode, IPv4 addresses, the least TTL of them) of a response to query `qid`."""
    rid, flags, qd, an = struct.unpack("!HHHH", msg[:8])
    if rid != qid or not flags & 0x8000:
        raise ValueError("not our answer")
    off = 12
    for _ in range(qd):
        off = _skip_name(msg, off) + 4
    out, ttls = [], []
    for _ in range(an):
        off = _skip_name(msg, off)
        rtype, _cls, ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
        off += 10
        if rtype == 1 and rdlen == 4:
            out.append(socket.inet_ntoa(msg[off:off + 4]))
            ttls.append(ttl)
        off += rdlen
    return flags & 0xF, out, min(ttls, default=0)


def resolve_in(ns: str, server: str, name: str, timeout: float = 3.0,
               tries: int = 3) -> list[str]:
    """Resolve `name` (A) by asking `server` from inside namespace `ns`."""
    return lookup_in(ns, server, name, 53, timeout, tries)[0]


def lookup_in(ns: str, server: str, name: str, port: int = 53, timeout: float = 3.0,
              tries: int = 3) -> tuple[list[str], int]:
    """(A addresses, their TTL) of `name`, asking `server`:`port` from inside `ns`."""
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout / tries)
        for _ in range(tries):
            q = query(name)
            qid = struct.unpack("!H", q[:2])[0]
            s.sendto(q, (server, port))
            try:
                while True:
                    msg, _ = s.recvfrom(4096)
                    try:
                        rcode, addrs, ttl = parse_a_ttl(msg, qid)
                    except (ValueError, struct.error, IndexError):
                        continue
                    if rcode == 0 and addrs:
                        return addrs, ttl
                    raise ApplyError(f"cannot resolve {name!r} via {server} (from {ns}): "
                                     f"rcode {rcode}, {len(addrs)} addresses")
            except TimeoutError:
                continue
    finally:
        s.close()
    raise ApplyError(f"cannot resolve {name!r}: no answer from {server} (from {ns})")
