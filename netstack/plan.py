"""The Plan: everything `up` will make, derived from the topology by pure functions.

`netstack plan --json` prints it; apply.py makes it real; status, down and the audit read
it back from the state file instead of re-deriving the topology their own way.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from netstack import addressing, names, state
from netstack.addressing import VIRTUAL_DNS
from netstack.config import Topology
from netstack.errors import ConfigError
from netstack.lab.vpnserver import LAB_FILES, OVPN_PORT, TUNNEL_NETS, WG_PORT, LabVpn
from netstack.roles import role_for
from netstack.roles.base import Client, Daemon, QubeContext
from netstack.tor.gateway import TOR_USER, TorInfo, tor_uid, torrc
from netstack.vpn.runtime import vpn_info

NSSWITCH = ("passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
            "networks: files\nprotocols: files\nservices: files\nethers: files\nrpc: files\n")


@dataclass
class NsPlan:
    name: str
    owner: str  # "qube:NAME" or "lab:HOST"
    sysctls: dict[str, str]
    ruleset: dict[str, Any] | None
    files: dict[str, str]  # absolute path -> content (/etc/netns/NS/...)


@dataclass
class Veth:
    ns_a: str | None  # None: the namespace netstack runs in (nat uplink mode only)
    if_a: str
    ns_b: str
    if_b: str


@dataclass
class MoveDev:
    dev: str
    ns: str
    new_name: str


@dataclass
class Addr:
    ns: str | None  # None: the namespace netstack runs in (nat uplink mode only)
    ifname: str
    cidr: str


@dataclass
class Route:
    ns: str | None
    dst: str  # "default" or a prefix
    dev: str
    via: str | None = None  # via is on-link (point-to-point /32 links)


@dataclass
class HostNat:
    """--uplink-mode nat: what is added to the namespace netstack runs in (the host): a
    veth to sys-net, forwarding on, and a table of our own that masquerades to `dev`."""

    dev: str
    veth: str
    subnet: str
    table: str


@dataclass
class Service:
    """A lab service run by the supervisor on sockets `up` opens in the namespace."""

    name: str
    netns: str
    type: str  # http | dns
    bind: str
    port: int
    zone: dict[str, str] = field(default_factory=dict)


@dataclass
class QubeInfo:
    name: str
    kind: str
    netvm: str | None
    label: str
    qid: int
    netns: str
    ipv4: str
    ipv6: str | None
    gateway: str | None
    interfaces: list[str]


@dataclass
class UplinkSpec:
    mode: str  # lab | move | nat
    dev: str | None = None


@dataclass
class Plan:
    stack: str
    uplink: UplinkSpec
    qubes: list[QubeInfo]
    namespaces: list[NsPlan]
    veths: list[Veth]
    moves: list[MoveDev]
    addrs: list[Addr]
    routes: list[Route]
    services: list[Service]
    daemons: list[Daemon]
    lab: dict[str, Any] | None
    host_nat: HostNat | None = None
    upstream_dns: list[str] = field(default_factory=list)
    vpns: list[dict[str, Any]] = field(default_factory=list)
    tors: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def ns(self, name: str) -> NsPlan:
        return next(n for n in self.namespaces if n.name == name)


def _ns_files(ns: str, nameservers: list[str]) -> dict[str, str]:
    base = f"/etc/netns/{ns}"
    return {
        f"{base}/resolv.conf": "".join(f"nameserver {n}\n" for n in nameservers),
        f"{base}/nsswitch.conf": NSSWITCH,
    }


def upstream_dns(topo: Topology, uplink: UplinkSpec, host_resolv: str = "") -> list[str]:
    """Real resolvers for the net qube: the lab DNS server, the config, or the host's
    resolv.conf (loopback stubs like systemd-resolved's cannot be reached from a namespace)."""
    if uplink.mode == "lab":
        return [addressing.lab_dns_server()]
    net = topo.root
    if "dns" in net.settings:
        return list(net.settings["dns"])
    found = []
    for line in host_resolv.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and not parts[1].startswith("127."):
            found.append(parts[1])
    if not found:
        raise ConfigError(f"qube {net.name!r} field 'dns'",
                          "the host has no usable resolver (only a loopback stub)",
                          'set dns = ["IP of your router or resolver"]')
    return found[:2]


def build(topo: Topology, stack: str, uplink: UplinkSpec, host_resolv: str = "",
          lab: LabVpn | None = None) -> Plan:
    """Pure (given the provider files it reads): the whole stack as data. `lab`: the lab
    VPN server's generated files, when the lab is wanted with its VPN server."""
    names.check_stack(stack)
    addrs = addressing.plan_addresses(topo)
    resolvers = upstream_dns(topo, uplink, host_resolv)
    p = Plan(stack, uplink, [], [], [], [], [], [], [], [], None, upstream_dns=resolvers)
    sdir = state.stack_dir(stack)
    config_dir = os.path.dirname(os.path.abspath(topo.source)) if topo.source != "<memory>" \
        else os.getcwd()
    lab_files = {ref: lab.path(f) for ref, f in LAB_FILES.items()} if lab else None
    if any(q.kind == "tor" for q in topo.qubes) and uplink.mode == "lab" and lab \
            and not lab.dirauths:
        raise ConfigError("--lab", "a tor qube needs the lab's private Tor network",
                          "internal: generate the lab with tor=True")
    net = topo.root
    for q in topo.tree_order():
        a = addrs[q.name]
        ns = names.qube_netns(stack, q.name)
        clients = tuple(Client(c.name, names.vif(addrs[c.name].qid), addrs[c.name])
                        for c in topo.children(q.name))
        up_if = names.UPLINK_IF if q.kind == "net" else names.UPSTREAM_IF
        extra: dict[str, Any] = {}
        if q.kind == "vpn":
            info = vpn_info(q, a.qid, stack, a.gateway4 or "", sdir, config_dir, lab_files)
            extra["vpn"] = info
            p.vpns.append(dataclasses.asdict(info))
        if q.kind == "tor":
            tinfo = TorInfo(q.name, ns, a.ipv4, sdir, TOR_USER, tor_uid(),
                            list(lab.dirauths) if lab and uplink.mode == "lab" else [],
                            list(q.settings.get("bridges", [])))
            extra["tor"] = tinfo
            p.tors.append({**dataclasses.asdict(tinfo), "torrc": torrc(tinfo),
                           "datadir": tinfo.datadir, "torrc_path": tinfo.torrc_path,
                           "control_socket": tinfo.control_socket})
        ctx = QubeContext(topo, q, a, stack, up_if, clients,
                          tuple(resolvers) if q.kind == "net" else (), extra)
        role = role_for(q.kind)
        p.namespaces.append(NsPlan(ns, f"qube:{q.name}", role.sysctls(ctx),
                                   role.ruleset(ctx).to_json(), _ns_files(ns, list(VIRTUAL_DNS))))
        p.daemons.extend(role.daemons(ctx))
        p.qubes.append(QubeInfo(q.name, q.kind, q.netvm, q.label, a.qid, ns, a.ipv4, a.ipv6,
                                a.gateway4, [up_if] + [c.vif for c in clients]))
        if q.netvm:  # the link to the netvm: /32 point-to-point both ends
            up_ns = names.qube_netns(stack, q.netvm)
            vif = names.vif(a.qid)
            p.veths.append(Veth(up_ns, vif, ns, names.UPSTREAM_IF))
            gw = addrs[q.netvm]
            p.addrs += [Addr(ns, names.UPSTREAM_IF, f"{a.ipv4}/32"),
                        Addr(up_ns, vif, f"{gw.ipv4}/32")]
            p.routes += [Route(ns, f"{gw.ipv4}/32", names.UPSTREAM_IF),
                         Route(ns, "default", names.UPSTREAM_IF, gw.ipv4),
                         Route(up_ns, f"{a.ipv4}/32", vif)]
            if topo.ipv6 and a.ipv6 and gw.ipv6:
                p.addrs += [Addr(ns, names.UPSTREAM_IF, f"{a.ipv6}/128"),
                            Addr(up_ns, vif, f"{gw.ipv6}/128")]
                p.routes += [Route(ns, f"{gw.ipv6}/128", names.UPSTREAM_IF),
                             Route(ns, "default6", names.UPSTREAM_IF, gw.ipv6),
                             Route(up_ns, f"{a.ipv6}/128", vif)]
    net_ns = names.qube_netns(stack, net.name)
    if uplink.mode == "lab":
        _plan_lab(p, net_ns, lab)
    elif uplink.mode == "move":
        if not uplink.dev:
            raise ConfigError("--uplink", "missing device name", "give --uplink DEV")
        p.moves.append(MoveDev(uplink.dev, net_ns, names.UPLINK_IF))
        address, gateway = net.settings.get("address"), net.settings.get("gateway")
        if not address or not gateway:
            raise ConfigError(f"qube {net.name!r} field 'address'",
                              "a moved uplink needs a static address and gateway",
                              'set address = "192.168.1.50/24" and gateway = "192.168.1.1"')
        p.addrs.append(Addr(net_ns, names.UPLINK_IF, address))
        p.routes.append(Route(net_ns, "default", names.UPLINK_IF, gateway))
    elif uplink.mode == "nat":
        if not uplink.dev:
            raise ConfigError("--uplink", "missing device name", "give --uplink DEV")
        net_a = ipaddress.ip_network(nat_subnet(stack))
        host_ip, sysnet_ip = (str(net_a.network_address + 1), str(net_a.network_address + 2))
        veth = names.root_uplink_veth(stack)
        p.veths.append(Veth(None, veth, net_ns, names.UPLINK_IF))
        p.addrs += [Addr(None, veth, f"{host_ip}/30"),
                    Addr(net_ns, names.UPLINK_IF, f"{sysnet_ip}/30")]
        p.routes.append(Route(net_ns, "default", names.UPLINK_IF, host_ip))
        p.host_nat = HostNat(uplink.dev, veth, str(net_a), f"netstack_{stack}")
    else:
        raise ConfigError("--uplink-mode", f"{uplink.mode!r} is not supported",
                          "use --lab, or --uplink DEV with --uplink-mode move or nat")
    return p


def nat_subnet(stack: str) -> str:
    """A /30 for the host<->sys-net link in nat mode, from 10.136.0.0/16, by stack name."""
    import zlib

    n = zlib.crc32(stack.encode()) % (1 << 14)
    return str(ipaddress.ip_network("10.136.0.0/16").network_address + n * 4) + "/30"


def _plan_lab(p: Plan, net_ns: str, lab: LabVpn | None) -> None:
    """The simulated internet: an ISP router namespace linked to sys-net's uplink and to one
    namespace per lab host; documentation addresses only; no link to the host."""
    stack = p.stack
    isp = names.lab_netns(stack, "isp")
    dns = addressing.lab_dns_server()
    lab_sysctls = {"net/ipv6/conf/all/disable_ipv6": "1",
                   "net/ipv6/conf/default/disable_ipv6": "1"}
    p.namespaces.append(NsPlan(isp, "lab:isp", {"net/ipv4/ip_forward": "1", **lab_sysctls},
                               None, _ns_files(isp, [dns])))
    p.veths.append(Veth(isp, "cust0", net_ns, names.UPLINK_IF))
    plen = addressing.LAB_ISP_PREFIXLEN
    p.addrs += [Addr(isp, "cust0", f"{addressing.LAB_ISP_ROUTER}/{plen}"),
                Addr(net_ns, names.UPLINK_IF, f"{addressing.LAB_ISP_CUSTOMER}/{plen}")]
    p.routes.append(Route(net_ns, "default", names.UPLINK_IF, addressing.LAB_ISP_ROUTER))
    with_tor = bool(lab and lab.tor_dir)
    lab_hosts = addressing.lab_hosts(tor=with_tor)
    zone = {h.fqdn: h.address for h in lab_hosts}
    hosts = {}
    for i, h in enumerate(lab_hosts):
        ns = names.lab_netns(stack, h.name)
        ifr = names.check_ifname(f"h{i}-{h.name}"[:15])
        fwd = "1" if h.name == "vpn" else "0"
        p.namespaces.append(NsPlan(ns, f"lab:{h.name}", {"net/ipv4/ip_forward": fwd,
                                                          **lab_sysctls},
                                   _lab_vpn_ruleset() if h.name == "vpn" else None,
                                   _ns_files(ns, [dns])))
        p.veths.append(Veth(isp, ifr, ns, "eth0"))
        gw = addressing.LAB_HOST_GATEWAY
        p.addrs += [Addr(isp, ifr, f"{gw}/32"), Addr(ns, "eth0", f"{h.address}/32")]
        p.routes += [Route(isp, f"{h.address}/32", ifr), Route(ns, f"{gw}/32", "eth0"),
                     Route(ns, "default", "eth0", gw)]
        hosts[h.name] = {"netns": ns, "address": h.address, "fqdn": h.fqdn}
    p.services.append(Service("lab-http", names.lab_netns(stack, "web"), "http",
                              hosts["web"]["address"], 80))
    p.services.append(Service("lab-dns", names.lab_netns(stack, "dns"), "dns",
                              hosts["dns"]["address"], 53, zone))
    if lab:
        vns = hosts["vpn"]["netns"]
        p.daemons.append(Daemon("lab-wireguard", vns, ("wireguard-go", "-f", lab.wg_server_dev),
                                True, (sys.executable, "-m", "netstack.vpn.hook",
                                       lab.path("wg-server-hook.json"))))
        p.daemons.append(Daemon("lab-openvpn", vns, ("openvpn", "--config",
                                                     lab.path("ovpn-server.conf"))))
    if lab and lab.tor_dir:
        from netstack.tor.network import DIR_PORT, OR_PORT, lab_nodes

        for n in lab_nodes(lab_hosts):
            p.daemons.append(Daemon(f"lab-tor-{n.name}", hosts[n.name]["netns"],
                                    ("tor", "-f", os.path.join(lab.tor_dir, n.name, "torrc"))))
        tor_nodes = {n.name: {"role": n.role, "address": n.host.address, "or_port": OR_PORT,
                              "dir_port": DIR_PORT, "netns": hosts[n.name]["netns"],
                              "control": os.path.join(lab.tor_dir, n.name, "control")}
                     for n in lab_nodes(lab_hosts)}
    else:
        tor_nodes = {}
    p.lab = {"hosts": hosts, "tor_nodes": tor_nodes,
             "isp_router": {"netns": isp, "interface": "cust0",
                            "address": addressing.LAB_ISP_ROUTER},
             "isp_link": {"netns": net_ns, "interface": names.UPLINK_IF,
                          "address": addressing.LAB_ISP_CUSTOMER},
             "domain": addressing.LAB_DOMAIN,
             "vpn_server": {"netns": hosts["vpn"]["netns"], "interface": "eth0",
                            "address": hosts["vpn"]["address"],
                            "wireguard_port": WG_PORT, "openvpn_port": OVPN_PORT,
                            "files": {ref: lab.path(f) for ref, f in LAB_FILES.items()}
                            if lab else {}}}


def _lab_vpn_ruleset() -> dict[str, Any]:
    """The lab VPN server forwards and masquerades tunnel traffic to the lab internet."""
    from netstack.rules.nft import MASQUERADE, Ruleset, ip_saddr, oifname

    rs = Ruleset()
    for c in ("input", "forward", "output"):
        rs[c].policy = "accept"
    for net in TUNNEL_NETS:
        a, plen = net.split("/")
        rs["nat_postrouting"].add(ip_saddr({"prefix": {"addr": a, "len": int(plen)}}),
                                  oifname("eth0"), MASQUERADE, comment=f"tunnel {net} out")
    return rs.to_json()
