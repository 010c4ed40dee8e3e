"""`firewall` (sys-firewall): per-client anti-spoofing and client-to-client isolation; clients
reach only upstream. DNS to the virtual addresses is forwarded upstream unchanged."""

from __future__ import annotations

from typing import Any

from netstack.roles.base import QubeContext, Role
from netstack.rules import common
from netstack.rules.nft import Ruleset


class FirewallRole(Role):
    kind = "firewall"
    enforces_client_rules = True  # Qubes' qvm-firewall: each client's list, in here

    def rules(self, ctx: QubeContext, info: Any, rs: Ruleset) -> None:
        from netstack.addressing import VIRTUAL_DNS
        from netstack.rules import qubefw

        filtered = {}
        for c in ctx.clients:
            raw = ctx.topo[c.name].settings.get("firewall")
            if raw is None:
                continue  # no list: the plain behaviour
            qubefw.add_client_rules(rs, c.qid, c.name, qubefw.parse(c.name, raw),
                                    VIRTUAL_DNS)
            filtered[c.vif] = (c.name, qubefw.chain_name(c.name))
        common.provide_network(rs, ctx.client_vifs, ctx.upstream_if, filtered)
        common.own_output_upstream(rs, ctx.upstream_if)

    def activate(self, q: Any, rt: Any) -> None:
        """Resolve the hostnames of the clients' rules through sys-net's resolver and fill
        their sets (a name that does not resolve stays empty: its rule matches nothing)."""
        resolve_rule_names(q, rt.plan, rt.kernel, rt.state)

    def reload_commands(self, q: Any, st: Any) -> list[dict[str, Any]]:
        from netstack.rules import qubefw

        return qubefw.name_set_commands(st.plan, q.name, st.data.resolved.get(q.name, {}))

    def status(self, q: Any, live: Any) -> dict[str, Any]:
        """Which client has rules, and the names not resolved (their rules match nothing)."""
        names = live.resolved or {}
        return {"client_rules": {"unresolved": sorted(h for h, a in names.items() if not a),
                                 "resolved": {h: a for h, a in names.items() if a}}}

    def status_lines(self, entry: dict[str, Any]) -> list[str]:
        cr = entry.get("client_rules") or {}
        if not cr.get("unresolved") and not cr.get("resolved"):
            return []
        out = [f"rule hostnames: {h} -> {', '.join(a)}" for h, a in
               sorted(cr.get("resolved", {}).items())]
        out += [f"rule hostname {h} does not resolve: its rule matches nothing"
                for h in cr.get("unresolved", [])]
        return out


def resolve_rule_names(q: Any, plan: Any, k: Any, st: Any) -> None:
    from netstack.rules import qubefw

    if not qubefw.name_sets(plan, q.name):
        return
    net = plan.net
    resolved = qubefw.resolve_names(plan, q.name,
                                    lambda h: k.resolve(net.netns, plan.upstream_dns[0], h))
    k.nft(q.netns, {"nftables": qubefw.name_set_commands(plan, q.name, resolved)})
    st.set_resolved(q.name, resolved)
