"""The lab's VPN server: throwaway WireGuard keys and a throwaway P-256 CA made at start,
a WireGuard server and an OpenVPN server (tls-crypt, no static keys) in the lab's `vpn`
host, NATing tunnel traffic to the lab. It writes client files in the providers' own
formats, so the lab exercises the same import path a user's downloaded file takes."""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

from netstack import addressing
from netstack.errors import ApplyError

if TYPE_CHECKING:
    from netstack.model import LabPlan

WG_PORT, OVPN_PORT = 51820, 1194
OVPN_TCP_PORT = 443  # lab:openvpn-tcp: OpenVPN over TCP 443 (what a UDP-blocking ISP passes)
WG_SERVER_ADDR, WG_CLIENT_ADDR = "10.66.0.1/24", "10.66.0.2/32"
WG2_SERVER_ADDR, WG2_CLIENT_ADDR = "10.68.0.1/24", "10.68.0.2/32"
OVPN_NET, OVPN2_NET, OVPN_TCP_NET = "10.67.0.0", "10.69.0.0", "10.70.0.0"
TUNNEL_NETS = ("10.66.0.0/24", "10.67.0.0/24", "10.68.0.0/24", "10.69.0.0/24",
               "10.70.0.0/24")
OVPN_SERVER_DEV = "ovs0"
LAB_FILES = {"lab:wireguard": "client-wireguard.conf", "lab:openvpn": "client-openvpn.ovpn",
             "lab:wireguard2": "client-wireguard2.conf",
             "lab:openvpn2": "client-openvpn2.ovpn",
             "lab:openvpn-tcp": "client-openvpn-tcp.ovpn"}


PLACEHOLDER_KEY = "A" * 43 + "="  # `netstack plan`: where a key will go (32 zero bytes)
PLACEHOLDER_PEM = "-----BEGIN PLACEHOLDER-----\nmade at `up`\n-----END PLACEHOLDER-----"


def _run(argv: list[str], **kw) -> str:
    from netstack.kernel import die_with_parent

    p = subprocess.run(argv, capture_output=True, text=True, preexec_fn=die_with_parent(),
                       **kw)
    if p.returncode != 0:
        raise ApplyError(f"lab VPN setup: {argv[0]} failed: {p.stderr.strip()[:200]}")
    return p.stdout


def wireguard_client(cli_key: str = PLACEHOLDER_KEY, srv_pub: str = PLACEHOLDER_KEY,
                     psk: str = PLACEHOLDER_KEY, second: bool = False) -> str:
    """The lab's WireGuard client file, as providers ship them (CRLF and all); `second`:
    for the second server (its own port, keys and tunnel subnet)."""
    vpn_host = next(h for h in addressing.lab_hosts() if h.name == "vpn")
    addr, port = (WG2_CLIENT_ADDR, WG_PORT + 1) if second else (WG_CLIENT_ADDR, WG_PORT)
    return ("# netstack lab VPN (throwaway keys) - a wg-quick file as providers ship them\r\n"
            f"[Interface]\r\nPrivateKey = {cli_key}\r\nAddress = {addr}\r\n"
            f"DNS = {addressing.lab_dns_server()}\r\nMTU = 1420\r\n\r\n[Peer]\r\n"
            f"PublicKey = {srv_pub}\r\nPresharedKey = {psk}\r\n"
            f"Endpoint = {vpn_host.fqdn}:{port}\r\n"
            "AllowedIPs = 0.0.0.0/0, ::/0\r\nPersistentKeepalive = 25\r\n")


def wireguard_client2(cli_key: str = PLACEHOLDER_KEY, srv_pub: str = PLACEHOLDER_KEY,
                      psk: str = PLACEHOLDER_KEY) -> str:
    return wireguard_client(cli_key, srv_pub, psk, second=True)


def openvpn_client(ca: str = PLACEHOLDER_PEM, cert: str = PLACEHOLDER_PEM,
                   key: str = PLACEHOLDER_PEM, tls_crypt: str = PLACEHOLDER_PEM,
                   second: bool = False, tcp: bool = False) -> str:
    vpn_host = next(h for h in addressing.lab_hosts() if h.name == "vpn")
    port = OVPN_TCP_PORT if tcp else OVPN_PORT + 1 if second else OVPN_PORT
    return "\n".join([
        "# netstack lab VPN (throwaway CA) - an .ovpn as providers ship them", "client",
        "dev tun", "proto tcp-client" if tcp else "proto udp", f"remote {vpn_host.fqdn} {port}",
        "resolv-retry infinite",
        "nobind", "persist-key", "persist-tun", "remote-cert-tls server",
        "verify-x509-name server name", "data-ciphers AES-256-GCM:CHACHA20-POLY1305",
        f"dhcp-option DNS {addressing.lab_dns_server()}", "redirect-gateway def1",
        "disable-dco", "verb 3", f"<ca>\n{ca}\n</ca>", f"<cert>\n{cert}\n</cert>",
        f"<key>\n{key}\n</key>", f"<tls-crypt>\n{tls_crypt}\n</tls-crypt>", ""])


def openvpn_client2(ca: str = PLACEHOLDER_PEM, cert: str = PLACEHOLDER_PEM,
                    key: str = PLACEHOLDER_PEM, tls_crypt: str = PLACEHOLDER_PEM) -> str:
    return openvpn_client(ca, cert, key, tls_crypt, second=True)


def openvpn_client_tcp(ca: str = PLACEHOLDER_PEM, cert: str = PLACEHOLDER_PEM,
                       key: str = PLACEHOLDER_PEM, tls_crypt: str = PLACEHOLDER_PEM) -> str:
    return openvpn_client(ca, cert, key, tls_crypt, tcp=True)


TEMPLATES = {"lab:wireguard": wireguard_client, "lab:openvpn": openvpn_client,
             "lab:wireguard2": wireguard_client2, "lab:openvpn2": openvpn_client2,
             "lab:openvpn-tcp": openvpn_client_tcp}


def generate(lab: LabPlan, write) -> tuple[str, ...]:
    """Keys, CA, certificates, server configs and client files, all under the lab dir
    (0700); with a private Tor network, its keys and torrc files too. `write(path, text)`
    writes a private file. Returns the Tor network's DirAuthority lines (or ())."""
    import threading

    tor_result: dict = {}
    tor_thread = None
    if lab.tor:  # the Tor keys (in-process RSA) overlap the VPN keys
        from netstack.tor import network

        def run() -> None:
            try:
                tor_result["dirauths"] = network.generate(list(lab.tor_nodes.values()),
                                                          lab.tor_dir)
            except Exception as e:  # re-raised below, in the caller's thread
                tor_result["error"] = e

        tor_thread = threading.Thread(target=run)
        tor_thread.start()
    if lab.vpn_keys:
        _generate_vpn(lab, write)
    if tor_thread:
        tor_thread.join()
        if "error" in tor_result:
            raise tor_result["error"]
        return tuple(tor_result["dirauths"])
    return ()


def _generate_vpn(lab: LabPlan, write) -> None:
    from netstack.lab import pki

    def p(name: str) -> str:
        return os.path.join(lab.dir, name)

    vs = lab.vpn_server
    vpn_host = next(h for h in addressing.lab_hosts() if h.name == "vpn")
    # WireGuard (and a second server to fail over to, when a qube names it)
    for second in (False, True) if vs.wg2_dev else (False,):
        (srv_key, srv_pub), (cli_key, cli_pub) = pki.wg_keypair(), pki.wg_keypair()
        psk = pki.wg_psk()
        n, port, cli_addr = ("wg2", WG_PORT + 1, WG2_CLIENT_ADDR) if second else \
            ("wg", WG_PORT, WG_CLIENT_ADDR)
        write(p(f"{n}-server.setconf"),
              f"[Interface]\nPrivateKey = {srv_key}\nListenPort = {port}\n\n[Peer]\n"
              f"PublicKey = {cli_pub}\nPresharedKey = {psk}\nAllowedIPs = {cli_addr}\n")
        write(p(f"{n}-server.pub"), srv_pub + "\n")
        write(vs.files["lab:wireguard2" if second else "lab:wireguard"],
              wireguard_client(cli_key, srv_pub, psk, second))
    # OpenVPN: throwaway P-256 CA, server and client certificates, tls-crypt key
    ca = pki.make_ca("netstack-lab-ca", days=2)
    write(p("ca.crt"), ca.cert_pem.decode())
    for name in ("server", "client"):
        leaf = pki.issue(ca, name, days=2, usage=name)
        write(p(f"{name}.key"), leaf.key_pem.decode())
        write(p(f"{name}.crt"), leaf.cert_pem.decode())
    _run(["openvpn", "--genkey", "tls-crypt", p("tls-crypt.key")])
    os.chmod(p("tls-crypt.key"), 0o600)
    servers = [("ovpn", OVPN_PORT, OVPN_NET, OVPN_SERVER_DEV, "udp")]
    if vs.openvpn2:
        servers.append(("ovpn2", OVPN_PORT + 1, OVPN2_NET, "ovs1", "udp"))
    if vs.openvpn_tcp:
        servers.append(("ovpn-tcp", OVPN_TCP_PORT, OVPN_TCP_NET, "ovs2", "tcp-server"))
    for n, port, net, dev, proto in servers:
        write(p(f"{n}-server.conf"), "\n".join([
            f"dev {dev}", "dev-type tun", f"proto {proto}", f"port {port}",
            f"local {vpn_host.address}", "topology subnet", f"server {net} 255.255.255.0",
            f"ca {p('ca.crt')}", f"cert {p('server.crt')}", f"key {p('server.key')}",
            "dh none", f"tls-crypt {p('tls-crypt.key')}",
            "data-ciphers AES-256-GCM:CHACHA20-POLY1305", "keepalive 2 10", "disable-dco",
            "duplicate-cn", "verb 3", "persist-key", "script-security 1", ""]))

    def read(n: str) -> str:
        with open(p(n)) as f:
            return f.read().strip()

    creds = (read("ca.crt"), read("client.crt"), read("client.key"), read("tls-crypt.key"))
    write(vs.files["lab:openvpn"], openvpn_client(*creds))
    if vs.openvpn2:
        write(vs.files["lab:openvpn2"], openvpn_client2(*creds))
    if vs.openvpn_tcp:
        write(vs.files["lab:openvpn-tcp"], openvpn_client_tcp(*creds))
    # the hook's spec goes last: it is lab-wireguard's go signal
    from netstack.codec import encode
    from netstack.vpn.runtime import TunnelSpec

    if vs.wg2_dev:
        write(p("wg2-server-hook.json"), encode(TunnelSpec(
            "wireguard", vs.wg2_dev, p("wg2-server.setconf"), [WG2_SERVER_ADDR], 1420, [])))
    write(p("wg-server-hook.json"), encode(TunnelSpec(
        "wireguard", vs.wg_dev, p("wg-server.setconf"), [WG_SERVER_ADDR], 1420, [])))
