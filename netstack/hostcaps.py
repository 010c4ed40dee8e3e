"""What the host's kernel offers that a plan may use (kernel WireGuard, nftables
flowtables), probed once per command without changing anything, and passed to the pure
plan as data: the plan stays a function of its inputs, and a unit test gives either
answer."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class HostCaps:
    wireguard: bool = False  # the kernel has WireGuard (built in or loadable)
    flowtable: bool = False  # nftables flowtables (nf_flow_table_inet)


def kernel_wireguard() -> bool:
    """The generic-netlink family `wireguard` exists (asking for it loads the module where
    it is loadable, as `ip link add type wireguard` would); no link is made."""
    from pyroute2.netlink.generic import GenericNetlinkSocket

    s = GenericNetlinkSocket()
    try:
        s.bind("wireguard", None)
        return True
    except Exception:  # noqa: BLE001 - NetlinkError ENOENT: no such family
        return False
    finally:
        with contextlib.suppress(Exception):
            s.close()


def probe(wireguard: bool = False, flowtable: bool = False) -> HostCaps:
    """Only what is asked is probed (each probe costs a netlink round trip or two)."""
    from netstack import fastpath

    return HostCaps(wireguard and kernel_wireguard(), flowtable and fastpath.supported())
