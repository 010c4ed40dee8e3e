"""The DHCP hook's pure parts: the lease state from dhcpcd's events, the DNS map it loads
(emptied when the lease goes), and what status says (issue 16)."""

from __future__ import annotations

from netstack import dhcp
from netstack.kinds.registry import RUNTIMES

BOUND = {"reason": "BOUND", "new_ip_address": "192.0.2.7", "new_subnet_cidr": "24",
         "new_routers": "192.0.2.1", "new_domain_name_servers": "192.0.2.53 192.0.2.54",
         "new_dhcp_lease_time": "120"}


def test_events_make_the_lease():
    a = dhcp.apply_event(None, {"reason": "PREINIT"}, 1.0)
    assert not a.bound and a.history == ["PREINIT"]
    b = dhcp.apply_event(a, BOUND, 2.0)
    assert b.bound and b.address == "192.0.2.7/24" and b.routers == ["192.0.2.1"]
    assert b.dns == ["192.0.2.53", "192.0.2.54"] and b.lease_s == 120 and b.renewals == 0
    c = dhcp.apply_event(b, {**BOUND, "reason": "RENEW"}, 3.0)
    assert c.bound and c.renewals == 1
    d = dhcp.apply_event(c, {"reason": "CARRIER"}, 4.0)  # no news: the lease stands
    assert d.bound and d.dns == c.dns and d.at == c.at and d.history[-1] == "CARRIER"
    for gone in ("NAK", "EXPIRE", "NOCARRIER", "STOP"):
        e = dhcp.apply_event(c, {"reason": gone}, 5.0)
        assert not e.bound and e.dns == [] and e.address is None and e.renewals == 1
    many = a
    for i in range(20):
        many = dhcp.apply_event(many, {"reason": f"E{i}"}, float(i))
    assert len(many.history) == 8 and many.history[-1] == "E19"


def test_dns_map_follows_the_lease():
    cmds = dhcp.map_commands(["192.0.2.53", "192.0.2.54", "192.0.2.55"])
    assert cmds[0] == {"flush": {"map": {"family": "inet", "table": "netstack",
                                         "name": dhcp.DNS_MAP}}}
    assert cmds[1]["add"]["element"]["elem"] == [["10.139.1.1", "192.0.2.53"],
                                                 ["10.139.1.2", "192.0.2.54"]]
    one = dhcp.map_commands(["192.0.2.53", "2001:db8::1"])  # IPv6 resolvers are not used
    assert one[1]["add"]["element"]["elem"] == [["10.139.1.1", "192.0.2.53"],
                                                ["10.139.1.2", "192.0.2.53"]]
    assert dhcp.map_commands([]) == cmds[:1]  # no lease: empty, lookups are dropped


def test_hook_writes_state_and_map(tmp_path, monkeypatch):
    applied = []

    class K:
        def nft(self, ns, cmds):
            applied.append((ns, cmds))

        def close(self):
            pass

    f = str(tmp_path / "lease.json")
    dhcp.hook(f, "dynamic", BOUND, K())
    assert dhcp.read_lease(f).bound and applied[-1][0] is None  # in dhcpcd's namespace
    dhcp.hook(f, "dynamic", {**BOUND, "reason": "RENEW"}, K())
    assert len(applied) == 1  # same resolvers: the map is not touched
    dhcp.hook(f, "dynamic", {"reason": "EXPIRE"}, K())
    assert applied[-1][1]["nftables"] == dhcp.map_commands([])
    dhcp.hook(f, "static", BOUND, K())  # `dns` in the config: the map is not ours to fill
    assert len(applied) == 2 and dhcp.read_lease(f).bound


def test_status_lines_and_health():
    role = RUNTIMES["net"]
    up = {"dhcp": {"dev": "uplink", "bound": True, "address": "192.0.2.7/24",
                   "routers": ["192.0.2.1"], "dns": ["192.0.2.53"], "lease_s": 120,
                   "renewals": 2, "reason": "RENEW", "age_s": 3.2}}
    assert role.status_lines(up) == ["dhcp uplink: 192.0.2.7/24 via 192.0.2.1, dns "
                                     "192.0.2.53 (lease 120 s, 2 renewals, last RENEW 3 s ago)"]
    assert role.health(up) == []
    down = {"dhcp": {"dev": "uplink", "bound": False, "reason": "NAK"}}
    assert "NO LEASE (last event NAK)" in role.status_lines(down)[0]
    assert role.health(down) == ["no DHCP lease on uplink (last event NAK): nothing leaves "
                                 "until one comes"]
    assert role.status_lines({}) == [] and role.health({}) == []


def test_dhcpcd_runs_its_hook_from_its_own_tmpfs_not_from_run_netstack():
    """A Debian host mounts /run noexec: dhcpcd executing the hook under /run/netstack got
    "Permission denied" at every event and sys-net never had a lease (scripts/test-host's
    VM, tests/host/test_nic.py). The hook is copied into bwrap's own /run first."""
    info = dhcp.DhcpInfo("sys-net", "nst-x-sys-net", "uplink", "/run/netstack/x", True)
    argv = list(dhcp.argv(info))
    view = argv[argv.index("--") + 1:]
    run = argv.index("--tmpfs")
    assert argv[run + 1] == "/run"  # the view's /run is bwrap's tmpfs (exec allowed)
    script = argv[argv.index("--script") + 1]
    assert script == dhcp.HOOK_IN_VIEW and script.startswith("/run/")
    assert not script.startswith(info.state_dir)
    # the copy is made before dhcpcd starts, from the hook `up` wrote
    assert view[:2] == ["/bin/sh", "-c"] and view[4:6] == [info.script, script]
    assert view[6] == "dhcpcd" and argv[-1] == "uplink"
