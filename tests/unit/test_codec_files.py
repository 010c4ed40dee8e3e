"""codec.read / codec.write (issue 25 item 3): every typed file of ours goes to the disk
atomically and comes back as the dataclass that wrote it; a damaged file, or one of another
schema, is one line of ours naming it. No root needed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import netstack.names
from netstack import codec, state
from netstack.dhcp import Lease, read_lease
from netstack.errors import DamagedFile, OtherSchema, StateError
from netstack.kinds.registry import SPECS
from netstack.lab.services import Overrides, ZoneEntry
from netstack.live import Intent
from netstack.model import SCHEMA, Daemon, Plan, UplinkSpec
from netstack.plan import build, load_inputs
from netstack.rules import names
from netstack.state import (
    GoneRec,
    NetnsRec,
    PidFile,
    ProcessRec,
    Record,
    StackState,
    read_pidfile,
)
from netstack.supervisor import (
    Child,
    ServiceSpec,
    SupervisorSpec,
    SupervisorStatus,
    read_status,
)
from netstack.tor.filter import FilterSpec
from netstack.vpn.failover import (
    FailoverSpec,
    ServerFiles,
    ServerState,
    Switch,
    read_state,
    write_state,
)
from netstack.vpn.runtime import HookRoute, TunnelSpec

ROOT = Path(__file__).resolve().parents[2]
LAB = UplinkSpec("lab")


@pytest.fixture(scope="module")
def plan() -> Plan:
    text = (ROOT / "configs" / "vpn.toml").read_text().replace(
        'config = "lab:wireguard"', 'config = ["lab:wireguard", "lab:wireguard2"]')
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "fo.toml"
        cfg.write_text(text)
        old = netstack.names.RUN_DIR
        netstack.names.RUN_DIR = str(Path(d) / "run")  # no overlay of a real stack
        try:
            return build(load_inputs(str(cfg), "cd0", LAB, SPECS, overlay={}), "cd0", LAB)
        finally:
            netstack.names.RUN_DIR = old


def samples(plan: Plan) -> list[tuple[type | object, object]]:
    """(type, value) of each typed file's content, with every field away from its default."""
    child = Child("tunnel", 4242, 17, 2, 1.5, 1, True, 2.5, {"server": 1, "answering": True})
    return [
        (StackState, StackState("cd0", "up", "/etc/netstack/x.toml", 12.5,
                                {"sys-vpn": {"vpn.example": ["203.0.113.1"]}}, ["10.0.0.1"],
                                {"nst-cd0-a": "abc", "nst-cd0-b": None},
                                {"nst-cd0-a": {"input": ["d1", "d2"]}}, {"work": None,
                                                                          "dev": "sys-vpn"})),
        (Plan, plan),
        (PidFile, PidFile(4242, None, "f00d")),
        (SupervisorStatus, SupervisorStatus(1, 2, {"tunnel": child})),
        (SupervisorSpec, SupervisorSpec("cd0", [ServiceSpec("web", "http", "nsl-cd0-web",
                                                            {"tcp": 3}, {"a.test": "1.2.3.4"},
                                                            "/run/x.log")],
                                        [Daemon("d", "ns", ("a", "b"), False, ("hook",), "req",
                                                ("m:f", "x"), "udp/53")])),
        (names.Store, {"sys-firewall": {"a.test": names.Answer(["192.0.2.1"], 30, 1.0),
                                        "b.test": names.Answer([], 0, 2.0, "NXDOMAIN")}}),
        (ServerState, ServerState(1, 5.0, [Switch(0, 1, "silent", 4.0, 4.001)])),
        (FailoverSpec, FailoverSpec("sys-vpn", "nst-cd0-sys-vpn", "10.139.1.1", 5.0, "/c",
                                    "/s", "/f", [ServerFiles([["203.0.113.1", "udp", 51820]],
                                                             "/c0", "/s0", "a.conf")])),
        (TunnelSpec, TunnelSpec("wireguard", "wg0", "/w", ["10.2.0.2/32"], 1420,
                                [HookRoute("0.0.0.0/0", "wg0", None)], "/l", 30.0)),
        (Lease, Lease("BOUND", True, 3.0, "192.0.2.5/24", ["192.0.2.1"], ["192.0.2.53"], 600, 2,
                      ["PREINIT", "BOUND"])),
        (Intent, Intent("run", plan, plan, {"work": [{"action": "drop"}]}, {}, {"work": None},
                        {"work": "sys-vpn"}, "applied", 99)),
        (FilterSpec, FilterSpec("10.137.0.1", 9051, "/run/tor/control", "10.137.0.1:9050",
                                {"10.137.0.5": "anon"}, 3)),
        (dict[str, ZoneEntry], {"moving.lab.test": ZoneEntry(["198.51.100.80"], 2)}),
    ]


def test_round_trip_of_every_typed_file(tmp_path, plan):
    for i, (tp, value) in enumerate(samples(plan)):
        p = str(tmp_path / f"f{i}.json")
        codec.write(p, value)
        back = codec.read(p, tp)
        assert back == value, tp
        assert type(back) is type(value)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == sorted(f"f{i}.json" for i in range(i + 1))


def test_intent_log_records_round_trip_one_line_each():
    for rec in (NetnsRec("nst-cd0-a"), GoneRec(3), ProcessRec("s", "t", "/p", 1, 2)):
        line = codec.encode(rec)
        assert "\n" not in line
        assert codec.decode(Record, line, "objects.jsonl") == rec


def test_the_formats_are_the_ones_running_stacks_wrote(tmp_path):
    """A stack brought up by the previous version keeps its files across an upgrade: the
    failover history's key stays `from`, rule names stay a table at the top."""
    p = tmp_path / "vpn-q.server"
    p.write_text(json.dumps({"current": 1, "since": 1.0, "history": [
        {"from": 0, "to": 1, "why": "silent", "swap_start": 1, "swap_end": 2}]}))
    st = read_state(str(p))
    assert st == ServerState(1, 1.0, [Switch(0, 1, "silent", 1.0, 2.0)])
    write_state(str(p), st)
    assert json.loads(p.read_text())["history"][0]["from"] == 0

    (tmp_path / names.FILE).write_text(json.dumps(
        {"fw": {"a.test": {"addrs": ["192.0.2.1"], "ttl": 5, "at": 1.0, "error": None}}}))
    assert names.load(str(tmp_path)) == {"fw": {"a.test": names.Answer(["192.0.2.1"], 5, 1.0)}}

    old = {"stack": "cd0", "status": "up", "config": None, "started": 1.0, "resolved": {},
           "dirauths": [], "digests": {}, "rule_digests": {}, "netvms": {}, "schema": SCHEMA}
    (tmp_path / "state.json").write_text(json.dumps(old))
    assert codec.read(str(tmp_path / "state.json"), StackState).status == "up"


def test_mode_is_what_the_caller_asks(tmp_path):
    p = str(tmp_path / "seccomp.bpf")
    from netstack.kernel import atomic_write

    atomic_write(p, b"\x00\x01", 0o644)
    assert Path(p).read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    codec.write(p, PidFile(1, 2, "t"), 0o640)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640


@pytest.mark.parametrize("text,why", [
    ("{damaged", "not JSON"),
    ("", "not JSON"),
    ('{"pid": 1, "start": 2', "not JSON"),  # cut short
    ('{"pid": "one", "start": 2, "token": "t"}', "expected int"),
    ('{"start": 2, "token": "t"}', "pid missing"),
    ("[1, 2]", "expected an object"),
    (b"\xff\xfe{}", "not JSON"),
])
def test_a_damaged_file_is_one_line_of_ours_naming_it(tmp_path, text, why):
    p = tmp_path / "supervisor.pid"
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    with pytest.raises(DamagedFile) as e:
        codec.read(str(p), PidFile)
    msg = str(e.value)
    assert isinstance(e.value, StateError) and e.value.exit_code == 3
    assert "\n" not in msg and str(p) in msg and why in msg and "fix:" in msg, msg
    # the readers that may meet a half-made stack take it as "not there"
    assert read_pidfile(str(p)) is None


def test_another_schema_names_the_file_and_both_numbers(tmp_path):
    p = tmp_path / "state.json"
    p.write_text(json.dumps({"stack": "cd0", "schema": SCHEMA + 1}))
    with pytest.raises(OtherSchema) as e:
        codec.read(str(p), StackState)
    msg = str(e.value)
    assert str(p) in msg and f"schema {SCHEMA + 1}" in msg and f"reads {SCHEMA}" in msg
    assert "\n" not in msg
    # no schema number: damaged, never "another version" (nothing says so)
    for text in (json.dumps({"stack": "cd0"}), "[]", '{"schema": "1"}', "{}", "7",
                 json.dumps({"schema": True})):
        p.write_text(text)
        with pytest.raises(DamagedFile) as d:
            codec.read(str(p), StackState)
        assert not isinstance(d.value, OtherSchema), text
        assert "is damaged" in str(d.value) and "another version" not in str(d.value)


def test_state_load_reports_damage_and_other_versions_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path))
    st = state.State("cd1")
    st.create()
    assert state.State.load("cd1").data == st.data
    Path(st.path).write_text(json.dumps({**codec.dump(st.data), "schema": 1}))
    with pytest.raises(StateError, match=r"stack 'cd1' was made by another version .*"
                                         r"state.json: state schema 1, this one reads"):
        state.State.load("cd1")
    Path(st.path).write_text('{"stack": "cd1", "sta')
    with pytest.raises(DamagedFile, match=f"{st.path} is damaged .*`netstack --stack cd1 "
                                          "down` removes what it finds"):
        state.State.load("cd1")
    Path(st.path).write_text('{"stack": "cd1"}')  # valid JSON of the wrong shape: damaged
    with pytest.raises(DamagedFile, match="is damaged") as e:
        state.State.load("cd1")
    assert "another version" not in str(e.value)


def test_readers_of_files_a_crash_may_leave_half_made(tmp_path):
    (tmp_path / "supervisor.json").write_text("{")
    assert read_status(str(tmp_path)) is None
    (tmp_path / "lease").write_text("{")
    assert read_lease(str(tmp_path / "lease")) is None
    (tmp_path / "server").write_text("{")
    assert read_state(str(tmp_path / "server")) is None
    (tmp_path / names.FILE).write_text("{")
    assert names.load(str(tmp_path)) == {}
    zone = tmp_path / "lab-zone.json"
    zone.write_text(json.dumps({"a.test": {"a": ["192.0.2.1"]}}))
    o = Overrides(str(zone))
    assert o.get() == {"a.test": (["192.0.2.1"], 60)}
    zone.write_text('{"a.test": {"a": 7}}')  # a test's half write: the last table holds
    os.utime(zone, ns=(1, 1))
    assert o.get() == {"a.test": (["192.0.2.1"], 60)}


def test_an_exception_before_the_rename_leaves_the_old_file_and_no_litter(tmp_path,
                                                                          monkeypatch):
    p = tmp_path / "state.json"
    codec.write(str(p), StackState("cd0", "up"))
    before = p.read_bytes()

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        codec.write(str(p), StackState("cd0", "partial"))
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_crash_between_write_and_rename_leaves_the_old_file(tmp_path):
    """A real crash: a child process dies (no cleanup at all) after the new content is
    written in full, before the rename. The reader sees the old file, whole."""
    p = tmp_path / "vpn-q.server"
    old = ServerState(0, 1.0)
    write_state(str(p), old)
    pid = os.fork()
    if pid == 0:  # the child: write a new state, die at the rename
        try:
            def die(src, dst):
                assert Path(src).read_text() == codec.encode(ServerState(1, 2.0))
                os._exit(9)

            os.replace = die
            write_state(str(p), ServerState(1, 2.0))
        finally:
            os._exit(1)  # never reached when the crash happened where it should
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 9
    assert read_state(str(p)) == old
    left = sorted(os.listdir(tmp_path))
    assert left[0] == "vpn-q.server" and all(x.startswith("vpn-q.server.tmp") for x in left[1:])
    write_state(str(p), ServerState(1, 2.0))  # the next write goes through
    assert read_state(str(p)) == ServerState(1, 2.0)


def test_writes_never_follow_a_symlink_planted_at_the_temporary_name(tmp_path):
    import threading

    target = tmp_path / "elsewhere"
    target.write_text("keep")
    p = tmp_path / "txn.json"
    (tmp_path / f"txn.json.tmp{os.getpid()}.{threading.get_native_id()}").symlink_to(target)
    with pytest.raises(OSError):
        codec.write(str(p), PidFile(1, 2, "t"))
    assert target.read_text() == "keep" and not p.exists()


def test_no_typed_file_is_written_or_read_beside_codec():
    """Files go through codec.read/write (atomic_write in kernel.py underneath); a JSON file
    that stays outside says why on its line or just above (`not codec: ...`). tor/network.py
    (torrc, tor's own format) is someone else's."""
    import re

    allowed = {"codec.py", "kernel.py", os.path.join("tor", "network.py")}
    pat = re.compile(r"\bos\.replace\(|\bjson\.load\(|\bjson\.dump\(")
    pkg = ROOT / "netstack"
    bad = []
    for f in sorted(pkg.rglob("*.py")):
        rel = str(f.relative_to(pkg))
        if rel in allowed:
            continue
        lines = f.read_text().splitlines()
        for i, line in enumerate(lines):
            if pat.search(line) and not any("not codec" in x for x in lines[max(0, i - 2):i + 1]):
                bad.append(f"{rel}:{i + 1}: {line.strip()}")
    assert not bad, "\n".join(bad)
