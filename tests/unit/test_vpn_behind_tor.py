"""A VPN whose transport is UDP behind a Tor gateway (which carries TCP only) could never
connect: the plan refuses it with one line naming the VPN qube's netvm, before anything is
made. TCP transports behind Tor (VPN over Tor) and every transport in front of it (Tor over
VPN, the usual chain) are planned."""

from __future__ import annotations

import pytest

from netstack.errors import ConfigError
from netstack.kinds.registry import SPECS
from netstack.model import UplinkSpec
from netstack.plan import build, load_inputs

LAB = UplinkSpec("lab")
CHAIN = """
[qubes.sys-net]
kind = "net"
[qubes.sys-firewall]
kind = "firewall"
netvm = "sys-net"
[qubes.sys-whonix]
kind = "tor"
netvm = "{tor_netvm}"
[qubes.sys-proxyvm]
kind = "vpn"
netvm = "{vpn_netvm}"
type = "{type}"
config = "{config}"
[qubes.work]
kind = "app"
netvm = "{app_netvm}"
"""
OVPN = """client
dev tun
proto {proto}
remote 203.0.113.20 {port}
nobind
dhcp-option DNS 10.8.0.1
<ca>
-----BEGIN CERTIFICATE-----
MIIB
-----END CERTIFICATE-----
</ca>
"""


@pytest.fixture(autouse=True)
def no_overlay(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))


def plan(tmp_path, *, vpn_behind_tor: bool, type_: str = "wireguard",
         config: str = "lab:wireguard"):
    order = dict(tor_netvm="sys-proxyvm", vpn_netvm="sys-firewall", app_netvm="sys-whonix")
    if vpn_behind_tor:
        order = dict(tor_netvm="sys-firewall", vpn_netvm="sys-whonix", app_netvm="sys-proxyvm")
    cfg = tmp_path / "chain.toml"
    cfg.write_text(CHAIN.format(type=type_, config=config, **order))
    return build(load_inputs(str(cfg), "u1", LAB, SPECS, overlay={}), "u1", LAB)


def test_tor_over_vpn_is_planned(tmp_path):
    assert plan(tmp_path, vpn_behind_tor=False).qube("sys-proxyvm").info.type == "wireguard"


def test_wireguard_behind_tor_is_refused_naming_the_netvm(tmp_path):
    with pytest.raises(ConfigError) as e:
        plan(tmp_path, vpn_behind_tor=True)
    line = str(e.value)
    assert "'sys-proxyvm' field 'netvm'" in line and "WireGuard needs UDP" in line
    assert "'sys-whonix' (kind tor)" in line and "\n" not in line


@pytest.mark.parametrize("proto,port,refused", [("udp", 1194, True), ("tcp-client", 443, False)])
def test_openvpn_behind_tor_by_its_transport(tmp_path, proto, port, refused):
    ovpn = tmp_path / "provider.ovpn"
    ovpn.write_text(OVPN.format(proto=proto, port=port))
    if refused:
        with pytest.raises(ConfigError, match="proto udp"):
            plan(tmp_path, vpn_behind_tor=True, type_="openvpn", config=str(ovpn))
    else:
        p = plan(tmp_path, vpn_behind_tor=True, type_="openvpn", config=str(ovpn))
        assert {e.proto for e in p.qube("sys-proxyvm").info.endpoints} == {"tcp"}
