"""`net` (sys-net): owns the uplink, masquerades to it, answers the virtual DNS addresses
with the real upstream resolver. On a moved uplink without a static address it runs the
DHCP client (netstack/dhcp.py) and takes its resolvers from the lease."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from netstack.dhcp import DNS_MAP, DhcpInfo
from netstack.errors import ConfigError
from netstack.kinds.spec import KindSpec, KindTraits, QubeContext
from netstack.model import Daemon
from netstack.rules import common
from netstack.rules.nft import Ruleset

if TYPE_CHECKING:
    from netstack.config import Qube


class NetSpec(KindSpec):
    kind = "net"
    config_keys = frozenset({"address", "gateway", "dns"})
    traits = KindTraits(fast_path=True, owns_uplink=True)

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
        if "gateway" in s and "address" not in s:
            raise ConfigError(f"{where} field 'gateway'", "a gateway without an address",
                              'give address = "IP/PREFIX" too, or neither (DHCP)')
        if "gateway" in s:
            addr = ipaddress.ip_interface(s["address"])
            gw = ipaddress.ip_address(s["gateway"])
            # the default route goes via the gateway on the uplink's subnet (no onlink
            # routes): outside it, the kernel would refuse the route halfway through `up`
            if gw.version != addr.version or gw == addr.ip or gw not in addr.network:
                raise ConfigError(f"{where} field 'gateway'", f"{s['gateway']} is not a "
                                  f"router on {addr.network} (the address's subnet)",
                                  "give the router's address in that subnet, or fix the "
                                  "address's prefix length")
        for d in s.get("dns", []):
            try:
                a = ipaddress.ip_address(d)
            except ValueError as e:
                raise ConfigError(f"{where} field 'dns'", f"bad address: {e}") from None
            if a.version != 4:
                raise ConfigError(f"{where} field 'dns'", f"{d!r} is not an IPv4 address",
                                  "the virtual DNS is IPv4: give IPv4 resolvers")

    def info(self, ctx: QubeContext) -> DhcpInfo | None:
        if not ctx.dhcp:
            return None
        return DhcpInfo(ctx.qube.name, ctx.netns, ctx.upstream_if, ctx.state_dir,
                        not ctx.upstream_dns)

    def rules(self, ctx: QubeContext, info: Any, rs: Ruleset) -> None:
        if isinstance(info, DhcpInfo) and info.dynamic_dns:  # before any accept
            common.dns_dnat_map(rs, ctx.client_vifs, DNS_MAP)
        common.provide_network(rs, ctx.client_vifs, ctx.upstream_if)
        common.own_output_upstream(rs, ctx.upstream_if)
        common.dns_dnat(rs, ctx.client_vifs, list(ctx.upstream_dns))

    def daemons(self, ctx: QubeContext, info: Any) -> list[Daemon]:
        from netstack import dhcp

        if not isinstance(info, DhcpInfo):
            return []
        return [Daemon(info.daemon_name, info.netns, dhcp.argv(info), True,
                       requires=info.script)]
