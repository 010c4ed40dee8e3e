"""The VPN qube's plan data (pure, no secrets) and its run-time preparation (resolve
endpoints through sys-net, write daemon configs with umask 077, fill the kill switch's
endpoint set)."""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from netstack import names
from netstack.config import Qube
from netstack.errors import ConfigError
from netstack.vpn import ovpnconf, wgconf

FWMARK = 0xCA6C  # 51820, as wg-quick uses; marks the tunnel transport for the kill switch
ENDPOINT_SET = "vpn_endpoints"


@dataclass
class VpnInfo:
    qube: str
    netns: str
    type: str
    dev: str
    fwmark: int
    provider: str
    endpoints: list[dict[str, Any]]  # host, port, proto
    dns: list[str]
    tunnel_addresses: list[str]
    mtu: int | None
    gateway: str
    upstream_if: str
    state_dir: str
    routes: list[str] = field(default_factory=lambda: ["0.0.0.0/0"])

    @property
    def spec_path(self) -> str:
        return os.path.join(self.state_dir, f"vpn-{self.qube}.json")

    @property
    def conf_path(self) -> str:
        ext = "setconf" if self.type == "wireguard" else "ovpn"
        return os.path.join(self.state_dir, f"vpn-{self.qube}.{ext}")

    @property
    def creds_path(self) -> str:
        return os.path.join(self.state_dir, f"vpn-{self.qube}.creds")

    @property
    def mgmt_sock(self) -> str:
        return os.path.join(self.state_dir, f"vpn-{self.qube}.mgmt")

    def literal_endpoints(self) -> list[dict[str, Any]]:
        return [e for e in self.endpoints if _is_ip(e["host"])]


def _is_ip(s: str) -> bool:
    try:
        ipaddress.IPv4Address(s)
        return True
    except ValueError:
        return False


def provider_path(q: Qube, config_dir: str, lab_files: dict[str, str] | None) -> str:
    ref = q.settings["config"]
    if ref.startswith("lab:"):
        if lab_files is None:
            raise ConfigError(f"qube {q.name!r} field 'config'", f"{ref!r} exists only in the lab",
                              "bring the stack up with --lab, or give your provider's file")
        if ref not in lab_files:
            raise ConfigError(f"qube {q.name!r} field 'config'", f"unknown lab file {ref!r}",
                              f"use one of {', '.join(sorted(lab_files))}")
        return lab_files[ref]
    return ref if os.path.isabs(ref) else os.path.normpath(os.path.join(config_dir, ref))


def load_provider(q: Qube, path: str) -> wgconf.WgConfig | ovpnconf.OvpnConfig:
    where = f"qube {q.name!r} field 'config'"
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(where, f"cannot read {path}: {e.strerror}",
                          "give the path of your provider's file") from None
    src = os.path.basename(path)
    if q.settings["type"] == "wireguard":
        return wgconf.parse(text, src)
    return ovpnconf.parse(text, src, os.path.dirname(path))


def vpn_info(q: Qube, qid: int, stack: str, gateway: str, state_dir: str, config_dir: str,
             lab_files: dict[str, str] | None) -> VpnInfo:
    """Everything about the VPN qube that the rules and status need, without secrets."""
    path = provider_path(q, config_dir, lab_files)
    cfg = load_provider(q, path)
    if isinstance(cfg, wgconf.WgConfig):
        eps = [{"host": e.host, "port": e.port, "proto": "udp"} for e in cfg.endpoints]
        addrs, mtu = cfg.addresses, cfg.mtu
        routes = sorted({a for p in cfg.peers for a in p.allowed_ips if ":" not in a}) \
            or ["0.0.0.0/0"]
    else:
        eps = [{"host": r.endpoint.host, "port": r.endpoint.port, "proto": r.proto}
               for r in cfg.remotes]
        addrs, mtu, routes = [], None, ["0.0.0.0/0"]
    dns = list(q.settings.get("dns") or cfg.dns)
    if not dns:
        raise ConfigError(f"qube {q.name!r} field 'dns'",
                          "the provider file names no DNS server",
                          'set dns = ["IP of the VPN provider\'s resolver"]')
    v4_dns = [d for d in dns if _is_ip(d)]
    if not v4_dns:
        raise ConfigError(f"qube {q.name!r} field 'dns'", "no IPv4 resolver",
                          "give an IPv4 DNS address reachable through the tunnel")
    return VpnInfo(q.name, names.qube_netns(stack, q.name), q.settings["type"],
                   names.tunnel_if(stack, qid, q.settings["type"]), FWMARK, path, eps, v4_dns,
                   [a for a in addrs if ":" not in a], mtu, gateway, names.UPSTREAM_IF,
                   state_dir, routes)


def _private_write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def prepare(info: VpnInfo, resolve) -> dict[str, list[str]]:
    """Resolve endpoint hostnames (via `resolve(host)`), write the daemon's config and the
    post-start hook's spec. Returns host -> addresses (literal IPs map to themselves)."""
    resolved: dict[str, list[str]] = {}
    for e in info.endpoints:
        h = e["host"]
        if h not in resolved:
            resolved[h] = [h] if _is_ip(h) else sorted(set(resolve(h)))
    q = Qube(info.qube, "vpn", None, "gray", {"type": info.type, "config": info.provider})
    cfg = load_provider(q, info.provider)
    if isinstance(cfg, wgconf.WgConfig):
        _private_write(info.conf_path, wgconf.setconf_text(cfg, resolved, info.fwmark))
    else:
        creds = None
        if cfg.credentials:
            _private_write(info.creds_path, cfg.credentials)
            creds = info.creds_path
        _private_write(info.conf_path, ovpnconf.render(
            cfg, dev=info.dev, fwmark=info.fwmark, resolved=resolved, creds_path=creds,
            mgmt_sock=info.mgmt_sock))
    routes = [{"dst": f"{ip}/32", "via": info.gateway, "dev": info.upstream_if}
              for ips in resolved.values() for ip in ips]
    routes += [{"dst": r, "dev": info.dev} for r in info.routes]
    spec = {"type": info.type, "dev": info.dev, "setconf": info.conf_path,
            "addresses": info.tunnel_addresses, "mtu": info.mtu, "routes": routes}
    _private_write(info.spec_path, json.dumps(spec))
    return resolved


def endpoint_elements(info: VpnInfo, resolved: dict[str, list[str]]) -> list[Any]:
    out = []
    for e in info.endpoints:
        for ip in resolved.get(e["host"], []):
            el = {"concat": [ip, e["proto"], e["port"]]}
            if el not in out:
                out.append(el)
    return out


def daemon_argv(info: VpnInfo) -> tuple[str, ...]:
    if info.type == "wireguard":
        return ("wireguard-go", "-f", info.dev)
    return ("openvpn", "--config", info.conf_path)


def to_json(info: VpnInfo) -> dict[str, Any]:
    return asdict(info)
