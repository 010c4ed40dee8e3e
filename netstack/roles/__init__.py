"""Roles by qube kind: the registry. Adding a kind is a module plus a line here."""

from __future__ import annotations

from netstack.roles.app import AppRole
from netstack.roles.base import Role
from netstack.roles.firewall import FirewallRole
from netstack.roles.net import NetRole
from netstack.roles.tor import TorRole
from netstack.roles.vpn import VpnRole

ROLES: dict[str, Role] = {r.kind: r for r in (NetRole(), FirewallRole(), VpnRole(), TorRole(),
                                              AppRole())}


def role_for(kind: str) -> Role:
    return ROLES[kind]  # config validation admits only registered kinds
