"""`net` (sys-net): owns the uplink, masquerades to it, answers the virtual DNS addresses
with the real upstream resolver."""

from __future__ import annotations

import ipaddress
from typing import Any

from netstack.config import Qube
from netstack.errors import ConfigError
from netstack.roles.base import QubeContext, Role
from netstack.rules import common
from netstack.rules.nft import Ruleset


class NetRole(Role):
    kind = "net"
    config_keys = frozenset({"address", "gateway", "dns"})
    owns_uplink = True

    def validate(self, q: Qube) -> None:
        where, s = f"qube {q.name!r}", q.settings
        for key, example in (("address", 'address = "192.168.1.50/24"'),
                             ("gateway", 'gateway = "192.168.1.1"')):
            if key in s and not isinstance(s[key], str):
                raise ConfigError(f"{where} field {key!r}", "must be a string", f"e.g. {example}")
        if "dns" in s and (not isinstance(s["dns"], list)
                           or not all(isinstance(x, str) for x in s["dns"])):
            raise ConfigError(f"{where} field 'dns'", "must be a list of addresses",
                              'e.g. dns = ["192.168.1.1"]')
        for key, parse in (("address", ipaddress.ip_interface),
                           ("gateway", ipaddress.ip_address)):
            if key in s:
                try:
                    parse(s[key])
                except ValueError as e:
                    raise ConfigError(f"{where} field {key!r}", f"bad address: {e}") from None
        for d in s.get("dns", []):
            try:
                a = ipaddress.ip_address(d)
            except ValueError as e:
                raise ConfigError(f"{where} field 'dns'", f"bad address: {e}") from None
            if a.version != 4:
                raise ConfigError(f"{where} field 'dns'", f"{d!r} is not an IPv4 address",
                                  "the virtual DNS is IPv4: give IPv4 resolvers")

    def rules(self, ctx: QubeContext, info: Any, rs: Ruleset) -> None:
        common.provide_network(rs, ctx.client_vifs, ctx.upstream_if)
        common.own_output_upstream(rs, ctx.upstream_if)
        common.dns_dnat(rs, ctx.client_vifs, list(ctx.upstream_dns))
