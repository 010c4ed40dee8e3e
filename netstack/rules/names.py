"""Run-time data of per-qube rules (rules/qubefw.py): hostnames resolved through the chain's
own resolver for the client, and expiring rules read off the clock, both held in the rules'
named sets. `up` and every live change fill them once; the supervisor's watcher
(`watch`) re-resolves a name when its answer's TTL runs out and retries a name that did
not resolve (its rule matches nothing meanwhile: fail closed), and `status` shows each.

A name is asked from the client's netvm toward the resolver the client itself uses (the
virtual DNS, which the chain carries onwards: in clear through sys-net, through the
tunnel behind a VPN qube, Tor's DNSPort behind a Tor gateway), never the host's resolver."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass, field
from typing import Any

from netstack.kernel import Kernel

FILE = "rule-names.json"
RETRY = 5.0  # seconds between tries of a name that does not resolve
MIN_TTL, MAX_TTL = 2, 3600  # a TTL of 0 would ask in a loop; a huge one never again
IDLE = 5.0  # the watcher re-reads the plan at least this often (live changes)


@dataclass
class Answer:
    """One name's last lookup, as the netvm's sets hold it."""

    addrs: list[str] = field(default_factory=list)
    ttl: int = 0
    at: float = 0.0  # when it was asked
    error: str | None = None

    def due(self) -> float:
        return self.at + (max(MIN_TTL, min(self.ttl, MAX_TTL)) if self.addrs else RETRY)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# netvm -> hostname -> answer: the whole of rule-names.json (a table at its top, as every
# version wrote it; codec reads the answers back as Answer)
Store = dict[str, dict[str, Answer]]


def path(stack_dir: str) -> str:
    return os.path.join(stack_dir, FILE)


def load(stack_dir: str) -> Store:
    """Nothing asked yet, or a damaged file: every name is due (asked again at once)."""
    from netstack import codec
    from netstack.errors import DamagedFile

    try:
        return codec.read(path(stack_dir), Store)
    except (FileNotFoundError, DamagedFile):
        return {}


def _save(stack_dir: str, store: Store) -> None:
    from netstack import codec

    codec.write(path(stack_dir), store)


@contextlib.contextmanager
def _locked(stack_dir: str) -> Any:
    """The CLI (at up and changes) and the watcher both update the store."""
    fd = os.open(path(stack_dir) + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def resolver(plan: Any, netvm: str) -> tuple[str, str, int]:
    """(namespace, server, port) a client of `netvm` resolves through."""
    q = plan.qube(netvm)
    assert q.client_resolver is not None  # a netvm: plan.build set where its clients ask
    server, port = q.client_resolver
    return q.netns, server, port


def lookup(plan: Any, netvm: str, host: str, k: Any, now: float) -> Answer:
    from netstack.errors import NetstackError

    ns, server, port = resolver(plan, netvm)
    try:
        addrs, ttl = k.lookup(ns, server, port, host)
        return Answer(sorted(addrs), ttl, now)
    except (NetstackError, OSError) as e:
        return Answer([], 0, now, str(e))


def addresses(store: Store, netvm: str) -> dict[str, list[str]]:
    return {h: a.addrs for h, a in store.get(netvm, {}).items()}


def fill(plan: Any, netvm: str, store: Store, started: float, now: float
         ) -> list[dict[str, Any]]:
    from netstack.rules import qubefw

    return qubefw.fill_commands(plan, netvm, addresses(store, netvm), started, now)


def refresh(stack_dir: str, plan: Any, started: float, k: Any, now: float | None = None,
            only_due: bool = False, netvms: list[str] | None = None) -> float:
    """Resolve the names of every netvm's clients' rules (only those due, for the
    watcher), refill the sets of a netvm whose answers changed (or all, at up and after a
    change), and keep the answers. Returns when the next name is due."""
    from netstack.rules import qubefw

    now = time.time() if now is None else now
    nxt = now + IDLE
    with _locked(stack_dir):
        store = load(stack_dir)
        for q in plan.qubes:
            if netvms is not None and q.name not in netvms:
                continue
            if not q.clients or not qubefw.client_lists(plan, q.name):
                store.pop(q.name, None)
                continue
            old = store.get(q.name, {})
            new = {}
            for h in qubefw.hostnames(plan, q.name):
                prev = old.get(h)
                new[h] = lookup(plan, q.name, h, k, now) \
                    if prev is None or not only_due or prev.due() <= now else prev
                nxt = min(nxt, new[h].due())
            store[q.name] = new
            changed = {h: a.addrs for h, a in new.items()} != \
                {h: a.addrs for h, a in old.items() if h in new}
            if not only_due or changed:
                cmds = fill(plan, q.name, store, started, now)
                if cmds:
                    k.nft(q.netns, {"nftables": cmds})
        _save(stack_dir, store)
    return nxt


def watch(stack_dir: str, stopping: Any, k: Kernel) -> None:
    """The supervisor's thread: re-resolve names as their TTLs run out (and retry the
    unresolved), reading the plan in force each round so live changes are followed."""
    from netstack import codec
    from netstack.errors import NetstackError
    from netstack.model import Plan
    from netstack.state import StackState

    try:
        while not stopping.is_set():
            nxt = time.time() + IDLE
            try:
                data = codec.read(os.path.join(stack_dir, "state.json"), StackState)
                plan = codec.read(os.path.join(stack_dir, "plan.json"), Plan)
                nxt = refresh(stack_dir, plan, data.started, k, only_due=True)
            except (OSError, ValueError, KeyError, NetstackError) as e:  # between writes
                print(f"rule names: {e}", flush=True)
            k.close()
            stopping.wait(max(0.2, nxt - time.time()))
    finally:
        k.close()


def status_lines(entry: dict[str, Any]) -> list[str]:
    """A netvm's rule hostnames: what each resolved to and for how long, or that it does
    not resolve (its rule matches nothing; retried)."""
    out = []
    now = time.time()
    for h, a in sorted(((entry.get("client_rules") or {}).get("names") or {}).items()):
        ans = Answer(**a)
        if ans.addrs:
            out.append(f"rule hostname {h} -> {', '.join(ans.addrs)} (TTL {ans.ttl} s, "
                       f"asked again in {max(0, round(ans.due() - now))} s)")
        else:
            out.append(f"rule hostname {h} does not resolve: its rule matches nothing "
                       f"(retried every {RETRY:.0f} s)")
    return out
