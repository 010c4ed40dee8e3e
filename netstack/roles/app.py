"""`app`: a workstation. Nothing comes in unasked; it talks only to its netvm link.
Its own rules protect nothing against root inside it: the guarantees sit upstream."""

from __future__ import annotations

from typing import Any

from netstack.config import Qube
from netstack.errors import ConfigError
from netstack.roles.base import QubeContext, Role
from netstack.rules import common
from netstack.rules.nft import Ruleset


class AppRole(Role):
    kind = "app"
    config_keys = frozenset({"home"})
    provides_network = False
    sandboxed = True  # a workstation: whatever runs in it may be hostile

    def validate(self, q: Qube) -> None:
        home = q.settings.get("home", "persistent")
        if home not in ("persistent", "ephemeral"):
            raise ConfigError(f"qube {q.name!r} field 'home'", f"{home!r} is not a home",
                              'use home = "persistent" (kept across down/up) or "ephemeral" '
                              "(a fresh empty home for every command)")

    def status(self, q: Any, live: Any) -> dict[str, Any]:
        """What the qube is given: its sandbox and home; no host resource is granted."""
        from netstack.sandbox import home_dir

        home = q.settings.get("home", "persistent")
        stack = q.netns.split("-", 2)[1]  # nst-STACK-QUBE
        return {"sandbox": {"kind": "bubblewrap", "home": home,
                            "home_path": home_dir(stack, q.name)
                            if home == "persistent" else None, "grants": []}}

    def status_lines(self, entry: dict[str, Any]) -> list[str]:
        sb = entry.get("sandbox") or {}
        where = f" ({sb['home_path']})" if sb.get("home_path") else ""
        return [f"sandbox: {sb.get('kind')}, {sb.get('home')} home{where}, grants: "
                + (", ".join(sb.get("grants") or []) or "none")]

    def rules(self, ctx: QubeContext, info: Any, rs: Ruleset) -> None:
        common.own_output_upstream(rs, ctx.upstream_if)
