"""Kernel WireGuard where the kernel has it, wireguard-go otherwise (issue 16): the plan
of both paths is the same apart from the tunnel's owner, and a forced backend the kernel
cannot give is refused with one line before anything changes."""

from __future__ import annotations

import dataclasses

import pytest

from netstack import plan, stack
from netstack.codec import dump
from netstack.errors import ConfigError
from netstack.hostcaps import HostCaps
from netstack.kinds.registry import RUNTIMES, SPECS
from tests.unit.test_rules import vpn_plan

LAB = plan.UplinkSpec("lab")


def build(tmp_path, caps: HostCaps, backend: str | None = None):
    p = vpn_plan(tmp_path)  # writes vpn.toml and wg.conf
    cfg = tmp_path / "vpn.toml"
    if backend:
        cfg.write_text(cfg.read_text().replace('\ntype = "wireguard"',
                                               f'\ntype = "wireguard"\nbackend = "{backend}"'))
    inputs = plan.load_inputs(str(cfg), "main", LAB, SPECS)
    inputs = dataclasses.replace(inputs, caps=caps)
    assert p is not None
    return plan.build(inputs, "main", LAB)


def test_both_paths_identical_apart_from_the_device(tmp_path):
    k, u = build(tmp_path, HostCaps(wireguard=True)), build(tmp_path, HostCaps())
    assert k.qube("sys-proxyvm").info.backend == "kernel"
    assert u.qube("sys-proxyvm").info.backend == "wireguard-go"
    # every namespace's ruleset, sysctls and files, every link, address and route: equal
    assert dump(k.namespaces) == dump(u.namespaces)
    assert (k.veths, k.addrs, k.routes) == (u.veths, u.addrs, u.routes)
    ki, ui = dump(k.qube("sys-proxyvm").info), dump(u.qube("sys-proxyvm").info)
    assert {x for x in ki if ki[x] != ui[x]} == {"backend"}
    kd, ud = k.daemons, u.daemons
    assert [d.name for d in kd] == [d.name for d in ud] == ["vpn-sys-proxyvm"]
    assert ud[0].argv == ("wireguard-go", "-f", "wg3-main")
    assert kd[0].argv[1:] == ("-m", "netstack.vpn.kernelwg", "wg3-main")
    # the same hook, go signal and restart policy: the kill switch and supervision agree
    same = ("post_start", "requires", "restart", "netns")
    assert [getattr(kd[0], f) for f in same] == [getattr(ud[0], f) for f in same]


def test_forced_backends(tmp_path):
    assert build(tmp_path, HostCaps(wireguard=True), "wireguard-go") \
        .qube("sys-proxyvm").info.backend == "wireguard-go"
    assert build(tmp_path, HostCaps(wireguard=True), "kernel") \
        .qube("sys-proxyvm").info.backend == "kernel"
    with pytest.raises(ConfigError, match="field 'backend'.*no WireGuard.*\"auto\""):
        build(tmp_path, HostCaps(), "kernel")


@pytest.mark.parametrize("bad", ["\"boringtun\"", "1"])
def test_bad_backend_refused(tmp_path, bad):
    vpn_plan(tmp_path)
    cfg = tmp_path / "vpn.toml"
    cfg.write_text(cfg.read_text().replace('\ntype = "wireguard"',
                                           f'\ntype = "wireguard"\nbackend = {bad}'))
    with pytest.raises(ConfigError, match="field 'backend'"):
        stack.plan_only(str(cfg), "main", LAB)


def test_openvpn_has_no_backend(tmp_path):
    cfg = tmp_path / "o.toml"
    from tests.unit.test_rules import ROOT

    cfg.write_text((ROOT / "configs/vpn.toml").read_text().replace(
        '\ntype = "wireguard"', '\ntype = "openvpn"\nbackend = "kernel"')
        .replace("lab:wireguard", "lab:openvpn"))
    with pytest.raises(ConfigError, match="field 'backend'.*OpenVPN has none"):
        stack.plan_only(str(cfg), "main", LAB)


def test_status_names_the_backend():
    role = RUNTIMES["vpn"]
    entry = {"vpn": {"type": "wireguard", "backend": "kernel", "dev": "wg3-main",
                     "endpoints": [{"host": "203.0.113.10", "port": 51820, "proto": "udp"}],
                     "tunnel": "up", "handshake_age_s": 3, "rx_bytes": 1, "tx_bytes": 2,
                     "restarts": 0}}
    assert role.status_lines(entry)[0].startswith("wireguard (kernel) 203.0.113.10:51820")
    entry["vpn"]["backend"] = "wireguard-go"
    assert role.status_lines(entry)[0].startswith("wireguard (wireguard-go) ")


def test_the_probe_asks_only_when_a_qube_could_use_it(tmp_path, monkeypatch):
    from netstack import hostcaps

    asked = []
    monkeypatch.setattr(hostcaps, "probe", lambda **kw: asked.append(kw) or HostCaps())
    vpn_plan(tmp_path)
    assert asked == [{"flowtable": True, "wireguard": True}]  # forwarding qubes: flowtable
    asked.clear()
    cfg = tmp_path / "vpn.toml"
    cfg.write_text(cfg.read_text().replace('\ntype = "wireguard"',
                                           '\ntype = "wireguard"\nbackend = "wireguard-go"'))
    stack.plan_only(str(cfg), "main", LAB)
    assert asked == [{"flowtable": True}]


@pytest.mark.parametrize("backend,want_ns", [("kernel", "nst-main-sys-proxyvm"),
                                             ("wireguard-go", None)])
def test_health_reads_a_kernel_device_in_its_namespace(tmp_path, monkeypatch, backend,
                                                       want_ns):
    """A kernel WireGuard device exists only in the qube's namespace: `wg show` run from
    the caller's found none, and status said "no handshake" for a tunnel that had one
    (scripts/test-host's VM). wireguard-go's control socket is seen from anywhere."""
    import contextlib
    import subprocess
    import time

    from netstack import netns
    from netstack.vpn import health

    info = dataclasses.replace(
        build(tmp_path, HostCaps(wireguard=True), backend).qube("sys-proxyvm").info)
    seen = []

    @contextlib.contextmanager
    def entered(ns):
        seen.append(("enter", ns))
        yield

    def run(argv, **kw):
        seen.append(("run", tuple(argv)))
        now = int(time.time())
        out = (f"{info.dev}\tpriv\tpub\t51820\toff\n"
               f"peer\t(none)\t203.0.113.10:51820\t0.0.0.0/0\t{now}\t92\t212\t25\n")
        return subprocess.CompletedProcess(argv, 0, out, "")

    monkeypatch.setattr(netns, "entered", entered)
    monkeypatch.setattr(health.subprocess, "run", run)
    link = type("L", (), {"name": info.dev, "addresses": ["10.66.0.2/32"], "rx_bytes": 92,
                          "tx_bytes": 212})()
    h = health.health(info, [link], {"alive": True}, {})
    assert seen == [("enter", want_ns), ("run", ("wg", "show", info.dev, "dump"))]
    assert h["tunnel"] == "up" and h["handshake_age_s"] is not None


def test_status_names_a_tunnel_up_without_its_daemon():
    """A kernel WireGuard device outlives a keeper killed with -9: `status` must not call
    that tunnel healthy (its hook deletes it as the keeper exits; docs/field-notes.md)."""
    from netstack.kinds.vpn_runtime import VpnRuntime

    v = {"type": "wireguard", "backend": "kernel", "dev": "wg3-main", "tunnel": "up",
         "process_alive": False, "handshake_age_s": 3.0}
    assert VpnRuntime().health({"vpn": v}) == [
        "tunnel wg3-main is up without its daemon: nothing supervises it (the supervisor's "
        "restart replaces it)"]
    assert VpnRuntime().health({"vpn": {**v, "process_alive": True}}) == []
