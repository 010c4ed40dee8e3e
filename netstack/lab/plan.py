"""The built-in lab internet as part of the Plan (pure): an ISP router namespace linked to
sys-net's uplink and one namespace per lab host; documentation addresses only; no link to
the host. The lab's hosts are planned and applied by the same machinery as the qubes."""

from __future__ import annotations

import os
import sys
from typing import Any

from netstack import addressing, names
from netstack.lab.vpnserver import LAB_FILES, OVPN_PORT, OVPN_TCP_PORT, TUNNEL_NETS, WG_PORT
from netstack.model import (
    Addr,
    Daemon,
    LabHostInfo,
    LabPlan,
    LinkEnd,
    NsPlan,
    Plan,
    Route,
    Service,
    TorNode,
    Veth,
    VpnServer,
)

LAB_SYSCTLS = {"net/ipv6/conf/all/disable_ipv6": "1",
               "net/ipv6/conf/default/disable_ipv6": "1"}


def lab_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "lab")


def lab_files(state_dir: str) -> dict[str, str]:
    """Where the lab writes its provider-format client files (`lab:wireguard`, ...)."""
    return {ref: os.path.join(lab_dir(state_dir), f) for ref, f in LAB_FILES.items()}


def plan_lab(p: Plan, state_dir: str, vpn_keys: bool, tor: bool,
             ns_files: Any, sink: bool = False, bridge: bool = False,
             second_wg: bool = False, second_ovpn: bool = False,
             tor_clients: list[str] | None = None, wg_kernel: bool = False,
             isp_scenarios: tuple[str, ...] = (), openvpn_tcp: bool = False) -> None:
    """Add the lab to plan `p`. vpn_keys: a qube uses a lab provider file, so `up` makes
    the VPN server's keys and runs it; tor: a tor qube needs the private Tor network;
    tor_clients: the control sockets of the gateways on it (told of its first consensus);
    isp_scenarios: what the hostile ISP does (netstack/lab/isp.py), in its namespace only."""
    stack = p.stack
    net_ns = p.net.netns
    isp = names.lab_netns(stack, "isp")
    dns = addressing.lab_dns_server()
    isp_rules = None
    if isp_scenarios:
        from netstack.lab import isp as hostile

        isp_rules = hostile.ruleset(isp_scenarios, "cust0")
        p.daemons.extend(hostile.daemons(isp_scenarios, isp, "cust0", lab_dir(state_dir),
                                         vpn_keys))
    p.namespaces.append(NsPlan(isp, "lab:isp", {"net/ipv4/ip_forward": "1", **LAB_SYSCTLS},
                               isp_rules, ns_files(isp, [dns])))
    p.veths.append(Veth(isp, "cust0", net_ns, names.UPLINK_IF))
    plen = addressing.LAB_ISP_PREFIXLEN
    p.addrs += [Addr(isp, "cust0", f"{addressing.LAB_ISP_ROUTER}/{plen}"),
                Addr(net_ns, names.UPLINK_IF, f"{addressing.LAB_ISP_CUSTOMER}/{plen}")]
    p.routes.append(Route(net_ns, "default", names.UPLINK_IF, addressing.LAB_ISP_ROUTER))
    hosts: dict[str, LabHostInfo] = {}
    extra = []  # what real programs fetch (lab/content.py; it imports http.server, ~20 ms)
    if sink:
        from netstack.lab import content

        extra = content.hosts()
    for i, h in enumerate(addressing.lab_hosts(tor=tor, sink=sink, bridge=bridge) + extra):
        ns = names.lab_netns(stack, h.name)
        ifr = names.check_ifname(f"h{i}-{h.name}"[:15])
        fwd = "1" if h.name == "vpn" else "0"
        p.namespaces.append(NsPlan(ns, f"lab:{h.name}", {"net/ipv4/ip_forward": fwd,
                                                          **LAB_SYSCTLS},
                                   _lab_vpn_ruleset() if h.name == "vpn" else
                                   _sink_ruleset() if h.name == "sink" else None,
                                   ns_files(ns, [dns])))
        p.veths.append(Veth(isp, ifr, ns, "eth0"))
        gw = addressing.LAB_HOST_GATEWAY
        p.addrs += [Addr(isp, ifr, f"{gw}/32"), Addr(ns, "eth0", f"{h.address}/32")]
        p.routes += [Route(isp, f"{h.address}/32", ifr), Route(ns, f"{gw}/32", "eth0"),
                     Route(ns, "default", "eth0", gw)]
        hosts[h.name] = LabHostInfo(h.name, ns, h.address, h.fqdn)
    p.services.append(Service("lab-http", hosts["web"].netns, "http", hosts["web"].address, 80))
    zone = {h.fqdn: h.address for h in hosts.values()}
    d = lab_dir(state_dir)
    if sink:
        from netstack.lab.sink import PORT

        zone["*"] = hosts["sink"].address
        p.services.append(Service("lab-sink", hosts["sink"].netns, "sink", "0.0.0.0", PORT,
                                  {"lab_dir": d}))
        content.plan(p.daemons, zone, {n: h.netns for n, h in hosts.items()}, d, state_dir)
    p.services.append(Service("lab-dns", hosts["dns"].netns, "dns", hosts["dns"].address, 53,
                              zone))
    vs = VpnServer(hosts["vpn"].netns, "eth0", hosts["vpn"].address, WG_PORT, OVPN_PORT,
                   names.check_ifname(f"wgs-{stack}"), lab_files(state_dir),
                   names.check_ifname(f"wgt-{stack}") if second_wg else None, second_ovpn,
                   openvpn_tcp)
    if vpn_keys and vs.wg2_dev:  # a second server to fail over to (lab:wireguard2)
        p.daemons.append(Daemon("lab-wireguard2", vs.netns, ("wireguard-go", "-f", vs.wg2_dev),
                                True, (sys.executable, "-m", "netstack.vpn.hook",
                                       os.path.join(d, "wg2-server-hook.json")),
                                requires=os.path.join(d, "wg2-server-hook.json"),
                                ready="hook"))
    if vpn_keys and vs.openvpn2:  # a second OpenVPN server (lab:openvpn2)
        p.daemons.append(Daemon("lab-openvpn2", vs.netns,
                                ("openvpn", "--config", os.path.join(d, "ovpn2-server.conf")),
                                requires=os.path.join(d, "ovpn2-server.conf"),
                                ready=f"udp/{OVPN_PORT + 1}"))
    if vpn_keys and vs.openvpn_tcp:  # OpenVPN over TCP 443 (lab:openvpn-tcp)
        p.daemons.append(Daemon("lab-openvpn-tcp", vs.netns,
                                ("openvpn", "--config", os.path.join(d, "ovpn-tcp-server.conf")),
                                requires=os.path.join(d, "ovpn-tcp-server.conf"),
                                ready=f"tcp/{OVPN_TCP_PORT}"))
    if vpn_keys:
        # wg_kernel: the kernel's WireGuard, held by the keeper the VPN qube's kernel
        # backend uses (the same hook configures both)
        wg = (sys.executable, "-m", "netstack.vpn.kernelwg", vs.wg_dev) if wg_kernel \
            else ("wireguard-go", "-f", vs.wg_dev)
        p.daemons.append(Daemon("lab-wireguard", vs.netns, wg,
                                True, (sys.executable, "-m", "netstack.vpn.hook",
                                       os.path.join(d, "wg-server-hook.json")),
                                requires=os.path.join(d, "wg-server-hook.json"),
                                ready="hook"))
        p.daemons.append(Daemon("lab-openvpn", vs.netns,
                                ("openvpn", "--config", os.path.join(d, "ovpn-server.conf")),
                                requires=os.path.join(d, "ovpn-server.conf"),
                                ready=f"udp/{OVPN_PORT}"))
        if any(f.natpmp for q in p.qubes for f in getattr(q.info, "forwards", ())):
            # a VPN qube asks for a port by NAT-PMP: the server answers as ProtonVPN's
            p.daemons.append(Daemon("lab-natpmp", vs.netns, natpmp_argv(hosts["vpn"].address),
                                    ready="udp/5351"))
    tor_nodes: dict[str, TorNode] = {}
    if tor:
        from netstack.tor.network import DIR_PORT, OR_PORT, node_role

        for h in hosts.values():
            role = node_role(h.name)
            if role:
                tor_nodes[h.name] = TorNode(h.name, role, h.address, OR_PORT, DIR_PORT,
                                            h.netns, os.path.join(d, "tor", h.name))
        auths = [n for n in tor_nodes.values() if n.role == "authority"]
        for node in tor_nodes.values():
            # the first authority's hook releases the held first vote once every relay is
            # in (netstack.tor.firstvote; docs/field-notes.md, "The first consensus")
            hook = (sys.executable, "-m", "netstack.tor.firstvote",
                    *(x for a in auths for x in ("--auth", a.control)),
                    *(x for n in tor_nodes.values() if n.role != "bridge"
                      for x in ("--expect", n.name)),
                    *(x for c in tor_clients or () for x in ("--client", c))) \
                if auths and node is auths[0] else ()
            p.daemons.append(Daemon(f"lab-tor-{node.name}", node.netns,
                                    ("tor", "-f", node.torrc), post_start=hook,
                                    requires=node.torrc))
    p.lab = LabPlan(d, addressing.LAB_DOMAIN, hosts,
                    LinkEnd(isp, "cust0", addressing.LAB_ISP_ROUTER),
                    LinkEnd(net_ns, names.UPLINK_IF, addressing.LAB_ISP_CUSTOMER), vs,
                    tor_nodes, vpn_keys, isp_scenarios)
    if isp_scenarios and "connectivity_check" not in p.net.settings:
        # a hostile ISP's lab checks connectivity as NetworkManager does, against the lab's
        # web host (status names a captive portal; netstack/connectivity.py)
        from netstack.lab.isp import CHECK_PATH

        p.net.settings["connectivity_check"] = f"http://{hosts['web'].fqdn}{CHECK_PATH}"


def natpmp_argv(public: str) -> tuple[str, ...]:
    """The lab's NAT-PMP gateway (lab/natpmpd.py) on each WireGuard and OpenVPN server's
    tunnel address, for clients in the tunnel networks."""
    listen = [x for net in TUNNEL_NETS
              for x in ("--listen", net.split("/")[0].rsplit(".", 1)[0] + ".1")]
    return (sys.executable, "-m", "netstack.lab.natpmpd", "--public", public, *listen,
            *(x for net in TUNNEL_NETS for x in ("--clients", net)))


def _sink_ruleset() -> dict[str, Any]:
    """Every TCP and UDP port of the sink goes to its one service (lab/sink.py)."""
    from netstack.lab.sink import PORT
    from netstack.rules.nft import accept_all, l4proto, redirect

    rs = accept_all()
    rs["nat_prerouting"].add(l4proto("tcp", "udp"), redirect(PORT), comment="any port -> sink")
    return rs.to_json()


def _lab_vpn_ruleset() -> dict[str, Any]:
    """The lab VPN server forwards and masquerades tunnel traffic to the lab internet, and,
    as a provider's server does, never sends a tunnel client's address out in clear: a
    reply de-NATed to a client after its tunnel device went (the lab's `down` ends the
    server's daemon before its namespace) was routed out eth0 to 10.66.0.2, and leaktest's
    `down` scenario saw it on the lab's links (CI 2026-12-07)."""
    from netstack.rules.nft import DROP, MASQUERADE, accept_all, ip_daddr, ip_saddr, oifname

    rs = accept_all()
    for net in TUNNEL_NETS:
        a, plen = net.split("/")
        pfx = {"prefix": {"addr": a, "len": int(plen)}}
        rs["forward"].add(ip_daddr(pfx), oifname("eth0"), DROP,
                          comment=f"tunnel {net} never in clear")
        rs["nat_postrouting"].add(ip_saddr(pfx), oifname("eth0"), MASQUERADE,
                                  comment=f"tunnel {net} out")
    return rs.to_json()
