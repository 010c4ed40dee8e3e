"""DHCP on a moved uplink (issue 16): `--uplink DEV` with no static address runs dhcpcd in
sys-net under the supervisor. In a stand-in host namespace whose uplink's peer is a lab
router running dnsmasq: the lease gives sys-net its address, default route and the
resolver the virtual DNS points at; the lease is renewed; when it is lost (the server
changes subnet and NAKs) the chain stays closed, nothing but DHCP and ARP leaves, no
lookup goes to the old resolver, and it recovers with the new lease (root)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP

from netstack.leaktest.capture import Capture
from tests.integration.util import BASIC, in_ns, reap_zombies, stand_in_host, wait_for

pytestmark = pytest.mark.root

T1 = 3  # renew every 3 s (dnsmasq's leases are 2 min at least; T1 is an option)


def dnsmasq(router: str, tmp: Path, net: str, dns: str) -> subprocess.Popen:
    """The lab's DHCP server in the router namespace, authoritative (it NAKs a lease it
    did not give), ended by its PID."""
    first, last = f"{net}.100", f"{net}.150"
    return subprocess.Popen(
        ["ip", "netns", "exec", router, "dnsmasq", "--keep-in-foreground", "--no-daemon",
         "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0",
         "--interface=rtr0", "--bind-interfaces", "--dhcp-authoritative", "--no-ping",
         f"--dhcp-range={first},{last},255.255.255.0,2m", f"--dhcp-option=option:router,{net}.1",
         f"--dhcp-option=option:dns-server,{dns}", f"--dhcp-option=option:T1,{T1}",
         f"--dhcp-option=option:T2,{T1 * 2}", f"--dhcp-leasefile={tmp}/leases-{net}",
         "--pid-file="], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(p: subprocess.Popen) -> None:
    p.terminate()
    p.wait(5)


def test_dhcp_lease_renew_loss_and_recovery(own_stack, tmp_path):
    s = own_stack("h")
    cfg = tmp_path / "dhcp.toml"
    cfg.write_text(Path(BASIC).read_text())  # sys-net has no address: DHCP
    work, net = f"nst-{s}-work", f"nst-{s}-sys-net"
    with stand_in_host(s) as (run, _host, router):
        for a in ("198.51.100.1/24", "192.0.2.53/24", "198.51.100.53/24"):  # + resolvers
            in_ns(router, "ip", "addr", "add", a, "dev", "rtr0")
        srv = dnsmasq(router, tmp_path, "192.0.2", "192.0.2.53")
        try:
            p = run("up", str(cfg), "--uplink", "standin0")
            assert p.returncode == 0, p.stderr
            st = json.loads(run("status", "--json").stdout)
            d = next(q for q in st["qubes"] if q["name"] == "sys-net")["dhcp"]
            assert d["bound"] and d["address"].startswith("192.0.2.1")
            assert d["routers"] == ["192.0.2.1"] and d["dns"] == ["192.0.2.53"]
            routes = in_ns(net, "ip", "route").stdout
            assert "default via 192.0.2.1 dev uplink" in routes
            ping = in_ns(work, "ping", "-c", "1", "-W", "2", "192.0.2.1", check=False)
            assert ping.returncode == 0, ping.stdout

            def lookup_goes_to(resolver: str, pcap: str) -> None:
                with Capture(router, "rtr0", str(tmp_path / pcap), "udp port 53") as cap:
                    in_ns(work, "dig", "+tries=1", "+time=1", "@10.139.1.1", "x.lab.test",
                          check=False)
                dst = {x[IP].dst for x in cap.packets() if IP in x}
                assert dst == {resolver}, dst

            lookup_goes_to("192.0.2.53", "dns1.pcap")  # the virtual DNS -> the lease's
            wait_for(lambda: lease(run)["renewals"] >= 1, 3 * T1 + 5, 0.1, "a renewal")

            # Lease loss: the server moves to another subnet and NAKs the renewal.
            with Capture(router, "rtr0", str(tmp_path / "loss.pcap")) as cap:
                stop(srv)
                srv = dnsmasq(router, tmp_path, "198.51.100", "198.51.100.53")
                wait_for(lambda: "NAK" in lease(run)["history"] or
                         "EXPIRE" in lease(run)["history"], 4 * T1 + 10, 0.05, "the NAK")
                end = time.monotonic() + 60
                while not lease(run)["bound"]:  # probe from work until the new lease
                    in_ns(work, "dig", "+tries=1", "+time=1", "@10.139.1.1", "y.lab.test",
                          check=False)
                    in_ns(work, "ping", "-c", "1", "-W", "1", "192.0.2.1", check=False)
                    assert time.monotonic() < end, "no new lease within 60 s"
            new = lease(run)
            assert new["address"].startswith("198.51.100.1") and new["dns"] == ["198.51.100.53"]
            assert "default via 198.51.100.1 dev uplink" in in_ns(net, "ip", "route").stdout
            # while there was no lease only DHCP and ARP left sys-net; no lookup went to
            # the old resolver after the server changed
            bad = [x.summary() for x in cap.packets()
                   if ARP not in x and not (UDP in x and {x[UDP].sport, x[UDP].dport} &
                                            {67, 68})
                   and IP in x and not x[IP].src.startswith("198.51.100.")
                   and x[IP].src != "192.0.2.1"]
            assert not bad, bad
            lookup_goes_to("198.51.100.53", "dns2.pcap")
            ping = in_ns(work, "ping", "-c", "1", "-W", "2", "198.51.100.1", check=False)
            assert ping.returncode == 0, ping.stdout
            in_net = in_ns(net, "ip", "netns", "pids", net).stdout.split()
            assert len(in_net) >= 3  # bwrap, its init, dhcpcd and its privsep helpers
            p = run("down")
            assert p.returncode == 0, p.stderr
            reap_zombies()  # re-parented to this test (a subreaper), not yet waited for
            alive = [x for x in in_net if Path(f"/proc/{x}").exists()]
            assert not alive, f"processes of sys-net left after down: {alive}"
        finally:
            stop(srv)


def lease(run) -> dict:
    st = json.loads(run("status", "--json").stdout)
    return next(q for q in st["qubes"] if q["name"] == "sys-net")["dhcp"]
