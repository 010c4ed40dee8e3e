"""`app`: a workstation. Nothing comes in unasked; it talks only to its netvm link.
Its own rules protect nothing against root inside it: the guarantees sit upstream."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from netstack.errors import ConfigError
from netstack.kinds.spec import KindSpec, KindTraits, QubeContext
from netstack.rules import common
from netstack.rules.nft import Ruleset

if TYPE_CHECKING:
    from netstack.config import Qube


PING_GROUPS = "0 2147483647"  # every group (systemd's default on the host)


class AppSpec(KindSpec):
    kind = "app"
    config_keys = frozenset({"home", "gui", "onion", "template"})
    # a workstation: whatever runs in it may be hostile; it has no clients
    traits = KindTraits(provides_network=False, enforces_client_rules=False, sandboxed=True)

    def validate(self, q: Qube) -> None:
        home = q.settings.get("home", "persistent")
        if home not in ("persistent", "ephemeral"):
            raise ConfigError(f"qube {q.name!r} field 'home'", f"{home!r} is not a home",
                              'use home = "persistent" (kept across down/up) or "ephemeral" '
                              "(a fresh empty home for every command)")
        if not isinstance(q.settings.get("gui", False), bool):
            raise ConfigError(f"qube {q.name!r} field 'gui'", "must be true or false",
                              "gui = true grants the invoking user's Wayland (or X11) display")
        onion_ports(q)
        if "template" in q.settings:  # its root file system (netstack/templates.py)
            from netstack.templates import check_name

            check_name(q.settings["template"], f"qube {q.name!r} field 'template'")

    def sysctls(self, ctx: QubeContext) -> dict[str, str]:
        """ping works as in a Qubes app qube: the sandbox's account (no_new_privs drops
        ping's file capability) may open ICMP echo sockets, which send echo requests only
        (no raw packets); where they may go is the netvm's firewall's to decide."""
        return {**super().sysctls(ctx), "net/ipv4/ping_group_range": PING_GROUPS}

    def rules(self, ctx: QubeContext, info: Any, rs: Ruleset) -> None:
        common.own_output_upstream(rs, ctx.upstream_if)
        from netstack.rules.nft import ACCEPT, ct_state, iifname, ip_saddr, match, payload

        for port, target in onion_ports(ctx.qube):  # its onion service, from the gateway
            if ctx.addr.gateway4:
                rs["input"].add(iifname(ctx.upstream_if), ip_saddr(ctx.addr.gateway4),
                                match(payload("tcp", "dport"), target), ct_state("new"),
                                ACCEPT, comment=f"onion service port {port}")
        forwarded(ctx, rs)


def forwarded(ctx: QubeContext, rs: Ruleset) -> None:
    """Ports its netvm (a VPN qube) forwards to it from the tunnel (vpn/portfwd.py): let
    in on its link, to its own address and the named port only."""
    from netstack.vpn import portfwd

    netvm = ctx.qube.netvm
    if netvm is None or not ctx.addr.gateway4 or "forward" not in ctx.topo[netvm].settings:
        return
    mine = portfwd.forwards_to(ctx.qube.name,
                               portfwd.parse(netvm, ctx.topo[netvm].settings["forward"]))
    portfwd.client_rules(rs, mine, ctx.upstream_if, ctx.addr.ipv4)


def onion_ports(q: Qube) -> list[tuple[int, int]]:
    """`onion = [{port = 80, target = 8080}]`: (onion port, the qube's own port) pairs; the
    service's keys live in the Tor gateway, never in the qube."""
    raw = q.settings.get("onion", [])
    where = f"qube {q.name!r} field 'onion'"
    fix = "e.g. onion = [{port = 80, target = 8080}]"
    if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
        raise ConfigError(where, "must be a list of {port, target} tables", fix)
    out = []
    for x in raw:
        if set(x) != {"port", "target"} or not all(
                isinstance(x[k], int) and not isinstance(x[k], bool) and 0 < x[k] < 65536
                for k in ("port", "target")):
            raise ConfigError(where, f"{x!r} needs port and target, each 1-65535", fix)
        if any(p == x["port"] for p, _t in out):
            raise ConfigError(where, f"port {x['port']} is given twice (one service answers "
                              "on a port)", "give each onion port once")
        out.append((x["port"], x["target"]))
    return out
