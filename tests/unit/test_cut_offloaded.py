"""A live rule change cuts connections that sit on the netvm's flowtable (issue 27 item 4):
the old flowtable's flows go back on the new one before the cut, and Linux before 6.4
refuses to delete an offloaded entry (EBUSY), so firewall_live.cut_offloaded takes the
flowtable and its `flow add` rule out, deletes the entries until none is left, and puts
both back where they were. Proven with
real packets in tests/host/test_flowtables.py; here the order of the kernel calls, with
the recording fake."""

from __future__ import annotations

import errno

from netstack.firewall_live import cut_offloaded
from tests.fakekernel import FakeKernel

NS = "nst-x-sys-firewall"
T = {"family": "inet", "table": "netstack"}
OFFLOAD = {**T, "chain": "forward", "handle": 5, "comment": "established flows to the "
           "fast path (flowtable)", "expr": [{"flow": {"op": "add", "flowtable": "@fastpath"}}]}
REPLIES = {**T, "chain": "forward", "handle": 6, "comment": "replies", "expr": [{"accept": None}]}
LISTING = {"nftables": [
    {"table": {"family": "inet", "name": "netstack", "handle": 1}},
    {"flowtable": {**T, "name": "fastpath", "handle": 2, "hook": "ingress", "prio": 0,
                   "dev": ["eth0", "vif3"]}},
    {"rule": {**T, "chain": "prerouting", "handle": 4, "expr": [{"drop": None}]}},
    {"rule": OFFLOAD}, {"rule": REPLIES}]}


class Busy(Exception):
    code = errno.EBUSY


class Kernel(FakeKernel):
    """Refuses to delete an entry while the flowtable exists, and `busy` times more after
    it went (the kernel frees the old flowtable after the transaction)."""

    def __init__(self, listing: dict, busy: int) -> None:
        super().__init__()
        self.namespaces.add(NS)
        self.listing, self.busy = listing, busy

    def nft_list(self, ns):
        return self.listing

    def conntrack_delete(self, ns, flow):
        out = any(e[0] == "nft" for e in self.events)
        if not out or self.busy > 0:
            self.busy -= out
            self._ev("busy", ns, flow)
            raise Busy()
        super().conntrack_delete(ns, flow)

    def forbidden(self):
        return list(self.flows.get(NS, []))


def test_flowtable_out_entries_deleted_then_flowtable_back_in_place():
    k = Kernel(LISTING, busy=2)
    k.flows[NS] = ["flow-a"]
    assert cut_offloaded(k, NS, k.forbidden) == ["flow-a"]
    kinds = [e[0] for e in k.events]
    assert kinds == ["nft", "busy", "busy", "conntrack_delete", "nft"], kinds
    out, back = k.tables[NS]
    assert out == {"nftables": [
        {"delete": {"rule": {**T, "chain": "forward", "handle": 5}}},
        {"delete": {"flowtable": {**T, "name": "fastpath"}}}]}
    ft = {k2: v for k2, v in LISTING["nftables"][1]["flowtable"].items() if k2 != "handle"}
    rule = {k2: v for k2, v in OFFLOAD.items() if k2 != "handle"}
    assert back == {"nftables": [{"add": {"flowtable": ft}},
                                 {"insert": {"rule": {**rule, "handle": 6}}}]}  # before replies


def test_the_flowtable_comes_back_when_an_entry_stays():
    k = Kernel(LISTING, busy=10**9)
    k.flows[NS] = ["flow-a"]
    assert cut_offloaded(k, NS, k.forbidden, timeout=0.05) == []
    assert len(k.tables[NS]) == 2 and "add" in k.tables[NS][1]["nftables"][0]


def test_a_netvm_without_a_flowtable_is_not_asked():
    from netstack.firewall_live import has_flowtable

    assert not has_flowtable(Kernel({"nftables": [{"rule": REPLIES}]}, busy=0), NS)
    assert has_flowtable(Kernel(LISTING, busy=0), NS)
