"""`netstack leaktest` on the Tor-over-VPN chain (the shared lab) and on the VPN-only chain:
the battery passes in every scenario, and every injected fault is caught with the right
case names (root)."""

from __future__ import annotations

import json
import os
import secrets

import pytest

from netstack.leaktest import battery
from netstack.leaktest.catalogue import Case
from tests.integration.faults import broken
from tests.integration.faults import fault as named
from tests.integration.util import VPN_CFG, cli, running_stack
from tests.realkernel import KERNEL

pytestmark = pytest.mark.root

INVALID = {"tcp-fin", "tcp-finack", "tcp-rst", "tcp-null", "tcp-xmas"}
NOT_TCP = {"udp-ntp", "udp-quic", "udp-random", "icmp-echo", "icmp-timestamp", "proto-gre",
           "proto-esp", "proto-sctp", "proto-raw253", "fragments"}


def leaked(r) -> set[str]:
    return {c["case"] for c in r.cases if c["leaked_on"]}


@pytest.fixture(scope="module", params=["wireguard", "wireguard-kernel"])
def vpn_stack(request, tmp_path_factory):
    """The VPN-only chain, its WireGuard forced to wireguard-go ("wireguard", proven on
    every host) or the kernel's ("wireguard-kernel", skipped where the kernel has none:
    scripts/test-host's VM runs it)."""
    from pathlib import Path

    from tests.integration.test_failover import backend_of

    _, backend = backend_of(request.param)
    cfg = tmp_path_factory.mktemp(request.param) / "vpn.toml"
    cfg.write_text(Path(VPN_CFG).read_text().replace(
        '\ntype = "wireguard"', f'\ntype = "wireguard"\nbackend = "{backend}"'))
    with running_stack(str(cfg), "lv") as s:
        yield s


def check_clean(r) -> None:
    assert r.leaks == 0, (leaked(r), [lk for lk in r.links if lk["violations"]])
    assert len(r.cases) >= 45, len(r.cases)
    assert all(c["sent"] >= 1 for c in r.cases), [c for c in r.cases if c["sent"] < 1]
    src = next(lk for lk in r.links if lk["zone"] == "source")
    assert src["packets"] >= r.packets_sent  # every probe really went out
    local = [c for c in r.cases if c["case"].startswith("local-")]
    # the call socket's row where another app qube is there to call (leaktest.callcheck)
    calls_row = [c for c in local if c["case"] == "local-call"]
    assert len(local) == 24 + len(calls_row) and all(c["verdict"] == "ok" for c in local), \
        local
    for c in r.cases:  # and each was seen leaving the workstation
        if c["case"] not in ("tcp-get-name", "dns-lookup-name") and c not in local:
            assert src["link"] in c["seen_on"], c["case"]
    for lk in r.links:
        assert os.path.getsize(lk["pcap"]) >= 24


def test_tor_chain_steady(tor_lab, tmp_path):
    r = battery.run(tor_lab.stack, "anon-whonix", pcaps_dir=str(tmp_path), kernel=KERNEL)
    check_clean(r)
    names = {lk["link"] for lk in r.links}
    assert {"isp-link", "sys-whonix:eth0", "lab:vpn-server", "lab:web", "lab:dns",
            "anon-whonix2:eth0"} <= names
    row = next(c for c in r.cases if c["case"] == "local-call")  # no policy: denied, tried
    assert row["sent"] == 1 and row["targets"]["anon-whonix2"].startswith("deny")
    assert r.chain_kind == "tor" and r.seconds < 60


@pytest.mark.parametrize("scenario", ["tor-killed", "vpn-killed", "firewall-reload"])
def test_tor_chain_scenarios(tor_lab, tmp_path, scenario):
    r = battery.run(tor_lab.stack, "anon-whonix", scenario=scenario, pcaps_dir=str(tmp_path),
                    kernel=KERNEL)
    check_clean(r)
    tor_lab.get("anon-whonix", "198.51.100.80")  # and the chain recovered


def test_tor_chain_fault_gateway_redirect_only_is_caught(tor_lab, tmp_path):
    r = battery.run(tor_lab.stack, "anon-whonix", fault=named("gateway-redirect-only"),
                    pcaps_dir=str(tmp_path), kernel=KERNEL)
    got = leaked(r)
    assert got >= INVALID and got >= NOT_TCP
    assert {"spoof-sibling", "spoof-upstream"} <= got
    # forwarding open, the NAT kept: a SYN to Tor's automap range is still redirected
    assert not got & {"tcp-syn-ip", "tcp-syn-automap", "tcp-get-name", "ipv6-global", "dhcp",
                      "mdns"}
    assert r.leaks > 0
    check_clean(battery.run(tor_lab.stack, "anon-whonix", pcaps_dir=str(tmp_path), kernel=KERNEL))


def test_cli_exit_codes_and_json(tor_lab, tmp_path):
    p = cli("--stack", tor_lab.stack, "leaktest", "--json", "--pcaps", str(tmp_path))
    r = json.loads(p.stdout)
    assert p.returncode == 0 and r["leaks"] == 0 and r["workstation"] == "anon-whonix"
    assert all(c["sent"] == c["planned"] >= 1 and not c["send_errors"] for c in r["cases"])
    with broken(tor_lab.stack, "anon-whonix", "gateway-redirect-only"):
        p = cli("--stack", tor_lab.stack, "leaktest", "--pcaps", str(tmp_path), check=False)
    assert p.returncode == 1 and "LEAK:" in p.stdout and "tcp-fin" in p.stdout
    # breaking a protection is a test helper, never a user-facing option
    p = cli("--stack", tor_lab.stack, "leaktest", "--inject-fault", "no-kill-switch",
            check=False)
    assert p.returncode == 2 and "--inject-fault" in p.stderr + p.stdout


def _with_case(monkeypatch, name: str, packet: dict) -> None:
    """The battery with one more case whose probe the test controls."""
    real = battery.cases

    def cases(t):
        return [*real(t), Case(name, "the sender's own honesty", [dict(packet)])]
    monkeypatch.setattr(battery, "cases", cases)


def test_a_probe_that_cannot_be_sent_is_an_error_not_a_pass(tor_lab, tmp_path, monkeypatch):
    _with_case(monkeypatch, "unsendable", {"dst": "ff02::1", "proto": "udp6",
                                           "iface": "nosuch0"})
    r = battery.run(tor_lab.stack, "anon-whonix", pcaps_dir=str(tmp_path), kernel=KERNEL)
    row = next(c for c in r.cases if c["case"] == "unsendable")
    assert row["sent"] == 0 and row["planned"] == 1 and row["verdict"] == "ERROR"
    assert "nosuch0" in row["send_errors"][0] or "No such device" in row["send_errors"][0]
    assert r.leaks == 0 and [e for e in r.errors if e.startswith("unsendable: 1 of 1")]
    # every other case still counts what really left
    assert all(c["sent"] == c["planned"] for c in r.cases if c["case"] != "unsendable")


def test_a_probe_sent_elsewhere_than_the_workstation_link_is_an_error(tor_lab, tmp_path,
                                                                     monkeypatch):
    """Anti-test of the capture check: the sender confirms a probe that went out on the
    loopback, not the workstation's link; the battery must not believe it."""
    _with_case(monkeypatch, "elsewhere", {"dst": "ff02::1", "proto": "udp6", "iface": "lo"})
    r = battery.run(tor_lab.stack, "anon-whonix", pcaps_dir=str(tmp_path), kernel=KERNEL)
    row = next(c for c in r.cases if c["case"] == "elsewhere")
    assert row["sent"] == 1 and row["verdict"] == "ERROR"
    assert [e for e in r.errors if e.startswith("elsewhere:") and "never carried" in e]


def test_vpn_chain_steady_and_scenarios(vpn_stack, tmp_path):
    for scenario in ("steady", "vpn-killed", "firewall-reload"):
        r = battery.run(vpn_stack, "work", scenario=scenario, pcaps_dir=str(tmp_path),
                        kernel=KERNEL)
        assert r.chain_kind == "vpn"
        check_clean(r)


@pytest.mark.parametrize("fault, expect", [
    ("no-kill-switch", {"tcp-syn-ip", "udp-ntp", "icmp-echo", "udp-dns-direct"} | INVALID),
    ("no-antispoof", {"spoof-sibling", "spoof-upstream", "spoof-lab"}),
    ("ipv6-allowed", {"ipv6-global"}),
])
def test_vpn_chain_faults_are_caught(vpn_stack, tmp_path, fault, expect):
    r = battery.run(vpn_stack, "work", fault=named(fault), pcaps_dir=str(tmp_path), kernel=KERNEL)
    got = leaked(r)
    assert expect <= got, got
    if fault != "no-kill-switch":
        assert not got & {"tcp-syn-ip", "tcp-get-name"}  # nothing else is blamed


def test_fuzz_no_escapes(tor_lab, tmp_path):
    """hypothesis-generated packets from the hostile workstation (random protocol, flags,
    addresses, ports, TTL, fragments): not one shows up beyond the Tor gateway."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from netstack.leaktest.capture import Capture
    from netstack.leaktest.prober import Prober

    marker = "nstkfz" + secrets.token_hex(4)
    addr = st.sampled_from(["198.51.100.80", "198.51.100.53", "203.0.113.10",
                            "203.0.113.41", "10.137.0.4", "10.137.0.3", "10.137.0.1",
                            "10.137.0.6", "192.0.2.1", "127.0.0.1", "255.255.255.255",
                            "224.0.0.251"])
    pkt = st.fixed_dictionaries({
        "dst": addr, "proto": st.sampled_from(["tcp", "udp", "icmp", "ip"]),
        "dport": st.integers(1, 65535), "sport": st.integers(1, 65535),
        "flags": st.sampled_from(["S", "A", "F", "R", "FA", "SA", "", "FPU", "SF", "SR"]),
        "ttl": st.integers(1, 255), "ipproto": st.sampled_from([0, 2, 4, 41, 47, 50, 132, 253]),
        "icmp_type": st.integers(0, 40),
    }, optional={"src": addr, "frag": st.sampled_from([8, 64, 512]),
                 "size": st.integers(1, 3000)})
    sent = []
    ws = tor_lab.ns["anon-whonix"]
    beyond = Capture(tor_lab.ns["sys-whonix"], "eth0", str(tmp_path / "fuzz-beyond.pcap"))
    isp = Capture(tor_lab.ns["sys-net"], "uplink", str(tmp_path / "fuzz-isp.pcap"))
    with Prober(ws) as prober, beyond, isp:
        @settings(max_examples=200, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(spec=pkt)
        def probe(spec):
            if spec["proto"] != "ip":
                spec.pop("ipproto")
            sent.append(prober.send([{**spec, "payload": marker}]).sent)

        probe()
    assert sum(sent) >= 150
    from tests.integration.test_tor import beyond_gateway_violations

    for cap in (beyond, isp):
        pkts = cap.packets()
        assert not [p for p in pkts if marker.encode() in bytes(p)], cap.path
    assert not beyond_gateway_violations(tor_lab, beyond.packets())


def test_down_while_probes_run(tmp_path):
    """`netstack down` in the middle of the battery: nothing leaks while the stack is torn
    down around the probes, and nothing of the stack is left afterwards."""
    with running_stack(VPN_CFG, "ld") as s:
        r = battery.run(s, "work", scenario="down", pcaps_dir=str(tmp_path), kernel=KERNEL)
        assert r.leaks == 0, (leaked(r), [lk for lk in r.links if lk["violations"]])
        assert r.packets_sent >= 40  # some need neighbours that `down` removed
        # what was sent before `down` began left and was seen; only later cases may not
        assert not r.errors, r.errors
        assert any(c["after_down"] for c in r.cases)
        assert all(c["sent"] == c["planned"] for c in r.cases if not c["after_down"])


def test_local_channels_anti_test(tor_lab, tmp_path, monkeypatch):
    """Without the sandbox (a bare namespace, what app qubes were) the battery's stand-in
    host service answers the workstation, as user and as root, and host processes and
    namespaces show: the local cases see the leak they guard against."""
    from netstack.leaktest import local

    monkeypatch.setattr(local, "SANDBOX", False)
    dns_before = len(tor_lab.log("lab-dns"))
    r = battery.run(tor_lab.stack, "anon-whonix", pcaps_dir=str(tmp_path), kernel=KERNEL)
    got = leaked(r)
    assert {"local-stand-in", "local-stand-in-root", "local-host-processes",
            "local-host-state-root"} <= got, got
    assert {"local-mount-root", "local-nftables-root", "local-ptrace-root"} <= got
    # the host's identifiers, nested user namespaces and the kernel interfaces the
    # sandbox's seccomp filter refuses are all there without it
    assert {"local-identity", "local-identity-root", "local-userns", "local-userns-root",
            "local-kernel-surface", "local-kernel-surface-root"} <= got, got
    # an unprivileged user cannot mount, load rules or trace root's process
    assert not got & {"local-mount", "local-nftables", "local-ptrace"}
    assert not {c for c in got if not c.startswith("local-")}  # packets: still clean
    row = next(c for c in r.cases if c["case"] == "local-stand-in")
    assert row["verdict"] == "LEAK" and "198.51.100.80" in row["leaked_on"][0], row
    # the name went around the chain: the lab's DNS was asked from the ISP address (the
    # battery's own lookups through the chain arrive from Tor exits)
    asked = [x for x in tor_lab.log("lab-dns")[dns_before:] if x["name"] == "web.lab.test"]
    assert "192.0.2.2" in {x["client"] for x in asked}, asked
    assert {x["client"] for x in asked} <= {"192.0.2.2"} | tor_lab.exits, asked
