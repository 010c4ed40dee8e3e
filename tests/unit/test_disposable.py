"""Disposable qubes on the recording fake kernel: names and addresses never collide, the
netvm's anti-spoofing for the new client is loaded before its link exists and in the same
transaction as what `up` filled in at run time (a VPN's endpoint set), orphans of a killed
`run` are reaped, a changed config is refused before anything changes; plus the pure
helpers, the stack lock's wait, the intent log's compaction and the display grant."""

from __future__ import annotations

import socket
import threading

import pytest

from netstack import disposable, reconcile, sandbox, state
from netstack.errors import StateError, UsageError
from netstack.kinds.registry import RUNTIMES, SPECS
from netstack.plan import build, load_inputs
from netstack.state import StackLock, State
from netstack.vpn.info import VpnInfo
from tests.fakekernel import FakeKernel
from tests.unit.test_reconcile import LAB, RESOLVE, ROOT, bring_up

DEAD_PID = 2 ** 22 + 12345  # above pid_max's default: never a live process


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))


def up(cfg: str) -> tuple[FakeKernel, State]:
    fk = FakeKernel(resolve=RESOLVE)
    _, st = bring_up(cfg, fk)
    st.data.config = str(ROOT / cfg)
    st.save()
    return fk, st


def plan_of(stack: str = "main"):
    st = State.load(stack)
    assert st is not None
    return st.plan


def test_two_disposables_get_distinct_names_addresses_and_links():
    fk, _ = up("configs/basic.toml")
    a = disposable.add("main", None, "red", kernel=fk)
    b = disposable.add("main", None, "orange", kernel=fk)
    assert (a.name, b.name) == ("disp1", "disp2")
    assert a.ipv4 != b.ipv4 and a.netvm == b.netvm == "sys-firewall"
    p = plan_of()
    fw = p.qube("sys-firewall")
    assert {c.name for c in fw.clients} >= {"disp1", "disp2"}
    rules = str(p.ns(fw.netns).ruleset)
    assert "antispoof disp1" in rules and "antispoof disp2" in rules
    assert fk.ifaces[(a.netns, "eth0")] and fk.ifaces[(b.netns, "eth0")]
    assert b.label == "orange" and b.settings["home"] == "ephemeral"


def test_the_netvm_knows_the_new_client_before_its_link_exists():
    fk, _ = up("configs/basic.toml")
    n = len(fk.events)
    q = disposable.add("main", None, "red", kernel=fk)
    ev = fk.events[n:]
    fw_ns = plan_of().qube("sys-firewall").netns
    rules = next(i for i, e in enumerate(ev) if e[0] == "nft" and e[1] == fw_ns)
    assert "antispoof disp1" in str(ev[rules][2])
    link = next(i for i, e in enumerate(ev) if e[0] == "veth")
    ups = [i for i, e in enumerate(ev) if e[0] == "link_up"]
    assert rules < link < min(ups)
    assert ev[link][1:] == (fw_ns, f"vif{q.qid}", q.netns, "eth0")


def test_removal_leaves_the_stack_as_up_left_it():
    fk, _ = up("configs/basic.toml")
    before = plan_of()
    q = disposable.add("main", None, "red", kernel=fk)
    assert disposable.remove("main", [q.name], kernel=fk) == [q.name]
    assert plan_of() == before
    assert q.netns not in fk.namespaces
    assert not any(q.netns in f for f in fk.files)
    assert not [k for k in fk.ifaces if k[1] == f"vif{q.qid}"]
    assert reconcile.teardown(State.load("main"), fk) == []
    assert fk.leftovers() == {}


def test_an_orphan_of_a_killed_run_is_reaped_by_the_next_run():
    fk, _ = up("configs/basic.toml")
    dead = disposable.add("main", None, "red", kernel=fk, runner=DEAD_PID)
    assert disposable.orphaned(plan_of().qube(dead.name))
    live = disposable.add("main", None, "red", kernel=fk)
    names = [q.name for q in disposable.disposables(plan_of())]
    assert names == [live.name] and dead.netns not in fk.namespaces
    assert not disposable.orphaned(plan_of().qube(live.name))
    assert disposable.remove("main", None, kernel=fk) == []  # the live one is no orphan


def test_behind_a_vpn_the_endpoint_set_is_reloaded_in_the_same_transaction():
    fk, st = up("configs/tor-over-vpn.toml")
    info = plan_of().infos(VpnInfo)[0]
    n = len(fk.events)
    disposable.add("main", info.qube, "red", kernel=fk)
    loads = [e for e in fk.events[n:] if e[0] == "nft" and e[1] == info.netns]
    assert len(loads) == 1  # one transaction: the table replaced and the set refilled
    cmds = loads[0][2]["nftables"]
    adds = [c for c in cmds if "element" in c.get("add", {})]
    assert adds and "203.0.113.10" in str(adds)
    assert cmds.index(adds[0]) > max(i for i, c in enumerate(cmds) if "table" in c.get("add", {}))


def test_a_changed_config_is_refused_before_anything_changes(tmp_path):
    cfg = tmp_path / "basic.toml"
    cfg.write_text((ROOT / "configs/basic.toml").read_text())
    fk = FakeKernel(resolve=RESOLVE)
    plan = build(load_inputs(str(cfg), "main", LAB, SPECS), "main", LAB)
    st = State("main")
    st.create()
    st.data.config = str(cfg)
    fk.state_root = st.dir
    reconcile.up(plan, st, fk, RUNTIMES)
    cfg.write_text(cfg.read_text().replace('label = "blue"', 'label = "purple"'))
    n = len(fk.events)
    with pytest.raises(StateError, match="another plan than the one `up`"):
        disposable.add("main", None, "red", kernel=fk)
    assert fk.events[n:] == [] and plan_of() == plan


@pytest.mark.parametrize(("netvm", "label", "word"), [
    ("nope", "red", "--netvm 'nope'"), ("work", "red", "provides no network"),
    (None, "pink", "--label 'pink'")])
def test_bad_requests_are_one_line_and_change_nothing(netvm, label, word):
    fk, _ = up("configs/basic.toml")
    n = len(fk.events)
    with pytest.raises(UsageError) as e:
        disposable.add("main", netvm, label, kernel=fk)
    assert word in str(e.value) and "\n" not in str(e.value)
    assert fk.events[n:] == []


def test_default_netvm_and_names():
    from netstack.config import parse

    def plan(text):
        return build(parse(text, SPECS), "main", LAB)

    base = (ROOT / "configs/basic.toml").read_text()
    assert disposable.default_netvm(plan(base)) == "sys-firewall"
    tov = build(load_inputs(str(ROOT / "configs/tor-over-vpn.toml"), "main", LAB, SPECS),
                "main", LAB)
    assert disposable.default_netvm(tov) == "sys-whonix"
    noapp = "\n".join(base.split("[qubes.work]")[0].splitlines())
    assert disposable.default_netvm(plan(noapp)) == "sys-firewall"
    taken = plan(base + '\n[qubes.disp1]\nkind = "app"\nnetvm = "sys-net"\n')
    assert disposable.new_name(taken) == "disp2"


def test_the_lock_waits_for_another_writer_up_to_its_deadline():
    held, release = threading.Event(), threading.Event()

    def holder():
        with StackLock("main"):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        with pytest.raises(StateError, match="being changed"), StackLock("main", wait=0.05):
            pass
        threading.Timer(0.1, release.set).start()
        with StackLock("main", wait=5):
            assert release.is_set()
    finally:
        release.set()
        t.join()


def test_compaction_keeps_exactly_the_live_records():
    st = State("main")
    st.create()
    recs = [state.FileRec(f"/run/x/{i}") for i in range(6)]
    for r in recs:
        st.record(r)
    for r in recs[::2]:
        st.forget(r)
    assert st.removed == 6  # three records and three removals
    live = st.objects
    st.compact()
    assert st.removed == 0 and st.objects == live
    again = State.load("main")
    assert again.objects == live and again.removed == 0
    st.record(state.FileRec("/run/x/new"))
    assert State.load("main").objects == [*live, state.FileRec("/run/x/new")]


@pytest.fixture
def sockets(tmp_path):
    made = []

    def make(path):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        made.append(s)
        return str(path)

    yield make
    for s in made:
        s.close()


def test_gui_grant_prefers_wayland_and_warns_for_x11(tmp_path, sockets, monkeypatch):
    who = sandbox.Account("u", 4242, 4242)
    wl = sockets(tmp_path / "wayland-1")
    g = sandbox.gui_grant({"XDG_RUNTIME_DIR": str(tmp_path), "WAYLAND_DISPLAY": "wayland-1",
                           "DISPLAY": ":0"}, who)
    assert g is not None and g.display == "wayland" and g.path == wl and g.warning is None
    assert g.inside == "/run/user/4242/wayland-0"
    assert ("WAYLAND_DISPLAY", "wayland-0") in g.env
    argv = sandbox.argv("ns", "q", who, None, ["true"], grants=(g,))
    assert argv[argv.index(wl) - 1] == "--bind" and argv[argv.index(wl) + 1] == g.inside
    # no Wayland socket: none granted, whatever the environment says
    assert sandbox.gui_grant({"XDG_RUNTIME_DIR": str(tmp_path / "none")}, who) is None
    (tmp_path / "not-a-socket").write_text("")
    assert sandbox.gui_grant({"XDG_RUNTIME_DIR": str(tmp_path),
                              "WAYLAND_DISPLAY": "not-a-socket"}, who) is None
    # X11: granted with the warning (a fake /tmp/.X11-unix through _is_socket)
    monkeypatch.setattr(sandbox, "_is_socket", lambda p: p == "/tmp/.X11-unix/X7")
    monkeypatch.setattr(sandbox.pwd, "getpwuid", lambda uid: type("P", (), {
        "pw_dir": str(tmp_path)}))
    (tmp_path / ".Xauthority").write_text("cookie")
    x = sandbox.gui_grant({"DISPLAY": ":7.0"}, who)
    assert x is not None and x.display == "x11" and x.warning == sandbox.X11_WARNING
    assert ("DISPLAY", ":7") in x.env and x.xauthority == str(tmp_path / ".Xauthority")
    assert sandbox.gui_grant({"DISPLAY": "remote:7"}, who) is None  # never a TCP display
    assert not sandbox.argv("ns", "q", who, None, ["true"]).count("--bind")


def test_gui_must_be_a_boolean():
    from netstack.config import parse
    from netstack.errors import ConfigError

    base = (ROOT / "configs/basic.toml").read_text()
    parse(base.replace('label = "blue"', 'label = "blue"\ngui = true'), SPECS)
    with pytest.raises(ConfigError, match="'gui'"):
        parse(base.replace('label = "blue"', 'label = "blue"\ngui = "yes"'), SPECS)


def test_a_disposable_goes_where_the_user_means():
    """Regression (issue 26): without --netvm a disposable went behind the first app qube's
    netvm in plan order (behind sys-firewall, in clear, when a clear-net qube came first;
    behind sys-net after an unrelated `attach`). Now: --like, the config's default_dispvm,
    else the most private path; never the order of the config."""
    import pytest as _pytest

    from netstack.config import parse
    from netstack.errors import ConfigError, UsageError

    tov = (ROOT / "configs/tor-over-vpn.toml").read_text()
    clear_first = tov.replace("[qubes.anon-whonix]", '[qubes.aaa]\nkind = "app"\nnetvm = '
                              '"sys-firewall"\nlabel = "green"\n\n[qubes.anon-whonix]', 1)

    def plan(text, moved=None):
        import dataclasses
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write(text)
            f.flush()
            inputs = load_inputs(f.name, "main", LAB, SPECS)
        if moved:
            inputs = dataclasses.replace(inputs, topo=disposable.topology(inputs.topo, [], (),
                                                                          moved))
        return build(inputs, "main", LAB)

    assert disposable.template(plan(clear_first)).netvm == "sys-whonix"
    # an unrelated qube moved: still the gateway
    assert disposable.template(plan(clear_first, {"aaa": "sys-net"})).netvm == "sys-whonix"
    named = clear_first.replace("[qubes.", '[stack]\ndefault_dispvm = "aaa"\n\n[qubes.', 1)
    t = disposable.template(plan(named))
    assert (t.netvm, t.label) == ("sys-firewall", "green") and "default_dispvm" in t.why
    # the default qube itself moved: disposables follow it, as Qubes' do their template
    assert disposable.template(plan(named, {"aaa": "sys-proxyvm"})).netvm == "sys-proxyvm"
    like = disposable.template(plan(named), like="anon-whonix")
    assert like.netvm == "sys-whonix" and "--like" in like.why
    with _pytest.raises(UsageError, match="--like 'sys-whonix'"):
        disposable.template(plan(named), like="sys-whonix")
    basic = (ROOT / "configs/basic.toml").read_text()
    assert disposable.template(plan(basic)).netvm == "sys-firewall"  # no Tor, no VPN
    for bad in ('"sys-net"', '"nosuch"', "3"):
        with _pytest.raises(ConfigError, match="default_dispvm"):
            parse(f"[stack]\ndefault_dispvm = {bad}\n\n" + basic, SPECS)


def test_a_disposable_made_like_a_qube_gets_its_firewall_rules(tmp_path, monkeypatch):
    """Regression (review): `run --like work` (or default_dispvm = "work") made a
    disposable with work's netvm but none of work's rules: it could reach what work may
    not. Now it carries the same list, enforced in its netvm."""
    from netstack import firewall_live, sandbox

    monkeypatch.setattr(sandbox, "HOME_ROOT", str(tmp_path / "lib"))
    fk, _ = up("configs/basic.toml")
    firewall_live.change("main", "work", "add", ["action=drop", "dsthost=198.51.100.53"],
                         kernel=fk)
    d = disposable.add("main", None, None, kernel=fk, like="work")
    rules = plan_of().qube(d.name).firewall
    assert rules == plan_of().qube("work").firewall
    fw = plan_of().qube("sys-firewall")
    assert f"fw-{d.name}" in str(plan_of().ns(fw.netns).ruleset)
    plain = disposable.add("main", "sys-firewall", None, kernel=fk)  # like no qube: none
    assert plan_of().qube(plain.name).firewall is None
