"""DHCP on a moved uplink (`--uplink DEV`, no static address in the config).

Debian's dhcpcd is the client, not pyroute2's: dhcpcd is a kept, complete RFC 2131 client
(INIT-REBOOT, renew at T1, rebind at T2, NAK, expiry, carrier loss) with privilege
separation, while pyroute2's client (0.9) is young and marked experimental. It runs in
sys-net under the supervisor, in a bubblewrap mount view of its own (private /run and
lease directory: nothing of it lands on the host, two stacks never share a pidfile), and
configures the address and default route itself. Its hook (this module, `hook`) keeps the
virtual DNS pointing at the resolvers of the current lease: a map in sys-net's ruleset,
emptied the moment the lease is gone, so a lookup then matches nothing and is dropped,
never sent to an old resolver in clear.

    python -m netstack.dhcp hook STATE_FILE     (run by dhcpcd with its environment)
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from netstack.addressing import VIRTUAL_DNS, ip_version
from netstack.kernel import Kernel
from netstack.model import RoleInfo

DNS_MAP = "upstream_dns"
HOOK_IN_SANDBOX = "/run/dhcpcd-hook"  # the hook's copy in dhcpcd's private, exec-able /run
BOUND = {"BOUND", "RENEW", "REBIND", "REBOOT", "INFORM", "STATIC"}
GONE = {"EXPIRE", "NAK", "STOP", "RELEASE", "FAIL", "NOCARRIER", "DEPARTED", "STOPPED",
        "TIMEOUT"}


@dataclass
class DhcpInfo(RoleInfo):
    """sys-net's plan data in DHCP mode (tag "dhcp")."""

    tag = "dhcp"

    qube: str
    netns: str
    dev: str
    state_dir: str
    dynamic_dns: bool  # no `dns` in the config: the lease's resolvers, through DNS_MAP

    @property
    def daemon_name(self) -> str:
        return f"dhcp-{self.qube}"

    @property
    def script(self) -> str:
        """dhcpcd's hook script; written by `up` last, it is the daemon's go signal."""
        return os.path.join(self.state_dir, f"{self.daemon_name}.sh")

    @property
    def lease_file(self) -> str:
        return os.path.join(self.state_dir, f"{self.daemon_name}.json")

    @property
    def lease_dir(self) -> str:
        return os.path.join(self.state_dir, f"{self.daemon_name}.db")


@dataclass
class Lease:
    """What the hook last heard from dhcpcd (the state file `status` reads)."""

    reason: str
    bound: bool
    at: float
    address: str | None = None
    routers: list[str] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    lease_s: int | None = None
    renewals: int = 0
    history: list[str] = field(default_factory=list)  # last reasons, oldest first


def argv(info: DhcpInfo) -> tuple[str, ...]:
    """dhcpcd in the foreground, IPv4 only, no link-local fallback (a made-up address is
    no network), no ARP probe (5 s at every boot; the lease server checks), no config file
    of the host, asking for resolvers; in a private /run and lease directory, and in a PID
    namespace of its own: ending the supervised bwrap ends dhcpcd's privilege-separation
    helpers with it (the kernel ends a PID namespace whole), none is orphaned.
    The hook runs from a copy in the sandbox's own /run (bubblewrap's tmpfs allows exec):
    a Debian host booted through initramfs-tools has the real /run mounted noexec, and
    dhcpcd could not run the hook where `up` wrote it (docs/field-notes.md, "Daemons from
    Debian")."""
    return ("bwrap", "--dev-bind", "/", "/", "--unshare-pid", "--proc", "/proc",
            "--tmpfs", "/run", "--bind", info.state_dir, info.state_dir,
            "--bind", info.lease_dir, "/var/lib/dhcpcd", "--die-with-parent", "--",
            "sh", "-c", f'install -m 0700 "$0" {HOOK_IN_SANDBOX} && exec "$@"', info.script,
            "dhcpcd", "--nobackground", "--ipv4only", "--noipv4ll", "--noarp",
            "--config", "/dev/null", "--option", "domain_name_servers",
            "--script", HOOK_IN_SANDBOX, info.dev)


def script_text(info: DhcpInfo) -> str:
    return ("#!/bin/sh\n# netstack: dhcpcd's hook for sys-net (see netstack/dhcp.py)\n"
            f"exec {sys.executable} -m netstack.dhcp hook {info.lease_file} "
            f"{'dynamic' if info.dynamic_dns else 'static'}\n")


def map_commands(dns: list[str]) -> list[dict[str, Any]]:
    """One transaction's worth: the virtual DNS addresses map to these resolvers (the
    first to .1, the second, or again the first, to .2); none: an empty map."""
    from netstack.rules.nft import set_commands

    v4 = [d for d in dns if ip_version(d) == 4][:2]
    elems = [[v, v4[min(i, len(v4) - 1)]] for i, v in enumerate(VIRTUAL_DNS)] if v4 else []
    return set_commands(DNS_MAP, elems, kind="map")


def read_lease(path: str) -> Lease | None:
    """None before the first event (or a damaged file: the next event rewrites it)."""
    from netstack import codec
    from netstack.errors import DamagedFile

    try:
        return codec.read(path, Lease)
    except (OSError, DamagedFile):
        return None


def apply_event(prev: Lease | None, env: dict[str, str], now: float) -> Lease:
    """The new lease state from one dhcpcd event (pure)."""
    reason = env.get("reason", "?")
    hist = ((prev.history if prev else []) + [reason])[-8:]
    renewals = (prev.renewals if prev else 0) + (reason in ("RENEW", "REBIND"))
    if reason in BOUND:
        cidr = env.get("new_subnet_cidr")
        addr = env.get("new_ip_address")
        return Lease(reason, True, now, f"{addr}/{cidr}" if addr and cidr else addr,
                     env.get("new_routers", "").split(),
                     env.get("new_domain_name_servers", "").split(),
                     int(env["new_dhcp_lease_time"]) if env.get("new_dhcp_lease_time",
                                                                "").isdigit() else None,
                     renewals, hist)
    if reason in GONE:
        return Lease(reason, False, now, renewals=renewals, history=hist)
    if prev is not None:  # PREINIT, CARRIER, ...: nothing changes but the history
        return Lease(prev.reason, prev.bound, prev.at, prev.address, prev.routers, prev.dns,
                     prev.lease_s, renewals, hist)
    return Lease(reason, False, now, history=hist)


def hook(lease_file: str, mode: str, env: dict[str, str], k: Kernel) -> int:
    """Called by dhcpcd for every event, inside sys-net: the DNS map first (emptied when
    the lease is gone), then the state file."""
    from netstack import codec

    prev = read_lease(lease_file)
    lease = apply_event(prev, env, time.time())
    changed = prev is None or (lease.bound, lease.dns) != (prev.bound, prev.dns)
    if mode == "dynamic" and changed:
        # dhcpcd runs in sys-net: its namespace is ours (None: stay)
        k.nft(None, {"nftables": map_commands(lease.dns if lease.bound else [])})
    codec.write(lease_file, lease)
    print(f"dhcp: {lease.history[-1]}: " + (f"{lease.address} via {','.join(lease.routers)}"
                                             f" dns {','.join(lease.dns) or '-'}"
                                             if lease.bound else "no lease"),
          file=sys.stderr, flush=True)
    return 0


def status(info: DhcpInfo) -> dict[str, Any]:
    from netstack.codec import dump

    lease = read_lease(info.lease_file)
    out: dict[str, Any] = {"dev": info.dev, "bound": bool(lease and lease.bound),
                           "dynamic_dns": info.dynamic_dns}
    if lease:
        out.update(dump(lease))
        out["age_s"] = round(time.time() - lease.at, 1)
    return out


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] != "hook":
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    from netstack.kernel import RealKernel

    k = RealKernel()  # this program's entry (dhcpcd runs it for every event)
    try:
        with contextlib.suppress(BrokenPipeError):
            sys.exit(hook(sys.argv[2], sys.argv[3], dict(os.environ), k))
    finally:
        k.close()


if __name__ == "__main__":
    main()


def wait_bound(info: DhcpInfo, timeout: float, progress: Any = None) -> float:
    """Until the hook wrote a bound lease, polled with a deadline (dhcpcd gives no other
    event to wait on); NotReady names the last event."""
    from netstack.errors import NotReady

    t0 = time.monotonic()
    delay = 0.01
    while True:
        lease = read_lease(info.lease_file)
        if lease and lease.bound:
            if progress:
                progress(100, f"lease {lease.address}")
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise NotReady(f"no DHCP lease on {info.qube}'s {info.dev} after {timeout:.0f} s "
                           f"(last event {lease.reason if lease else 'none'}); see "
                           f"{os.path.join(info.state_dir, info.daemon_name + '.log')}")
        if progress:
            progress(30, f"dhcp: {lease.history[-1] if lease else 'starting'}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def upstream_resolver(plan: Any, timeout: float = 30.0) -> str:
    """sys-net's resolver now: the plan's, or the current lease's (waited for)."""
    from netstack.errors import NotReady

    if plan.upstream_dns:
        return plan.upstream_dns[0]
    info = plan.net.info
    found = resolvers(info, timeout) if isinstance(info, DhcpInfo) else []
    if not found:
        raise NotReady(f"{plan.net.name} has no resolver: the DHCP lease names none; set "
                       f"dns = [...] in [qubes.{plan.net.name}]")
    return found[0]


def resolvers(info: DhcpInfo, timeout: float = 30.0) -> list[str]:
    """The current lease's resolvers, waiting for a lease first (a VPN endpoint's name is
    asked only once sys-net has a resolver)."""
    wait_bound(info, timeout)
    lease = read_lease(info.lease_file)
    return lease.dns if lease else []
