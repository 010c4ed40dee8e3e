"""The VPN qube's plan data (pure, no secrets): endpoints, tunnel device, DNS, and the
paths its run-time files go to; plus the one function that turns endpoints and their
resolution into the transport the kill switch admits."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from netstack.addressing import ip_version, is_ip
from netstack.model import RoleInfo
from netstack.vpn.portfwd import Forward

FWMARK = 0xCA6C  # 51820, as wg-quick uses; marks the tunnel transport for the kill switch
ENDPOINT_SET, ENDPOINT_SET6 = "vpn_endpoints", "vpn_endpoints6"

Transport = tuple[str, str, int]  # (address, proto, port)


@dataclass(frozen=True)
class VpnEndpoint:
    host: str  # IP literal or hostname
    port: int
    proto: str  # udp | tcp


@dataclass(frozen=True)
class VpnServerInfo:
    """One of several servers a VPN qube may fail over between (one provider file each)."""

    provider: str
    endpoints: list[VpnEndpoint]
    tunnel_addresses: list[str]
    mtu: int | None
    routes: list[str]


@dataclass
class VpnInfo(RoleInfo):
    tag = "vpn"

    qube: str
    netns: str
    type: str  # wireguard | openvpn
    dev: str
    fwmark: int
    provider: str  # the provider file's path
    endpoints: list[VpnEndpoint]
    dns: list[str]
    tunnel_addresses: list[str]
    mtu: int | None
    gateway: str
    upstream_if: str
    state_dir: str
    routes: list[str] = field(default_factory=lambda: ["0.0.0.0/0"])
    gateway6: str | None = None
    backend: str = "wireguard-go"  # kernel | wireguard-go (WireGuard); openvpn
    # several provider files: the servers, in order (the fields above are the first's);
    # the supervisor moves to the next when the current one stops answering
    servers: list[VpnServerInfo] = field(default_factory=list)
    failover_after: float = 20.0
    # inbound ports forwarded from the tunnel to a client (vpn/portfwd.py; `forward`)
    forwards: list[Forward] = field(default_factory=list)

    def _path(self, ext: str) -> str:
        return os.path.join(self.state_dir, f"vpn-{self.qube}.{ext}")

    @property
    def spec_path(self) -> str:
        """The post-start hook's spec; written last, it is the daemon's go signal."""
        return self._path("json")

    @property
    def conf_path(self) -> str:
        return self._path("setconf" if self.type == "wireguard" else "ovpn")

    @property
    def creds_path(self) -> str:
        return self._path("creds")

    @property
    def mgmt_sock(self) -> str:
        return self._path("mgmt")

    @property
    def daemon_name(self) -> str:
        return f"vpn-{self.qube}"

    @property
    def server_file(self) -> str:
        """Which server is current (written by the failover watcher; none: the first)."""
        return self._path("server")

    def server_path(self, path: str, i: int) -> str:
        """Server i's copy of a run-time file (its config, its hook spec)."""
        base, ext = os.path.splitext(path)
        return f"{base}.s{i}{ext}"

    def server(self, i: int) -> VpnInfo:
        """This qube as it runs with server i (the kill switch admits only its transport)."""
        if not self.servers:
            return self
        s = self.servers[i % len(self.servers)]
        return dataclasses.replace(self, provider=s.provider, endpoints=list(s.endpoints),
                                   tunnel_addresses=list(s.tunnel_addresses), mtu=s.mtu,
                                   routes=list(s.routes))

    def current(self) -> VpnInfo:
        return self.server(current_index(self))

    def literal(self) -> dict[str, list[str]]:
        """Endpoints given as addresses resolve to themselves, without any DNS."""
        return {e.host: [e.host] for e in self.endpoints if is_ip(e.host)}


def transport(info: VpnInfo, resolved: dict[str, list[str]] | None) -> list[Transport]:
    """What the kill switch admits: every endpoint at each of its resolved addresses. An
    endpoint whose name did not resolve admits nothing (fail closed)."""
    known = {**(resolved or {}), **info.literal()}
    out: list[Transport] = []
    for e in info.endpoints:
        for ip in known.get(e.host, []):
            t = (ip, e.proto, e.port)
            if t not in out:
                out.append(t)
    return out


def set_elements(triples: list[Transport]) -> tuple[list[dict], list[dict]]:
    """The endpoint sets' elements, IPv4 and IPv6."""
    v4 = [{"concat": [a, pr, po]} for a, pr, po in triples if ip_version(a) == 4]
    v6 = [{"concat": [a, pr, po]} for a, pr, po in triples if ip_version(a) == 6]
    return v4, v6


def all_transport(infos: list[VpnInfo], resolved: dict[str, dict[str, list[str]]] | None
                  ) -> set[Transport]:
    """Every VPN qube's transport to its current server, as resolved at `up` (state:
    qube -> name -> addrs)."""
    out: set[Transport] = set()
    for info in infos:
        out |= set(transport(info.current(), (resolved or {}).get(info.qube)))
    return out


def current_index(info: VpnInfo) -> int:
    """The current server's index (0 without failover, or before any)."""
    if len(info.servers) < 2:
        return 0
    st = read_state(info.server_file)
    return st.current % len(info.servers) if st else 0


def endpoint_set_commands(info: VpnInfo, resolved: dict[str, list[str]] | None
                          ) -> dict[str, Any]:
    """One transaction: both endpoint sets hold exactly this (server's) transport."""
    return endpoint_set_commands_for(transport(info, resolved))


def endpoint_set_commands_for(triples: list[Any]) -> dict[str, Any]:
    from netstack.rules.nft import set_commands

    v4, v6 = set_elements(triples)
    return {"nftables": set_commands(ENDPOINT_SET, v4) + set_commands(ENDPOINT_SET6, v6)}


# --- the failover watcher's state file (written by vpn/failover.py, read here by status
# and the kill switch's current server) ---

@dataclass
class Switch:
    """One move to the next server; the kill switch's swap ran from swap_start to swap_end
    (wall clock, as a capture's timestamps)."""

    from_: int = field(metadata={"json": "from"})
    to: int
    why: str
    swap_start: float
    swap_end: float


@dataclass
class ServerState:
    """`vpn-QUBE.server`: the server in force, written by the failover watcher."""

    current: int
    since: float  # when this server became current
    history: list[Switch] = field(default_factory=list)


def read_state(path: str) -> ServerState | None:
    """None when it cannot be read (not written yet, or damaged: the watcher starts on the
    first server; status tells a damaged file by its existence)."""
    from netstack import codec
    from netstack.errors import DamagedFile

    try:
        return codec.read(path, ServerState)
    except (OSError, DamagedFile):
        return None


def write_state(path: str, st: ServerState) -> None:
    from netstack import codec

    codec.write(path, st)
