"""State.plan is read on first use; two threads asking at once (open-in-disposable's
reader thread and its caller) must both get the plan, never a None while the other is
still reading it (an intermittent AttributeError traceback before)."""

from __future__ import annotations

import threading

from netstack import codec, state
from netstack.model import Plan, UplinkSpec


def test_two_threads_both_get_the_plan(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path))
    st = state.State("race1")
    st.dir = str(tmp_path / "race1")
    (tmp_path / "race1").mkdir()
    st.plan_path = str(tmp_path / "race1" / "plan.json")
    codec.write(st.plan_path, Plan("race1", UplinkSpec("lab"), [], []))
    real_read = codec.read
    started = threading.Event()

    def slow_read(path, cls):
        started.set()
        threading.Event().wait(0.2)  # the other thread asks meanwhile
        return real_read(path, cls)

    monkeypatch.setattr(codec, "read", slow_read)
    got: list = []
    t = threading.Thread(target=lambda: got.append(st.plan))
    t.start()
    started.wait(5)
    got.append(st.plan)
    t.join(5)
    assert len(got) == 2 and all(p is not None and p.stack == "race1" for p in got)
