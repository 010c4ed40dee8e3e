"""What a role sees of the plan, and the interface every role implements. A role owns its
kind: config keys and their validation, its info, rules, sysctls and daemons, its run-time
preparation, its audit properties, its leak-test zone and its status lines. Adding a kind
is one module plus a line in roles/__init__.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from netstack.addressing import QubeAddr
from netstack.config import Qube, Topology
from netstack.hostcaps import HostCaps
from netstack.model import Client, Daemon, QubeInfo, RoleInfo
from netstack.rules import common
from netstack.rules.nft import Ruleset

if TYPE_CHECKING:
    from netstack.audit.properties import AuditContext, QubeView, Result
    from netstack.kernel import Kernel
    from netstack.reconcile import Runtime
    from netstack.state import State


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


@dataclass(frozen=True)
class Tunnel:
    """A qube that encapsulates its clients' traffic (the audit's end-to-end walk and the
    leak test follow it): the device, the transport's mark and the routes into it."""

    dev: str
    fwmark: int
    routes: tuple[str, ...]
    upstream_if: str


@dataclass
class LiveFacts:
    """What `status` read from the kernel and the supervisor, for a role's status."""

    links: list[Any]  # kernel.LinkState of the qube's namespace
    children: dict[str, Any]  # supervisor children by daemon name (with "alive")
    resolved: dict[str, list[str]]  # this qube's resolved endpoint names


class Role:
    """A role contributes to its qube's plan and run time. Shared rule pieces live in
    netstack.rules.common; a role only says what is particular to its kind."""

    kind = ""
    config_keys: frozenset[str] = frozenset()
    provides_network = True
    owns_uplink = False  # the one net qube: the root of the tree
    strict_replies = False
    fast_path = False  # plain forwarding: established flows may go on a flowtable
    protection: str | None = None  # "vpn" | "tor": how leaktest names a chain through it
    sandboxed = False  # its commands run in a bubblewrap sandbox (netstack.sandbox)
    enforces_client_rules = True  # clients may have `firewall = [...]` (rules/qubefw.py)
    offers_onions = False  # clients may have `onion = [...]` (a Tor gateway's services)

    # --- config and plan (pure) ---------------------------------------------------------
    def validate(self, q: Qube) -> None:
        """Kind-specific settings; raise ConfigError naming the qube and field."""

    def host_caps(self, q: Qube) -> set[str]:
        """Kernel features (HostCaps fields) this qube could use: probed at plan time."""
        return {"flowtable"} if self.fast_path else set()

    def provider_refs(self, q: Qube) -> list[str]:
        """Provider files this qube's config points at (read once per command)."""
        return []

    def info(self, ctx: QubeContext) -> RoleInfo | None:
        return None

    def ruleset(self, ctx: QubeContext, info: RoleInfo | None) -> Ruleset:
        rs = Ruleset()
        peers6 = [a for a in (ctx.addr.gateway6, *(c.ipv6 for c in ctx.clients)) if a]
        offload = [ctx.upstream_if, *ctx.client_vifs] \
            if self.fast_path and ctx.caps.flowtable and ctx.clients else None
        common.base(rs, ctx.ipv6, self.strict_replies, peers6, offload)
        if self.provides_network:
            common.antispoof(rs, list(ctx.clients))
        if self.enforces_client_rules:
            common.client_firewalls(rs, list(ctx.clients), client_lists(ctx), ctx.ipv6)
        self.rules(ctx, info, rs)
        return rs

    def client_env(self, q: QubeInfo) -> dict[str, str]:
        """Environment a client's commands get from this netvm (where its services are)."""
        return {}

    def client_resolver(self, q: QubeInfo) -> tuple[str, int]:
        """(address, port) a client's lookups reach, asked from this qube's namespace: the
        virtual DNS, which each kind carries onwards as it carries its clients' DNS."""
        from netstack.addressing import VIRTUAL_DNS

        return VIRTUAL_DNS[0], 53

    def refuse_client_rule(self, rule: Any) -> str | None:
        """Why this kind cannot enforce a client's rule as written (None: it can). A rule
        that cannot be enforced is refused at load, never silently ignored."""
        return None

    def rules(self, ctx: QubeContext, info: Any, rs: Ruleset) -> None:
        raise NotImplementedError

    def sysctls(self, ctx: QubeContext) -> dict[str, str]:
        return common.sysctls(self.provides_network, ctx.ipv6)

    def daemons(self, ctx: QubeContext, info: Any) -> list[Daemon]:
        return []

    # --- run time -----------------------------------------------------------------------
    def prepare(self, q: QubeInfo, rt: Runtime) -> None:
        """Before the supervisor starts (files its daemons wait for)."""

    def activate(self, q: QubeInfo, rt: Runtime) -> None:
        """After the supervisor started (e.g. resolving through the lab's DNS service)."""

    def reload_commands(self, q: QubeInfo, st: State) -> list[dict[str, Any]]:
        """nft commands that put back what `up` filled in at run time (named sets), to go in
        the same transaction as a reload of the qube's ruleset."""
        return []

    def after_reload(self, q: QubeInfo, k: Kernel, st: State) -> None:
        """Restore run-time data (named sets filled after `up`) after a ruleset reload."""
        cmds = self.reload_commands(q, st)
        if cmds:
            k.nft(q.netns, {"nftables": cmds})

    def tunnel(self, q: QubeInfo) -> Tunnel | None:
        return None

    def leak_zone(self, outer: str) -> str:
        """The zone of this qube's upstream link, given the zone below it."""
        return outer

    # --- proofs and status --------------------------------------------------------------
    def audit(self, view: QubeView, ctx: AuditContext) -> list[Result]:
        from netstack.audit import properties as p

        res = [p.default_drop(view), p.invalid_first(view)]
        if not ctx.plan.ipv6:  # with IPv6 on, each kind's own properties cover IPv6 classes
            res.append(p.no_ipv6_egress(view))
        if self.provides_network:
            res += p.antispoof(view)
            r = p.no_client_to_client(view)
            if r:
                res.append(r)
        if self.enforces_client_rules:
            from netstack.audit import clientrules

            res += clientrules.for_netvm(view, ctx)
        return res

    def status(self, q: QubeInfo, live: LiveFacts) -> dict[str, Any]:
        return {}

    def status_lines(self, entry: dict[str, Any]) -> list[str]:
        return []

    def wait_ready(self, q: QubeInfo, st: State, timeout: float,
                   progress: Callable[[int, str], None]) -> float | None:
        """Block until the qube does its job (a tunnel carries traffic, Tor bootstrapped);
        returns the seconds waited, None when there is nothing to wait for."""
        return None

    def health(self, entry: dict[str, Any]) -> list[str]:
        """Problems of this kind seen in the status entry (e.g. a tunnel down, and why)."""
        return []


def client_lists(ctx: QubeContext) -> dict[str, tuple]:
    """The rule list of each client that has one (no key: the plain behaviour)."""
    from netstack.rules import qubefw

    return {c.name: qubefw.parse(c.name, raw) for c in ctx.clients
            if (raw := ctx.topo[c.name].settings.get("firewall")) is not None}
