"""The Whonix-style gateway's plan data and torrc, built by pure functions: TransPort and
DNSPort on the gateway's own address (the nftables rules admit only redirected traffic from
client links), the control port only as a unix socket, each workstation on its own
circuits."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field

from netstack.errors import NetstackError
from netstack.model import RoleInfo
from netstack.tor.network import TESTING_OPTIONS

TRANS_PORT, DNS_PORT = 9040, 5400
SOCKS_PORT = 9050  # Whonix's general SOCKS port: a circuit per SOCKS username (and client)
CONTROL_PORT = 9051  # never on the network: the control port is a unix socket
TOR_USER = "debian-tor"
# Virtual addresses Tor maps .onion and other names to (AutomapHostsOnResolve).
VIRTUAL_NET = "10.192.0.0/10"


# A lab gateway fetches its directory documents from the lab's authorities, as caches do:
# a cold lab's relays fetch the first consensus late (they back off while there is none),
# and a gateway that asked them for the microdescriptors of the first consensus waited
# 10 s more (docs/field-notes.md, "The first consensus"). Never on the public network,
# where it would load the authorities.
LAB_CLIENT_OPTIONS = ["FetchDirInfoEarly 1"]

ONION_CAP = 4  # onion services one workstation may hold through the control-port filter


@dataclass
class TorInfo(RoleInfo):
    tag = "tor"

    qube: str
    netns: str
    address: str
    state_dir: str
    user: str = TOR_USER
    lab_network: bool = False  # True: the lab's private Tor network, else the public one
    bridges: list[str] = field(default_factory=list)
    # seconds: tor starts straight to the relays and turns its bridges on when it has not
    # bootstrapped by then (tor.control.watch); 0: bridges from the start
    bridges_fallback_after: float = 0
    socks_ports: dict[str, int] = field(default_factory=dict)  # per-application ports
    # client -> [(onion port, client address, client port)]: services whose keys stay here
    onions: dict[str, list[tuple[int, str, int]]] = field(default_factory=dict)
    # onion services a workstation may make through the control-port filter at once (each
    # lives as long as the filter session that made it)
    onions_per_workstation: int = ONION_CAP
    # kept across down/up (as Whonix keeps /var/lib/tor): the onion services' keys, so an
    # address stays the same, and on the public network tor's own state too (its guards:
    # new guards at every up would weaken what guards are for). `down --purge` removes it.
    keep_dir: str = ""

    def onion_dir(self, client: str) -> str:
        return os.path.join(self.keep_dir or self.datadir, f"onion-{client}")

    @property
    def all_socks_ports(self) -> list[int]:
        return [SOCKS_PORT, *sorted(self.socks_ports.values())]

    @property
    def datadir(self) -> str:
        if self.keep_dir and not self.lab_network:  # the lab's network lives with the lab
            return os.path.join(self.keep_dir, "data")
        return os.path.join(self.state_dir, f"tor-{self.qube}")

    @property
    def torrc_path(self) -> str:
        return os.path.join(self.state_dir, f"tor-{self.qube}.torrc")

    @property
    def control_socket(self) -> str:
        return os.path.join(self.datadir, "control")

    @property
    def daemon_name(self) -> str:
        return f"tor-{self.qube}"

    @property
    def filter_spec(self) -> str:
        return os.path.join(self.state_dir, f"torfilter-{self.qube}.json")


def tor_uid(user: str = TOR_USER) -> int:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise NetstackError(f"user {user!r} not found: install Debian's tor package "
                            "(scripts/setup.sh does); netstack never runs a gateway's tor as "
                            "root") from None


def torrc(t: TorInfo, dirauths: list[str] | tuple[str, ...] = ()) -> str:
    """`dirauths`: the lab's private network (DirAuthority lines made at `up`)."""
    iso = "IsolateClientAddr IsolateDestAddr IsolateDestPort"
    lines = [
        "# written by netstack; the gateway of " + t.qube,
        f"DataDirectory {t.datadir}", "RunAsDaemon 0", f"User {t.user}", "Log notice stdout",
        f"ControlSocket {t.control_socket}", "CookieAuthentication 1",
        # Whonix's 9050: a circuit per workstation and per SOCKS username (Tor Browser
        # isolates each site so); every named port is its own session group, so streams
        # of two ports never share a circuit
        f"SocksPort {t.address}:{SOCKS_PORT} IsolateClientAddr IsolateSOCKSAuth",
        *(f"SocksPort {t.address}:{port} IsolateClientAddr IsolateSOCKSAuth"
          for _name, port in sorted(t.socks_ports.items())),
        f"TransPort {t.address}:{TRANS_PORT} {iso}",
        f"DNSPort {t.address}:{DNS_PORT} IsolateClientAddr",
        f"VirtualAddrNetworkIPv4 {VIRTUAL_NET}", "AutomapHostsOnResolve 1", "ClientOnly 1",
        "AvoidDiskWrites 1", "ClientUseIPv6 0",
    ]
    for client, ports in sorted(t.onions.items()):  # the keys never leave the gateway
        lines.append(f"HiddenServiceDir {t.onion_dir(client)}")
        lines += [f"HiddenServicePort {p} {addr}:{target}" for p, addr, target in ports]
    if dirauths:  # the lab's private network only, never the public one
        lines += TESTING_OPTIONS + LAB_CLIENT_OPTIONS + list(dirauths)
    if t.bridges:
        # with a fallback, the bridges wait unused until the monitor sets UseBridges 1
        lines += ["UseBridges 0" if t.bridges_fallback_after else "UseBridges 1",
                  "ClientTransportPlugin obfs4 exec /usr/bin/obfs4proxy"]
        lines += [f"Bridge {b}" for b in t.bridges]
    return "\n".join(lines) + "\n"


def onion_addresses(t: TorInfo) -> dict[str, str | None]:
    """client -> the .onion address of its service (None until tor made it)."""
    out: dict[str, str | None] = {}
    for client in t.onions:
        try:
            with open(os.path.join(t.onion_dir(client), "hostname")) as f:
                out[client] = f.read().strip()
        except OSError:
            out[client] = None
    return out
