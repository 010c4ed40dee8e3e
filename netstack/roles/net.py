"""`net` (sys-net): owns the uplink, masquerades to it, answers the virtual DNS addresses
with the real upstream resolver. On a moved uplink without a static address it runs the
DHCP client (netstack/dhcp.py) and takes its resolvers from the lease."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from netstack.config import Qube
from netstack.dhcp import DNS_MAP, DhcpInfo
from netstack.errors import ConfigError
from netstack.model import Daemon, QubeInfo
from netstack.roles.base import LiveFacts, QubeContext, Role
from netstack.rules import common
from netstack.rules.nft import Ruleset

if TYPE_CHECKING:
    from collections.abc import Callable

    from netstack.reconcile import Runtime
    from netstack.state import State


class NetRole(Role):
    kind = "net"
    fast_path = True
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

    # --- run time -----------------------------------------------------------------------
    def prepare(self, q: QubeInfo, rt: Runtime) -> None:
        """The client's private lease directory, then its hook: the go signal."""
        from netstack import dhcp

        info = q.info
        if isinstance(info, DhcpInfo):
            rt.make_dir(info.lease_dir, 0o700)
            rt.write(info.script, dhcp.script_text(info), 0o700)

    def reload_commands(self, q: QubeInfo, st: State) -> list[dict[str, Any]]:
        """A full ruleset reload empties the map: the current lease fills it again."""
        from netstack import dhcp

        info = q.info
        if not isinstance(info, DhcpInfo) or not info.dynamic_dns:
            return []
        lease = dhcp.read_lease(info.lease_file)
        return dhcp.map_commands(lease.dns if lease and lease.bound else [])

    def status(self, q: QubeInfo, live: LiveFacts) -> dict[str, Any]:
        from netstack import dhcp

        info = q.info
        return {"dhcp": dhcp.status(info)} if isinstance(info, DhcpInfo) else {}

    def status_lines(self, entry: dict[str, Any]) -> list[str]:
        d = entry.get("dhcp")
        if not d:
            return []
        if not d["bound"]:
            return [f"dhcp {d['dev']}: NO LEASE (last event {d.get('reason', '-')}): the "
                    "chain is closed, nothing leaves"]
        return [f"dhcp {d['dev']}: {d['address']} via {', '.join(d['routers']) or '-'}, "
                f"dns {', '.join(d['dns']) or '-'} (lease {d['lease_s']} s, "
                f"{d['renewals']} renewals, last {d['reason']} {d['age_s']:.0f} s ago)"]

    def health(self, entry: dict[str, Any]) -> list[str]:
        d = entry.get("dhcp")
        if d and not d["bound"]:
            return [f"no DHCP lease on {d['dev']} (last event {d.get('reason', '-')}): "
                    "nothing leaves until one comes"]
        return []

    def wait_ready(self, q: QubeInfo, st: State, timeout: float,
                   progress: Callable[[int, str], None]) -> float | None:
        from netstack import dhcp

        info = q.info
        if not isinstance(info, DhcpInfo):
            return None
        return dhcp.wait_bound(info, timeout, progress)
