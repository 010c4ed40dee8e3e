"""`net` (sys-net): owns the uplink, masquerades to it, answers the virtual DNS addresses
with the real upstream resolver. On a moved uplink without a static address it runs the
DHCP client (netstack/dhcp.py) and takes its resolvers from the lease. A Wi-Fi uplink
(`wifi = "wlan0"`) moves with its radio (the phy: a wireless netdev cannot change namespace
by itself) and wpa_supplicant runs in sys-net under the supervisor, with the credentials
of a root-only file (`wifi_config`, wpa_supplicant's own format)."""

from __future__ import annotations

import ipaddress
import os
import re
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
    config_keys = frozenset({"address", "gateway", "dns", "wifi", "wifi_config",
                             "connectivity_check"})
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
            net = addr.network
            if gw.version != addr.version or gw == addr.ip or gw not in net or (
                    net.num_addresses > 2 and gw in (net.network_address,
                                                     net.broadcast_address)):
                raise ConfigError(f"{where} field 'gateway'", f"{s['gateway']} is not a "
                                  f"router on {net} (the address's subnet)",
                                  "give the router's address in that subnet, or fix the "
                                  "address's prefix length")
        cc = s.get("connectivity_check")
        if cc is not None and (not isinstance(cc, str) or not cc.startswith("http://")
                               or len(cc) > 2000 or any(c.isspace() for c in cc)):
            raise ConfigError(f"{where} field 'connectivity_check'", f"{cc!r} is not an "
                              "http:// URL", 'e.g. connectivity_check = '
                              '"http://nmcheck.gnome.org/check_network_status.txt" (its '
                              "answer must be NetworkManager's \"NetworkManager is online\")")
        self._validate_wifi(q)
        for d in s.get("dns", []):
            try:
                a = ipaddress.ip_address(d)
            except ValueError as e:
                raise ConfigError(f"{where} field 'dns'", f"bad address: {e}") from None
            if a.version != 4:
                raise ConfigError(f"{where} field 'dns'", f"{d!r} is not an IPv4 address",
                                  "the virtual DNS is IPv4: give IPv4 resolvers")

    @staticmethod
    def _validate_wifi(q: Qube) -> None:
        where, s = f"qube {q.name!r}", q.settings
        if "wifi" in s:
            dev = s["wifi"]
            if not isinstance(dev, str) or not WIFI_DEV_RE.match(dev):
                raise ConfigError(f"{where} field 'wifi'", "must name the Wi-Fi interface "
                                  "(at most 15 characters, no '/' or spaces)",
                                  'e.g. wifi = "wlan0"')
            if "wifi_config" not in s:
                raise ConfigError(f"{where} field 'wifi_config'", "missing: Wi-Fi needs "
                                  "its credentials", 'wifi_config = "/etc/netstack/wifi.conf" '
                                  "(wpa_supplicant's format, chmod 600, owned by root)")
        if "wifi_config" in s:
            path = s["wifi_config"]
            if "wifi" not in s:
                raise ConfigError(f"{where} field 'wifi'", "missing: wifi_config is for a "
                                  "Wi-Fi uplink", 'name the interface: wifi = "wlan0"')
            if not isinstance(path, str) or not os.path.isabs(path):
                raise ConfigError(f"{where} field 'wifi_config'", "must be an absolute path",
                                  'e.g. wifi_config = "/etc/netstack/wifi.conf"')

    def private_files(self, q: Qube) -> list[tuple[str, str]]:
        """The credentials file: root's alone (checked when the config is read)."""
        path = q.settings.get("wifi_config")
        return [("wifi_config", path)] if isinstance(path, str) else []

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

        out = []
        conf = ctx.qube.settings.get("wifi_config")
        if "wifi" in ctx.qube.settings and isinstance(conf, str):
            out.append(Daemon(f"wifi-{ctx.qube.name}", ctx.netns,
                              wpa_argv(ctx.upstream_if, conf), True))
        if isinstance(info, DhcpInfo):
            out.append(Daemon(info.daemon_name, info.netns, dhcp.argv(info), True,
                              requires=info.script))
        return out


WIFI_DEV_RE = re.compile(r"^[^/\s:]{1,15}$")


def wpa_argv(dev: str, conf: str) -> tuple[str, ...]:
    """wpa_supplicant in the foreground on sys-net's uplink (the moved netdev), nl80211.
    In a private /run (a control socket the credentials file asks for lands there, never
    beside the host's own wpa_supplicant or another stack's: two stacks' uplinks have the
    same name) and a PID namespace of its own, like the DHCP client."""
    return ("bwrap", "--dev-bind", "/", "/", "--unshare-pid", "--proc", "/proc",
            "--tmpfs", "/run", "--die-with-parent", "--",
            "wpa_supplicant", "-i", dev, "-D", "nl80211", "-c", conf)
