"""`app`: a workstation. Nothing comes in unasked; it talks only to its netvm link.
Its own rules protect nothing against root inside it: the guarantees sit upstream."""

from __future__ import annotations

from typing import Any

from netstack.config import Qube
from netstack.errors import ConfigError
from netstack.roles.base import QubeContext, Role
from netstack.rules import common
from netstack.rules.nft import Ruleset

PING_GROUPS = "0 2147483647"  # every group (systemd's default on the host)


class AppRole(Role):
    kind = "app"
    config_keys = frozenset({"home", "gui", "onion"})
    provides_network = False
    enforces_client_rules = False  # it has no clients
    sandboxed = True  # a workstation: whatever runs in it may be hostile

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

    def rules(self, ctx: QubeContext, info: Any, rs: Ruleset) -> None:
        common.own_output_upstream(rs, ctx.upstream_if)
        from netstack.rules.nft import ACCEPT, ct_state, iifname, ip_saddr, match, payload

        for port, target in onion_ports(ctx.qube):  # its onion service, from the gateway
            if ctx.addr.gateway4:
                rs["input"].add(iifname(ctx.upstream_if), ip_saddr(ctx.addr.gateway4),
                                match(payload("tcp", "dport"), target), ct_state("new"),
                                ACCEPT, comment=f"onion service port {port}")

    def sysctls(self, ctx: QubeContext) -> dict[str, str]:
        """ping works as in a Qubes app qube: the sandbox's account (no_new_privs drops
        ping's file capability) may open ICMP echo sockets, which send echo requests only
        (no raw packets); where they may go is the netvm's firewall's to decide."""
        return {**super().sysctls(ctx), "net/ipv4/ping_group_range": PING_GROUPS}

    def status(self, q: Any, live: Any) -> dict[str, Any]:
        """What the qube is given: its sandbox, its home, and a display if `gui = true`
        (the only grant there is); for a disposable, the `run` that owns it."""
        from netstack.sandbox import home_dir

        home = q.settings.get("home", "persistent")
        stack = q.netns.split("-", 2)[1]  # nst-STACK-QUBE
        grants, warnings = gui_status(q)
        out: dict[str, Any] = {"sandbox": {"kind": "bubblewrap", "home": home,
                                           "home_path": home_dir(stack, q.name)
                                           if home == "persistent" else None,
                                           "grants": grants, "warnings": warnings}}
        if q.settings.get("disposable"):
            from netstack.disposable import orphaned

            out["disposable"] = {"runner": q.settings.get("runner"), "orphaned": orphaned(q)}
        return out

    def status_lines(self, entry: dict[str, Any]) -> list[str]:
        sb = entry.get("sandbox") or {}
        where = f" ({sb['home_path']})" if sb.get("home_path") else ""
        lines = [f"sandbox: {sb.get('kind')}, {sb.get('home')} home{where}, grants: "
                 + (", ".join(sb.get("grants") or []) or "none")]
        lines += [f"WARNING: {w}" for w in sb.get("warnings") or []]
        d = entry.get("disposable")
        if d:
            lines.append(f"disposable of `netstack run` pid {d['runner']}" if not d["orphaned"]
                         else f"disposable, its `netstack run` (pid {d['runner']}) is gone: "
                         "the next `run` or `down` removes it")
        return lines

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
        out.append((x["port"], x["target"]))
    return out


def gui_status(q: Any) -> tuple[list[str], list[str]]:
    """What `gui = true` grants here and now (the invoking user's display), and warnings."""
    import os

    from netstack import sandbox
    from netstack.errors import UsageError

    if not q.settings.get("gui"):
        return [], []
    try:
        who = sandbox.account(None, os.environ.get("SUDO_USER"))
    except UsageError:
        return ["gui: no account to run as"], []
    g = sandbox.gui_grant(os.environ, who)
    if g is None:
        return [f"gui: none ({who.name} has no Wayland or X11 display here)"], []
    return [g.describe()], [g.warning] if g.warning else []
