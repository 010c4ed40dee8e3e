"""`firewall` (sys-firewall): per-client anti-spoofing and client-to-client isolation; clients
reach only upstream. DNS to the virtual addresses is forwarded upstream unchanged."""

from __future__ import annotations

from typing import Any

from netstack.roles.base import QubeContext, Role
from netstack.rules import common
from netstack.rules.nft import Ruleset


class FirewallRole(Role):
    kind = "firewall"
    enforces_client_rules = True  # Qubes' qvm-firewall: each client's list, in here

    def rules(self, ctx: QubeContext, info: Any, rs: Ruleset) -> None:
        from netstack.addressing import VIRTUAL_DNS
        from netstack.rules import qubefw

        filtered = {}
        for c in ctx.clients:
            raw = ctx.topo[c.name].settings.get("firewall")
            if raw is None:
                continue  # no list: the plain behaviour
            qubefw.add_client_rules(rs, c.qid, c.name, qubefw.parse(c.name, raw),
                                    VIRTUAL_DNS)
            filtered[c.vif] = (c.name, qubefw.chain_name(c.name))
        common.provide_network(rs, ctx.client_vifs, ctx.upstream_if, filtered)
        common.own_output_upstream(rs, ctx.upstream_if)
