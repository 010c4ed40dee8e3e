"""`app`: a workstation. Nothing comes in unasked; it talks only to its netvm link.
Its own rules protect nothing against root inside it: the guarantees sit upstream."""

from __future__ import annotations

from typing import Any

from netstack.roles.base import QubeContext, Role
from netstack.rules import common
from netstack.rules.nft import Ruleset


class AppRole(Role):
    kind = "app"
    provides_network = False
    sandboxed = True  # a workstation: whatever runs in it may be hostile

    def rules(self, ctx: QubeContext, info: Any, rs: Ruleset) -> None:
        common.own_output_upstream(rs, ctx.upstream_if)
