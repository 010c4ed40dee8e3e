"""The VPN qube from its provider file: the pure derivation of its plan data, and the
run-time files (daemon config with umask 077, the post-start hook's spec) written once its
endpoints are resolved."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from netstack import names
from netstack.addressing import ip_version, is_ip
from netstack.codec import encode
from netstack.config import Qube
from netstack.errors import ConfigError
from netstack.vpn import ovpnconf, wgconf
from netstack.vpn.info import FWMARK, VpnEndpoint, VpnInfo, VpnServerInfo

if TYPE_CHECKING:
    from netstack.kernel import Kernel

Provider = wgconf.WgConfig | ovpnconf.OvpnConfig


@dataclass
class HookRoute:
    dst: str
    dev: str
    via: str | None = None


@dataclass
class TunnelSpec:
    """What the post-start hook does after each (re)start of the tunnel daemon."""

    type: str
    dev: str
    setconf: str | None
    addresses: list[str]
    mtu: int | None
    routes: list[HookRoute]
    log: str | None = None  # the daemon's own log: its last words when it cannot connect
    connect_timeout: float = 60.0
    # The device is kernel WireGuard's, made by netstack.vpn.kernelwg: it outlives a keeper
    # killed with -9, so the hook configures only the device with its keeper's mark and
    # deletes it when that keeper exits (netstack/vpn/kernelwg.py).
    keeper: bool = False


def provider_refs(q: Qube) -> list[str]:
    """`config` is one provider file, or a list of them: servers to fail over between."""
    c = q.settings["config"]
    return [c] if isinstance(c, str) else list(c)


def provider_path(q: Qube, ref: str, config_dir: str, lab_files: dict[str, str] | None) -> str:
    if ref.startswith("lab:"):
        if lab_files is None:
            raise ConfigError(f"qube {q.name!r} field 'config'", f"{ref!r} exists only in the lab",
                              "bring the stack up with --lab, or give your provider's file")
        if ref not in lab_files:
            raise ConfigError(f"qube {q.name!r} field 'config'", f"unknown lab file {ref!r}",
                              f"use one of {', '.join(sorted(lab_files))}")
        return lab_files[ref]
    return ref if os.path.isabs(ref) else os.path.normpath(os.path.join(config_dir, ref))


def parse_provider(vpn_type: str, text: str, path: str, where: str) -> Provider:
    """`where` names the qube field for errors about the file as a whole."""
    src = os.path.basename(path)
    if vpn_type == "wireguard":
        return wgconf.parse(text, src)
    return ovpnconf.parse(text, src, os.path.dirname(path))


def read_provider(q: Qube, path: str) -> Provider:
    from netstack.config import read_text

    where = f"qube {q.name!r} field 'config'"
    text = read_text(path, where, "give the path of your provider's file")
    return parse_provider(q.settings["type"], text, path, where)


def backend(q: Qube, kernel_wireguard: bool) -> str:
    """Kernel WireGuard where the kernel has it, wireguard-go otherwise (as wg-quick
    chooses); `backend` in the qube's table forces one."""
    if q.settings["type"] != "wireguard":
        return "openvpn"
    want = q.settings.get("backend", "auto")
    if want == "kernel" and not kernel_wireguard:
        raise ConfigError(f"qube {q.name!r} field 'backend'",
                          "this kernel has no WireGuard (no generic netlink family "
                          "'wireguard')", 'use backend = "auto" or "wireguard-go"')
    if want == "auto":
        return "kernel" if kernel_wireguard else "wireguard-go"
    return want


def server_info(cfg: Provider, path: str) -> VpnServerInfo:
    if isinstance(cfg, wgconf.WgConfig):
        eps = [VpnEndpoint(e.host, e.port, "udp") for e in cfg.endpoints]
        addrs, mtu = cfg.addresses, cfg.mtu
        routes = sorted({a for p in cfg.peers for a in p.allowed_ips if ":" not in a}) \
            or ["0.0.0.0/0"]
    else:
        eps = [VpnEndpoint(r.endpoint.host, r.endpoint.port, r.proto) for r in cfg.remotes]
        addrs, mtu, routes = [], None, ["0.0.0.0/0"]
    return VpnServerInfo(path, eps, [a for a in addrs if ":" not in a], mtu, routes)


def vpn_info(q: Qube, providers: list[tuple[str, Provider]], qid: int, stack: str,
             gateway: str, gateway6: str | None, state_dir: str,
             kernel_wireguard: bool = False) -> VpnInfo:
    """Everything about the VPN qube that the rules and status need, without secrets.
    Several provider files are servers to fail over between: the same resolvers for all
    (the rules point the virtual DNS at them), the first is where the tunnel starts."""
    servers = [server_info(cfg, path) for path, cfg in providers]
    first = servers[0]
    dnss = [list(q.settings.get("dns") or cfg.dns) for _, cfg in providers]
    if any(d != dnss[0] for d in dnss):
        raise ConfigError(f"qube {q.name!r} field 'dns'",
                          "the provider files name different DNS servers",
                          "set dns = [...] to the resolver every server answers on")
    dns = dnss[0]
    if not dns:
        raise ConfigError(f"qube {q.name!r} field 'dns'",
                          "the provider file names no DNS server",
                          'set dns = ["IP of the VPN provider\'s resolver"]')
    v4_dns = [d for d in dns if ip_version(d) == 4]
    if not v4_dns:
        raise ConfigError(f"qube {q.name!r} field 'dns'", "no IPv4 resolver",
                          "give an IPv4 DNS address reachable through the tunnel")
    return VpnInfo(q.name, names.qube_netns(stack, q.name), q.settings["type"],
                   names.tunnel_if(stack, qid, q.settings["type"]), FWMARK, first.provider,
                   list(first.endpoints), v4_dns, list(first.tunnel_addresses), first.mtu,
                   gateway, names.UPSTREAM_IF, state_dir, list(first.routes), gateway6,
                   backend(q, kernel_wireguard), servers if len(servers) > 1 else [],
                   float(q.settings.get("failover_after", 20)))


def write_files(k: Kernel, info: VpnInfo, cfg: Provider, resolved: dict[str, list[str]],
                server: int | None = None) -> None:
    """The daemon's config (secrets, 0600), then the hook's spec: the daemon's go signal,
    written only once the kill switch admits the endpoints. `server`: write server i's
    copies instead (server_path), for the failover watcher to put in place."""
    def dest(path: str) -> str:
        return path if server is None else info.server_path(path, server)

    if isinstance(cfg, wgconf.WgConfig):
        k.write_file(dest(info.conf_path), wgconf.setconf_text(cfg, resolved, info.fwmark),
                     0o600)
    else:
        creds = None
        if cfg.credentials:
            creds = dest(info.creds_path)  # referenced where it is: not switched
            k.write_file(creds, cfg.credentials, 0o600)
        k.write_file(dest(info.conf_path), ovpnconf.render(
            cfg, dev=info.dev, fwmark=info.fwmark, resolved=resolved, creds_path=creds,
            mgmt_sock=info.mgmt_sock), 0o600)
    mine = {a for e in info.endpoints for a in resolved.get(e.host, [])}  # this server's
    routes = [HookRoute(f"{ip}/32", info.upstream_if, info.gateway)
              for ip in sorted(mine) if ip_version(ip) == 4]
    if info.gateway6:
        routes += [HookRoute(f"{ip}/128", info.upstream_if, info.gateway6)
                   for ip in sorted(mine) if ip_version(ip) == 6]
    routes += [HookRoute(r, info.dev) for r in info.routes]
    spec = TunnelSpec(info.type, info.dev,
                      info.conf_path if info.type == "wireguard" else None,
                      info.tunnel_addresses, info.mtu, routes,
                      os.path.join(info.state_dir, f"{info.daemon_name}.log"),
                      keeper=info.backend == "kernel")
    k.write_file(dest(info.spec_path), encode(spec), 0o600)


def resolve_endpoints(info: VpnInfo, resolve) -> dict[str, list[str]]:
    """host -> addresses; literal IPs map to themselves and are never sent to DNS."""
    out: dict[str, list[str]] = {}
    for e in info.endpoints:
        if e.host not in out:
            out[e.host] = [e.host] if is_ip(e.host) else sorted(set(resolve(e.host)))
    return out


def uapi_socket(dev: str) -> str:
    """wireguard-go's control socket: one directory for every namespace
    (docs/field-notes.md, WireGuard)."""
    return f"/var/run/wireguard/{dev}.sock"


def daemon_argv(info: VpnInfo) -> tuple[str, ...]:
    """The tunnel's owner: kernel WireGuard's keeper makes the device and deletes it when
    ended, as wireguard-go's device goes with its process, so supervision, restarts and
    the kill switch are the same for both."""
    if info.backend == "kernel":
        import sys

        return (sys.executable, "-m", "netstack.vpn.kernelwg", info.dev)
    if info.type == "wireguard":
        return ("wireguard-go", "-f", info.dev)
    return ("openvpn", "--config", info.conf_path)
