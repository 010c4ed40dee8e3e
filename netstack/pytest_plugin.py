"""netstack's pytest plugin (entry point `pytest11`, installed with the package): a test gets
a running lab chain, runs a command or a Python callable inside a qube, and asserts on the
flows it caused.

    def test_my_client_talks_only_through_tor(netstack_chain):
        chain = netstack_chain(config="configs/tor-over-vpn.toml")
        mark = chain.mark()
        chain.run(["my-client", "--sync"])
        chain.flows(since=mark).only_via("tor")

One chain per config for the whole pytest session (brought up with the offline internet
at first use, taken down at the end, also when a test fails); `netstack_chain(stack=NAME)`
adopts a running stack instead (never taken down by the plugin). Root only: without it the
fixture skips the test, saying why."""

from __future__ import annotations

import os
import pickle
import secrets
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest


class FlowError(AssertionError):
    """A flow the assertion forbids, named with where it went and the evidence."""


@dataclass
class Flows:
    report: Any  # netstack.check.Report

    def __iter__(self) -> Any:
        return iter(self.report.flows)

    def __len__(self) -> int:
        return len(self.report.flows)

    def only_via(self, way: str) -> Flows:
        """Every flow left `way` (tor | vpn | direct) or was answered (or held) by the
        chain's own resolver, nothing was stopped, nothing leaked, no outcome is unknown (a flow no
        evidence settles is never taken as fine); else a FlowError naming each offending
        flow with its reason."""
        from netstack.check import flow_line

        bad = [f"  {f.klass}: {flow_line(f)}" for f in self.report.flows
               if f.outcome not in ("answered", "held")
               and (f.outcome != "left" or f.via != way)]
        bad += [f"  LEAK on {x.link}: {x.summary} ({x.pcap} frame {x.frame})"
                for x in self.report.leaks]
        if bad:
            raise FlowError(f"expected every flow via {way}; these were not:\n"
                            + "\n".join(bad) + f"\npcaps: {self.report.pcaps}")
        return self

    def none_stopped(self) -> Flows:
        from netstack.check import flow_line

        bad = [f"  {f.klass}: {flow_line(f)}" for f in self.report.stopped]
        if bad:
            raise FlowError("the chain stopped these flows:\n" + "\n".join(bad))
        return self

    def stopped(self, klass: str | None = None) -> list[Any]:
        return [f for f in self.report.stopped if klass is None or f.klass == klass]

    def unknown(self) -> list[Any]:
        """Flows whose outcome no evidence settles (each with its `reason`)."""
        return self.report.unknown

    @property
    def leaks(self) -> list[Any]:
        return self.report.leaks


class Chain:
    """A running lab chain a test talks to through one workstation."""

    def __init__(self, stack: str, qube: str | None, own: bool, kernel: Any) -> None:
        self.stack, self.qube, self.own = stack, qube, own
        self.kernel = kernel  # the plugin's one kernel (made by the fixture, its entry)
        self._watch: Any = None

    def mark(self, expect: str | None = None) -> Any:
        """From now on, every link is captured; `flows(since=mark)` reports what came."""
        from netstack.check import Watch

        if self._watch is not None:
            self._watch.stop()
        self._watch = Watch(self.stack, self.qube, self.kernel, expect).start()
        return self._watch

    def flows(self, since: Any = None) -> Flows:
        w = since or self._watch
        if w is None:
            raise RuntimeError("call chain.mark() before the traffic to watch")
        if w is self._watch:
            self._watch = None
        return Flows(w.report(["(pytest)"], None))

    def run(self, cmd: list[str], check: bool = False) -> subprocess.CompletedProcess:
        """The command in the workstation's sandbox (output captured)."""
        from netstack.check import run_in
        from netstack.leaktest import battery

        ctx = battery.context(self.stack, self.qube, self.kernel)
        # pytest's Ctrl-C stays pytest's: the command is ended, the session stopped
        o = run_in(ctx, cmd, capture=True, forward=(), name=f"pytest command in "
                   f"{ctx.ws.name}")
        p = subprocess.CompletedProcess(cmd, o.code, o.stdout, o.stderr)
        if check and p.returncode != 0:
            raise AssertionError(f"{cmd} exited {p.returncode}: {p.stderr.strip()[-500:]}")
        return p

    def call(self, fn: Any, *args: Any) -> Any:
        """A Python callable (importable by name) run in the workstation's namespace, in a
        child process; its return value comes back pickled."""
        from netstack.leaktest import battery

        ns = battery.context(self.stack, self.qube, self.kernel).ws.netns
        payload = pickle.dumps((fn, args))
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                            "import pickle, sys; fn, a = pickle.loads(sys.stdin.buffer.read());"
                            " sys.stdout.buffer.write(pickle.dumps(fn(*a)))"],
                           input=payload, capture_output=True)
        if p.returncode != 0:
            raise AssertionError(f"{fn.__name__} failed in the qube: "
                                 f"{p.stderr.decode(errors='replace')[-800:]}")
        return pickle.loads(p.stdout)  # noqa: S301 - our own child's answer


@pytest.fixture(scope="session")
def netstack_chain() -> Any:
    """Factory: netstack_chain(config=..., qube=..., stack=...) -> Chain (one per config
    for the session; all brought down at its end)."""
    from netstack.kernel import RealKernel

    made: dict[tuple[str | None, str | None], Chain] = {}
    k = RealKernel()  # this entry's one kernel (the plugin is a command of its own)

    def get(config: str | None = None, qube: str | None = None,
            stack: str | None = None) -> Chain:
        if os.geteuid() != 0:
            pytest.skip("netstack_chain needs root (namespaces, nftables, captures)")
        key = (stack or config, qube)
        if key in made:
            return made[key]
        if stack is not None:
            made[key] = Chain(stack, qube, own=False, kernel=k)
            return made[key]
        from netstack import stack as stacks
        from netstack.check import wait_ready
        from netstack.model import UplinkSpec

        name = "pt" + secrets.token_hex(3)
        try:
            stacks.up(config, name, UplinkSpec("lab", sink=True), k)
            wait_ready(name, k)
        except BaseException:
            stacks.down(name, k)
            raise
        made[key] = Chain(name, qube, own=True, kernel=k)
        return made[key]
    yield get
    from netstack import stack as stacks

    for c in made.values():
        if c.own:
            stacks.down(c.stack, k)
            _purge(c.stack)
    k.close()


def _purge(stack: str) -> None:
    import shutil

    from netstack.rules.qubefw import overlay_path

    shutil.rmtree(os.path.dirname(overlay_path(stack)), ignore_errors=True)
