"""`vpn` (sys-proxyvm): everything from its clients leaves only through the tunnel; its own
output to the uplink is only the tunnel transport (fwmark + endpoint address, protocol and
port); DNS goes to the VPN's resolver through the tunnel. The rules are in place before the
tunnel starts and stay when it dies: a dead VPN means dropped traffic, never clear."""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import TYPE_CHECKING, Any

from netstack.addressing import ip_version
from netstack.config import Qube
from netstack.errors import ConfigError
from netstack.model import Daemon, QubeInfo
from netstack.roles.base import LiveFacts, QubeContext, Role, Tunnel
from netstack.rules import common
from netstack.rules.nft import (
    ACCEPT,
    COUNTER,
    MASQUERADE,
    NamedSet,
    Ruleset,
    concat,
    ct_state,
    iifname,
    in_set,
    l4proto,
    match,
    meta,
    oifname,
    payload,
    set_commands,
)
from netstack.vpn.info import ENDPOINT_SET, ENDPOINT_SET6, VpnInfo, set_elements, transport

if TYPE_CHECKING:
    from collections.abc import Callable

    from netstack.audit.properties import AuditContext, QubeView, Result
    from netstack.reconcile import Runtime
    from netstack.state import State

SET_TYPE = ["ipv4_addr", "inet_proto", "inet_service"]
SET_TYPE6 = ["ipv6_addr", "inet_proto", "inet_service"]


class VpnRole(Role):
    kind = "vpn"
    config_keys = frozenset({"type", "config", "dns", "backend", "failover_after"})
    strict_replies = True
    protection = "vpn"

    def validate(self, q: Qube) -> None:
        where, s = f"qube {q.name!r}", q.settings
        if s.get("type") not in ("wireguard", "openvpn"):
            raise ConfigError(f"{where} field 'type'", f"{s.get('type')!r} is not a VPN type",
                              'use type = "wireguard" or type = "openvpn"')
        c = s.get("config")
        if isinstance(c, list):
            if not c or not all(isinstance(x, str) and x for x in c):
                raise ConfigError(f"{where} field 'config'", "must be a non-empty list of "
                                  "paths", 'e.g. config = ["se-1.conf", "se-2.conf"]')
            if len(set(c)) != len(c):
                raise ConfigError(f"{where} field 'config'", "names a file twice",
                                  "list each server's file once")
        elif not isinstance(c, str) or not c:
            raise ConfigError(f"{where} field 'config'", "missing",
                              "give the path of the provider's .conf or .ovpn file, or a "
                              "list of them (servers to fail over between)")
        fa = s.get("failover_after", 20)
        if isinstance(fa, bool) or not isinstance(fa, int | float) or not 2 <= fa <= 3600:
            raise ConfigError(f"{where} field 'failover_after'", f"{fa!r} is not seconds "
                              "(2-3600)", "e.g. failover_after = 20")
        if "backend" in s and (s["type"] != "wireguard"
                               or s["backend"] not in ("auto", "kernel", "wireguard-go")):
            raise ConfigError(f"{where} field 'backend'", f"{s['backend']!r} is not a "
                              f"{s['type']} backend",
                              'for WireGuard use "auto", "kernel" or "wireguard-go"; '
                              "OpenVPN has none")
        dns = s.get("dns", [])
        if not isinstance(dns, list) or not all(isinstance(d, str) for d in dns):
            raise ConfigError(f"{where} field 'dns'", "must be a list of addresses",
                              'e.g. dns = ["10.64.0.1"]')
        for d in dns:
            if ip_version(d) != 4:
                raise ConfigError(f"{where} field 'dns'", f"{d!r} is not an IPv4 address",
                                  "give the VPN resolver's IPv4 address (the virtual DNS "
                                  "is IPv4)")

    def host_caps(self, q: Qube) -> set[str]:
        wants = q.settings.get("type") == "wireguard" and \
            q.settings.get("backend", "auto") != "wireguard-go"
        return {"wireguard"} if wants else set()

    def provider_refs(self, q: Qube) -> list[str]:
        from netstack.vpn.runtime import provider_refs

        return provider_refs(q)

    def info(self, ctx: QubeContext) -> VpnInfo:
        from netstack.vpn import runtime

        return runtime.vpn_info(ctx.qube, ctx.provider, ctx.addr.qid, ctx.stack,
                                ctx.addr.gateway4 or "", ctx.addr.gateway6, ctx.state_dir,
                                ctx.caps.wireguard)

    def rules(self, ctx: QubeContext, info: VpnInfo, rs: Ruleset) -> None:
        # Literal endpoints are in the set from the first transaction on; names are added
        # once resolved through sys-net, before the tunnel daemon may start.
        v4, v6 = set_elements(transport(info, None))
        rs.add_set(NamedSet(ENDPOINT_SET, SET_TYPE, v4))
        rs.add_set(NamedSet(ENDPOINT_SET6, SET_TYPE6, v6))
        tun, up = info.dev, ctx.upstream_if
        clients = ctx.client_vifs
        if clients:
            common.no_qubes(rs, clients)
            rs["forward"].add(iifname(*clients), oifname(tun), ACCEPT,
                              comment="clients -> tunnel only")
            rs["forward"].add(iifname(tun), oifname(*clients),
                              ct_state("established", "related"), ACCEPT,
                              comment="replies from the tunnel")
            rs["output"].add(oifname(*clients), ct_state("established", "related"), ACCEPT,
                             comment="replies to clients")
        rs["output"].add(oifname(tun), ACCEPT, comment="own traffic through the tunnel")
        rs["output"].add(oifname(up), match(meta("mark"), info.fwmark), l4proto("tcp", "udp"),
                         in_set(concat(payload("ip", "daddr"), meta("l4proto"),
                                       payload("th", "dport")), ENDPOINT_SET),
                         COUNTER, ACCEPT, comment="VPN transport")
        rs["output"].add(oifname(up), match(meta("mark"), info.fwmark), l4proto("tcp", "udp"),
                         in_set(concat(payload("ip6", "daddr"), meta("l4proto"),
                                       payload("th", "dport")), ENDPOINT_SET6),
                         COUNTER, ACCEPT, comment="VPN transport (IPv6)")
        rs["nat_postrouting"].add(oifname(tun), MASQUERADE, comment="masquerade tunnel")
        common.dns_dnat(rs, clients, info.dns)

    def daemons(self, ctx: QubeContext, info: VpnInfo) -> list[Daemon]:
        from netstack.vpn import runtime

        monitor = ("netstack.vpn.failover:watch", failover_spec_path(info)) \
            if info.servers else ()
        return [Daemon(info.daemon_name, info.netns, runtime.daemon_argv(info), True,
                       (sys.executable, "-m", "netstack.vpn.hook", info.spec_path),
                       requires=info.spec_path, monitor=monitor)]

    # --- run time -----------------------------------------------------------------------
    def prepare(self, q: QubeInfo, rt: Runtime) -> None:
        """The tunnel carries IPv4 only: devices made from now on (the tunnel, by its daemon)
        are born without IPv6, so not even a link-scope packet of its own goes into it."""
        if rt.plan.ipv6:
            rt.kernel.sysctl(q.netns, "net/ipv6/conf/default/disable_ipv6", "1")

    def activate(self, q: QubeInfo, rt: Runtime) -> None:
        """Resolve endpoint names through sys-net's resolver (never the host's), let the
        kill switch admit exactly those addresses, then write the daemon's files: the spec
        goes last and is what the supervisor waits for, so the tunnel's first handshake
        never meets a closed kill switch."""
        from netstack.vpn import runtime

        info = q.info
        assert isinstance(info, VpnInfo)
        net = rt.plan.net
        from netstack.dhcp import upstream_resolver
        from netstack.vpn.checks import check_address

        servers = [info.server(i) for i in range(len(info.servers))] or [info]
        resolved: dict[str, list[str]] = {}
        for srv in servers:  # every server's names now: a failover asks no DNS
            resolved.update(runtime.resolve_endpoints(
                srv, lambda h: rt.kernel.resolve(net.netns, upstream_resolver(rt.plan), h)))
        for host, addrs in resolved.items():  # a name may answer what a literal may not be
            for a in addrs:
                check_address(a, f"qube {q.name!r} endpoint {host!r} (resolved)")
        rt.kernel.nft(info.netns, endpoint_set_commands(info, resolved))  # the first only
        rt.state.set_resolved(q.name, resolved)
        if info.servers:
            write_failover(rt, info, servers, resolved)
        if info.backend == "wireguard-go":  # its control socket outlives a kill -9: ours
            from netstack.state import FileRec

            rt.state.record(FileRec(runtime.uapi_socket(info.dev)))
        runtime.write_files(rt.kernel, info, rt.provider(q.name), resolved)

    def reload_commands(self, q: QubeInfo, st: State) -> list[dict[str, Any]]:
        """A full ruleset reload empties the endpoint sets (filled at run time): the
        current server's transport again."""
        info = q.info
        assert isinstance(info, VpnInfo)
        return endpoint_set_commands(info.current(),
                                     st.data.resolved.get(q.name))["nftables"]

    def tunnel(self, q: QubeInfo) -> Tunnel:
        info = q.info
        assert isinstance(info, VpnInfo)
        return Tunnel(info.dev, info.fwmark, tuple(info.routes), info.upstream_if)

    def leak_zone(self, outer: str) -> str:
        return "vpn-out"

    # --- proofs and status --------------------------------------------------------------
    def audit(self, view: QubeView, ctx: AuditContext) -> list[Result]:
        info = view.qube.info
        assert isinstance(info, VpnInfo)
        want = set(transport(info.current(), ctx.resolved.get(view.qube.name)))
        return super().audit(view, ctx) + kill_switch(view, self.tunnel(view.qube),
                                                      ctx.endpoints) \
            + [endpoint_set(view, want)]

    def status(self, q: QubeInfo, live: LiveFacts) -> dict[str, Any]:
        from netstack.vpn.health import health

        info = q.info
        assert isinstance(info, VpnInfo)
        from netstack.vpn.info import current_index

        i = current_index(info)
        out = health(info.server(i), live.links, live.children.get(info.daemon_name),
                     live.resolved)
        if info.servers:
            from netstack.codec import dump
            from netstack.vpn.failover import read_state

            fs = read_state(info.server_file)
            out["failover"] = {"current": i, "servers": [s.provider for s in info.servers],
                               "after_s": info.failover_after,
                               "switches": dump(fs.history) if fs else []}
            if fs is None and os.path.exists(info.server_file):
                # the current server is then a guess (the first): say so, never show it as
                # known
                out["failover"]["error"] = (
                    f"{info.server_file} is damaged: which server the kill switch admits is "
                    "unknown; fix: `netstack down` and `up` again")
        return {"vpn": out}

    def wait_ready(self, q: QubeInfo, st: State, timeout: float,
                   progress: Callable[[int, str], None]) -> float:
        """Until the tunnel is up (WireGuard: a handshake; OpenVPN: CONNECTED), polled with
        a deadline; a NotReady error says why not."""
        import time

        from netstack.codec import dump
        from netstack.errors import NotReady
        from netstack.kernel import RealKernel, proc_alive
        from netstack.processes import children
        from netstack.vpn.health import health

        info = q.info
        assert isinstance(info, VpnInfo)
        k = RealKernel()
        t0 = time.monotonic()
        delay = 0.01
        try:
            while True:
                c = children(st).get(info.daemon_name)
                child = {**dump(c), "alive": proc_alive(c.pid, c.start)} if c else None
                h = health(info.current(), k.links(info.netns), child,
                           st.data.resolved.get(q.name))
                # up: connected, and the hook has set the routes into the tunnel (OpenVPN
                # reports CONNECTED before them)
                if h["tunnel"] == "up" and child and child.get("configured"):
                    progress(100, "tunnel up")
                    return time.monotonic() - t0
                if time.monotonic() - t0 > timeout:
                    why = self.health({"vpn": h})
                    raise NotReady(f"vpn {q.name}: not up after {timeout:.0f} s: "
                                   + "; ".join(why))
                progress(50 if child and child.get("configured") else 10,
                         "handshake" if child and child.get("configured") else "starting")
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        finally:
            k.close()

    def health(self, entry: dict[str, Any]) -> list[str]:
        v = entry["vpn"]
        unknown = [v["failover"]["error"]] if (v.get("failover") or {}).get("error") else []
        if v["tunnel"] == "up":
            return unknown
        if not v["process_alive"]:
            why = "its daemon is not running"
        elif v["type"] == "wireguard":
            age = v.get("handshake_age_s")
            why = "no handshake yet" if age is None else f"last handshake {age:.0f} s ago"
        else:
            why = f"OpenVPN state {v.get('state') or 'unknown'}"
        return unknown + [f"tunnel {v['dev']} down: {why} (the kill switch holds: nothing "
                          "leaves)"]

    def status_lines(self, entry: dict[str, Any]) -> list[str]:
        v = entry["vpn"]
        eps = ", ".join(f"{e['host']}:{e['port']}/{e['proto']}" for e in v["endpoints"])
        extra = (f"handshake {v['handshake_age_s']}s ago" if v.get("handshake_age_s")
                 is not None else f"state {v.get('state') or '-'}")
        kind = v["type"] if v.get("backend", v["type"]) == v["type"] \
            else f"{v['type']} ({v['backend']})"
        lines = [f"{kind} {eps}: tunnel {v['tunnel'].upper()}, {extra}, "
                 f"rx {v['rx_bytes'] or 0} B tx {v['tx_bytes'] or 0} B, "
                 f"restarts {v['restarts']}"]
        f = v.get("failover")
        if f:
            import os

            names = [os.path.basename(x) for x in f["servers"]]
            lines.append(f"server {f['current'] + 1}/{len(names)} ({names[f['current']]}); "
                         f"fails over after {f['after_s']:.0f} s silent; "
                         f"{len(f['switches'])} switches"
                         + (f", last: {f['switches'][-1]['why']}" if f["switches"] else ""))
        return lines


def endpoint_set_commands(info: VpnInfo, resolved: dict[str, list[str]] | None
                          ) -> dict[str, Any]:
    """One transaction: both endpoint sets hold exactly this (server's) transport."""
    return endpoint_set_commands_for(transport(info, resolved))


def endpoint_set_commands_for(triples: list[Any]) -> dict[str, Any]:
    v4, v6 = set_elements(triples)
    return {"nftables": set_commands(ENDPOINT_SET, v4) + set_commands(ENDPOINT_SET6, v6)}


def failover_spec_path(info: VpnInfo) -> str:
    return info.server_path(info.spec_path, 0).replace(".s0.", ".failover.")


def write_failover(rt: Runtime, info: VpnInfo, servers: list[VpnInfo],
                   resolved: dict[str, list[str]]) -> None:
    """Each server's daemon config and hook spec (secrets 0600), and what the failover
    watcher needs; the current files are written after, by the caller (the go signal)."""
    from netstack.codec import encode
    from netstack.vpn import runtime
    from netstack.vpn.failover import FailoverSpec, ServerFiles

    files = []
    for i, srv in enumerate(servers):
        runtime.write_files(rt.kernel, srv, rt.provider(info.qube, i), resolved, server=i)
        files.append(ServerFiles([list(t) for t in transport(srv, resolved)],
                                 info.server_path(info.conf_path, i),
                                 info.server_path(info.spec_path, i), srv.provider))
    spec = FailoverSpec(info.qube, info.netns, info.dns[0], info.failover_after,
                        info.conf_path, info.spec_path, info.server_file, files)
    rt.kernel.write_file(failover_spec_path(info), encode(spec), 0o600)


def kill_switch(q: QubeView, tun: Tunnel, endpoints: set[tuple[str, str, int]]) -> list[Result]:
    """Forwarded client traffic only into the tunnel; the qube's own output to its uplink
    only the tunnel transport (mark + endpoint), whoever sends it (any socket owner, or
    none)."""
    from netstack.audit import properties as p
    from netstack.audit.space import Domains

    extra = Domains()
    for a, _proto, port in endpoints:
        n = int(ipaddress.ip_address(a))
        extra.interval(f"daddr{ipaddress.ip_address(a).version}", n, n)
        extra.interval("dport", port, port)
    extra.interval("mark", tun.fwmark, tun.fwmark)
    out = []
    total = 0
    for c in q.clients:
        start = {**p.not_sockets("forward"), "iif": p.one_of("iif", c.vif),
                 "oif": p.none_of("oif", tun.dev)}
        r = p.check("kill switch (forward)", q, "forward", start, p.accepted, "", extra)
        total += r.classes
        if r.status != "PASS":
            out.append(r)
            break
    else:
        out.append(p.Result("kill switch (forward)", q.name, "PASS",
                            f"client traffic is forwarded only into {tun.dev}", classes=total))
    allowed = [p.box(mark=p.one_of("mark", tun.fwmark),
                     family=p.one_of("family", f"ipv{ipaddress.ip_address(a).version}"),
                     **{p.addr_field(a, "daddr"): p.one_of(p.addr_field(a, "daddr"), a)},
                     l4proto=p.one_of("l4proto", proto), dport=p.one_of("dport", port))
               for a, proto, port in sorted(endpoints)]
    start = {**p.not_sockets("output"), "oif": p.one_of("oif", q.upstream_if)}
    r = p.check("kill switch (own output)", q, "output", start,
                p.dropped_or_allowed(allowed + p.link_nd(q)),
                f"to {q.upstream_if} only the tunnel transport leaves (fwmark "
                f"{tun.fwmark:#x} to " + ", ".join(f"{a}:{po}/{pr}"
                                                  for a, pr, po in sorted(endpoints))
                + "), whoever sends it", extra)
    return out + [r]


def endpoint_set(q: QubeView, want: set[tuple[str, str, int]]) -> Result:
    """The kill switch admits exactly the endpoints resolved at `up`, nothing more."""
    from netstack.audit.properties import Result

    got: set[tuple[str, str, int]] = set()
    found = False
    for i in q.ruleset.get("nftables", []):
        s = i.get("set")
        if s and s["name"] in (ENDPOINT_SET, ENDPOINT_SET6):
            found = True
            for e in s.get("elem", []):
                c = e.get("concat") if isinstance(e, dict) else None
                if c:
                    got.add((c[0], c[1], c[2]))
    extra = got - want
    status = "PASS" if found and not extra and got else "FAIL"
    return Result("VPN endpoints exactly as resolved", q.name, status,
                  f"set {ENDPOINT_SET} = {sorted(got)}; resolved {sorted(want)}",
                  {"unexpected": [list(e) for e in sorted(extra)]} if extra else None,
                  [f"{q.name} -> set {ENDPOINT_SET} -> element {a} . {pr} . {po}: not the "
                   "current server's transport" for a, pr, po in sorted(extra)])
