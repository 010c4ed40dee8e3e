"""`net` (sys-net): owns the uplink, masquerades to it, answers the virtual DNS addresses
with the real upstream resolver."""

from __future__ import annotations

from netstack.roles.base import QubeContext, Role
from netstack.rules import common
from netstack.rules.nft import Ruleset


class NetRole(Role):
    kind = "net"

    def rules(self, ctx: QubeContext, rs: Ruleset) -> None:
        common.provide_network(rs, ctx.client_vifs, ctx.upstream_if)
        common.own_output_upstream(rs, ctx.upstream_if)
        common.dns_dnat(rs, ctx.client_vifs, list(ctx.upstream_dns))
