"""What a role sees of the plan, and the small interface every role implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from netstack.addressing import QubeAddr
from netstack.config import Qube, Topology
from netstack.rules import common
from netstack.rules.nft import Ruleset


@dataclass(frozen=True)
class Client:
    """A qube that gets network from this one, and the link it arrives on."""

    name: str
    vif: str
    addr: QubeAddr


@dataclass(frozen=True)
class QubeContext:
    topo: Topology
    qube: Qube
    addr: QubeAddr
    stack: str
    upstream_if: str  # eth0, or the uplink for the net qube
    clients: tuple[Client, ...]
    upstream_dns: tuple[str, ...] = ()  # real resolvers, net qube only
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def client_vifs(self) -> list[str]:
        return [c.vif for c in self.clients]

    @property
    def ipv6(self) -> bool:
        return self.topo.ipv6


@dataclass(frozen=True)
class Daemon:
    """A process the supervisor runs inside a qube's namespace and restarts when it dies."""

    name: str
    netns: str
    argv: tuple[str, ...]
    restart: bool = True
    post_start: tuple[str, ...] = ()  # run in the namespace after each start; failure kills
    requires: str = ""  # a file `up` writes when the daemon may start (e.g. resolved config)


class Role:
    """A role contributes rules, sysctls and daemons to its qube's plan. Shared pieces live in
    netstack.rules.common; a role only says what is particular to its kind."""

    kind = ""
    strict_replies = False

    def ruleset(self, ctx: QubeContext) -> Ruleset:
        rs = Ruleset()
        common.base(rs, ctx.ipv6, self.strict_replies)
        if ctx.qube.provides_network:
            common.antispoof(rs, [(c.vif, c.addr.ipv4, c.addr.ipv6, c.name)
                                  for c in ctx.clients])
        self.rules(ctx, rs)
        return rs

    def rules(self, ctx: QubeContext, rs: Ruleset) -> None:
        raise NotImplementedError

    def sysctls(self, ctx: QubeContext) -> dict[str, str]:
        return common.sysctls(ctx.qube.provides_network, ctx.ipv6)

    def daemons(self, ctx: QubeContext) -> list[Daemon]:
        return []
