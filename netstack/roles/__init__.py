"""Roles by qube kind."""

from __future__ import annotations

from netstack.errors import NetstackError
from netstack.roles.app import AppRole
from netstack.roles.base import Role
from netstack.roles.firewall import FirewallRole
from netstack.roles.net import NetRole
from netstack.roles.tor import TorRole
from netstack.roles.vpn import VpnRole

ROLES: dict[str, type[Role]] = {"net": NetRole, "firewall": FirewallRole, "app": AppRole,
                                "vpn": VpnRole, "tor": TorRole}


def role_for(kind: str) -> Role:
    try:
        return ROLES[kind]()
    except KeyError:
        raise NetstackError(f"qube kind {kind!r} cannot be brought up by this version yet") \
            from None
