"""Parse the wg-quick `.conf` files providers hand out, and refuse what we do not run.

netstack sets addresses, routes and DNS itself and never runs commands from a provider file,
so PostUp/PreDown & co. are refused with a clear line. Keys never appear in errors or repr.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field

from netstack.errors import ConfigError

REFUSED = {"preup", "postup", "predown", "postdown"}
IGNORED = {"saveconfig", "table"}  # wg-quick host-routing knobs; netstack routes itself
IFACE_KEYS = {"privatekey", "address", "dns", "mtu", "listenport", "fwmark"}
PEER_KEYS = {"publickey", "presharedkey", "endpoint", "allowedips", "persistentkeepalive"}


class Secret(str):
    """A key: never printed."""

    def __repr__(self) -> str:
        return "Secret(***)"


@dataclass(frozen=True)
class Endpoint:
    host: str  # IP literal or hostname
    port: int

    @property
    def is_ip(self) -> bool:
        from netstack.addressing import is_ip

        return is_ip(self.host)


@dataclass
class WgPeer:
    public_key: str
    preshared_key: Secret | None = field(default=None, repr=False)
    endpoint: Endpoint | None = None
    allowed_ips: list[str] = field(default_factory=list)
    keepalive: int | None = None


@dataclass
class WgConfig:
    private_key: Secret = field(repr=False)
    addresses: list[str]
    dns: list[str]
    mtu: int | None
    peers: list[WgPeer]

    @property
    def endpoints(self) -> list[Endpoint]:
        return [p.endpoint for p in self.peers if p.endpoint]


def _key(where: str, value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(where, "is not a WireGuard key (32 bytes, base64)",
                          "copy the key from your provider's file unchanged")
    return value


def parse_endpoint(where: str, value: str) -> Endpoint:
    v = value.strip()
    if v.startswith("["):
        host, _, port = v[1:].partition("]:")
    else:
        host, _, port = v.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(where, f"{value!r} is not HOST:PORT", "e.g. Endpoint = vpn.example:51820")
    from netstack.vpn.checks import check_host

    check_host(host, where)
    return Endpoint(host, int(port))


def parse(text: str, source: str = "wireguard config") -> WgConfig:
    section = None
    iface: dict[str, list[str]] = {}
    peers: list[dict[str, list[str]]] = []
    for n, raw in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {n}"
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            if section == "peer":
                peers.append({})
            elif section != "interface":
                raise ConfigError(where, f"unknown section [{line[1:-1]}]",
                                  "a wg-quick file has [Interface] and [Peer] sections")
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(where, f"expected KEY = VALUE, got {line[:40]!r}")
        k, value = key.strip().lower(), value.strip()
        if k in REFUSED:
            raise ConfigError(f"{where} ({key.strip()})",
                              "netstack does not run commands from provider files",
                              "delete the line: netstack sets routes and DNS itself")
        if k in IGNORED:
            continue
        if section is None:
            raise ConfigError(where, "key outside a section", "start with [Interface]")
        allowed = IFACE_KEYS if section == "interface" else PEER_KEYS
        if k not in allowed:
            raise ConfigError(f"{where}", f"unknown key {key.strip()!r} in [{section}]")
        target = iface if section == "interface" else peers[-1]
        target.setdefault(k, []).append(value)

    def one(d: dict[str, list[str]], k: str) -> str | None:
        v = d.get(k)
        return v[-1] if v else None

    def many(d: dict[str, list[str]], k: str) -> list[str]:
        return [x.strip() for v in d.get(k, []) for x in v.split(",") if x.strip()]

    if not iface:
        raise ConfigError(source, "no [Interface] section", "is this a wg-quick .conf file?")
    pk = one(iface, "privatekey")
    if not pk:
        raise ConfigError(f"{source} [Interface]", "PrivateKey missing")
    addrs = many(iface, "address")
    if not addrs:
        raise ConfigError(f"{source} [Interface]", "Address missing",
                          "the tunnel address your provider assigned, e.g. 10.66.0.2/32")
    for a in addrs:
        try:
            ipaddress.ip_interface(a)
        except ValueError:
            raise ConfigError(f"{source} [Interface] Address", f"{a!r} is not an address") \
                from None
    dns = many(iface, "dns")
    for d in dns:
        try:
            ipaddress.ip_address(d)
        except ValueError:
            raise ConfigError(f"{source} [Interface] DNS", f"{d!r} is not an IP address",
                              "search domains are not supported; give resolver IPs") from None
    mtu_s = one(iface, "mtu")
    if mtu_s is not None and (not mtu_s.isdigit() or not 576 <= int(mtu_s) <= 9000):
        raise ConfigError(f"{source} [Interface] MTU", f"{mtu_s!r} is not an MTU (576-9000)")
    if not peers:
        raise ConfigError(source, "no [Peer] section", "the provider's server is a [Peer]")
    out_peers = []
    for i, p in enumerate(peers, start=1):
        where = f"{source} [Peer] #{i}"
        pub = one(p, "publickey")
        if not pub:
            raise ConfigError(where, "PublicKey missing")
        psk = one(p, "presharedkey")
        ep = one(p, "endpoint")
        ka = one(p, "persistentkeepalive")
        if ka is not None and ka != "off" and not ka.isdigit():
            raise ConfigError(f"{where} PersistentKeepalive", f"{ka!r} is not seconds")
        allowed = many(p, "allowedips")
        for a in allowed:
            try:
                ipaddress.ip_network(a, strict=False)
            except ValueError:
                raise ConfigError(f"{where} AllowedIPs", f"{a!r} is not a prefix") from None
        out_peers.append(WgPeer(
            _key(f"{where} PublicKey", pub),
            Secret(_key(f"{where} PresharedKey", psk)) if psk else None,
            parse_endpoint(f"{where} Endpoint", ep) if ep else None,
            allowed,
            int(ka) if ka and ka.isdigit() else None,
        ))
    if not any(p.endpoint for p in out_peers):
        raise ConfigError(source, "no peer has an Endpoint", "the VPN server's HOST:PORT")
    return WgConfig(Secret(_key(f"{source} [Interface] PrivateKey", pk)), addrs, dns,
                    int(mtu_s) if mtu_s else None, out_peers)


def setconf_text(cfg: WgConfig, resolved: dict[str, list[str]], fwmark: int) -> str:
    """The `wg setconf` file (no wg-quick keys), endpoints replaced by resolved addresses."""
    out = ["[Interface]", f"PrivateKey = {cfg.private_key}", f"FwMark = {fwmark}"]
    for p in cfg.peers:
        out += ["", "[Peer]", f"PublicKey = {p.public_key}"]
        if p.preshared_key:
            out.append(f"PresharedKey = {p.preshared_key}")
        if p.endpoint:
            host = resolved.get(p.endpoint.host, [p.endpoint.host])[0]
            host = f"[{host}]" if ":" in host else host
            out.append(f"Endpoint = {host}:{p.endpoint.port}")
        if p.allowed_ips:
            out.append(f"AllowedIPs = {', '.join(p.allowed_ips)}")
        if p.keepalive:
            out.append(f"PersistentKeepalive = {p.keepalive}")
    return "\n".join(out) + "\n"
