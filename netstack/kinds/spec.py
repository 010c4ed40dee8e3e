"""A kind's pure half: what it contributes to a qube's plan, from data to data. Config keys
and their validation, its info, rules, sysctls and daemons, the traits the plan carries for
every other layer, its audit properties and its leak-test zone. Nothing here touches the
host: the impure half (prepare, activate, wait, health, status) is the kind's runtime
(netstack/kinds/runtime.py). Adding a kind is one spec module, one runtime module and a
line in netstack/kinds/registry.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from netstack.addressing import VIRTUAL_DNS, QubeAddr
from netstack.hostcaps import HostCaps
from netstack.model import Client, Daemon, KindTraits, QubeInfo, RoleInfo, Tunnel
from netstack.rules import common
from netstack.rules.nft import Ruleset

if TYPE_CHECKING:
    from netstack.audit.properties import AuditContext, QubeView, Result
    from netstack.config import Qube, Topology

__all__ = ["KindSpec", "KindTraits", "QubeContext", "Tunnel", "client_lists"]


@dataclass(frozen=True)
class QubeContext:
    topo: Topology
    qube: Qube
    addr: QubeAddr
    stack: str
    netns: str
    upstream_if: str  # eth0, or the uplink for the net qube
    clients: tuple[Client, ...]
    state_dir: str
    lab: bool  # the uplink is the built-in lab
    upstream_dns: tuple[str, ...] = ()  # real resolvers, net qube only
    provider: Any = None  # a VPN qube's provider files: [(path, parsed)], one per server
    caps: HostCaps = field(default_factory=HostCaps)  # what the host's kernel offers
    dhcp: bool = False  # net qube only: a moved uplink without a static address

    @property
    def client_vifs(self) -> list[str]:
        return [c.vif for c in self.clients]

    @property
    def ipv6(self) -> bool:
        return self.topo.ipv6


class KindSpec:
    """A kind's contribution to its qube's plan. Shared rule pieces live in
    netstack.rules.common; a spec only says what is particular to its kind."""

    kind = ""
    config_keys: frozenset[str] = frozenset()
    traits = KindTraits()
    # whether its clients' UDP gets through it (a Tor gateway carries TCP and DNS only, so
    # a VPN whose transport is UDP can never connect behind one)
    carries_udp = True

    # --- config and plan (pure) ---------------------------------------------------------
    def validate(self, q: Qube) -> None:
        """Kind-specific settings; raise ConfigError naming the qube and field."""

    def host_caps(self, q: Qube) -> set[str]:
        """Kernel features (HostCaps fields) this qube could use: probed at plan time."""
        return {"flowtable"} if self.traits.fast_path else set()

    def provider_refs(self, q: Qube) -> list[str]:
        """Provider files this qube's config points at (read once per command)."""
        return []

    def private_files(self, q: Qube) -> list[tuple[str, str]]:
        """(field, absolute path) of files with secrets this qube's config names: refused
        unless root's alone (checked once, when the config is read)."""
        return []

    def info(self, ctx: QubeContext) -> RoleInfo | None:
        return None

    def ruleset(self, ctx: QubeContext, info: RoleInfo | None) -> Ruleset:
        t = self.traits
        rs = Ruleset()
        peers6 = [a for a in (ctx.addr.gateway6, *(c.ipv6 for c in ctx.clients)) if a]
        offload = [ctx.upstream_if, *ctx.client_vifs] \
            if t.fast_path and ctx.caps.flowtable and ctx.clients else None
        common.base(rs, ctx.ipv6, t.strict_replies, peers6, offload)
        if t.provides_network:
            common.antispoof(rs, list(ctx.clients))
        if t.enforces_client_rules:
            common.client_firewalls(rs, list(ctx.clients), client_lists(ctx), ctx.ipv6)
        self.rules(ctx, info, rs)
        return rs

    def client_env(self, q: QubeInfo) -> dict[str, str]:
        """Environment a client's commands get from this netvm (where its services are)."""
        return {}

    def client_resolver(self, q: QubeInfo) -> tuple[str, int]:
        """(address, port) a client's lookups reach, asked from this qube's namespace: the
        virtual DNS, which each kind carries onwards as it carries its clients' DNS."""
        return VIRTUAL_DNS[0], 53

    def refuse_client_rule(self, rule: Any) -> str | None:
        """Why this kind cannot enforce a client's rule as written (None: it can). A rule
        that cannot be enforced is refused at load, never silently ignored."""
        return None

    def rules(self, ctx: QubeContext, info: Any, rs: Ruleset) -> None:
        raise NotImplementedError

    def sysctls(self, ctx: QubeContext) -> dict[str, str]:
        return common.sysctls(self.traits.provides_network, ctx.ipv6)

    def daemons(self, ctx: QubeContext, info: Any) -> list[Daemon]:
        return []

    def tunnel(self, q: QubeInfo) -> Tunnel | None:
        """Its tunnel (copied into the plan: the audit and leaktest read it there)."""
        return None

    def leak_zone(self, outer: str) -> str:
        """The zone of this qube's upstream link, given the zone below it."""
        return outer

    # --- proofs (pure: they read the ruleset and the plan) ------------------------------
    def audit(self, view: QubeView, ctx: AuditContext) -> list[Result]:
        from netstack.audit import properties as p

        res = [p.default_drop(view), p.invalid_first(view)]
        if not ctx.plan.ipv6:  # with IPv6 on, each kind's own properties cover IPv6 classes
            res.append(p.no_ipv6_egress(view))
        if self.traits.provides_network:
            res += p.antispoof(view)
            r = p.no_client_to_client(view)
            if r:
                res.append(r)
        if self.traits.enforces_client_rules:
            from netstack.audit import clientrules

            res += clientrules.for_netvm(view, ctx)
        return res


def client_lists(ctx: QubeContext) -> dict[str, tuple]:
    """The rule list of each client that has one (no key: the plain behaviour)."""
    return {c.name: rules for c in ctx.clients
            if (rules := ctx.topo[c.name].firewall) is not None}
