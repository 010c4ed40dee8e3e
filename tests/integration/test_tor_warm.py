"""A warm lab (root, own stacks, own cache directory): `down` keeps the lab's private Tor
network (keys, consensus, descriptors) for the next `up --lab` of the same shape, which
reuses the authorities' keys (the same DirAuthority lines) and bootstraps from the kept
consensus; a lab of another shape (with the obfs4 bridge) makes its own keys; `down
--purge` removes everything kept."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.integration.util import ROOT, cli, in_ns, load_state, wait_for

pytestmark = pytest.mark.root

WEB = "198.51.100.80"


def _page(ws: str) -> str | None:
    p = in_ns(ws, "curl", "-sS", "--max-time", "10", f"http://{WEB}/", check=False,
              timeout=20)
    return p.stdout.strip() if p.returncode == 0 else None


def _up(stack: str, cfg: str, env: dict) -> tuple[list[str], float, object]:
    """up --lab; (DirAuthority lines, seconds to the first page, plan)."""
    t0 = time.monotonic()
    cli("--stack", stack, "up", cfg, "--lab", "--no-wait", env=env, timeout=120)
    st = load_state(stack)
    ws = st.plan.qube("anon-whonix").netns
    got = wait_for(lambda: _page(ws), 90, 0.2, f"a page through Tor in {stack}")
    assert got in st.plan.lab.exits
    return list(st.data.dirauths), time.monotonic() - t0, st.plan


def test_warm_up_reuses_keys_other_shape_does_not_purge_removes(own_stack, tmp_path):
    from netstack.tor import network

    cache = str(tmp_path / "lab-tor")
    env = {"NETSTACK_LAB_TOR_CACHE": cache}
    cfg = str(ROOT / "configs" / "tor-over-vpn.toml")
    s = own_stack("w")

    cold, cold_s, plan = _up(s, cfg, env)
    assert len(cold) == 3 and all(x.startswith("DirAuthority auth") for x in cold)
    cli("--stack", s, "down", env=env)
    nodes = list(plan.lab.tor_nodes.values())
    kept = os.path.join(cache, os.path.basename(network.cache_dir(nodes)))
    assert os.path.isdir(kept), "down kept nothing"
    with open(os.path.join(kept, network.DIRAUTHS)) as f:
        assert f.read().split("\n")[:3] == cold
    assert os.path.isfile(os.path.join(kept, "nodes", "auth1", "cached-microdesc-consensus"))
    assert not os.path.exists(os.path.join(kept, "nodes", "auth1", "lock"))

    warm, warm_s, plan = _up(s, cfg, env)
    assert warm == cold, "the warm up made new authority keys"
    # the gateway started from the lab's consensus, not from an empty DataDirectory
    gw = plan.qube("sys-whonix").info.datadir
    assert os.path.exists(os.path.join(gw, "cached-microdesc-consensus"))
    assert warm_s < cold_s + 5, (warm_s, cold_s)
    cli("--stack", s, "down", env=env)

    # another shape (the lab's obfs4 bridge joins the network): its own keys, never the
    # kept ones, and a cache of its own beside the first
    b = own_stack("w")
    other, _, bplan = _up(b, str(ROOT / "configs" / "tor.toml"), env)
    assert not set(x.split()[-1] for x in other) & set(x.split()[-1] for x in cold)
    assert network.cache_dir(bplan.lab.tor_nodes.values()) != network.cache_dir(nodes)
    p = cli("--stack", b, "down", "--purge", env=env)
    assert "the kept lab Tor network" in p.stdout
    # only what b kept (review2 finding 7): the first shape, kept by s, stays
    bkept = os.path.join(cache, os.path.basename(network.cache_dir(bplan.lab.tor_nodes.values())))
    assert not os.path.exists(bkept) and os.path.isdir(kept)
    p = cli("--stack", s, "down", "--purge", env=env)  # s is down: its kept network goes
    assert "the kept lab Tor network" in p.stdout, p.stdout + p.stderr
    assert not os.path.exists(cache)


def _consensus(path: str) -> str | None:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return text if "\ndirectory-footer" in text else None  # only a whole one


def test_cold_first_consensus_lists_every_relay_exits_and_guards(own_stack, tmp_path):
    """A cold lab's FIRST consensus already lists every relay, the exits with Exit and
    every node with Guard: the authorities' first vote is held until every authority has
    every relay's descriptor (netstack.tor.firstvote). Before, it came at a fixed time
    after the torrc, and in 2 of 6 cold runs it had no exits: the gateway was ready only
    after its own refetch, 6-12 s later (docs/field-notes.md, "The first consensus")."""
    env = {"NETSTACK_LAB_TOR_CACHE": str(tmp_path / "lab-tor")}  # cold: nothing kept
    s = own_stack("f")
    t0 = time.monotonic()
    cli("--stack", s, "up", str(ROOT / "configs" / "tor-over-vpn.toml"), "--lab",
        "--no-wait", env=env, timeout=120)
    st = load_state(s)
    nodes = st.plan.lab.tor_nodes
    auth1 = nodes["auth1"]
    # the first consensus is replaced 5 s later: read it as soon as it is there
    text = wait_for(lambda: _consensus(os.path.join(auth1.dir, "cached-consensus")), 90,
                    0.05, "the lab's first consensus")
    first_s = time.monotonic() - t0
    log = Path(st.dir, "lab-tor-auth1.log")
    released = wait_for(lambda: [x for x in log.read_text().splitlines()
                                 if "first vote released: valid-after " in x], 10, 0.1,
                        "the hook's release line")[0].split("valid-after ")[1][:19]
    valid_after = next(x for x in text.splitlines() if x.startswith("valid-after "))[12:31]
    assert valid_after == released, ("not the released round", valid_after, released)
    flags: dict[str, set[str]] = {}
    nick = None
    for line in text.splitlines():
        if line.startswith("r "):
            nick = line.split()[1]
        elif line.startswith("s ") and nick:
            flags[nick] = set(line.split()[1:])
    want = {n.name for n in nodes.values() if n.role != "bridge"}
    assert set(flags) == want, f"first consensus lists {sorted(flags)}, not {sorted(want)}"
    exits = {n.name for n in nodes.values() if n.role == "exit"}
    assert exits and all("Exit" in flags[n] for n in exits), flags
    assert all({"Guard", "Running", "Valid"} <= flags[n] for n in want), flags
    # and the gateway builds its circuits from it: a page through Tor
    ws = st.plan.qube("anon-whonix").netns
    assert wait_for(lambda: _page(ws), 60, 0.2, "a page through Tor") in st.plan.lab.exits
    print(f"first consensus {first_s:.1f} s, first page {time.monotonic() - t0:.1f} s "
          "after up began")
    p = cli("--stack", s, "down", "--purge", env=env)
    assert "the kept lab Tor network" in p.stdout
