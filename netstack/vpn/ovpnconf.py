"""Parse provider `.ovpn` files (OpenVPN 2.x client configs) into a sanitized config we run.

Refused with a clear line: anything that runs commands or touches the host (up/down
scripts, plugins, script-security > 1, management of its own, daemon/chroot), and TAP.
Ignored: routing and DNS knobs (netstack routes and sets DNS itself, and never touches the
host's DNS). Referenced key files are read and inlined so the config we write is
self-contained. Credentials never appear in errors or repr.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from netstack.errors import ConfigError
from netstack.vpn.checks import check_host, read_referenced
from netstack.vpn.wgconf import Endpoint, Secret

REFUSED = {
    "up", "down", "route-up", "route-pre-down", "ipchange", "client-connect",
    "client-disconnect", "learn-address", "tls-verify", "auth-user-pass-verify", "plugin",
    "iproute", "management", "management-client", "management-query-passwords", "daemon",
    "chroot", "cd", "config", "down-pre", "up-delay", "up-restart", "setenv-safe", "writepid",
    "log", "log-append", "status", "tls-export-cert", "route-ipv6", "server", "mode",
}
IGNORED = {  # routing/DNS/host knobs: netstack does these itself
    "redirect-gateway", "route", "route-delay", "route-method", "route-metric",
    "block-outside-dns", "setenv", "register-dns", "dhcp-renew", "dhcp-release", "user",
    "group", "persist-tun", "ip-win32", "route-nopull", "pull", "dev-node", "verb", "mute",
    "auth-nocache", "script-security",
}
PASS = {
    "client", "tls-client", "nobind", "persist-key", "resolv-retry", "remote-random",
    "remote-random-hostname", "remote-cert-tls", "verify-x509-name", "cipher",
    "data-ciphers", "data-ciphers-fallback", "ncp-ciphers", "auth", "tls-version-min",
    "tls-version-max", "tls-cipher", "tls-ciphersuites", "tls-groups", "key-direction",
    "comp-lzo", "compress", "allow-compression", "mute-replay-warnings", "reneg-sec", "ping",
    "ping-restart", "ping-exit", "keepalive", "explicit-exit-notify", "sndbuf", "rcvbuf",
    "fast-io", "mssfix", "tun-mtu", "fragment", "pull-filter", "auth-retry",
    "server-poll-timeout", "connect-retry", "connect-retry-max", "hand-window", "float",
    "txqueuelen", "ecdh-curve", "tls-timeout", "replay-window", "topology", "disable-dco",
    "tun-mtu-extra", "link-mtu", "providers", "auth-token-user", "push-peer-info",
    "ns-cert-type", "peer-fingerprint", "proto", "port", "rport", "lport", "bind",
}
FILE_OPTS = {"ca", "cert", "key", "tls-auth", "tls-crypt", "tls-crypt-v2", "pkcs12",
             "extra-certs", "crl-verify", "dh", "secret"}
INLINE = {"ca", "cert", "key", "tls-auth", "tls-crypt", "tls-crypt-v2", "pkcs12",
          "extra-certs", "crl-verify", "dh", "secret", "auth-user-pass", "peer-fingerprint",
          "connection"}
SECRET_BLOCKS = {"key", "tls-auth", "tls-crypt", "tls-crypt-v2", "pkcs12", "secret",
                 "auth-user-pass"}


@dataclass
class OvpnRemote:
    endpoint: Endpoint
    proto: str  # udp | tcp


@dataclass
class OvpnConfig:
    remotes: list[OvpnRemote]
    dns: list[str]
    directives: list[list[str]]  # passed through, in order
    blocks: dict[str, Secret] = field(repr=False)  # inline name -> content
    credentials: Secret | None = field(default=None, repr=False)  # "user\npass\n"

    @property
    def endpoints(self) -> list[Endpoint]:
        return [r.endpoint for r in self.remotes]


def _norm_proto(p: str, where: str) -> str:
    p = p.lower()
    if p in ("udp", "udp4", "udp6"):
        return "udp"
    if p in ("tcp", "tcp4", "tcp6", "tcp-client"):
        return "tcp"
    raise ConfigError(where, f"proto {p!r} is not supported", "use udp or tcp")


def parse(text: str, source: str = "openvpn config", base_dir: str = ".") -> OvpnConfig:
    lines = text.replace("\r\n", "\n").split("\n")
    directives: list[list[str]] = []
    blocks: dict[str, Secret] = {}
    remotes_raw: list[tuple[list[str], str]] = []
    default_proto, default_port = "udp", 1194
    dns: list[str] = []
    creds: Secret | None = None
    i = 0
    while i < len(lines):
        n, raw = i + 1, lines[i].strip()
        i += 1
        where = f"{source} line {n}"
        if not raw or raw[0] in "#;":
            continue
        if raw.startswith("<") and raw.endswith(">") and not raw.startswith("</"):
            name = raw[1:-1].strip().lower()
            if name not in INLINE:
                raise ConfigError(where, f"unknown inline block <{name}>")
            end = f"</{name}>"
            body = []
            while i < len(lines) and lines[i].strip().lower() != end:
                body.append(lines[i].rstrip())
                i += 1
            if i >= len(lines):
                raise ConfigError(where, f"<{name}> is never closed", f"add {end}")
            i += 1
            if name == "connection":
                raise ConfigError(where, "<connection> blocks are not supported",
                                  "use remote lines")
            if name == "auth-user-pass":
                creds = Secret("\n".join(body).strip() + "\n")
            else:
                blocks[name] = Secret("\n".join(body).strip() + "\n")
            continue
        try:
            words = shlex.split(raw, comments=True)
        except ValueError:
            raise ConfigError(where, "unbalanced quotes") from None
        if not words:
            continue
        opt = words[0].lower().lstrip("-")
        args = words[1:]
        if opt in REFUSED:
            raise ConfigError(f"{where} ({opt})",
                              "netstack does not run scripts or host-changing options from "
                              "provider files", "delete the line: netstack sets routes and "
                              "DNS itself")
        if opt == "script-security" and args and args[0].isdigit() and int(args[0]) > 1:
            raise ConfigError(f"{where} (script-security)",
                              "scripts are never run from provider files", "delete the line")
        if opt == "dev":
            if not args or not args[0].lower().startswith("tun"):
                raise ConfigError(f"{where} (dev)", "only TUN devices are supported",
                                  "use a tun config from your provider")
            continue
        if opt == "dev-type":
            if args and args[0].lower() != "tun":
                raise ConfigError(f"{where} (dev-type)", "only TUN is supported")
            continue
        if opt == "remote":
            if not args:
                raise ConfigError(f"{where} (remote)", "missing host")
            remotes_raw.append((args, where))
            continue
        if opt == "proto" and args:
            default_proto = _norm_proto(args[0], where)
            continue
        if opt in ("port", "rport") and args:
            if not args[0].isdigit():
                raise ConfigError(f"{where} ({opt})", f"{args[0]!r} is not a port")
            default_port = int(args[0])
            continue
        if opt == "dhcp-option":
            if len(args) >= 2 and args[0].upper() == "DNS":
                dns.append(args[1])
            continue
        if opt == "auth-user-pass":
            if args:
                creds = Secret(read_referenced(base_dir, args[0], f"{where} (auth-user-pass)")
                               .strip() + "\n")
            elif creds is None:
                creds = Secret("")  # must come inline or from the qube config
            continue
        if opt in FILE_OPTS and args and args[0] != "[inline]":
            if opt == "crl-verify" and len(args) > 1:
                raise ConfigError(f"{where} (crl-verify)", "a CRL directory is not supported",
                                  "inline the CRL or give one file")
            blocks[opt] = Secret(read_referenced(base_dir, args[0], f"{where} ({opt})")
                                 .strip() + "\n")
            if opt == "tls-auth" and len(args) > 1:
                directives.append(["key-direction", args[1]])
            continue
        if opt in FILE_OPTS:  # "[inline]"
            continue
        if opt in IGNORED:
            continue
        if opt not in PASS:
            raise ConfigError(f"{where} ({opt})", "unknown or unsupported option",
                              "remove it, or report it if your provider needs it")
        if opt in ("bind", "lport"):
            continue  # nobind: the client never listens
        directives.append([opt, *args])
    remotes = []
    for args, where in remotes_raw:
        port = default_port
        if len(args) > 1:
            if not args[1].isdigit() or not 0 < int(args[1]) < 65536:
                raise ConfigError(f"{where} (remote)", f"{args[1]!r} is not a port")
            port = int(args[1])
        proto = _norm_proto(args[2], where) if len(args) > 2 else default_proto
        check_host(args[0], f"{where} (remote)")
        remotes.append(OvpnRemote(Endpoint(args[0], port), proto))
    if not remotes:
        raise ConfigError(source, "no remote line", "the provider's server: remote HOST PORT")
    for need in ("ca",):
        if need not in blocks:
            raise ConfigError(source, f"no {need}", f"add <{need}> or a {need} file line")
    if creds is not None and not creds.strip():
        raise ConfigError(f"{source} (auth-user-pass)", "credentials needed but not given",
                          "give auth-user-pass FILE with username and password lines")
    directives = [d for d in directives if d[0] not in ("client",)]
    return OvpnConfig(remotes, dns, directives, blocks, creds)


def render(cfg: OvpnConfig, *, dev: str, fwmark: int, resolved: dict[str, list[str]],
           creds_path: str | None, mgmt_sock: str) -> str:
    """The config we run: provider options that are safe, plus what netstack decides:
    our device name, no routes or scripts of its own, the fwmark of the kill switch, and
    the resolved remote addresses only."""
    out = ["# written by netstack from a provider file; do not edit", "client",
           f"dev {dev}", "dev-type tun", "route-noexec", "script-security 1",
           f"mark {fwmark}", "nobind", "pull-filter ignore \"route\"",
           "pull-filter ignore \"redirect-gateway\"", "pull-filter ignore \"dhcp-option\"",
           "pull-filter ignore \"block-outside-dns\"", f"management {mgmt_sock} unix",
           "verb 3"]
    for r in cfg.remotes:
        for ip in resolved.get(r.endpoint.host, [r.endpoint.host]):
            out.append(f"remote {ip} {r.endpoint.port} {r.proto}")
    for d in cfg.directives:
        out.append(" ".join(shlex.quote(w) for w in d))
    if creds_path:
        out.append(f"auth-user-pass {creds_path}")
    for name, body in cfg.blocks.items():
        out += [f"<{name}>", body.rstrip("\n"), f"</{name}>"]
    return "\n".join(out) + "\n"
