"""`down` from whatever remains of a stack, on the recording fake kernel (no root): a
damaged or missing state.json and a damaged intent log still get the stack's namespaces
(by their names) and /etc/netns directories removed, never another stack's; `down` of
a stack with nothing left is "not up". And `up --uplink DEV` refuses a device the
namespace netstack runs in does not have before anything is made."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netstack import stack
from netstack.errors import StateError, UsageError
from netstack.model import UplinkSpec
from netstack.state import NetnsRec, State
from tests.fakekernel import FakeKernel


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))


def _made(name: str) -> tuple[State, FakeKernel]:
    st = State(name)
    st.create()
    st.record(NetnsRec(f"nst-{name}-work"))
    k = FakeKernel()
    for ns in (f"nst-{name}-work", f"nst-{name}-sys-net", f"nsl-{name}-isp", "nst-other-work",
               f"nst-{name}x-work"):
        k.netns_create(ns)
    k.dirs |= {f"/etc/netns/nst-{name}-work", f"/etc/netns/nsl-{name}-isp",
               "/etc/netns/nst-other-work"}
    k.files[f"/etc/netns/nsl-{name}-isp/resolv.conf"] = "nameserver 10.0.0.1\n"
    return st, k


def _only_others_left(k: FakeKernel, name: str) -> None:
    assert k.namespaces == {"nst-other-work", f"nst-{name}x-work"}  # anti-test: not ours
    assert k.etc_netns_dirs() == ["/etc/netns/nst-other-work"]
    assert not k.files
    assert not os.path.exists(stack.stack_dir(name))


@pytest.mark.parametrize("damage", ["", "[]", '{"stack": "s1"}'])
def test_a_damaged_state_json_is_no_reason_to_leave_anything(damage):
    st, k = _made("s1")
    Path(st.path).write_text(damage)
    with pytest.raises(StateError, match="is damaged"):
        State.load("s1")
    notes: list[str] = []
    assert stack.down("s1", k, notes) == []
    assert len(notes) == 1 and "state.json is damaged" in notes[0]
    assert "another version" not in notes[0]
    _only_others_left(k, "s1")


def test_garbage_in_the_intent_log_is_skipped_named_and_the_names_still_found():
    st, k = _made("s2")
    Path(st.log_path).write_bytes(b"garbage\x00{")
    loaded = State.load("s2")
    assert loaded.bad_lines == [1] and loaded.objects == []
    notes: list[str] = []
    assert stack.down("s2", k, notes) == []
    assert "skipped 1 unreadable line(s) (1)" in notes[0]
    _only_others_left(k, "s2")


def test_a_good_line_after_a_bad_one_is_still_undone():
    st, k = _made("s3")
    with open(st.log_path, "a") as f:
        f.write("{not json\n")
    st2 = State("s3")
    st2._lines = 2
    st2.record(NetnsRec("nst-s3-extra"))  # a record after the damaged line
    k.netns_create("nst-s3-extra")
    loaded = State.load("s3")
    assert loaded.bad_lines == [2]
    assert NetnsRec("nst-s3-extra") in loaded.objects
    assert stack.down("s3", k) == []
    _only_others_left(k, "s3")


def test_a_missing_state_json_with_leftovers_is_taken_down_and_without_is_not_up():
    st, k = _made("s4")
    os.unlink(st.path)
    notes: list[str] = []
    assert stack.down("s4", k, notes) == []
    assert "state.json is missing" in notes[0]
    _only_others_left(k, "s4")
    with pytest.raises(StateError, match="is not up"):  # nothing left: as before
        stack.down("s4", k)


@pytest.mark.parametrize("mode", ["move", "nat"])
def test_an_uplink_device_that_does_not_exist_is_refused(mode):
    k = FakeKernel()
    with pytest.raises(UsageError, match="^--uplink nosuchdev0: no such network device.*fix:"):
        stack.check_uplink(UplinkSpec(mode, "nosuchdev0"), k)
    assert not k.events
    k.ifaces[(None, "eth7")] = True  # anti-test: a device that exists is taken
    stack.check_uplink(UplinkSpec(mode, "eth7"), k)
    stack.check_uplink(UplinkSpec("lab"), k)


def test_check_removes_only_the_lab_stacks_whose_check_is_gone():
    """check's orphans (state.owner gone) go; a live check's stack, a ck stack that names
    no owner (a user's `--stack ck1`) and another stack with a dead owner stay."""
    import subprocess

    from netstack import check
    from netstack.kernel import proc_start_time
    from netstack.state import owner_gone

    dead = subprocess.Popen(["true"])
    dead_start = proc_start_time(dead.pid)
    dead.wait()
    k = FakeKernel()
    owners = {"ckdead": (dead.pid, dead_start), "cklive": (os.getpid(),
                                                          proc_start_time(os.getpid())),
              "cknone": (None, None), "userdead": (dead.pid, dead_start)}
    for name, (pid, start) in owners.items():
        st = State(name)
        st.data.owner, st.data.owner_start = pid, start
        st.create()
        st.record(NetnsRec(f"nst-{name}-work"))
        k.netns_create(f"nst-{name}-work")
    assert [n for n in owners if owner_gone(State.load(n).data)] == ["ckdead", "userdead"]
    said: list[str] = []
    assert check.remove_orphans(k, said.append) == ["ckdead"]
    assert f"pid {dead.pid}" in said[0] and "is gone" in said[0]
    assert State.stacks() == ["cklive", "cknone", "userdead"]
    assert k.namespaces == {"nst-cklive-work", "nst-cknone-work", "nst-userdead-work"}
