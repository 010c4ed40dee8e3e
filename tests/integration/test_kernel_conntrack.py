"""The kernel seam's conntrack calls (pyroute2's ctnetlink) act on the namespace they name
and on nothing else: a scratch namespace's ICMP and TCP connections are listed by source,
deleted one by one, and flushed; the root namespace's table is never read or changed by
them (root)."""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest

from netstack.kernel import RealKernel

pytestmark = pytest.mark.root


@pytest.fixture
def scratch():
    name = f"nstk-{os.environ.get('NETSTACK_TEST_STACK_PREFIX', '')}ct-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        def run(*argv: str) -> None:
            subprocess.run(["ip", "netns", "exec", name, *argv], check=True,
                           capture_output=True)
        run("ip", "link", "set", "lo", "up")
        run("ip", "addr", "add", "192.0.2.7/32", "dev", "lo")
        run("nft", "add table inet t; add chain inet t o { type filter hook output "
            "priority 0; ct state new accept; }")
        yield name, run
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_list_delete_and_flush_in_one_namespace(scratch):
    ns, run = scratch
    run("ping", "-c", "1", "-W", "1", "-I", "192.0.2.7", "127.0.0.1")
    listener = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c",
                                 "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', "
                                 "8080)); s.listen(); print('ok', flush=True); "
                                 "c,_=s.accept(); c.recv(1)"], stdout=subprocess.PIPE,
                                text=True)
    try:
        assert listener.stdout.readline().strip() == "ok"
        run("python3", "-c", "import socket; s=socket.create_connection(('127.0.0.1', 8080),"
            " source_address=('192.0.2.7', 40123)); s.send(b'x')")
        k = RealKernel()
        try:
            flows = k.conntrack_list(ns, "192.0.2.7")
            assert {(f.proto, f.dport, f.icmp_type) for f in flows} >= {
                ("icmp", None, 8), ("tcp", 8080, None)}, flows
            assert all(f.src == "192.0.2.7" for f in flows)
            assert not k.conntrack_list(ns, "192.0.2.99")
            tcp = next(f for f in flows if f.proto == "tcp")
            k.conntrack_delete(ns, tcp)
            left = k.conntrack_list(ns, "192.0.2.7")
            assert tcp not in left and any(f.proto == "icmp" for f in left)
            k.conntrack_delete(ns, tcp)  # gone already: no error
            k.conntrack_flush(ns)
            assert not k.conntrack_list(ns, "192.0.2.7")
        finally:
            k.close()
    finally:
        listener.kill()
        listener.wait()


def test_ipv6_sources_are_listed_deleted_and_flushed(scratch):
    """An IPv6 source is dumped with the IPv6 nfgen family (pyroute2's default AF_INET made
    the kernel refuse the dump's filter with EINVAL on every `[stack] ipv6 = true` stack),
    its entries deleted with it, and a flush clears both families."""
    ns, run = scratch
    run("ip", "addr", "add", "2001:db8::7/128", "dev", "lo", "nodad")
    run("ping", "-c", "1", "-W", "1", "-I", "192.0.2.7", "127.0.0.1")
    run("ping", "-6", "-c", "1", "-W", "1", "-I", "2001:db8::7", "::1")
    run("python3", "-c", "import socket; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM);"
        " s.bind(('2001:db8::7', 40124)); s.sendto(b'x', ('::1', 9))")
    k = RealKernel()
    try:
        six = k.conntrack_list(ns, "2001:db8::7")
        assert {(f.proto, f.dport, f.icmp_type) for f in six} >= {
            ("icmp", None, 128), ("udp", 9, None)}, six
        assert all(f.src == "2001:db8::7" for f in six)
        assert [f.src for f in k.conntrack_list(ns, "192.0.2.7")] == ["192.0.2.7"]
        udp = next(f for f in six if f.proto == "udp")
        k.conntrack_delete(ns, udp)
        left = k.conntrack_list(ns, "2001:db8::7")
        assert udp not in left and any(f.proto == "icmp" for f in left)
        k.conntrack_delete(ns, udp)  # gone already: no error
        k.conntrack_flush(ns)
        assert not k.conntrack_list(ns, "2001:db8::7")
        assert not k.conntrack_list(ns, "192.0.2.7")
    finally:
        k.close()
