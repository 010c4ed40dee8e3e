"""Shared labs for root tests: one Tor-over-VPN stack (one private Tor network) for every
test that does not break it for good."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.integration.util import (
    ROOT,
    Prober,
    children,
    cli,
    in_ns,
    load_state,
    new_stack_name,
    reap_zombies,
    stack_leftovers,
    wait_for,
)

WEB = "198.51.100.80"
CFG = str(ROOT / "tests" / "configs" / "tor-two-workstations.toml")


class TorLab:
    def __init__(self) -> None:
        self.stack = new_stack_name("tor")
        t0 = time.monotonic()
        cli("--stack", self.stack, "up", CFG, "--lab", "--sink", timeout=240)
        self.up_s = time.monotonic() - t0
        try:
            self.dir = Path(f"/run/netstack/{self.stack}")
            self.plan = load_state(self.stack).plan
            self.exits = self.plan.lab.exits
            self.relay_ports = self.plan.lab.relay_ports
            self.tor = self.plan.qube("sys-whonix").info
            self.ns = {q.name: q.netns for q in self.plan.qubes}
            self.prober = Prober(self.ns["anon-whonix"])
            wait_for(lambda: self.fetch("anon-whonix", WEB) in self.exits, 60, 0.2,
                     "a first page through Tor")
        except BaseException:
            self.close()
            raise

    def fetch(self, ws: str, target: str, timeout: int = 10) -> str | None:
        p = in_ns(self.ns[ws], "curl", "-sS", "--max-time", str(timeout), f"http://{target}/",
                  check=False, timeout=timeout + 5)
        return p.stdout.strip() if p.returncode == 0 else None

    def get(self, ws: str, target: str) -> str:
        """A page through Tor, retried with a deadline (fresh isolated circuits can fail
        their first stream for a few seconds)."""
        return wait_for(lambda: (r := self.fetch(ws, target)) in self.exits and r, 30, 0.2,
                        f"{ws} to fetch {target} through Tor")

    def log(self, name: str) -> list[dict]:
        return [json.loads(x) for x in (self.dir / f"{name}.log").read_text().splitlines()]

    def child(self, name: str):
        return children(self.stack)[name]

    def close(self) -> None:
        if hasattr(self, "prober"):
            self.prober.close()
        cli("--stack", self.stack, "down", "--purge", check=False)
        reap_zombies()
        assert not stack_leftovers(self.stack)


