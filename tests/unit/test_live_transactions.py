"""Live changes are transactions (netstack.live) on the recording fake kernel (no root):
`firewall add`, `attach` and `run` fail or "crash" at every kernel step, and after each
the plan, the firewall list, the moves and the kernel agree, either all old or all new,
and the next command works (never "config changed"). A crash is simulated by a process
that dies where it stands: the rollback never runs and the intent is left on disk, as
kill -9 or libnftables aborting the process would leave it."""

from __future__ import annotations

import pytest

from netstack import disposable, firewall_live, live, sandbox, state
from netstack.attach import attach
from netstack.errors import ApplyError
from netstack.rules import qubefw
from netstack.rules.nft import commands
from tests.unit.test_disposable import plan_of, up

MUTATING = ("netns_create", "netns_delete", "nft", "veth", "link_del", "link_up", "addr_add",
            "route_add", "route_del", "sysctl", "write_file")


class Died(BaseException):
    """The process died here: no handler of ours runs after it."""


@pytest.fixture(autouse=True)
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(sandbox, "HOME_ROOT", str(tmp_path / "lib"))


def firewall_add(fk):
    return firewall_live.change("main", "work", "add", ["action=drop",
                                                         "dsthost=203.0.113.10"], kernel=fk)


def attach_work(fk):
    return attach("main", "work", "sys-net", kernel=fk)


def run_one(fk):
    return disposable.add("main", "sys-firewall", "red", kernel=fk, runner=1)


COMMANDS = {"firewall add": firewall_add, "attach": attach_work, "run": run_one}


def fresh():
    """A new stack over the recording fake, with no firewall list left by a run before."""
    qubefw.save_overlay("main", {})
    return up("configs/basic.toml")


def steps_of(command) -> int:
    fk, _ = fresh()
    n = len(fk.events)
    command(fk)
    return sum(1 for e in fk.events[n:] if e[0] in MUTATING)


def body(cmds: list) -> list:
    """A ruleset load without its table replacement (first load or reload alike)."""
    return [c for c in cmds if not any("table" in c.get(v, {}) for v in ("add", "delete"))]


def consistent(fk) -> str:
    """'old' or 'new': the plan in force, the list, the moves and the kernel agree on one
    of the two; anything else fails the test."""
    st = state.State.load("main")
    assert st is not None and live.pending(st) is None
    p = st.plan
    overlay = qubefw.load_overlay("main")
    listed = p.qube("work").firewall
    assert (overlay.get("work") is None and listed is None) or \
        qubefw.parse("work", overlay["work"]) == listed
    assert st.data.netvms.get("work", p.qube("work").netvm) == p.qube("work").netvm
    for n in p.namespaces:  # every namespace of the plan exists, with its latest rules
        assert n.name in fk.namespaces, n.name
        if n.ruleset:
            last = body(fk.tables[n.name][-1]["nftables"])
            want = body(commands(n.ruleset)["nftables"])
            assert last[:len(want)] == want, f"{n.name}: the kernel holds other rules"
    work = p.qube("work")
    peer = fk.peers.get((work.netns, "eth0"))
    assert peer is not None and peer[0] == p.qube(work.netvm).netns, peer
    disposables = {q.netns for q in p.qubes if q.settings.get("disposable")}
    made = {ns for ns in fk.namespaces if "-disp" in ns}
    assert made == disposables, (made, disposables)
    return "new" if (listed or work.netvm == "sys-net" or disposables) else "old"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_failure_at_any_step_changes_nothing(name):
    command = COMMANDS[name]
    for n in range(steps_of(command)):
        calls = iter(range(10**6))
        fk, _ = fresh()
        fk.fail = lambda e, n=n, c=calls: e[0] in MUTATING and next(c) == n
        with pytest.raises(ApplyError):
            command(fk)
        fk.fail = lambda e: False
        assert consistent(fk) == "old", (name, n)
        command(fk)  # the next try works
        assert consistent(fk) == "new", (name, n)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_crash_at_any_step_is_repaired_by_the_next_command(name, monkeypatch):
    command = COMMANDS[name]

    def die(*_a, **_k):
        raise Died()
    for n in range(steps_of(command)):
        calls = iter(range(10**6))
        fk, _ = fresh()
        fk.fail = lambda e, n=n, c=calls: e[0] in MUTATING and next(c) == n
        with monkeypatch.context() as m:
            m.setattr(live, "_abort", die)  # dead before its rollback
            with pytest.raises(Died):
                command(fk)
        fk.fail = lambda e: False
        st = state.State.load("main")
        assert live.pending(st) is not None  # left behind, as a crash leaves it
        assert live.repair(st, fk).startswith("rolled back")
        assert consistent(fk) == "old", (name, n)
        command(fk)
        assert consistent(fk) == "new", (name, n)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_crash_after_the_kernel_changed_is_finished_by_the_next_command(name,
                                                                           monkeypatch):
    """The kernel holds the new state, the files do not yet: the next command (here any
    live change: the lock's holder repairs first) rolls forward."""
    command = COMMANDS[name]
    fk, _ = fresh()

    def die(*_a, **_k):
        raise Died()
    with monkeypatch.context() as m:
        m.setattr(qubefw, "save_overlay", die)  # the first file written after "applied"
        with pytest.raises(Died):
            command(fk)
    st = state.State.load("main")
    assert live.pending(st).phase == "applied"
    firewall_live.change("main", "personal", "reset", kernel=fk)  # any live change
    assert consistent(fk) == "new"


def test_an_interrupted_change_is_named_by_status(monkeypatch):
    fk, _ = fresh()

    def die(*_a, **_k):
        raise Died()
    monkeypatch.setattr(qubefw, "save_overlay", die)
    with pytest.raises(Died):
        firewall_add(fk)
    from netstack.stack import interrupted

    assert "firewall work add" in interrupted(state.State.load("main"))
    assert plan_of().qube("work").firewall is None  # old until repaired
