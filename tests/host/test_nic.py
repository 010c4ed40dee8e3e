"""A real NIC in move mode (issue 27 item 7), inside scripts/test-host's VM.

The VM's one network device is a virtio-net NIC (MAC `NIC_MAC` in scripts/test-host) whose
peer is a tap in a namespace of its own on the development machine, where dnsmasq serves
DHCP (192.0.2.100-150, router and resolver 192.0.2.1, leases of 2 min, dnsmasq's least,
T1 10 s, T2 15 s) and DNS (`nic.lab.test` -> 192.0.2.1). `up --uplink NIC` moves the
device into sys-net, where dhcpcd under the supervisor takes a lease from that server;
these tests prove the lease, its renewal, what netstack does when the server stops
answering (the lease runs out: the chain stays closed, only DHCP and ARP leave), its
recovery, and that `down` gives the NIC back to the VM's root namespace under its own name.
The test stops and starts the server through the console ("NETSTACK-TEST-HOST: nic-dhcp
stop|start", which scripts/test-host's loop reads), repeating the request until the
server's DNS answers (or stops answering) from sys-net."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP

from netstack.leaktest.capture import Capture
from tests.host.test_host import NETSTACK, ROOT, diagnose, host_view, sh
from tests.integration.util import reap_zombies, stack_leftovers, wait_for

pytestmark = pytest.mark.root

NIC_MAC = "52:54:00:4e:53:01"  # scripts/test-host's NIC_MAC
SERVER = "192.0.2.1"  # the tap on the development machine: router, resolver, DHCP server
T1, T2, LEASE = 10, 15, 120  # scripts/test-host's dnsmasq options
STACK = "nc"
NET, WORK = f"nst-{STACK}-sys-net", f"nst-{STACK}-work"


def nic_in(ns: str | None) -> str | None:
    """The NIC's name in a namespace (None: the VM's root), found by its MAC."""
    cmd = ("ip", "-o", "link", "show") if ns is None else ("ip", "-n", ns, "-o", "link", "show")
    for line in sh(*cmd).stdout.splitlines():
        if f"link/ether {NIC_MAC} " in line:
            return line.split(":")[1].strip().split("@")[0]
    return None


def console(request: str) -> None:
    """A request to scripts/test-host on the development machine (it reads the console)."""
    with open("/dev/ttyS0", "w") as tty:
        tty.write(f"\nNETSTACK-TEST-HOST: nic-dhcp {request}\n")


def server_answers() -> bool:
    """The development machine's dnsmasq answers sys-net's own DNS query (sys-net's
    output to its uplink is allowed)."""
    p = sh("ip", "netns", "exec", NET, "dig", "+short", "+tries=1", "+time=1",
           f"@{SERVER}", "nic.lab.test", check=False, timeout=20)
    return p.returncode == 0 and p.stdout.strip() == SERVER


def ask_server(request: str, answering: bool, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while True:
        console(request)
        t = time.monotonic() + 4
        while time.monotonic() < t:
            if server_answers() == answering:
                return
            time.sleep(0.5)
        assert time.monotonic() < end, f"scripts/test-host did not {request} the DHCP server"


def dhcp() -> dict:
    p = sh(NETSTACK, "--stack", STACK, "status", "--json", check=False)
    return next(q for q in json.loads(p.stdout)["qubes"] if q["name"] == "sys-net")["dhcp"]


def ping_from_work(timeout: int = 2) -> bool:
    return sh("ip", "netns", "exec", WORK, "ping", "-c", "1", "-W", str(timeout), SERVER,
              check=False, timeout=timeout + 10).returncode == 0


def lookup_from_work() -> str:
    """Through the chain: work's virtual DNS -> sys-net's map -> the lease's resolver."""
    out = sh("ip", "netns", "exec", WORK, "dig", "+short", "+tries=1", "+time=2",
             "@10.139.1.1", "nic.lab.test", check=False, timeout=20).stdout
    # without an answer dig +short prints ";; communications error ..." on stdout
    return "\n".join(x for x in out.splitlines() if not x.startswith(";;")).strip()


def without_ifindex(view: dict[str, str]) -> dict[str, str]:
    """The root namespace's view with each link's index left out: a device moved into a
    namespace where its index is taken gets another one, and keeps it when it comes back
    (ens3 went 2 -> 3: docs/field-notes.md, "A real NIC in the VM")."""
    links = "\n".join(x.split(": ", 1)[1] for x in view["links"].splitlines())
    return {**view, "links": links}


@pytest.fixture(scope="module")
def nic_stack():
    """configs/basic.toml (sys-net without an address: DHCP) on the NIC, moved."""
    nic = nic_in(None)
    assert nic, f"no NIC with MAC {NIC_MAC}: scripts/test-host gives the VM one"
    before = host_view()
    t0 = time.monotonic()
    # --vpn-timeout is also the deadline for the first lease (30 s by default): the hook is
    # a Python program, slow under TCG on a loaded host (a BOUND came after 30 s there)
    p = sh(NETSTACK, "--stack", STACK, "up", str(ROOT / "configs" / "basic.toml"),
           "--uplink", nic, "--vpn-timeout", "300", check=False, timeout=600)
    up_s = time.monotonic() - t0
    if p.returncode != 0:
        diagnose(STACK, "nic-up")
    try:
        assert p.returncode == 0, f"up -> {p.returncode}\n{p.stdout}\n{p.stderr}"
        print(f"up --uplink {nic} (DHCP) took {up_s:.1f} s")
        yield {"nic": nic, "before": before, "up_s": up_s}
    finally:
        sh(NETSTACK, "--stack", STACK, "down", "--purge", check=False, timeout=300)
        reap_zombies()
        console("start")  # whatever a failed test left, the server answers again


def test_lease_from_the_development_machine(nic_stack):
    """The NIC is in sys-net (gone from the VM's root namespace), dhcpcd there took a lease
    from the development machine's dnsmasq, and work reaches the server and its DNS through
    the chain."""
    assert nic_in(None) is None
    assert nic_in(NET) == "uplink"
    d = dhcp()
    assert d["bound"], d
    addr = d["address"]
    assert addr.startswith("192.0.2.") and addr.endswith("/24"), addr
    assert 100 <= int(addr.split("/")[0].rsplit(".", 1)[1]) <= 150, addr
    assert d["routers"] == [SERVER] and d["dns"] == [SERVER], d
    assert d["lease_s"] == LEASE, d
    assert f"default via {SERVER} dev uplink" in sh("ip", "-n", NET, "route").stdout
    assert ping_from_work()
    assert lookup_from_work() == SERVER
    st = sh(NETSTACK, "--stack", STACK, "status", check=False)
    assert st.returncode == 0, st.stdout  # up, not degraded
    assert f"dhcp uplink: {addr} via {SERVER}" in st.stdout, st.stdout


def test_lease_is_renewed(nic_stack):
    """dnsmasq's T1 of 10 s: dhcpcd renews (unicast to the server) and keeps its address."""
    first = dhcp()
    t0 = time.monotonic()
    wait_for(lambda: dhcp()["renewals"] > first["renewals"], T1 + 30, 0.5, "a renewal")
    print(f"renewal seen {time.monotonic() - t0:.1f} s after asking")
    again = dhcp()
    assert again["bound"] and again["address"] == first["address"], again
    assert "RENEW" in again["history"], again
    assert ping_from_work()


def test_server_stops_answering_the_lease_runs_out_and_the_chain_stays_closed(
        nic_stack, tmp_path):
    """The server stops (killed by its PID on the development machine): dhcpcd renews at
    T1, rebinds at T2, and at the lease's end drops address and route; netstack empties the
    virtual DNS map and says NO LEASE (status exits 1). From then on nothing leaves the NIC
    but DHCP and ARP, whatever work sends. The server back, a new lease (the same address:
    dnsmasq kept its lease file) and the chain works again."""
    lease_addr = dhcp()["address"].split("/")[0]
    pcap = str(tmp_path / "uplink-bound.pcap")
    # anti-test: the capture on the NIC sees work's ping while there is a lease
    with Capture(NET, "uplink", pcap) as cap:
        assert ping_from_work()
    seen = [x for x in cap.packets() if IP in x and ICMP in x and x[IP].src == lease_addr
            and x[IP].dst == SERVER]
    assert seen, "the capture on the NIC is blind: work's ping not seen"

    t_stop = time.monotonic()
    ask_server("stop", answering=False)
    print(f"server stopped {time.monotonic() - t_stop:.1f} s after asking")
    assert dhcp()["bound"]  # until the lease's end the chain keeps working on it
    # the lease ends at most LEASE s after its last renewal
    wait_for(lambda: not dhcp()["bound"], LEASE + 30, 0.5, "the lease to run out")
    gone_s = time.monotonic() - t_stop
    d = dhcp()
    print(f"lease gone {gone_s:.1f} s after the server stopped; events {d['history']}")
    assert d.get("reason") == "EXPIRE" or "EXPIRE" in d["history"], d
    st = sh(NETSTACK, "--stack", STACK, "status", check=False)
    assert st.returncode == 1 and "NO LEASE" in st.stdout, st.stdout
    assert "inet " not in sh("ip", "-n", NET, "-o", "addr", "show", "dev", "uplink").stdout
    assert "default" not in sh("ip", "-n", NET, "route").stdout
    ruleset = sh("ip", "netns", "exec", NET, "nft", "-j", "list", "map", "inet", "netstack",
                 "upstream_dns").stdout
    assert '"elem"' not in ruleset, ruleset  # the virtual DNS points nowhere

    # closed: work's probes (ping, lookups through the virtual DNS, TCP) leave nothing
    with Capture(NET, "uplink", str(tmp_path / "uplink-nolease.pcap")) as cap:
        assert not ping_from_work(1)
        assert lookup_from_work() == ""
        sh("ip", "netns", "exec", WORK, "curl", "-sS", "--max-time", "2",
           f"http://{SERVER}/", check=False, timeout=20)
        time.sleep(1)  # what the probes sent has reached the capture (one poll of it)
    bad = [x.summary() for x in cap.packets()
           if ARP not in x and not (UDP in x and {x[UDP].sport, x[UDP].dport} & {67, 68})]
    assert not bad, f"left sys-net without a lease: {bad}"

    t_start = time.monotonic()
    end = time.monotonic() + 120
    while not dhcp()["bound"]:  # the lease is the answer; the request is repeated
        assert time.monotonic() < end, "no new lease 120 s after the server was asked back"
        console("start")
        time.sleep(3)
    back_s = time.monotonic() - t_start
    d = dhcp()
    print(f"new lease {d['address']} {back_s:.1f} s after the server came back")
    assert d["address"].split("/")[0] == lease_addr, d
    assert wait_for(ping_from_work, 20, 0.5, "work's ping after the new lease")
    assert lookup_from_work() == SERVER
    assert sh(NETSTACK, "--stack", STACK, "status", check=False).returncode == 0


def test_down_gives_the_nic_back_under_its_own_name(nic_stack):
    """`down` moves the NIC back into the VM's root namespace as it was (name, MAC, no
    address), ends dhcpcd, and leaves the root namespace as it found it."""
    in_net = sh("ip", "netns", "pids", NET).stdout.split()
    assert in_net  # dhcpcd (in its bwrap) among them
    t0 = time.monotonic()
    p = sh(NETSTACK, "--stack", STACK, "down", check=False, timeout=300)
    print(f"down took {time.monotonic() - t0:.1f} s")
    assert p.returncode == 0, p.stderr
    reap_zombies()
    assert nic_in(None) == nic_stack["nic"]
    assert not [x for x in in_net if Path(f"/proc/{x}").exists()]
    assert not stack_leftovers(STACK)
    after = host_view()
    if without_ifindex(after) != without_ifindex(nic_stack["before"]):
        out = os.environ.get("NETSTACK_TEST_HOST_OUT")
        if out:
            Path(out, "nic-host-view.json").write_text(json.dumps(
                {"before": nic_stack["before"], "after": after}, indent=1))
    assert without_ifindex(after) == without_ifindex(nic_stack["before"])
    idx = [x.split(":")[0] for v in (nic_stack["before"], after)
           for x in v["links"].splitlines() if f"link/ether {NIC_MAC} " in x]
    print(f"{nic_stack['nic']} given back, ifindex {idx[0]} -> {idx[1]}")
