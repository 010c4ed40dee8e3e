"""Provider files of several real-world shapes, and every refusal, for wg-quick and .ovpn."""

import base64

import pytest

from netstack.errors import ConfigError
from netstack.vpn import ovpnconf, wgconf

K1 = base64.b64encode(bytes(range(32))).decode()
K2 = base64.b64encode(bytes(range(1, 33))).decode()
K3 = base64.b64encode(bytes(range(2, 34))).decode()
K4 = base64.b64encode(bytes(range(3, 35))).decode()

WG_MULLVAD_LIKE = f"""[Interface]
# Device: Happy Fox
PrivateKey = {K1}
Address = 10.64.1.2/32,fc00:bbbb:bbbb:bb01::1:102/128
DNS = 10.64.0.1

[Peer]
PublicKey = {K2}
AllowedIPs = 0.0.0.0/0,::0/0
Endpoint = 185.65.134.1:51820
"""

WG_PROTON_LIKE = (f"[Interface]\r\n# Key for laptop\r\nPrivateKey = {K1}\r\n"
                  "Address = 10.2.0.2/32\r\nDNS = 10.2.0.1\r\n\r\n[Peer]\r\n"
                  f"# NL-FREE#1\r\nPublicKey = {K2}\r\nAllowedIPs = 0.0.0.0/0\r\n"
                  "Endpoint = nl-free-01.protonvpn.example:51820\r\n")

WG_MULTI_PEER = f"""[Interface]
PrivateKey = {K1}
Address = 10.8.0.2/24
MTU = 1380
ListenPort = 51000
SaveConfig = false

[Peer]
PublicKey = {K2}
PresharedKey = {K3}
Endpoint = [2001:db8::1]:51820
AllowedIPs = 10.8.0.0/24
PersistentKeepalive = 25

[Peer]
PublicKey = {K4}
Endpoint = 198.51.100.7:443
AllowedIPs = 0.0.0.0/1, 128.0.0.0/1
"""


def test_wg_mullvad_like():
    c = wgconf.parse(WG_MULLVAD_LIKE)
    assert c.addresses == ["10.64.1.2/32", "fc00:bbbb:bbbb:bb01::1:102/128"]
    assert c.dns == ["10.64.0.1"] and c.mtu is None
    assert c.endpoints == [wgconf.Endpoint("185.65.134.1", 51820)]
    assert c.peers[0].allowed_ips == ["0.0.0.0/0", "::0/0"]


def test_wg_crlf_comments_and_hostname_endpoint():
    c = wgconf.parse(WG_PROTON_LIKE)
    assert c.endpoints[0] == wgconf.Endpoint("nl-free-01.protonvpn.example", 51820)
    assert not c.endpoints[0].is_ip


def test_wg_multiple_peers_ipv6_endpoint_psk():
    c = wgconf.parse(WG_MULTI_PEER)
    assert [p.endpoint for p in c.peers] == [wgconf.Endpoint("2001:db8::1", 51820),
                                             wgconf.Endpoint("198.51.100.7", 443)]
    assert c.peers[0].keepalive == 25 and c.mtu == 1380
    assert c.peers[0].preshared_key == K3


def test_wg_keys_never_in_repr_or_errors():
    c = wgconf.parse(WG_MULTI_PEER)
    assert K1 not in repr(c) and K3 not in repr(c)
    with pytest.raises(ConfigError) as e:
        wgconf.parse(WG_MULLVAD_LIKE.replace("Endpoint = 185.65.134.1:51820", "Endpoint = x"))
    assert K1 not in str(e.value)


def test_wg_setconf_has_no_wg_quick_keys_and_resolved_endpoints():
    c = wgconf.parse(WG_PROTON_LIKE)
    text = wgconf.setconf_text(c, {"nl-free-01.protonvpn.example": ["203.0.113.5"]}, 51820)
    assert "Endpoint = 203.0.113.5:51820" in text and "FwMark = 51820" in text
    for k in ("Address", "DNS", "MTU"):
        assert f"{k} =" not in text


@pytest.mark.parametrize("line", ["PostUp = iptables -A FORWARD", "PreUp = echo hi",
                                  "PostDown = resolvconf -d wg0", "PreDown = x"])
def test_wg_refuses_commands(line):
    with pytest.raises(ConfigError) as e:
        wgconf.parse(WG_MULLVAD_LIKE.replace("DNS = 10.64.0.1", f"DNS = 10.64.0.1\n{line}"))
    assert "does not run commands" in str(e.value) and "line 6" in str(e.value)


@pytest.mark.parametrize("broken, needle", [
    ("PrivateKey = " + K1, "PrivateKey missing"),
    ("Endpoint = 185.65.134.1:51820", "no peer has an Endpoint"),
    ("DNS = 10.64.0.1", None),
])
def test_wg_missing_pieces(broken, needle):
    text = WG_MULLVAD_LIKE.replace(broken, "")
    if needle is None:
        assert wgconf.parse(text).dns == []
        return
    with pytest.raises(ConfigError) as e:
        wgconf.parse(text)
    assert needle in str(e.value)


@pytest.mark.parametrize("bad, needle", [
    ("PublicKey = " + K2, "PublicKey = abc"),
    ("Address = 10.64.1.2/32,fc00:bbbb:bbbb:bb01::1:102/128", "Address = tunnel"),
    ("DNS = 10.64.0.1", "DNS = example.org"),
    ("Endpoint = 185.65.134.1:51820", "Endpoint = 185.65.134.1:99999"),
    ("[Peer]", "[Peers]"),
    ("DNS = 10.64.0.1", "Table = off\nFoo = 1"),
])
def test_wg_bad_values(bad, needle):
    with pytest.raises(ConfigError):
        wgconf.parse(WG_MULLVAD_LIKE.replace(bad, needle))


CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
OVPN_INLINE = f"""client
dev tun
proto udp
remote 203.0.113.20 1194
remote vpn2.example 443 tcp
remote-random
resolv-retry infinite
nobind
persist-key
persist-tun
remote-cert-tls server
verify-x509-name "server name" name
cipher AES-256-GCM
auth SHA512
auth-user-pass
redirect-gateway def1
dhcp-option DNS 10.8.0.1
block-outside-dns
setenv opt block-outside-dns
verb 3
<ca>
{CA}
</ca>
<tls-crypt>
-----BEGIN OpenVPN Static key V1-----
abcd
-----END OpenVPN Static key V1-----
</tls-crypt>
<auth-user-pass>
user1
pass1
</auth-user-pass>
"""


def test_ovpn_inline_multiple_remotes():
    c = ovpnconf.parse(OVPN_INLINE)
    assert [(r.endpoint.host, r.endpoint.port, r.proto) for r in c.remotes] == [
        ("203.0.113.20", 1194, "udp"), ("vpn2.example", 443, "tcp")]
    assert c.dns == ["10.8.0.1"]
    assert set(c.blocks) == {"ca", "tls-crypt"}
    assert c.credentials == "user1\npass1\n"
    assert "pass1" not in repr(c)
    assert ["verify-x509-name", "server name", "name"] in c.directives
    assert not [d for d in c.directives if d[0] in ("redirect-gateway", "setenv")]


def test_ovpn_crlf_and_referenced_files(tmp_path):
    (tmp_path / "ca.crt").write_text(CA)
    (tmp_path / "ta.key").write_text("KEY")
    (tmp_path / "creds.txt").write_text("u\np\n")
    text = ("client\r\ndev tun0\r\nproto tcp-client\r\nremote vpn.example\r\nport 443\r\n"
            "ca ca.crt\r\ntls-auth ta.key 1\r\nauth-user-pass creds.txt\r\n"
            "; a comment\r\n# another\r\n")
    c = ovpnconf.parse(text, "p.ovpn", str(tmp_path))
    assert c.remotes[0].endpoint == wgconf.Endpoint("vpn.example", 443)
    assert c.remotes[0].proto == "tcp"
    assert c.blocks["tls-auth"] == "KEY\n" and ["key-direction", "1"] in c.directives
    assert c.credentials == "u\np\n"


def test_ovpn_render_forces_our_options():
    c = ovpnconf.parse(OVPN_INLINE)
    out = ovpnconf.render(c, dev="tun5-main", fwmark=51820,
                          resolved={"vpn2.example": ["198.51.100.9"]},
                          creds_path="/run/x.creds", mgmt_sock="/run/x.sock")
    assert "dev tun5-main" in out and "route-noexec" in out and "mark 51820" in out
    assert "remote 198.51.100.9 443 tcp" in out and "remote 203.0.113.20 1194 udp" in out
    assert "vpn2.example" not in out and "redirect-gateway def1" not in out
    assert "script-security 1" in out and "auth-user-pass /run/x.creds" in out


@pytest.mark.parametrize("line", [
    "up /etc/openvpn/update-resolv-conf", "down /etc/openvpn/update-resolv-conf",
    "script-security 2", "route-up /bin/sh", "plugin /usr/lib/x.so", "ipchange x",
    "management 127.0.0.1 7505", "daemon", "dev tap", "config other.conf",
])
def test_ovpn_refusals(line):
    with pytest.raises(ConfigError) as e:
        ovpnconf.parse(OVPN_INLINE.replace("verb 3", line))
    assert "line 20" in str(e.value)


@pytest.mark.parametrize("old, new, needle", [
    ("remote 203.0.113.20 1194\nremote vpn2.example 443 tcp\n", "", "no remote"),
    (f"<ca>\n{CA}\n</ca>\n", "", "no ca"),
    ("</tls-crypt>", "", "never closed"),
    ("remote 203.0.113.20 1194", "remote 203.0.113.20 http", "not a port"),
    ("proto udp", "proto sctp", "not supported"),
    ("verb 3", "frobnicate 1", "unknown or unsupported"),
])
def test_ovpn_bad_files(old, new, needle):
    with pytest.raises(ConfigError) as e:
        ovpnconf.parse(OVPN_INLINE.replace(old, new))
    assert needle in str(e.value)
    assert "pass1" not in str(e.value)


@pytest.mark.parametrize("line, needle", [
    ("auth-user-pass /etc/shadow", "outside the provider file's folder"),
    ("ca /etc/shadow", "outside the provider file's folder"),
    ("ca ../secret.pem", "outside the provider file's folder"),
    ("ca link-out.pem", "outside the provider file's folder"),
    ("ca keys", "not a regular file"),
    ("ca huge.pem", "more than a key file"),
    ("tls-crypt binary.key", "not text"),
    ("crl-verify crls dir", "CRL directory"),
])
def test_ovpn_file_references_stay_in_the_providers_folder(tmp_path, line, needle):
    """A provider file cannot make netstack read (and send to the VPN server, or inline
    into the generated config) a file outside its own folder: /etc/shadow, a symlink out,
    a device or directory, a huge or binary file. The refusal names the line."""
    d = tmp_path / "provider"
    d.mkdir()
    (tmp_path / "secret.pem").write_text("secret")
    (d / "link-out.pem").symlink_to(tmp_path / "secret.pem")
    (d / "keys").mkdir()
    (d / "huge.pem").write_text("A" * 300_000)
    (d / "binary.key").write_bytes(b"\xff\xfe\x00\x01" * 10)
    text = OVPN_INLINE.replace("verb 3", line)
    with pytest.raises(ConfigError) as e:
        ovpnconf.parse(text, "p.ovpn", str(d))
    msg = str(e.value)
    assert needle in msg and "p.ovpn line 20" in msg and "secret" not in msg.split(needle)[0][-1:]
    assert len(msg.splitlines()) == 1


def test_ovpn_a_file_next_to_it_is_fine(tmp_path):
    (tmp_path / "ca.pem").write_text("\ufeff" + CA)  # a byte order mark is accepted
    c = ovpnconf.parse(OVPN_INLINE.replace(f"<ca>\n{CA}\n</ca>\n", "ca ca.pem\n"), "p.ovpn",
                       str(tmp_path))
    assert c.blocks["ca"] == CA + "\n"


@pytest.mark.parametrize("endpoint, needle", [
    ("a.example:1,b.example:2", "neither an address nor a host name"),
    ("vpn example:51820", "neither an address nor a host name"),
    ("0.0.0.0:51820", "unspecified"),
    ("127.0.0.1:51820", "loopback"),
    ("[::1]:51820", "loopback"),
    ("224.0.0.1:51820", "multicast"),
    ("255.255.255.255:51820", "broadcast"),
    ("169.254.1.1:51820", "link-local"),
    ("[fe80::1]:51820", "link-local"),
    ("10.137.0.5:51820", "netstack's own range"),
    ("10.139.1.1:51820", "netstack's own range"),
    ("0.1.2.3:51820", "0.0.0.0/8"),
])
def test_wg_endpoint_must_be_a_vpn_servers_address(endpoint, needle):
    with pytest.raises(ConfigError) as e:
        wgconf.parse(WG_MULLVAD_LIKE.replace("185.65.134.1:51820", endpoint))
    assert needle in str(e.value) and "Endpoint" in str(e.value)


@pytest.mark.parametrize("remote", ["remote 127.0.0.1 1194", "remote 10.137.0.9 1194",
                                    "remote a,b 1194"])
def test_ovpn_remote_must_be_a_vpn_servers_address(remote):
    with pytest.raises(ConfigError) as e:
        ovpnconf.parse(OVPN_INLINE.replace("remote 203.0.113.20 1194", remote))
    assert "line 4 (remote)" in str(e.value)


def test_private_lan_and_documentation_endpoints_are_fine():
    for ep in ("192.168.1.1:51820", "10.8.0.1:51820", "203.0.113.10:51820",
               "[2001:db8::1]:51820", "vpn-01.example.net:443"):
        assert wgconf.parse(WG_MULLVAD_LIKE.replace("185.65.134.1:51820", ep)).endpoints
