"""The Plan's dataclasses: everything `up` makes, as data. Low enough that roles/, the
reconcile and every reader (status, audit, leaktest) import it; plan.py builds it.

The state file holds a Plan written with codec.dump and read back with codec.load into
these same classes; SCHEMA (netstack/schema.py) changes whenever their shape does.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, ClassVar

from netstack.codec import Tagged
from netstack.schema import SCHEMA  # noqa: F401 - re-exported; bump it in schema.py


@dataclass(frozen=True)
class Client:
    """A qube that gets network from another one, and the link it arrives on there."""

    name: str
    qid: int
    vif: str
    ipv4: str
    ipv6: str | None = None
    ll: str | None = None  # IPv6 link-local


@dataclass
class NsPlan:
    name: str
    owner: str  # "qube:NAME" or "lab:HOST"
    sysctls: dict[str, str]
    ruleset: dict[str, Any] | None
    files: dict[str, str]  # absolute path -> content (/etc/netns/NS/...)

    @property
    def qube(self) -> str | None:
        return self.owner[5:] if self.owner.startswith("qube:") else None


@dataclass(frozen=True)
class Veth:
    ns_a: str | None  # None: the namespace netstack runs in (nat uplink mode only)
    if_a: str
    ns_b: str
    if_b: str


@dataclass(frozen=True)
class MoveDev:
    dev: str
    ns: str
    new_name: str
    wireless: bool = False  # a Wi-Fi netdev: its phy moves (`iw phy PHY set netns`)


@dataclass(frozen=True)
class Addr:
    ns: str | None  # None: the namespace netstack runs in (nat uplink mode only)
    ifname: str
    cidr: str


@dataclass(frozen=True)
class Route:
    ns: str | None
    dst: str  # "default", "default6" or a prefix
    dev: str
    via: str | None = None  # on-link next hop (point-to-point /32 links)
    metric: int | None = None


@dataclass(frozen=True)
class HostNat:
    """--uplink-mode nat: what is added to the namespace netstack runs in (the host): a
    veth to sys-net, forwarding on, and a table of our own that masquerades to `dev`."""

    dev: str
    veth: str
    subnet: str
    table: str


@dataclass(frozen=True)
class Service:
    """A lab service run by the supervisor on sockets `up` opens in the namespace."""

    name: str
    netns: str
    type: str  # http | dns | sink
    bind: str
    port: int
    zone: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Daemon:
    """A process the supervisor runs inside a namespace and restarts when it dies."""

    name: str
    netns: str
    argv: tuple[str, ...]
    restart: bool = True
    post_start: tuple[str, ...] = ()  # run in the namespace after each start; failure kills
    requires: str = ""  # a file `up` writes when the daemon may start (its go signal)
    monitor: tuple[str, ...] = ()  # "module:function", args: the supervisor watches health
    # what says it answers, for a daemon others need before they start (the lab's VPN
    # servers): "hook" (its post-start hook is done) or "udp/PORT" (the port is bound)
    ready: str = ""


@dataclass(frozen=True)
class FwRule:
    """One rule of a qube's list (Qubes' qvm-firewall), as validated from the config by
    rules/qubefw.parse: typed from the config to the kernel (config.Qube.firewall,
    QubeInfo.firewall); `to_raw` gives the table the config and the overlay write."""

    action: str  # accept | drop
    dsthost: str | None = None  # an address, a CIDR prefix or a hostname
    proto: str | None = None  # tcp | udp | icmp
    dstports: tuple[int, int] | None = None
    icmptype: int | None = None
    specialtarget: str | None = None  # dns
    expire: int | None = None  # seconds after `up` ("+SECONDS"; `firewall add` makes it
    expire_at: int | None = None  # an absolute Unix time, as qvm-firewall does)
    comment: str | None = None

    @property
    def expires(self) -> bool:
        return self.expire is not None or self.expire_at is not None

    def deadline(self, started: float) -> float | None:
        """The Unix time the rule ends (None: never); "+N" counts from the stack's `up`."""
        if self.expire_at is not None:
            return float(self.expire_at)
        return started + self.expire if self.expire is not None else None

    @property
    def runtime_set(self) -> bool:
        """Its set is filled at run time (a name to resolve, a clock to read), so the
        loaded ruleset holds it empty: the rule matches nothing until then (fail closed)."""
        return self.host_is_name or self.expires

    @property
    def host_is_name(self) -> bool:
        return self.dsthost is not None and not is_net(self.dsthost)

    def family(self) -> str | None:
        """ipv4 or ipv6 when the destination says so; None: both (or a name)."""
        if self.dsthost is None or self.host_is_name:
            return None
        return "ipv6" if ipaddress.ip_network(self.dsthost, strict=False).version == 6 \
            else "ipv4"

    def to_raw(self) -> dict[str, Any]:
        """The rule as a config table: qubefw.parse(to_raw) gives the same rule back."""
        out: dict[str, Any] = {"action": self.action}
        for k in ("dsthost", "proto", "icmptype", "specialtarget", "comment"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.dstports:
            lo, hi = self.dstports
            out["dstports"] = lo if lo == hi else f"{lo}-{hi}"
        if self.expire is not None:
            out["expire"] = f"+{self.expire}"
        if self.expire_at is not None:
            out["expire"] = self.expire_at
        return out

    def describe(self) -> str:
        """The rule as qvm-firewall prints it (key=value pairs)."""
        parts = [f"action={self.action}"]
        if self.dsthost:
            parts.append(f"dsthost={self.dsthost}")
        if self.proto:
            parts.append(f"proto={self.proto}")
        if self.dstports:
            lo, hi = self.dstports
            parts.append(f"dstports={lo}" if lo == hi else f"dstports={lo}-{hi}")
        if self.icmptype is not None:
            parts.append(f"icmptype={self.icmptype}")
        if self.specialtarget:
            parts.append(f"specialtarget={self.specialtarget}")
        if self.expire is not None:
            parts.append(f"expire=+{self.expire}")
        if self.expire_at is not None:
            parts.append(f"expire={self.expire_at}")
        if self.comment is not None:
            parts.append(f"comment={quote_comment(self.comment)}")
        return " ".join(parts)


# a comment of these characters reads and pastes back as one word, unquoted
_BARE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.,:/+@%-")


def quote_comment(comment: str) -> str:
    """A rule's comment as `describe` writes it: bare when it is one plain word, else in
    double quotes, so `comment=x dsthost=1.2.3.4` can never read as a second condition and
    the line pastes back into a shell as one word (a comment holds no `"` or backslash:
    rules/qubefw.parse refuses them; `$` and a backquote are escaped, as in the shell).
    rules/qubefw.rule_from_words takes the quoted form back."""
    if comment and all(c in _BARE for c in comment):
        return comment
    return '"' + comment.replace("$", "\\$").replace("`", "\\`") + '"'


def is_net(s: str) -> bool:
    try:
        ipaddress.ip_network(s, strict=False)
        return True
    except ValueError:
        return False


class RoleInfo(Tagged):
    """What a kind knows of its qube beyond the common fields (VPN endpoints, Tor paths).
    Subclasses are dataclasses with a `tag` (their kind); the codec picks them by it (and
    imports the module the file names for it: this module never imports a kind)."""

    registry: ClassVar[dict[str, type]] = {}
    by_module: ClassVar[bool] = True


@dataclass(frozen=True)
class KindTraits:
    """What every layer may know of a qube's kind, copied into the plan by plan.build from
    the kind's spec (netstack/kinds/): lower layers read these, never the registry."""

    provides_network: bool = True
    owns_uplink: bool = False  # the one net qube: the root of the tree
    strict_replies: bool = False
    fast_path: bool = False  # plain forwarding: established flows may go on a flowtable
    protection: str | None = None  # "vpn" | "tor": how leaktest and check name a chain
    sandboxed: bool = False  # its commands run in a bubblewrap sandbox (netstack.sandbox)
    enforces_client_rules: bool = True  # clients may have `firewall = [...]`
    offers_onions: bool = False  # clients may have `onion = [...]` (a Tor gateway's)
    privacy: int = 0  # how private a path through it is (a disposable's default netvm)
    lab_tor: bool = False  # on the lab it needs the lab's private Tor network


@dataclass(frozen=True)
class Tunnel:
    """A qube that encapsulates its clients' traffic (the audit's end-to-end walk and the
    leak test follow it): the device, the transport's mark and the routes into it."""

    dev: str
    fwmark: int
    routes: tuple[str, ...]
    upstream_if: str


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
    gateway: str | None  # the netvm's address
    interfaces: list[str]  # upstream first, then one vif per client
    clients: list[Client] = field(default_factory=list)
    info: RoleInfo | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    traits: KindTraits = field(default_factory=KindTraits)  # from the kind's spec
    tunnel: Tunnel | None = None  # its tunnel, if its kind encapsulates
    # where a client's lookups go when asked from this qube's namespace: (address, port)
    client_resolver: tuple[str, int] | None = None
    client_env: dict[str, str] = field(default_factory=dict)  # what clients' commands get
    # its own rule list (enforced in its netvm); None: no list, the plain behaviour
    firewall: tuple[FwRule, ...] | None = None
    # `tags = [...]` of its table: what `[[invariant]]` selectors (`@tag:NAME`) match
    tags: tuple[str, ...] = ()

    @property
    def cut_off(self) -> bool:
        """`attach QUBE none`: no netvm and no uplink of its own, so no link upstream."""
        return self.netvm is None and not self.traits.owns_uplink

    @property
    def upstream_if(self) -> str:
        if self.cut_off:
            raise ValueError(f"qube {self.name!r} is cut off (no netvm): it has no link "
                             "upstream; callers check `cut_off` first")
        return self.interfaces[0]


@dataclass(frozen=True)
class UplinkSpec:
    mode: str  # lab | move | nat
    dev: str | None = None
    sink: bool = False  # lab only: the offline internet (every name answered by the sink)
    # lab only: the lab VPN server's WireGuard runs in the kernel instead of wireguard-go
    # (bench/vpn.py: a kernel-WireGuard chain measured against kernel WireGuard both ends)
    lab_wg_kernel: bool = False
    # lab only: the lab ISP is hostile (`up --lab --isp SCENARIO`: netstack/lab/isp.py)
    isp: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabHostInfo:
    name: str
    netns: str
    address: str
    fqdn: str


@dataclass(frozen=True)
class LinkEnd:
    netns: str
    interface: str
    address: str


@dataclass(frozen=True)
class TorNode:
    name: str
    role: str  # authority | relay | exit
    address: str
    or_port: int
    dir_port: int
    netns: str
    dir: str

    @property
    def control(self) -> str:
        return f"{self.dir}/control"

    @property
    def torrc(self) -> str:
        return f"{self.dir}/torrc"


@dataclass(frozen=True)
class VpnServer:
    netns: str
    interface: str
    address: str
    wireguard_port: int
    openvpn_port: int
    wg_dev: str
    files: dict[str, str] = field(default_factory=dict, hash=False)  # lab:REF -> path
    wg2_dev: str | None = None  # a second WireGuard server (lab:wireguard2, port + 1)
    openvpn2: bool = False  # a second OpenVPN server (lab:openvpn2, port + 1)
    openvpn_tcp: bool = False  # an OpenVPN server over TCP 443 (lab:openvpn-tcp)


@dataclass
class LabPlan:
    """The simulated internet: where its hosts are, and what `up` generates for it (VPN
    server keys only when a qube uses a lab provider file; a Tor network only for tor
    qubes)."""

    dir: str
    domain: str
    hosts: dict[str, LabHostInfo]
    isp_router: LinkEnd
    isp_link: LinkEnd
    vpn_server: VpnServer
    tor_nodes: dict[str, TorNode] = field(default_factory=dict)
    vpn_keys: bool = False
    isp: tuple[str, ...] = ()  # the hostile ISP's scenarios (netstack/lab/isp.py)

    @property
    def tor(self) -> bool:
        return bool(self.tor_nodes)

    @property
    def tor_dir(self) -> str:
        return f"{self.dir}/tor"

    @property
    def exits(self) -> set[str]:
        return {n.address for n in self.tor_nodes.values() if n.role == "exit"}

    @property
    def relay_ports(self) -> set[tuple[str, int]]:
        return {(n.address, p) for n in self.tor_nodes.values() for p in (n.or_port, n.dir_port)}


@dataclass(frozen=True)
class Invariant:
    """One `[[invariant]]` table of the config (netstack/invariants.py evaluates it, the
    audit proves it on the live rulesets). `qubes` selects (`@tag:T`, `@label:C`,
    `@kind:K`, `@anyvm` or a qube's name); each rule is None when not written."""

    index: int  # 1-based: "invariant 2" in every message
    qubes: str
    name: str = ""  # its `name = "..."`, shown beside the index
    reach: tuple[str, ...] | None = None  # the only ways out it may have (tor, vpn, clearnet)
    never: tuple[str, ...] = ()  # ways out it must never have
    netvm_in: tuple[str, ...] | None = None  # the netvms it may be attached to (or selectors)

    @property
    def title(self) -> str:
        return f"invariant {self.index}" + (f" ({self.name})" if self.name else "")


@dataclass
class Plan:
    stack: str
    uplink: UplinkSpec
    qubes: list[QubeInfo]
    namespaces: list[NsPlan]
    veths: list[Veth] = field(default_factory=list)
    moves: list[MoveDev] = field(default_factory=list)
    addrs: list[Addr] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)
    lab: LabPlan | None = None
    host_nat: HostNat | None = None
    upstream_dns: list[str] = field(default_factory=list)
    ipv6: bool = False
    schema: int = SCHEMA
    default_dispvm: str | None = None  # [stack] default_dispvm: disposables are made like it
    invariants: list[Invariant] = field(default_factory=list)  # the config's [[invariant]]
    updatevm: str | None = None  # [stack] updatevm: `template update` goes out through it
    # the call layer (netstack.policy, docs/calls.md): absolute directories, checked at `up`
    policy: str = ""
    call_services: str | None = None
    ask_timeout: float = 60.0
    call_max_bytes: int = 64 << 20  # each way, per call
    # [stack] watch / on_leak: the supervisor watches the uplink (netstack/watch.py)
    watch: bool = False
    on_leak: str = "log"  # log | cut

    def ns(self, name: str) -> NsPlan:
        return next(n for n in self.namespaces if n.name == name)

    def qube(self, name: str) -> QubeInfo:
        for q in self.qubes:
            if q.name == name:
                return q
        raise KeyError(name)

    def has_qube(self, name: str) -> bool:
        return any(q.name == name for q in self.qubes)

    @property
    def net(self) -> QubeInfo:
        return next(q for q in self.qubes if q.netvm is None and q.traits.owns_uplink)

    def chain(self, name: str) -> list[QubeInfo]:
        """The qube, then its netvms up to the net qube."""
        out = [self.qube(name)]
        while out[-1].netvm:
            out.append(self.qube(out[-1].netvm))
        return out

    def infos(self, cls: type[Any]) -> list[Any]:
        """Every role info of one type (e.g. all VPN qubes' infos), in qube order."""
        return [q.info for q in self.qubes if isinstance(q.info, cls)]
