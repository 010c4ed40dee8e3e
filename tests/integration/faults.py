"""Faults injected on purpose to show the battery catches what it guards: each breaks one
protection of a lab chain and returns the function that repairs it. Test helpers only: no
user-facing command can take down a kill switch (a kill -9 in the middle would leave it
down); the test's own stack is torn down after it whatever happens."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from netstack.errors import UsageError
from netstack.kernel import RealKernel
from netstack.leaktest.battery import Ctx, Fault, context, hold_dead, reload_runtime
from netstack.model import QubeInfo, Route
from netstack.rules.nft import accept_all, commands


def _by_protection(ctx: Ctx, protection: str) -> QubeInfo:
    q = next((q for q in ctx.chain if q.traits.protection == protection), None)
    if q is None:
        raise UsageError(f"this fault needs a {protection} qube in the chain")
    return q


def inject(ctx: Ctx, fault: str) -> Callable[[], None]:
    """Break one rule on purpose. Returns the function that repairs it."""
    k = ctx.kernel
    gw = ctx.chain[1]
    undo: list[Callable[[], Any]] = []

    def reload(q: QubeInfo) -> None:
        n = ctx.plan.ns(q.netns)
        k.nft(q.netns, commands(n.ruleset or {}))
        for key, v in n.sysctls.items():
            k.sysctl(q.netns, key, v)

    def open_up(q: QubeInfo, keep_nat: bool) -> None:
        rs = accept_all(masquerade_to="eth0")
        if keep_nat:  # a naive transparent proxy: only the redirect
            for item in (ctx.plan.ns(q.netns).ruleset or {}).get("nftables", []):
                r = item.get("rule")
                if r and r["chain"] == "nat_prerouting":
                    rs["nat_prerouting"].add(*r["expr"], comment=r.get("comment"))
        k.nft(q.netns, commands(rs.to_json()))

    def without(q: QubeInfo, drop: Callable[[str], bool]) -> None:
        items = [i for i in (ctx.plan.ns(q.netns).ruleset or {})["nftables"]
                 if not (i.get("rule") and drop(str(i["rule"].get("comment", ""))))]
        k.nft(q.netns, commands({"nftables": items}))

    if fault == "gateway-redirect-only":
        tor = _by_protection(ctx, "tor")
        open_up(tor, keep_nat=True)
        k.sysctl(tor.netns, "net/ipv4/ip_forward", "1")
        undo.append(lambda: reload(tor))
    elif fault == "no-kill-switch":
        vpn = _by_protection(ctx, "vpn")
        open_up(vpn, keep_nat=False)
        # the tunnel dies and the host still has its old default route: the classic leak
        fallback = Route(vpn.netns, "default", "eth0", vpn.gateway, metric=1000)
        k.route_add(fallback)
        hold = hold_dead(ctx, "vpn")
        hold.__enter__()

        def repair() -> None:
            hold.__exit__(None, None, None)
            k.route_del(fallback)
            reload(vpn)
            reload_runtime(ctx)
        undo.append(repair)
    elif fault == "no-antispoof":
        without(gw, lambda c: c.startswith(f"antispoof {ctx.ws.name}"))
        undo.append(lambda: (reload(gw), reload_runtime(ctx)))
    elif fault == "ipv6-allowed":
        without(gw, lambda c: c.startswith("IPv6 is off") or "(IPv6" in c)
        tun = gw.tunnel
        out_if = tun.dev if tun else gw.upstream_if  # where its forward rule leads
        ifs = ["all", "default", *gw.interfaces, out_if]
        for i in ifs:
            with contextlib.suppress(OSError):
                k.sysctl(gw.netns, f"net/ipv6/conf/{i}/disable_ipv6", "0")
        k.sysctl(gw.netns, "net/ipv6/conf/all/forwarding", "1")
        v6 = Route(gw.netns, "default6", out_if)
        with contextlib.suppress(Exception):
            k.route_add(v6)

        def repair6() -> None:
            k.route_del(v6)
            for i in ifs:
                with contextlib.suppress(OSError):
                    k.sysctl(gw.netns, f"net/ipv6/conf/{i}/disable_ipv6", "1")
            k.sysctl(gw.netns, "net/ipv6/conf/all/forwarding", "0")
            reload(gw)
            reload_runtime(ctx)
        undo.append(repair6)
    else:
        raise UsageError(f"fault {fault!r}: use one of {', '.join(FAULTS)}")

    def restore() -> None:
        for u in reversed(undo):
            u()
        # Forget connections the fault let through, so late replies to them (a web server
        # retransmitting its SYN/ACK for half a minute) meet no NAT mapping and die at
        # sys-net instead of haunting the next run's captures.
        for q in ctx.chain:
            k.conntrack_flush(q.netns)
    return restore


FAULTS = ("gateway-redirect-only", "no-kill-switch", "no-antispoof", "ipv6-allowed")


def fault(name: str) -> Fault:
    """The named fault, for `battery.run(..., fault=fault("no-kill-switch"))`."""
    if name not in FAULTS:
        raise UsageError(f"fault {name!r}: use one of {', '.join(FAULTS)}")
    return Fault(name, lambda ctx: inject(ctx, name))


@contextlib.contextmanager
def broken(stack: str, ws: str, name: str) -> Iterator[None]:
    """The stack with one protection broken while the body runs (say, a CLI run)."""
    k = RealKernel()
    try:
        restore = inject(context(stack, ws, k), name)
        try:
            yield
        finally:
            restore()
    finally:
        k.close()
