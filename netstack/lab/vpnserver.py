"""The lab's VPN server: throwaway WireGuard keys and a throwaway P-256 CA made at start,
a WireGuard server and an OpenVPN server (tls-crypt, no static keys) in the lab's `vpn`
host, NATing tunnel traffic to the lab. It writes client files in the providers' own
formats, so the lab exercises the same import path a user's downloaded file takes."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from netstack import addressing, names
from netstack.errors import ApplyError

WG_PORT, OVPN_PORT = 51820, 1194
WG_SERVER_ADDR, WG_CLIENT_ADDR = "10.66.0.1/24", "10.66.0.2/32"
OVPN_NET = "10.67.0.0"
TUNNEL_NETS = ("10.66.0.0/24", "10.67.0.0/24")
OVPN_SERVER_DEV = "ovs0"
LAB_FILES = {"lab:wireguard": "client-wireguard.conf", "lab:openvpn": "client-openvpn.ovpn"}


@dataclass(frozen=True)
class LabVpn:
    """What the lab generated at start: VPN server files, and the private Tor network's
    DirAuthority lines when a tor qube needs it."""

    dir: str
    wg_server_dev: str
    tor_dir: str | None = None
    dirauths: tuple[str, ...] = ()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)


def _run(argv: list[str], **kw) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise ApplyError(f"lab VPN setup: {argv[0]} failed: {p.stderr.strip()[:200]}")
    return p.stdout


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def generate(lab_dir: str, stack: str, tor: bool = False) -> LabVpn:
    """Keys, CA, certificates, server configs and client files, all under lab_dir (0700);
    with `tor`, the private Tor network's keys and torrc files too."""
    import threading

    os.makedirs(lab_dir, mode=0o700, exist_ok=True)
    tor_result: dict = {}
    tor_thread = None
    if tor:  # tor-gencert takes ~1.5 s: overlap it with the VPN keys
        from netstack.tor import network

        tor_dir = os.path.join(lab_dir, "tor")
        nodes = network.lab_nodes(addressing.lab_hosts(tor=True))

        def run() -> None:
            try:
                tor_result["dirauths"] = network.generate(
                    tor_dir, nodes, os.path.join(tor_dir, "resolv.conf"))
            except Exception as e:  # re-raised below, in the caller's thread
                tor_result["error"] = e

        tor_thread = threading.Thread(target=run)
        tor_thread.start()
    lv = _generate_vpn(lab_dir, stack)
    if tor_thread:
        tor_thread.join()
        if "error" in tor_result:
            raise tor_result["error"]
        lv = LabVpn(lv.dir, lv.wg_server_dev, os.path.join(lab_dir, "tor"),
                    tuple(tor_result["dirauths"]))
    return lv


def _generate_vpn(lab_dir: str, stack: str) -> LabVpn:
    lv = LabVpn(lab_dir, names.check_ifname(f"wgs-{stack}"))
    p = lv.path
    vpn_host = next(h for h in addressing.lab_hosts() if h.name == "vpn")
    dns = addressing.lab_dns_server()
    # WireGuard
    srv_key, cli_key = _run(["wg", "genkey"]).strip(), _run(["wg", "genkey"]).strip()
    srv_pub = _run(["wg", "pubkey"], input=srv_key).strip()
    cli_pub = _run(["wg", "pubkey"], input=cli_key).strip()
    psk = _run(["wg", "genpsk"]).strip()
    _write(p("wg-server.setconf"),
           f"[Interface]\nPrivateKey = {srv_key}\nListenPort = {WG_PORT}\n\n[Peer]\n"
           f"PublicKey = {cli_pub}\nPresharedKey = {psk}\nAllowedIPs = {WG_CLIENT_ADDR}\n")
    _write(p("wg-server.pub"), srv_pub + "\n")
    import json

    _write(p("wg-server-hook.json"), json.dumps({
        "type": "wireguard", "dev": lv.wg_server_dev, "setconf": p("wg-server.setconf"),
        "addresses": [WG_SERVER_ADDR], "mtu": 1420, "routes": []}))
    _write(p(LAB_FILES["lab:wireguard"]),
           "# netstack lab VPN (throwaway keys) - a wg-quick file as providers ship them\r\n"
           f"[Interface]\r\nPrivateKey = {cli_key}\r\nAddress = {WG_CLIENT_ADDR}\r\n"
           f"DNS = {dns}\r\nMTU = 1420\r\n\r\n[Peer]\r\nPublicKey = {srv_pub}\r\n"
           f"PresharedKey = {psk}\r\nEndpoint = {vpn_host.fqdn}:{WG_PORT}\r\n"
           "AllowedIPs = 0.0.0.0/0, ::/0\r\nPersistentKeepalive = 25\r\n")
    # OpenVPN: throwaway P-256 CA, server and client certificates, tls-crypt key
    ossl = ["openssl"]
    for name in ("ca", "server", "client"):
        _run(ossl + ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
                     p(f"{name}.key")])
        os.chmod(p(f"{name}.key"), 0o600)
    _run(ossl + ["req", "-x509", "-new", "-key", p("ca.key"), "-sha256", "-days", "2",
                 "-subj", "/CN=netstack-lab-ca", "-out", p("ca.crt")])
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        _run(ossl + ["req", "-new", "-key", p(f"{name}.key"), "-subj", f"/CN={name}",
                     "-out", p(f"{name}.csr")])
        ext = p(f"{name}.ext")
        with open(ext, "w") as f:
            f.write(f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\n"
                    f"extendedKeyUsage={usage}\n")
        _run(ossl + ["x509", "-req", "-in", p(f"{name}.csr"), "-CA", p("ca.crt"), "-CAkey",
                     p("ca.key"), "-CAcreateserial", "-days", "2", "-sha256", "-extfile", ext,
                     "-out", p(f"{name}.crt")])
    _run(["openvpn", "--genkey", "tls-crypt", p("tls-crypt.key")])
    os.chmod(p("tls-crypt.key"), 0o600)
    _write(p("ovpn-server.conf"), "\n".join([
        f"dev {OVPN_SERVER_DEV}", "dev-type tun", "proto udp", f"port {OVPN_PORT}",
        f"local {vpn_host.address}", "topology subnet", f"server {OVPN_NET} 255.255.255.0",
        f"ca {p('ca.crt')}", f"cert {p('server.crt')}", f"key {p('server.key')}", "dh none",
        f"tls-crypt {p('tls-crypt.key')}", "data-ciphers AES-256-GCM:CHACHA20-POLY1305",
        "keepalive 2 10", "disable-dco", "duplicate-cn", "verb 3", "persist-key",
        "script-security 1", ""]))

    def read(n: str) -> str:
        with open(p(n)) as f:
            return f.read().strip()

    _write(p(LAB_FILES["lab:openvpn"]), "\n".join([
        "# netstack lab VPN (throwaway CA) - an .ovpn as providers ship them", "client",
        "dev tun", "proto udp", f"remote {vpn_host.fqdn} {OVPN_PORT}", "resolv-retry infinite",
        "nobind", "persist-key", "persist-tun", "remote-cert-tls server",
        "verify-x509-name server name", "data-ciphers AES-256-GCM:CHACHA20-POLY1305",
        f"dhcp-option DNS {dns}", "redirect-gateway def1", "disable-dco", "verb 3",
        f"<ca>\n{read('ca.crt')}\n</ca>", f"<cert>\n{read('client.crt')}\n</cert>",
        f"<key>\n{read('client.key')}\n</key>", f"<tls-crypt>\n{read('tls-crypt.key')}\n"
        "</tls-crypt>", ""]))
    return lv
