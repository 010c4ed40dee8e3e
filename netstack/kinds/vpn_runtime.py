"""`vpn` at run time: endpoint names resolved through sys-net and admitted by the kill switch
before the tunnel's files (its go signal) are written; the failover watcher's files; the
tunnel's health in `status`; the wait for a handshake."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from netstack.kernel import Kernel
from netstack.kinds.runtime import KindRuntime, LiveFacts
from netstack.kinds.vpn import failover_spec_path
from netstack.model import QubeInfo
from netstack.vpn.info import VpnInfo, endpoint_set_commands, transport

if TYPE_CHECKING:
    from netstack.reconcile import Runtime
    from netstack.state import State


class VpnRuntime(KindRuntime):
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
        if info.forwards:
            write_forwards(rt, info)
        runtime.write_files(rt.kernel, info, rt.provider(q.name), resolved)

    def reload_commands(self, q: QubeInfo, st: State) -> list[dict[str, Any]]:
        """A full ruleset reload empties the endpoint sets (filled at run time): the
        current server's transport again."""
        info = q.info
        assert isinstance(info, VpnInfo)
        return endpoint_set_commands(info.current(),
                                     st.data.resolved.get(q.name))["nftables"] \
            + forward_set_commands(info)

    def status(self, q: QubeInfo, live: LiveFacts, k: Kernel) -> dict[str, Any]:
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
        if info.forwards:
            out["forward"] = forward_status(info)
        return {"vpn": out}

    def wait_ready(self, q: QubeInfo, st: State, k: Kernel, timeout: float,
                   progress: Callable[[int, str], None]) -> float:
        """Until the tunnel is up (WireGuard: a handshake; OpenVPN: CONNECTED), polled with
        a deadline; a NotReady error says why not."""
        import time

        from netstack.codec import dump
        from netstack.errors import NotReady
        from netstack.kernel import proc_alive
        from netstack.processes import children
        from netstack.vpn.health import health

        info = q.info
        assert isinstance(info, VpnInfo)
        t0 = time.monotonic()
        delay = 0.01
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

    def health(self, entry: dict[str, Any]) -> list[str]:
        v = entry["vpn"]
        unknown = [v["failover"]["error"]] if (v.get("failover") or {}).get("error") else []
        if v["tunnel"] == "up":
            if not v["process_alive"]:
                # kernel WireGuard's device outlives its keeper (its hook deletes it as the
                # keeper exits): a tunnel nobody supervises, until the supervisor's restart
                return unknown + [f"tunnel {v['dev']} is up without its daemon: nothing "
                                  "supervises it (the supervisor's restart replaces it)"]
            return unknown + forward_problems(v)
        if not v["process_alive"]:
            why = "its daemon is not running"
        elif v["type"] == "wireguard":
            age = v.get("handshake_age_s")
            why = "no handshake yet" if age is None else f"last handshake {age:.0f} s ago"
        else:
            why = f"OpenVPN state {v.get('state') or 'unknown'}"
        return unknown + [f"tunnel {v['dev']} down: {why} (the kill switch holds: nothing "
                          "leaves)"] + forward_problems(v)

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
        for g in v.get("forward") or []:
            lines.append(forward_line(g))
        return lines


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


# --- port forwarding (vpn/portfwd.py; the renewer is vpn/portfwd_run.py) ----------------

def write_forwards(rt: Runtime, info: VpnInfo) -> None:
    """Before the tunnel starts: the state (static ports granted for good, NAT-PMP ones
    pending), the clients' files, and the renewer's spec (its go signal)."""
    from netstack import sandbox
    from netstack.codec import encode
    from netstack.vpn import portfwd

    spec = portfwd.RenewerSpec(info.qube, info.netns,
                               portfwd.state_path(info.state_dir, info.qube),
                               os.path.join(info.state_dir, sandbox.PUBLIC),
                               list(info.forwards))
    st = portfwd.ForwardState([portfwd.Grant(f.index, f.qube, f.port, list(f.protos),
                                             f.public, static=not f.natpmp)
                               for f in info.forwards])
    dirs, files = portfwd.publication(spec, st)
    for d, mode in dirs:
        if not rt.kernel.is_dir(d):
            rt.kernel.make_dir(d, mode)
    for path, text, mode in files:
        rt.kernel.write_file(path, text, mode)
    if any(f.natpmp for f in info.forwards):
        rt.kernel.write_file(portfwd.spec_path(info.state_dir, info.qube), encode(spec),
                             0o600)


def forward_set_commands(info: VpnInfo) -> list[dict[str, Any]]:
    """After a reload: each NAT-PMP set holds the grant in force again (none: empty)."""
    import time

    from netstack.vpn import portfwd

    st = portfwd.read_state(portfwd.state_path(info.state_dir, info.qube))
    return portfwd.held_set_commands(info.forwards, st, time.time())


def forward_status(info: VpnInfo) -> list[dict[str, Any]]:
    import time

    from netstack.codec import dump
    from netstack.vpn import portfwd

    st = portfwd.read_state(portfwd.state_path(info.state_dir, info.qube))
    grants = {g.index: g for g in st.grants} if st else {}
    out = []
    now = time.time()
    for f in info.forwards:
        g = grants.get(f.index)
        e: dict[str, Any] = {"to": f"{f.qube}:{f.port}", "protos": list(f.protos),
                             "source": "natpmp" if f.natpmp else "static",
                             "gateway": f.gateway}
        if g is None:
            e.update(public_port=f.public, error=None if f.public else "no grant yet")
        else:
            e.update({k: v for k, v in dump(g).items()
                      if k not in ("index", "qube", "port", "protos", "static")})
            if g.expires_at is not None:
                e["expires_in_s"] = round(g.expires_at - now, 1)
            if f.natpmp and not g.public_port and not g.error:
                e["error"] = "no grant yet"
        out.append(e)
    return out


def forward_line(g: dict[str, Any]) -> str:
    pub = g.get("public_port")
    where = f"{g.get('public_address') or 'the VPN exit'}:{pub}" if pub else "(no port)"
    src = "NAT-PMP" if g["source"] == "natpmp" else "static"
    line = f"forward {src} {where}/{'+'.join(g['protos'])} -> {g['to']}"
    if g["source"] == "natpmp" and pub:
        line += (f", renewed {g.get('renewals', 0)}x, expires in "
                 f"{g.get('expires_in_s', 0):.0f} s")
    if g.get("error"):
        line += f" ({g['error']})"
    return line


def forward_problems(v: dict[str, Any]) -> list[str]:
    """A NAT-PMP port not held (never granted, or lapsed): the forward does not work."""
    return [f"forward to {g['to']}: no port held ({g.get('error') or 'no grant yet'})"
            for g in v.get("forward") or [] if g["source"] == "natpmp"
            and not g.get("public_port")]
