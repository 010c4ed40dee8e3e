"""netstack/rtnl.py without root: the requests it packs read back as the kernel's dumps
are read (same layouts), and a batch names its first refused request after reading every
ack (the kernel goes on after a refusal)."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from netstack import rtnl


def test_attrs_are_padded_and_read_back():
    data = rtnl.name_attr(rtnl.IFLA_IFNAME, "eth0") + rtnl.u32_attr(rtnl.IFLA_MASTER, 7)
    assert len(data) % 4 == 0
    a = rtnl.parse_attrs(data, 0, len(data))
    assert a[rtnl.IFLA_IFNAME] == b"eth0\0" and struct.unpack("=I", a[rtnl.IFLA_MASTER]) == (7,)


@pytest.mark.parametrize("dst,via,scope,plen", [
    ("10.137.0.1/32", None, rtnl.RT_SCOPE_LINK, 32),
    ("default", "10.137.0.1", rtnl.RT_SCOPE_UNIVERSE, 0),
    ("default6", "fd00::1", rtnl.RT_SCOPE_UNIVERSE, 0),
])
def test_a_route_reads_back_as_a_dumped_one(dst, via, scope, plen):
    kind, flags, body = rtnl.route(True, 3, dst, via, 10)
    assert kind == rtnl.RTM_NEWROUTE and flags & rtnl.F_REPLACE and flags & rtnl.F_CREATE
    r = rtnl.parse_route(body, 0, len(body))  # the dump's parser: same layout
    assert (r["dst_len"], r["scope"], r["table"], r["proto"]) == \
        (plen, scope, rtnl.RT_TABLE_MAIN, rtnl.RTPROT_STATIC)
    assert r.get_attr("RTA_OIF") == 3 and r.get_attr("RTA_GATEWAY") == via
    assert r.get_attr("RTA_PRIORITY") == 10
    assert r.get_attr("RTA_DST") == (None if dst.startswith("default") else dst[:-3])
    assert rtnl.route(False, 3, dst, via, None)[0] == rtnl.RTM_DELROUTE


def test_an_address_is_local_and_ipv6_skips_dad():
    _, _, four = rtnl.addr_add(5, "192.0.2.2/24")
    a = rtnl.parse_addr(four, 0, len(four))
    assert (a["prefixlen"], a["index"], a["flags"]) == (24, 5, 0)
    assert a.get_attr("IFA_LOCAL") == a.get_attr("IFA_ADDRESS") == "192.0.2.2"
    _, _, six = rtnl.addr_add(5, "fd00::2/64")
    assert rtnl.parse_addr(six, 0, len(six))["flags"] == rtnl.IFA_F_NODAD


def test_a_veth_names_its_peer_and_the_peer_namespace():
    kind, flags, body = rtnl.veth("vif2", "eth0", 9)
    assert kind == rtnl.RTM_NEWLINK and flags & rtnl.F_EXCL
    a = rtnl.parse_attrs(body, 16, len(body))
    assert a[rtnl.IFLA_IFNAME] == b"vif2\0"
    info = rtnl.parse_attrs(a[rtnl.IFLA_LINKINFO], 0, len(a[rtnl.IFLA_LINKINFO]))
    assert info[rtnl.IFLA_INFO_KIND] == b"veth\0"
    data = rtnl.parse_attrs(info[rtnl.IFLA_INFO_DATA], 0, len(info[rtnl.IFLA_INFO_DATA]))
    peer = data[rtnl.VETH_INFO_PEER]
    pa = rtnl.parse_attrs(peer, 16, len(peer))
    assert pa[rtnl.IFLA_IFNAME] == b"eth0\0" and pa[rtnl.IFLA_NET_NS_FD] == struct.pack("=I", 9)


class AckingSocket:
    """Answers each request of a write with its own ack; `refuse` maps a request's number
    (0-based, over the socket's life) to an errno and the kernel's message."""

    def __init__(self, refuse: dict[int, tuple[int, str]]) -> None:
        self.refuse, self.acks, self.n, self.writes = refuse, [], 0, 0

    def send(self, data: bytes) -> int:
        self.writes += 1
        off = 0
        while off < len(data):
            ln, _kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
            code, msg = self.refuse.get(self.n, (0, ""))
            body = struct.pack("=i", -code) + data[off:off + 16]  # capped: header only
            flags = rtnl.F_CAPPED
            if msg:
                body += rtnl.name_attr(rtnl.NLMSGERR_ATTR_MSG, msg)
                flags |= rtnl.F_ACK_TLVS
            self.acks.append(struct.pack("=IHHII", 16 + len(body), rtnl.NLMSG_ERROR, flags,
                                         seq, 0) + body)
            self.n += 1
            off += (ln + 3) & ~3
        return len(data)

    def recv(self, _size: int) -> bytes:
        return self.acks.pop(0)


def nl(sock: AckingSocket) -> rtnl.Rtnl:
    h = rtnl.Rtnl.__new__(rtnl.Rtnl)
    h.sock, h.seq, h.ns, h._filters = sock, 0, None, None  # type: ignore[assignment]
    return h


def test_a_batch_is_one_write_and_names_its_first_refusal():
    sock = AckingSocket({1: (errno.EEXIST, "Address already assigned"),
                         2: (errno.ENODEV, "")})
    h = nl(sock)
    reqs = [rtnl.addr_add(2, f"10.0.0.{i}/32") for i in range(4)]
    with pytest.raises(rtnl.NetlinkError) as e:
        h.batch(reqs, [f"address {i}" for i in range(4)])
    assert sock.writes == 1 and not sock.acks  # every ack read: the socket stays in step
    assert e.value.errno == errno.EEXIST
    assert "address 1" in str(e.value) and "Address already assigned" in str(e.value)
    h.batch(reqs[:1], ["again"])  # the next batch is answered on its own


def test_a_large_batch_is_cut_into_writes_each_acked_before_the_next():
    sock = AckingSocket({})
    reqs = [rtnl.route(True, 2, f"10.{i // 250}.{i % 250}.0/24", None, None)
            for i in range(2000)]
    nl(sock).batch(reqs, ["r"] * len(reqs))
    assert sock.writes > 1 and sock.n == 2000 and not sock.acks


def test_link_messages_parse_like_pyroute2s():
    ifi = struct.pack("=BxHiII", 0, 1, 4, 0x11043, 0)
    info = rtnl.attr(rtnl.IFLA_LINKINFO, rtnl.name_attr(rtnl.IFLA_INFO_KIND, "veth"))
    xdp = rtnl.attr(rtnl.IFLA_XDP, rtnl.attr(rtnl.IFLA_XDP_ATTACHED, b"\x01"))
    body = ifi + rtnl.name_attr(rtnl.IFLA_IFNAME, "eth0") + rtnl.attr(
        rtnl.IFLA_OPERSTATE, b"\x06") + rtnl.attr(rtnl.IFLA_ADDRESS, bytes([2, 0, 0, 0, 0, 0xab])
    ) + rtnl.attr(rtnl.IFLA_STATS64, struct.pack("=QQQQ", 1, 2, 300, 400) + bytes(160)) + \
        info + xdp
    m = rtnl.parse_link(body, 0, len(body))
    assert (m["index"], m["flags"]) == (4, 0x11043)
    assert m.get_attr("IFLA_IFNAME") == "eth0" and m.get_attr("IFLA_OPERSTATE") == "UP"
    assert m.get_attr("IFLA_ADDRESS") == "02:00:00:00:00:ab"
    assert m.get_attr("IFLA_STATS64")["rx_bytes"] == 300
    assert m.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "veth"
    assert m.get_attr("IFLA_XDP").get_attr("IFLA_XDP_ATTACHED") == 1
    assert m.get_attr("IFLA_MASTER") is None


def test_address_families_are_read_from_the_message():
    body = struct.pack("=BBBBI", socket.AF_INET6, 64, 0, 0, 3) + rtnl.attr(
        rtnl.IFA_ADDRESS, socket.inet_pton(socket.AF_INET6, "fe80::1"))
    assert rtnl.parse_addr(body, 0, len(body)).get_attr("IFA_ADDRESS") == "fe80::1"
