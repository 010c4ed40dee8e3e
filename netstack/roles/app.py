"""`app`: a workstation. Nothing comes in unasked; it talks only to its netvm link.
Its own rules protect nothing against root inside it: the guarantees sit upstream."""

from __future__ import annotations

from netstack.roles.base import QubeContext, Role
from netstack.rules import common
from netstack.rules.nft import Ruleset


class AppRole(Role):
    kind = "app"

    def rules(self, ctx: QubeContext, rs: Ruleset) -> None:
        common.own_output_upstream(rs, ctx.upstream_if)
