"""A kind's impure half: what it does on the host around the plan's kernel steps and what it
reports. A runtime is handed the kernel and the state (through reconcile.Runtime or as
arguments) and never makes them: the command entry makes the one RealKernel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from netstack.model import QubeInfo

if TYPE_CHECKING:
    from netstack.kernel import Kernel
    from netstack.reconcile import Runtime
    from netstack.state import State


@dataclass
class LiveFacts:
    """What `status` read from the kernel and the supervisor, for a kind's status."""

    links: list[Any]  # kernel.LinkState of the qube's namespace
    children: dict[str, Any]  # supervisor children by daemon name (with "alive")
    resolved: dict[str, list[str]]  # this qube's resolved endpoint names
    watching: bool = False  # the uplink watch runs (netstack/watch.py): no clear probes


class KindRuntime:
    """The default: nothing to prepare, wait for or report."""

    def prepare(self, q: QubeInfo, rt: Runtime) -> None:
        """Before the supervisor starts (files its daemons wait for)."""

    def activate(self, q: QubeInfo, rt: Runtime) -> None:
        """After the supervisor started (e.g. resolving through the lab's DNS service)."""

    def reload_commands(self, q: QubeInfo, st: State) -> list[dict[str, Any]]:
        """nft commands that put back what `up` filled in at run time (named sets), to go in
        the same transaction as a reload of the qube's ruleset."""
        return []

    def after_reload(self, q: QubeInfo, k: Kernel, st: State) -> None:
        """Restore run-time data (named sets filled after `up`) after a ruleset reload."""
        cmds = self.reload_commands(q, st)
        if cmds:
            k.nft(q.netns, {"nftables": cmds})

    def status(self, q: QubeInfo, live: LiveFacts, k: Kernel) -> dict[str, Any]:
        return {}

    def status_lines(self, entry: dict[str, Any]) -> list[str]:
        return []

    def wait_ready(self, q: QubeInfo, st: State, k: Kernel, timeout: float,
                   progress: Callable[[int, str], None]) -> float | None:
        """Block until the qube does its job (a tunnel carries traffic, Tor bootstrapped);
        returns the seconds waited, None when there is nothing to wait for."""
        return None

    def health(self, entry: dict[str, Any]) -> list[str]:
        """Problems of this kind seen in the status entry (e.g. a tunnel down, and why)."""
        return []
