"""The bring-up order as the kernel reports it (root): a real `up` of every shipped config,
with a netlink listener in each new namespace (rtnetlink link events and nftables events)
read after every call of the kernel seam. Each namespace's ruleset is announced by the
kernel before any link of that namespace appears, and no link is set up before every
ruleset of the stack is in place."""

from __future__ import annotations

import socket
import struct

import pytest

from netstack import netns, stack
from netstack.kernel import RealKernel
from netstack.model import UplinkSpec
from tests.integration.util import ROOT, new_stack_name, reap_zombies, stack_leftovers
from tests.realkernel import KERNEL

pytestmark = pytest.mark.root

NETLINK_NETFILTER, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 12, 270, 1
RTMGRP_LINK, NFNLGRP_NFTABLES = 1, 7
RTM_NEWLINK = 16
NFT_NEWRULE = (10 << 8) | 6
IFF_UP = 1


class Observed(RealKernel):
    """The real kernel seam, plus what the kernel itself announced after each call."""

    def __init__(self) -> None:
        super().__init__()
        self.socks: dict[str, tuple[socket.socket, socket.socket]] = {}
        self.seen: list[tuple[int, str, str, int]] = []  # (call, ns, what, flags)
        self.calls = 0

    def _watch(self, ns: str) -> None:
        with netns.entered(ns):
            rt = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
            nf = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                               NETLINK_NETFILTER)
        rt.bind((0, RTMGRP_LINK))
        nf.bind((0, 0))
        nf.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        self.socks[ns] = (rt, nf)

    def _drain(self) -> None:
        self.calls += 1
        for ns, pair in self.socks.items():
            for s in pair:
                while True:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        break
                    off = 0
                    while off + 16 <= len(data):
                        ln, typ = struct.unpack_from("=IH", data, off)
                        if typ == RTM_NEWLINK:
                            flags = struct.unpack_from("=I", data, off + 16 + 8)[0]
                            self.seen.append((self.calls, ns, "link", flags))
                        elif typ == NFT_NEWRULE:
                            self.seen.append((self.calls, ns, "rule", 0))
                        off += (ln + 3) & ~3
                        if ln == 0:
                            break

    def netns_create(self, name: str) -> None:
        super().netns_create(name)
        self._watch(name)

    def close(self) -> None:
        for pair in self.socks.values():
            for s in pair:
                s.close()
        super().close()


def _wrap(name: str):
    def call(self, *a, **kw):
        out = getattr(RealKernel, name)(self, *a, **kw)
        self._drain()
        return out
    return call


for _m in ("nft", "veth", "link_move", "link_up", "addr_add", "route_add", "sysctl",
           "veth_many", "addr_add_many", "link_up_many", "route_add_many"):  # the batches
    setattr(Observed, _m, _wrap(_m))


@pytest.mark.parametrize("cfg", ["basic.toml", "vpn.toml"])
def test_kernel_announces_rules_before_links(cfg):
    s = new_stack_name("ord")
    k = Observed()
    try:
        p, _ = stack.up(str(ROOT / "configs" / cfg), s, UplinkSpec("lab"), kernel=k)
        with_rules = {n.name for n in p.namespaces if n.ruleset is not None}
        assert with_rules and with_rules <= set(k.socks)
        for ns in with_rules:
            rules = [c for c, n, what, _ in k.seen if n == ns and what == "rule"]
            links = [c for c, n, what, _ in k.seen if n == ns and what == "link"]
            assert rules and links, ns
            assert min(rules) < min(links), (ns, min(rules), min(links))
        last_ruleset = max(min(c for c, n, what, _ in k.seen if n == ns and what == "rule")
                           for ns in with_rules)
        ups = [c for c, n, what, flags in k.seen if what == "link" and flags & IFF_UP]
        assert ups and min(ups) > last_ruleset
    finally:
        k.close()
        stack.down(s, KERNEL)
        reap_zombies()
    assert not stack_leftovers(s)
