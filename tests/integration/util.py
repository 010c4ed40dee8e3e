"""Helpers for root tests: run the CLI, run in a namespace, send hostile packets, capture."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from netstack import netns

ROOT = Path(__file__).resolve().parents[2]
BASIC = str(ROOT / "configs" / "basic.toml")


def new_stack_name(prefix: str = "t") -> str:
    """PREFIX + random; NETSTACK_TEST_STACK_PREFIX goes first (e.g. `tw`: every stack of
    one developer's run is told apart from another's on a shared host)."""
    prefix = (os.environ.get("NETSTACK_TEST_STACK_PREFIX", "") + prefix)[:6]
    return prefix + secrets.token_hex(3)[: 8 - len(prefix)]


def cli(*args: str, check: bool = True, env: dict | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    e = dict(os.environ, **(env or {}))
    if "--purge" in args and "NETSTACK_LAB_TOR_CACHE" not in (env or {}):
        # `down --purge` removes the kept lab Tor network of the stack's shape: in a test
        # run that is the warm start of every later Tor stack of that shape (tests/
        # integration/conftest.py), so a test's purge removes its homes and an empty cache
        # of its own; a test proving the purge of a kept network names its cache
        # (test_tor_warm)
        e["NETSTACK_LAB_TOR_CACHE"] = e.get("NETSTACK_LAB_TOR_CACHE",
                                            "/var/lib/netstack/lab-tor") + ".purged"
    # scripts/test-host's VM under TCG on a loaded host: `up --lab` took over 120 s there
    timeout *= float(os.environ.get("NETSTACK_TEST_SLOW", "1"))
    p = subprocess.run([sys.executable, "-m", "netstack.cli", *args], capture_output=True,
                       text=True, env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"netstack {' '.join(args)} -> {p.returncode}\n{p.stdout}\n"
                             f"{p.stderr}")
    return p


def in_ns(ns: str, *argv: str, check: bool = True, timeout: float = 30,
          input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                       timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{ns}: {' '.join(argv)} -> {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def send(ns: str, packets: list[dict]) -> int:
    """Send crafted packets from inside `ns` with scapy (AF_PACKET, like a hostile root)."""
    p = in_ns(ns, sys.executable, "-m", "netstack.leaktest.send", json.dumps(packets),
              timeout=60)
    return json.loads(p.stdout.strip().splitlines()[-1])["sent"]


def reap_zombies() -> None:
    """Reap exited children re-parented to us (we are a child subreaper as root)."""
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2:].split()
        if rest[0] == "Z" and int(rest[1]) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(d), os.WNOHANG)


def _another_workers(name: str) -> bool:
    """Under pytest-xdist (scripts/test): a namespace, /etc/netns entry or stack directory
    of a stack another worker made (its letter after the base prefix, tests/conftest.py),
    or the differential oracle's namespaces of another worker's process (nso<pid>...).
    What this worker made, and anything no worker's name explains, is still compared."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return False
    from tests.conftest import WORKER_LETTERS

    mine = os.environ.get("NETSTACK_TEST_STACK_PREFIX", "")
    base = os.environ.get("NETSTACK_TEST_BASE_PREFIX", "")
    if name.startswith("nso"):
        return not name.startswith(f"nso{os.getpid() % 100000}")
    stack = name.split("-")[1] if name.startswith("ns") and name.count("-") >= 2 else name
    return any(stack.startswith(base + c) for c in WORKER_LETTERS) \
        and not stack.startswith(mine)


def snapshot_host() -> dict:
    """What the safety rules say a test must leave untouched or clean (under pytest-xdist,
    less what the other worker's stacks make meanwhile)."""
    def run(*a):
        return subprocess.run(a, capture_output=True, text=True).stdout

    def own(names: list[str]) -> list[str]:
        return sorted(x for x in names if not _another_workers(x))

    def listing(d: str) -> list[str] | None:
        if not os.path.isdir(d):  # made and removed by the other worker's stacks meanwhile
            return [] if os.environ.get("PYTEST_XDIST_WORKER") else None
        return own(os.listdir(d))

    return {
        "netns": own(netns.list_names()),
        "etc_netns": listing("/etc/netns"),
        "run": listing("/run/netstack"),
        "links": run("ip", "-o", "link", "show").count("\n"),
        "link_names": sorted(line.split(":")[1].strip().split("@")[0]
                             for line in run("ip", "-o", "link", "show").splitlines()),
        "routes": run("ip", "route", "show", "table", "all"),
        "nft": run("nft", "list", "ruleset"),
    }


def stack_leftovers(stack: str) -> list[str]:
    """Anything of `stack` still on the host: namespaces, files, state, processes."""
    left = [n for n in netns.list_names() if n.startswith((f"nst-{stack}-", f"nsl-{stack}-"))]
    if os.path.isdir("/etc/netns"):
        left += [f"/etc/netns/{d}" for d in os.listdir("/etc/netns")
                 if d.startswith((f"nst-{stack}-", f"nsl-{stack}-"))]
    for d in (f"/run/netstack/{stack}", f"/var/lib/netstack/{stack}"):
        if os.path.exists(d):
            left.append(d)
    if os.path.isdir("/var/run/wireguard"):  # wireguard-go's control sockets (wg3-STACK)
        left += [f"/var/run/wireguard/{f}" for f in os.listdir("/var/run/wireguard")
                 if f.endswith(f"-{stack}.sock")]
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        named = f"/run/netstack/{stack}" in cmd or f"nst-{stack}-" in cmd or \
            f"nsl-{stack}-" in cmd
        if named and ("-" in stack or _first_stack_named(cmd) == stack):
            left.append(f"process {d}: {cmd}")
    return left


def _first_stack_named(cmd: str) -> str | None:
    """The stack a process's command line names first: its own (a sandbox binds its
    stack's directory before anything else; the local battery's probe then lists every
    namespace on the host as a target, another stack's among them: two pytest workers)."""
    import re

    m = re.search(r"/run/netstack/([A-Za-z0-9_.-]+)|\bns[tl]-([A-Za-z0-9_.]+)-", cmd)
    return (m.group(1) or m.group(2)) if m else None


def purge_homes(stack: str) -> None:
    """What `down --purge` removes of a stack that is down, but for the kept lab Tor
    networks (the run's warm cache: tests/integration/conftest.py): its app qubes' homes
    and firewall overlay under /var/lib/netstack/STACK."""
    from netstack import sandbox

    sandbox.purge_homes(stack)


def wait_for(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kernel():
    """A real kernel seam for a test's own changes (closed by the caller or at exit)."""
    from netstack.kernel import RealKernel

    return RealKernel()


def list_ruleset(ns: str) -> dict:
    k = kernel()
    try:
        return k.nft_list(ns)
    finally:
        k.close()


def load_ruleset(ns: str, ruleset: dict) -> None:
    """Replace our table in `ns` with `ruleset` in one transaction (tests that break or
    repair a qube's rules on purpose)."""
    from netstack.rules.nft import commands

    k = kernel()
    try:
        k.nft(ns, commands(ruleset))
    finally:
        k.close()


def load_state(stack: str):
    from netstack.state import State

    st = State.load(stack)
    assert st is not None and st.plan is not None, f"stack {stack} has no state"
    return st


def supervisor_pid(stack: str) -> int:
    from netstack.processes import supervisor_pid as sp

    pid = sp(load_state(stack))
    assert pid is not None
    return pid


def children(stack: str) -> dict:
    """The supervisor's children by daemon name (supervisor.Child)."""
    from netstack.processes import children as ch

    return ch(load_state(stack))


def nft_counter(ns: str, comment: str) -> int:
    """Packets counted by the rule with this comment in namespace `ns` (live ruleset)."""
    total = 0
    found = False
    for item in list_ruleset(ns)["nftables"]:
        r = item.get("rule")
        if r and r.get("comment") == comment:
            found = True
            for e in r["expr"]:
                if "counter" in e and e["counter"]:
                    total += e["counter"]["packets"]
    assert found, f"no rule with comment {comment!r} in {ns}"
    return total


from netstack.leaktest.prober import Prober  # noqa: E402,F401  (re-exported for tests)


@contextlib.contextmanager
def running_stack(config: str, prefix: str):
    """A stack of its own, brought up over the lab and removed afterwards; the removal
    must leave nothing of it behind."""
    s = new_stack_name(prefix)
    cli("--stack", s, "up", config, "--lab")
    try:
        yield s
    finally:
        cli("--stack", s, "down", check=False)  # its lab Tor network kept (conftest)
        purge_homes(s)
        reap_zombies()
    left = stack_leftovers(s)
    assert not left, left


VPN_CFG = str(ROOT / "configs" / "vpn.toml")


@contextlib.contextmanager
def stand_in_host(s: str):
    """A throwaway 'host' namespace holding a veth `standin0` whose peer sits in a
    'router' namespace (192.0.2.1/24). netstack runs in the host namespace through
    nsenter, which switches only the network namespace: netstack must share the real mount
    namespace for its /run/netns mounts to be seen by later commands. Yields (run, host,
    router) where run(*args) is the netstack CLI there."""
    host, router = f"nsx-{s}-host", f"nsx-{s}-rtr"
    argv = ["nsenter", f"--net=/run/netns/{host}", sys.executable, "-m", "netstack.cli",
            "--stack", s]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv + list(args), capture_output=True, text=True)

    for n in (host, router):
        subprocess.run(["ip", "netns", "add", n], check=True)
    try:
        in_ns(host, "ip", "link", "add", "standin0", "type", "veth", "peer", "name", "rtr0",
              "netns", router)
        in_ns(router, "ip", "addr", "add", "192.0.2.1/24", "dev", "rtr0")
        in_ns(router, "ip", "link", "set", "rtr0", "up")
        yield run, host, router
        reap_zombies()
        assert not stack_leftovers(s)
    finally:
        from netstack.state import State

        if State.load(s):
            run("down")
        for n in (host, router):
            subprocess.run(["ip", "netns", "del", n], check=False)
