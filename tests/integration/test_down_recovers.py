"""`down` after the stack's own files were damaged or lost (root): an empty or
wrong-shaped state.json, a deleted state.json, garbage in the intent log. It removes
what the log's readable lines, the supervisor's pidfile and the stack's names show, and
says honestly what it could not remove. Anti-tests: a stack of another schema number is
still "another version", and `down` of a stack with nothing left is still "not up"."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from netstack import netns
from netstack.kernel import proc_alive
from netstack.schema import SCHEMA
from tests.integration.util import (
    BASIC,
    cli,
    reap_zombies,
    stack_leftovers,
    supervisor_pid,
    wait_for,
)

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def _own_lab_tor_cache(tmp_path_factory, monkeypatch):
    """`down --purge` (own_stack's clean-up) purges the kept lab Tor networks: only ours."""
    monkeypatch.setenv("NETSTACK_LAB_TOR_CACHE", str(tmp_path_factory.mktemp("labtor")))


def _up(s: str) -> tuple[int, int | None]:
    cli("--stack", s, "up", BASIC, "--lab", "--no-wait")
    pid = supervisor_pid(s)
    from netstack.kernel import proc_start_time

    assert len([n for n in netns.list_names() if f"-{s}-" in n]) == 8
    return pid, proc_start_time(pid)


def _gone(s: str, sup: tuple[int, int | None]) -> None:
    reap_zombies()
    assert not proc_alive(*sup), "supervisor still running"
    wait_for(lambda: not stack_leftovers(s), 10, what=f"nothing of {s}: {stack_leftovers(s)}")


@pytest.mark.parametrize("damage", ["empty", "wrong-shape"])
def test_down_removes_a_stack_whose_state_json_is_damaged(own_stack, damage):
    s = own_stack("fd")
    sup = _up(s)
    state = Path(f"/run/netstack/{s}/state.json")
    state.write_text("" if damage == "empty" else json.dumps({"stack": s, "qubes": []}))
    p = cli("--stack", s, "status", check=False)
    assert p.returncode == 3 and "is damaged" in p.stderr, p.stderr
    assert "another version" not in p.stderr and "by hand" not in p.stderr
    assert f"netstack --stack {s} down" in p.stderr
    p = cli("--stack", s, "down", check=False)
    assert p.returncode == 0, p.stderr
    assert "is damaged" in p.stderr and "another version" not in p.stderr
    _gone(s, sup)


def test_down_removes_a_stack_whose_state_json_was_deleted(own_stack):
    s = own_stack("fm")
    sup = _up(s)
    os.unlink(f"/run/netstack/{s}/state.json")
    p = cli("--stack", s, "status", check=False)
    assert p.returncode == 3 and "something of it is left" in p.stderr, p.stderr
    assert f"`netstack --stack {s} down`" in p.stderr
    p = cli("--stack", s, "up", BASIC, "--lab", check=False)  # refused, nothing touched
    assert p.returncode == 3 and "something of it is left" in p.stderr, p.stderr
    assert os.path.exists(f"/run/netstack/{s}/objects.jsonl")
    p = cli("--stack", s, "down", check=False)
    assert p.returncode == 0, p.stderr
    assert "state.json is missing" in p.stderr
    _gone(s, sup)
    # anti-test: nothing of the stack left, so `down` and `status` say "not up" as before
    for cmd in ("down", "status"):
        p = cli("--stack", s, cmd, check=False)
        assert p.returncode == 3 and "is not up" in p.stderr, p.stderr


def test_garbage_in_the_intent_log_status_tells_and_down_removes_it_all(own_stack):
    s = own_stack("fg")
    sup = _up(s)
    Path(f"/run/netstack/{s}/objects.jsonl").write_bytes(b"garbage\x00{")
    p = cli("--stack", s, "status", "--json", check=False)
    st = json.loads(p.stdout)
    problems = st["health"]["problems"]
    assert not any("supervisor not running" in x for x in problems), problems
    assert any("intent log" in x and "damaged" in x for x in problems), problems
    assert {x["pid"] for x in st["processes"] if x["name"] == "supervisor"} == {sup[0]}
    p = cli("--stack", s, "down", check=False)
    assert p.returncode == 0, p.stderr
    assert "skipped 1 unreadable line(s) (1)" in p.stderr
    _gone(s, sup)


def test_down_says_what_it_could_not_remove_and_exits_non_zero(own_stack):
    """A stack's /etc/netns directory that cannot go (a mount on it): named, exit 1, the
    state kept for another try; once it can go, `down` again finishes."""
    s = own_stack("fl")
    sup = _up(s)
    Path(f"/run/netstack/{s}/state.json").write_text("")
    stuck = f"/etc/netns/nst-{s}-zz"
    os.makedirs(stuck)
    subprocess.run(["mount", "-t", "tmpfs", "none", stuck], check=True)
    try:
        p = cli("--stack", s, "down", check=False)
        assert p.returncode == 1, p.stderr
        assert f"could not remove {stuck}" in p.stderr and "not wholly down" in p.stderr
        assert [x for x in stack_leftovers(s) if not x.startswith("process ")] == \
            [stuck, f"/run/netstack/{s}"]
    finally:
        subprocess.run(["umount", stuck], check=False)
    p = cli("--stack", s, "down", check=False)
    assert p.returncode == 0, p.stderr
    _gone(s, sup)


def test_another_schema_number_is_another_version_and_down_leaves_it(own_stack):
    """The anti-test: a schema number that differs is another version's stack, and this
    version's `down` does not guess at it."""
    s = own_stack("fv")
    sup = _up(s)
    state = Path(f"/run/netstack/{s}/state.json")
    good = state.read_text()
    state.write_text(json.dumps({**json.loads(good), "schema": SCHEMA + 1}))
    for cmd in ("status", "down"):
        p = cli("--stack", s, cmd, check=False)
        assert p.returncode == 3 and "another version" in p.stderr, p.stderr
        assert "damaged" not in p.stderr
    assert proc_alive(*sup) and len(stack_leftovers(s)) > 2
    state.write_text(good)
    cli("--stack", s, "down")
    _gone(s, sup)


def test_a_lost_log_of_a_nat_stack_still_takes_its_host_table_and_says_what_it_cannot(
        own_stack, tmp_path):
    """--uplink-mode nat inside a throwaway 'host' namespace (nsenter: the real host is
    never touched): with the intent log garbage, `down` removes the host table by its
    name (netstack_STACK) and says that the host's ip_forward, whose old value was in the
    lost record, stays as it is. Anti-test: with the log whole nothing is said of it."""
    from tests.integration.util import in_ns, stand_in_host

    s = own_stack("fn")
    cfg = tmp_path / "nat.toml"
    cfg.write_text(Path(BASIC).read_text().replace(
        'kind = "net"', 'kind = "net"\ndns = ["192.0.2.1"]', 1))
    for damaged in (False, True):
        with stand_in_host(s) as (run, host, _router):
            in_ns(host, "ip", "addr", "add", "192.0.2.2/24", "dev", "standin0")
            in_ns(host, "ip", "link", "set", "standin0", "up")
            p = run("up", str(cfg), "--uplink", "standin0", "--uplink-mode", "nat",
                    "--no-wait")
            assert p.returncode == 0, p.stderr
            assert f"table ip netstack_{s}" in in_ns(host, "nft", "list", "ruleset").stdout
            if damaged:
                Path(f"/run/netstack/{s}/objects.jsonl").write_bytes(b"garbage\x00{")
            p = run("down")
            assert p.returncode == 0, p.stderr
            assert f"netstack_{s}" not in in_ns(host, "nft", "list", "ruleset").stdout
            assert f"nsu-{s}" not in in_ns(host, "ip", "-o", "link").stdout
            assert ("ip_forward it set to 1 is left as it is" in p.stderr) is damaged, \
                p.stderr
