"""Names of namespaces and interfaces, derived from the stack name and qube ids.

Interface names must fit the kernel's 15-character limit. Links between qubes live only
inside the stack's own namespaces, so short fixed names there cannot collide; names that
live in a shared place (the root namespace, wireguard-go's global socket directory) carry
the stack name.
"""

from __future__ import annotations

import os
import re

from netstack.errors import UsageError

STACK_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
IFNAME_MAX = 15
UPSTREAM_IF = "eth0"  # a qube's link to its netvm
UPLINK_IF = "uplink"  # the net qube's link to the outside


def check_stack(stack: str) -> str:
    if not STACK_RE.match(stack):
        raise UsageError(f"--stack {stack!r}: use 1-8 characters a-z and 0-9, starting with a "
                         "letter (it becomes part of namespace and interface names)")
    return stack


def qube_netns(stack: str, qube: str) -> str:
    return f"nst-{stack}-{qube}"


def lab_netns(stack: str, host: str) -> str:
    return f"nsl-{stack}-{host}"


def vif(qid: int) -> str:
    """The netvm's end of the link to the qube with id `qid` (Qubes calls these vifN)."""
    return check_ifname(f"vif{qid}")


def root_uplink_veth(stack: str) -> str:
    """Root-namespace end of the uplink veth in --uplink-mode nat."""
    return check_ifname(f"nsu-{stack}")


def tunnel_if(stack: str, qid: int, kind: str = "wireguard") -> str:
    """A VPN tunnel interface; wireguard-go's control socket path is global, so unique."""
    return check_ifname(f"{'wg' if kind == 'wireguard' else 'tun'}{qid}-{stack}")


def check_ifname(name: str) -> str:
    if not (0 < len(name) <= IFNAME_MAX) or "/" in name or name.strip() != name \
            or name in (".", "..") or any(c.isspace() for c in name):
        raise ValueError(f"invalid interface name {name!r}")
    return name


RUN_DIR = os.environ.get("NETSTACK_RUN_DIR", "/run/netstack")


def stack_dir(stack: str) -> str:
    """A stack's run-time directory (the state, the plan, the daemons' files)."""
    return os.path.join(RUN_DIR, stack)
