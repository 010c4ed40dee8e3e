"""The Plan: everything `up` will make, derived from the topology by pure functions.

`load_inputs` reads what a plan depends on (the config, each provider file, the host's
resolv.conf): once per command. `build` is pure: no subprocess, no key, no passwd or state
read; keys are generated at `up` (lab placeholders stand in for them here). `netstack plan
--json` prints the result; the state file holds it; every reader gets it back typed.

Each qube is derived by its kind's spec (the topology carries the kinds it was validated
with); `build` copies what other layers need to know of a kind into the plan (its traits,
its tunnel, where its clients resolve, what their commands are told), so no reader of the
plan ever looks a kind up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netstack import addressing, config, names
from netstack.addressing import VIRTUAL_DNS
from netstack.config import Topology
from netstack.errors import ConfigError
from netstack.hostcaps import HostCaps
from netstack.kinds.spec import QubeContext
from netstack.lab import plan as labplan
from netstack.model import (
    Addr,
    Client,
    HostNat,
    MoveDev,
    NsPlan,
    Plan,
    QubeInfo,
    Route,
    UplinkSpec,
    Veth,
)

NSSWITCH = ("passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
            "networks: files\nprotocols: files\nservices: files\nethers: files\nrpc: files\n")
CONFIG_DIR = config.shipped_configs(Path(__file__).resolve().parent.parent)
DEFAULT_CONFIG = CONFIG_DIR / "tor-over-vpn.toml"

__all__ = ["Inputs", "Plan", "UplinkSpec", "build", "load_inputs"]


@dataclass
class Inputs:
    """What a plan is derived from, read once per command. `providers`: per VPN qube, the
    provider file's path and its parsed content (secrets stay in memory, never in the
    plan); lab provider files are parsed from placeholders until `up` makes the keys."""

    topo: Topology
    config_path: str
    providers: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)
    host_resolv: str = ""
    caps: HostCaps = field(default_factory=HostCaps)  # what the kernel offers (probed)
    text: str = ""  # the config file as read (a live change re-parses it, never re-reads)


def load_inputs(config_path: str | None, stack: str, uplink: UplinkSpec,
                kinds: config.Kinds, overlay: dict[str, list[Any]] | None = None,
                live: bool = False, probe: bool = True) -> Inputs:
    """Read and validate the config and the provider files it names (no host change), with
    the rule lists `netstack firewall` changed (the stack's overlay, or `overlay`)."""
    from netstack.lab.vpnserver import TEMPLATES
    from netstack.names import stack_dir
    from netstack.rules.qubefw import load_overlay
    from netstack.vpn import runtime

    path = config.resolve(config_path, CONFIG_DIR) if config_path else str(DEFAULT_CONFIG)
    text = config.read_text(path, path, "give the path of a TOML config")
    topo = config.parse(text, kinds, path, load_overlay(stack) if overlay is None else overlay,
                        live)
    config_dir = os.path.dirname(os.path.abspath(path))
    lab_files = labplan.lab_files(stack_dir(stack)) if uplink.mode == "lab" else None
    providers: dict[str, list[tuple[str, Any]]] = {}
    for q in topo.qubes:
        for ref in kinds[q.kind].provider_refs(q):
            p = runtime.provider_path(q, ref, config_dir, lab_files)
            if ref.startswith("lab:"):
                where = f"qube {q.name!r} field 'config'"
                cfg = runtime.parse_provider(q.settings["type"], TEMPLATES[ref](), p, where)
            else:
                cfg = runtime.read_provider(q, p)
            providers.setdefault(q.name, []).append((p, cfg))
    for q in topo.qubes:  # secrets files: root's alone, or refused before anything
        for key, secret in kinds[q.kind].private_files(q):
            config.check_private_file(f"qube {q.name!r} field {key!r}", secret)
    host_resolv = ""
    if uplink.mode != "lab":
        with contextlib.suppress(OSError):
            host_resolv = Path("/etc/resolv.conf").read_text()
    from netstack import hostcaps

    wants: dict[str, bool] = {}
    for q in topo.qubes:  # probe only what some qube could use
        for cap in kinds[q.kind].host_caps(q):
            wants[cap] = True
    check_policy(topo, config_dir)  # a bad policy refuses `up`: nothing is made
    caps = hostcaps.probe(**wants) if probe else HostCaps()
    return Inputs(topo, path, providers, host_resolv, caps, text)


def check_policy(topo: Topology, config_dir: str) -> None:
    """The call layer's policy directory parses and names only app qubes of the config
    (netstack.policy); the services directory, if named, exists."""
    from netstack import policy

    facts = {q.name: policy.QubeFacts(frozenset(q.tags))
             for q in topo.qubes if topo.kinds[q.kind].traits.sandboxed}
    pol = policy.load(os.path.join(config_dir, topo.policy), topo.policy)
    policy.check_names(pol, facts)
    import pwd

    for r in pol.rules:  # an account a call would run as must exist, or the call fails late
        user = r.param("user")
        if user:
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise ConfigError(r.where, f"user={user}: no such account on this host",
                                  f"create it (useradd --system {user}), or drop user=") \
                    from None
    if topo.services and not os.path.isdir(os.path.join(config_dir, topo.services)):
        raise ConfigError("[stack] field 'services'", f"{topo.services!r} is not a directory "
                          f"(relative to {config_dir})", "create it, or drop the key")


def with_overlay(inputs: Inputs, overlay: dict[str, list[Any]], live: bool = False) -> Inputs:
    """The same inputs with other rule lists (`netstack firewall`'s change): the config
    text is parsed again, nothing is read or probed again (one read per command). Rule
    lists change no provider file and no host capability."""
    from dataclasses import replace

    topo = config.parse(inputs.text, inputs.topo.kinds, inputs.config_path, overlay, live)
    return replace(inputs, topo=topo)


def _ns_files(ns: str, nameservers: list[str], qube: str | None = None) -> dict[str, str]:
    """What `ip netns exec` binds over /etc inside the namespace: the chain's resolvers,
    files-then-dns lookups, and for a qube its own hostname and hosts (never the host's
    name, which would tell a workstation where it runs)."""
    base = f"/etc/netns/{ns}"
    files = {
        f"{base}/resolv.conf": "".join(f"nameserver {n}\n" for n in nameservers),
        f"{base}/nsswitch.conf": NSSWITCH,
    }
    if qube:
        files[f"{base}/hostname"] = f"{qube}\n"
        files[f"{base}/hosts"] = (f"127.0.0.1\tlocalhost\n127.0.1.1\t{qube}\n"
                                  "::1\tlocalhost ip6-localhost ip6-loopback\n")
    return files


def dhcp_uplink(topo: Topology, uplink: UplinkSpec) -> bool:
    """A moved uplink without a static address takes its address from DHCP."""
    s = topo.root.settings
    return uplink.mode == "move" and "address" not in s and "gateway" not in s


def upstream_dns(topo: Topology, uplink: UplinkSpec, host_resolv: str = "") -> list[str]:
    """Real resolvers for the net qube: the lab DNS server, the config, the DHCP lease's
    (known at run time: none here), or the host's resolv.conf (loopback stubs like
    systemd-resolved's cannot be reached from a namespace)."""
    if uplink.mode == "lab":
        return [addressing.lab_dns_server()]
    net = topo.root
    if "dns" in net.settings:
        return list(net.settings["dns"])
    if dhcp_uplink(topo, uplink):
        return []
    found = []
    for line in host_resolv.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and not parts[1].startswith("127.") \
                and addressing.ip_version(parts[1]) == 4:
            found.append(parts[1])
    if not found:
        raise ConfigError(f"qube {net.name!r} field 'dns'",
                          "the host has no usable resolver (only a loopback stub)",
                          'set dns = ["IP of your router or resolver"]')
    return found[:2]


def build(inputs: Inputs | Topology, stack: str, uplink: UplinkSpec,
          previous: Plan | None = None) -> Plan:
    """The whole stack as data (pure). A bare Topology stands for inputs without provider
    files. `previous`: the plan in force, whose qubes keep their ids and so their
    addresses and links (a live change)."""
    from netstack.names import stack_dir

    names.check_stack(stack)
    if isinstance(inputs, Topology):
        inputs = Inputs(inputs, inputs.source)
    topo = inputs.topo
    pinned = {q.name: q.qid for q in previous.qubes} if previous else None
    addrs = addressing.plan_addresses(topo, pinned)
    resolvers = upstream_dns(topo, uplink, inputs.host_resolv)
    sdir = stack_dir(stack)
    base = os.path.dirname(os.path.abspath(inputs.config_path))
    p = Plan(stack, uplink, [], [], upstream_dns=resolvers, ipv6=topo.ipv6,
             default_dispvm=topo.default_dispvm, invariants=list(topo.invariants),
             updatevm=topo.updatevm,
             policy=os.path.join(base, topo.policy),
             call_services=os.path.join(base, topo.services) if topo.services else None,
             ask_timeout=topo.ask_timeout, call_max_bytes=topo.call_max_bytes,
             watch=topo.watch, on_leak=topo.on_leak)
    lab = uplink.mode == "lab"
    for q in topo.tree_order():
        a = addrs[q.name]
        ns = names.qube_netns(stack, q.name)
        role = topo.kinds[q.kind]
        t = role.traits
        clients = tuple(Client(c.name, addrs[c.name].qid, names.vif(addrs[c.name].qid),
                               addrs[c.name].ipv4, addrs[c.name].ipv6, addrs[c.name].ll)
                        for c in topo.children(q.name))
        up_if = names.UPLINK_IF if t.owns_uplink else names.UPSTREAM_IF
        ctx = QubeContext(topo, q, a, stack, ns, up_if, clients, sdir, lab,
                          tuple(resolvers) if t.owns_uplink else (),
                          inputs.providers.get(q.name), inputs.caps,
                          t.owns_uplink and dhcp_uplink(topo, uplink))
        info = role.info(ctx)
        p.namespaces.append(NsPlan(ns, f"qube:{q.name}", role.sysctls(ctx),
                                   role.ruleset(ctx, info).to_json(),
                                   _ns_files(ns, list(VIRTUAL_DNS), q.name)))
        p.daemons.extend(role.daemons(ctx, info))
        qi = QubeInfo(q.name, q.kind, q.netvm, q.label, a.qid, ns, a.ipv4, a.ipv6,
                      # a qube cut off (`attach Q none`) has no link upstream
                      a.gateway4, ([up_if] if q.netvm or t.owns_uplink else [])
                      + [c.vif for c in clients], list(clients),
                      info, dict(q.settings), t, firewall=q.firewall, tags=q.tags)
        qi.tunnel = role.tunnel(qi)
        if t.provides_network:
            qi.client_resolver = role.client_resolver(qi)
            qi.client_env = role.client_env(qi)
        p.qubes.append(qi)
        if q.netvm:  # the link to the netvm: /32 point-to-point both ends
            _plan_link(p, topo, stack, q.netvm, ns, a, addrs[q.netvm])
    net_ns = p.net.netns
    if uplink.mode != "move" and "wifi" in topo.root.settings:
        raise ConfigError(f"qube {topo.root.name!r} field 'wifi'",
                          f"Wi-Fi is moved into {topo.root.name}: move mode only",
                          "bring the stack up with --uplink DEV (move mode), or remove wifi "
                          "and wifi_config")
    if lab:
        refs = {ref for q in topo.qubes for ref in topo.kinds[q.kind].provider_refs(q)}
        vpn_keys = any(ref.startswith("lab:") for ref in refs)
        tor = any(topo.kinds[q.kind].traits.lab_tor for q in topo.qubes)
        from netstack.tor.obfs4 import LAB_REF

        bridge = any(LAB_REF in q.settings.get("bridges", []) for q in topo.qubes)
        # the lab network's clients (gateways): told to fetch its first consensus at once
        tor_clients = [s for q in p.qubes if topo.kinds[q.kind].traits.lab_tor
                       and (s := getattr(q.info, "control_socket", None))]
        labplan.plan_lab(p, sdir, vpn_keys, tor, _ns_files, uplink.sink, bridge,
                         second_wg="lab:wireguard2" in refs,
                         second_ovpn="lab:openvpn2" in refs, tor_clients=tor_clients,
                         wg_kernel=uplink.lab_wg_kernel, isp_scenarios=uplink.isp,
                         openvpn_tcp="lab:openvpn-tcp" in refs)
    elif uplink.mode == "move":
        _plan_move(p, topo, uplink, net_ns)
    elif uplink.mode == "nat":
        _plan_nat(p, uplink, net_ns)
    else:
        raise ConfigError("--uplink-mode", f"{uplink.mode!r} is not supported",
                          "use --lab, or --uplink DEV with --uplink-mode move or nat")
    return p


def _plan_link(p: Plan, topo: Topology, stack: str, netvm: str, ns: str,
               a: addressing.QubeAddr, gw: addressing.QubeAddr) -> None:
    up_ns = names.qube_netns(stack, netvm)
    vif = names.vif(a.qid)
    p.veths.append(Veth(up_ns, vif, ns, names.UPSTREAM_IF))
    p.addrs += [Addr(ns, names.UPSTREAM_IF, f"{a.ipv4}/32"), Addr(up_ns, vif, f"{gw.ipv4}/32")]
    p.routes += [Route(ns, f"{gw.ipv4}/32", names.UPSTREAM_IF),
                 Route(ns, "default", names.UPSTREAM_IF, gw.ipv4),
                 Route(up_ns, f"{a.ipv4}/32", vif)]
    if topo.ipv6 and a.ipv6 and gw.ipv6:
        p.addrs += [Addr(ns, names.UPSTREAM_IF, f"{a.ipv6}/128"),
                    Addr(up_ns, vif, f"{gw.ipv6}/128"),
                    Addr(ns, names.UPSTREAM_IF, f"{a.ll}/64"),
                    Addr(up_ns, vif, f"{gw.ll}/64")]
        p.routes += [Route(ns, f"{gw.ipv6}/128", names.UPSTREAM_IF),
                     Route(ns, "default6", names.UPSTREAM_IF, gw.ipv6),
                     Route(up_ns, f"{a.ipv6}/128", vif)]


def _plan_move(p: Plan, topo: Topology, uplink: UplinkSpec, net_ns: str) -> None:
    if not uplink.dev:
        raise ConfigError("--uplink", "missing device name", "give --uplink DEV")
    net = topo.root
    wifi = net.settings.get("wifi")
    if wifi is not None and wifi != uplink.dev:
        raise ConfigError(f"qube {net.name!r} field 'wifi'",
                          f"names {wifi!r} but the uplink is --uplink {uplink.dev}",
                          f"give --uplink {wifi}, or remove wifi for a wired uplink")
    p.moves.append(MoveDev(uplink.dev, net_ns, names.UPLINK_IF, wireless=wifi is not None))
    address, gateway = net.settings.get("address"), net.settings.get("gateway")
    if dhcp_uplink(topo, uplink):
        return  # the DHCP client in sys-net sets address and default route
    if not address or not gateway:
        raise ConfigError(f"qube {net.name!r} field {'gateway' if address else 'address'!r}",
                          "a static uplink needs both address and gateway",
                          'set address = "192.168.1.50/24" and gateway = "192.168.1.1", or '
                          "neither for DHCP")
    p.addrs.append(Addr(net_ns, names.UPLINK_IF, address))
    p.routes.append(Route(net_ns, "default", names.UPLINK_IF, gateway))


def _plan_nat(p: Plan, uplink: UplinkSpec, net_ns: str) -> None:
    if not uplink.dev:
        raise ConfigError("--uplink", "missing device name", "give --uplink DEV")
    net_a = ipaddress.ip_network(nat_subnet(p.stack))
    host_ip, sysnet_ip = (str(net_a.network_address + 1), str(net_a.network_address + 2))
    veth = names.root_uplink_veth(p.stack)
    p.veths.append(Veth(None, veth, net_ns, names.UPLINK_IF))
    p.addrs += [Addr(None, veth, f"{host_ip}/30"), Addr(net_ns, names.UPLINK_IF, f"{sysnet_ip}/30")]
    p.routes.append(Route(net_ns, "default", names.UPLINK_IF, host_ip))
    p.host_nat = HostNat(uplink.dev, veth, str(net_a), f"netstack_{p.stack}")


def nat_subnet(stack: str) -> str:
    """A /30 for the host<->sys-net link in nat mode, from 10.136.0.0/16, by stack name."""
    n = zlib.crc32(stack.encode()) % (1 << 14)
    return str(ipaddress.ip_network("10.136.0.0/16").network_address + n * 4) + "/30"
