"""`firewall` (sys-firewall): per-client anti-spoofing and client-to-client isolation; clients
reach only upstream. DNS to the virtual addresses is forwarded upstream unchanged. Each
client's own rules (Qubes' qvm-firewall) are enforced by every netvm kind: rules/qubefw.py.
It has nothing to do at run time: its runtime is the default KindRuntime."""

from __future__ import annotations

from typing import Any

from netstack.kinds.spec import KindSpec, KindTraits, QubeContext
from netstack.rules import common
from netstack.rules.nft import Ruleset


class FirewallSpec(KindSpec):
    kind = "firewall"
    traits = KindTraits(fast_path=True)

    def rules(self, ctx: QubeContext, info: Any, rs: Ruleset) -> None:
        common.provide_network(rs, ctx.client_vifs, ctx.upstream_if)
        common.own_output_upstream(rs, ctx.upstream_if)
