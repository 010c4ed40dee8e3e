"""`up` killed with SIGKILL while it makes the lab Tor network's keys (root): it makes them
in-process (netstack.tor.network.make_authority_cert; no tor-gencert or `tor
--list-fingerprint` child is left to write into the directory the next `up` makes again),
the next `up` repairs the stack and makes the keys again over the half-made ones, and
`down` leaves nothing running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.integration.util import cli, reap_zombies, stack_leftovers, wait_for

pytestmark = pytest.mark.root


def _children(pid: int, comm: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
        except OSError:
            continue
        name = data[data.index("(") + 1:data.rindex(")")]
        rest = data[data.rindex(")") + 2:].split()
        if name == comm and int(rest[1]) == pid and rest[0] != "Z":
            out.append(int(d))
    return out


def _running(stack: str) -> list[str]:
    return [x for x in stack_leftovers(stack) if x.startswith("process ")]


def test_kill_9_of_up_while_it_makes_tor_keys_leaves_no_key_maker(monkeypatch, tmp_path,
                                                                  own_stack):
    # a cold lab of our own: the keys are made, not restored (and own_stack's --purge
    # purges only this cache)
    monkeypatch.setenv("NETSTACK_LAB_TOR_CACHE", str(tmp_path / "labtor"))
    s = own_stack("fk")
    up = subprocess.Popen([sys.executable, "-m", "netstack.cli", "--stack", s, "up", "--lab",
                           "--no-wait"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    from netstack.state import stack_dir

    keys = os.path.join(stack_dir(s), "lab", "tor", "auth1", "keys")
    try:
        wait_for(lambda: os.path.isdir(keys), 60, 0.002, "up making the lab's Tor keys")
        os.kill(up.pid, signal.SIGKILL)
        assert up.wait(10) == -9
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert not _children(up.pid, "tor-gencert") and not _children(up.pid, "tor")
    reap_zombies()
    assert not _running(s), _running(s)
    p = cli("--stack", s, "up", "--lab", "--no-wait", check=False)
    assert p.returncode == 0, p.stderr
    assert "repaired" in p.stderr and "already exists" not in p.stderr
    cli("--stack", s, "down")
    reap_zombies()
    assert not stack_leftovers(s), stack_leftovers(s)
