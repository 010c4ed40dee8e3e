"""The reconcile on the recording fake kernel, for every shipped and test config: rulesets
before links, the VPN's endpoint set before its go signal, `down` removes exactly what `up`
made, a failure at any step rolls back (and says what it could not undo), and live changes
keep the same order. No root: nothing touches the host."""

from __future__ import annotations

from pathlib import Path

import pytest

import netstack.names
from netstack import reconcile
from netstack.errors import NetstackError
from netstack.kinds.registry import RUNTIMES, SPECS
from netstack.lab.vpnserver import TEMPLATES
from netstack.model import Plan, UplinkSpec
from netstack.plan import build, load_inputs
from netstack.rules.nft import commands
from netstack.state import State
from netstack.vpn.info import VpnInfo, set_elements, transport
from tests.fakekernel import FakeKernel

ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in
                      [*ROOT.glob("configs/*.toml"), *ROOT.glob("tests/configs/*.toml")])
# every config also with IPv6 on ("+ipv6": the same table with [stack] ipv6 = true)
CONFIGS = BASE_CONFIGS + [c + "+ipv6" for c in BASE_CONFIGS]
LAB = UplinkSpec("lab")
RESOLVE = {"vpn.lab.test": ["203.0.113.10"]}


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))


def fake_lab(lab, write) -> tuple[str, ...]:
    """The lab's key making, faked: provider files from the templates."""
    for ref, path in lab.vpn_server.files.items():
        write(path, TEMPLATES[ref]())
    if any(n.role == "bridge" for n in lab.tor_nodes.values()):
        from netstack.tor.network import bridge_line_path

        write(bridge_line_path(lab.tor_dir), "obfs4 203.0.113.51:5443 cert=" + "A" * 70
              + " iat-mode=0\n")
    return ("DirAuthority fake",) if lab.tor else ()


def config_path(cfg: str) -> str:
    """A config of the matrix: "+ipv6" means the same table with IPv6 on."""
    if not cfg.endswith("+ipv6"):
        return str(ROOT / cfg)
    import tempfile

    src = ROOT / cfg[:-len("+ipv6")]
    out = Path(tempfile.mkdtemp()) / src.name
    text = src.read_text()
    # the table's own [stack] gains ipv6 (TOML allows one [stack] table)
    out.write_text(text.replace("[stack]\n", "[stack]\nipv6 = true\n", 1) if "[stack]\n"
                   in text else "[stack]\nipv6 = true\n\n" + text)
    return str(out)


def bring_up(cfg: str, fk: FakeKernel, stack: str = "main") -> tuple[Plan, State]:
    inputs = load_inputs(config_path(cfg), stack, LAB, SPECS)
    plan = build(inputs, stack, LAB)
    st = State(stack)
    st.create()
    fk.state_root = st.dir
    reconcile.up(plan, st, fk, RUNTIMES, inputs.providers, lab_maker=fake_lab)
    return plan, st


def first(events, pred) -> int:
    return next((i for i, e in enumerate(events) if pred(e)), len(events))


def touches_link_of(e, ns: str) -> bool:
    if e[0] == "veth":
        return ns in (e[1], e[3])
    if e[0] == "link_move":
        return e[2] == ns
    if e[0] in ("link_up", "addr_add"):
        return e[1] == ns
    return False


@pytest.mark.parametrize("cfg", CONFIGS)
def test_every_ruleset_before_any_link_of_its_namespace(cfg):
    fk = FakeKernel(resolve=RESOLVE)
    plan, _ = bring_up(cfg, fk)
    ev = fk.events
    checked = 0
    for n in plan.namespaces:
        if n.ruleset is None:
            continue
        rules = first(ev, lambda e, ns=n.name: e[0] == "nft" and e[1] == ns)
        link = first(ev, lambda e, ns=n.name: touches_link_of(e, ns))
        assert rules < link < len(ev), (n.name, rules, link)
        # and that first transaction is the whole ruleset, loaded into a fresh namespace
        assert ev[rules][2] == commands(n.ruleset, fresh=True)
        checked += 1
    assert checked >= len(plan.qubes)
    # and every link goes up only once every ruleset of the plan is in place
    last_rules = max(first(ev, lambda e, ns=n.name: e[0] == "nft" and e[1] == ns)
                     for n in plan.namespaces if n.ruleset is not None)
    setup = [i for i, e in enumerate(ev) if e[0] == "link_up"]
    assert setup and min(setup) > last_rules


VPN_CONFIGS = [c for c in CONFIGS
               if 'kind = "vpn"' in (ROOT / c.removesuffix("+ipv6")).read_text()]


@pytest.mark.parametrize("cfg", VPN_CONFIGS)
def test_vpn_endpoints_admitted_before_the_tunnel_may_start(cfg):
    fk = FakeKernel(resolve=RESOLVE)
    plan, st = bring_up(cfg, fk)
    infos = plan.infos(VpnInfo)
    assert infos
    for info in infos:
        go = first(fk.events, lambda e, p=info.spec_path: e == ("write_file", p))
        assert go < len(fk.events), "the tunnel's go signal was never written"
        want_v4, _ = set_elements(transport(info, st.data.resolved[info.qube]))
        assert want_v4 == [{"concat": ["203.0.113.10", "udp", 51820]}]
        admitted = [i for i, e in enumerate(fk.events[:go])
                    if e[0] == "nft" and e[1] == info.netns
                    and {"add": {"element": {"family": "inet", "table": "netstack",
                                             "name": "vpn_endpoints", "elem": want_v4}}}
                    in e[2]["nftables"]]
        assert admitted, "the endpoint set was not filled before the go signal"
        # the supervisor (which starts the tunnel when the go signal appears) came before
        assert first(fk.events, lambda e: e[0] == "spawn") < go


def test_literal_endpoint_is_in_the_kill_switch_transaction(tmp_path):
    from tests.unit.test_vpn_parsers import WG_MULLVAD_LIKE

    wg = tmp_path / "wg.conf"
    wg.write_text(WG_MULLVAD_LIKE.replace("185.65.134.1", "203.0.113.10"))
    cfg = tmp_path / "vpn.toml"
    cfg.write_text((ROOT / "configs/vpn.toml").read_text().replace('"lab:wireguard"',
                                                                    f'"{wg}"'))
    fk = FakeKernel()
    plan, _ = bring_up(str(cfg), fk)
    ns = plan.qube("sys-proxyvm").netns
    tx = next(e[2] for e in fk.events if e[0] == "nft" and e[1] == ns)
    sets = [c["add"]["set"] for c in tx["nftables"] if "set" in c.get("add", {})]
    assert {"concat": ["203.0.113.10", "udp", 51820]} in sets[0]["elem"]
    assert any("rule" in c.get("add", {}) and c["add"]["rule"].get("comment") == "VPN transport"
               for c in tx["nftables"])  # the kill switch, in the same transaction
    assert not [e for e in fk.events if e[0] == "resolve"]  # an address is never looked up


def made(events) -> dict[str, set]:
    out: dict[str, set] = {"netns": set(), "veth": set(), "file": set(), "dir": set(),
                           "proc": set()}
    for e in events:
        if e[0] == "netns_create":
            out["netns"].add(e[1])
        elif e[0] == "veth":
            out["veth"].add((e[1], e[2]))
        elif e[0] == "write_file":
            out["file"].add(e[1])
        elif e[0] == "make_dir":
            out["dir"].add(e[1])
    return out


@pytest.mark.parametrize("cfg", CONFIGS)
def test_down_removes_exactly_what_up_made(cfg):
    import os

    fk = FakeKernel(resolve=RESOLVE)
    plan, st = bring_up(cfg, fk)
    up_events = list(fk.events)
    spawned = [e for e in up_events if e[0] == "spawn"]
    assert len(spawned) == 1  # one supervisor
    assert os.path.exists(st.dir)
    problems = reconcile.teardown(State.load("main"), fk)
    assert problems == []
    assert fk.leftovers() == {}
    down = fk.events[len(up_events):]
    m = made(up_events)
    assert {e[1] for e in down if e[0] == "netns_delete"} == m["netns"]
    outside = {f for f in m["file"] if not f.startswith(st.dir)}
    from netstack.vpn.info import VpnInfo
    from netstack.vpn.runtime import uapi_socket

    # and the control socket each wireguard-go that up started makes for itself
    sockets = {uapi_socket(i.dev) for i in plan.infos(VpnInfo) if i.backend == "wireguard-go"}
    assert {e[1] for e in down if e[0] == "remove_file"} == outside | sockets
    assert {e[1] for e in down if e[0] == "remove_dir"} == \
        {d for d in m["dir"] if not d.startswith(st.dir)}
    assert len([e for e in down if e[0] == "kill"]) == 1
    assert not os.path.exists(st.dir)
    # nothing was removed that was not made
    assert not [e for e in down if e[0] in ("link_del", "link_return")]


MUTATING = ("netns_create", "sysctl", "nft", "veth", "link_up", "addr_add", "route_add",
            "write_file", "make_dir", "spawn", "bind", "resolve")


def probe_plan(cfg: str) -> list[list[str]]:
    """The hostnames of every qube's firewall rules in the config."""
    from netstack.config import load

    topo = load(config_path(cfg), SPECS)
    return [[r.dsthost for r in q.firewall if r.host_is_name]
            for q in topo.qubes if q.firewall is not None]


@pytest.mark.parametrize("cfg", BASE_CONFIGS)
def test_a_failure_at_any_step_rolls_back_everything(cfg):
    import os

    probe = FakeKernel(resolve=RESOLVE)
    bring_up(cfg, probe, "probe")
    # a firewall rule's hostname that does not resolve is not a failure: the rule matches
    # nothing (fail closed) and `status` says so
    names = {host for q in probe_plan(cfg) for host in q}
    mutating = [e for e in probe.events if e[0] in MUTATING]  # fail counts only these
    steps = [i for i, e in enumerate(mutating) if not (e[0] == "resolve" and e[-1] in names)]
    assert len(steps) > 30
    for n in steps:
        calls = iter(range(10**6))
        fk = FakeKernel(fail=lambda e, n=n, c=calls: e[0] in MUTATING and next(c) == n,
                        resolve=RESOLVE)
        with pytest.raises(NetstackError) as exc:
            bring_up(cfg, fk, "s")
        assert "injected failure" in str(exc.value)
        assert fk.leftovers() == {}, (n, mutating[n])
        assert not os.path.exists(os.path.join(netstack.names.RUN_DIR, "s", "state.json"))


def test_rollback_reports_what_it_could_not_undo():
    import os

    target = "nst-s-sys-firewall"
    fk = FakeKernel(fail=lambda e: (e[0] == "route_add" and e[1] == "nst-s-work")
                    or e == ("netns_delete", target), resolve=RESOLVE)
    with pytest.raises(NetstackError) as exc:
        bring_up("configs/basic.toml", fk, "s")
    msg = str(exc.value)
    assert "could not undo" in msg and target in msg
    assert fk.leftovers()["namespaces"] == [target]
    st = State.load("s")  # kept, so a later `down` can try again
    assert st is not None and os.path.exists(st.dir)
    fk.fail = lambda e: False
    assert reconcile.teardown(st, fk) == []
    assert fk.leftovers() == {}


def two_plans(extra: str) -> tuple[Plan, Plan]:
    from netstack import config

    base = (ROOT / "configs/basic.toml").read_text()
    a = build(config.parse(base, SPECS), "main", LAB)
    b = build(config.parse(base + extra, SPECS), "main", LAB, previous=a)
    return a, b


def test_live_add_qube_loads_the_netvm_rules_before_its_link():
    a, b = two_plans('\n[qubes.disp1]\nkind = "app"\nnetvm = "sys-firewall"\n')
    assert {q.name: q.qid for q in a.qubes}.items() <= {q.name: q.qid for q in b.qubes}.items()
    steps = reconcile.diff(a, b)
    kinds = [type(s).__name__ for s in steps]
    fw = next(i for i, s in enumerate(steps) if isinstance(s, reconcile.LoadRules)
              and s.ns == "nst-main-sys-firewall")
    veth = next(i for i, s in enumerate(steps) if isinstance(s, reconcile.AddVeth))
    new_rules = next(i for i, s in enumerate(steps) if isinstance(s, reconcile.LoadRules)
                     and s.ns == "nst-main-disp1")
    assert kinds[0] == "MakeNs" and fw < veth and new_rules < veth
    assert not [s for s in steps if isinstance(s, reconcile.DelNs | reconcile.DelLink)]
    assert "antispoof disp1" in str(b.ns("nst-main-sys-firewall").ruleset)


def test_live_remove_qube_cuts_its_link_before_the_rules_change():
    b, a = two_plans('\n[qubes.disp1]\nkind = "app"\nnetvm = "sys-firewall"\n')
    steps = reconcile.diff(a, b)
    dl = next(i for i, s in enumerate(steps) if isinstance(s, reconcile.DelLink | reconcile.DelNs))
    fw = next(i for i, s in enumerate(steps) if isinstance(s, reconcile.LoadRules))
    assert dl < fw
    assert any(isinstance(s, reconcile.DelNs) and s.ns == "nst-main-disp1" for s in steps)


def test_live_change_on_the_fake_then_down():
    fk = FakeKernel()
    a, st = bring_up("configs/basic.toml", fk)
    from netstack import config

    extra = '\n[qubes.disp1]\nkind = "app"\nnetvm = "sys-firewall"\n'
    b = build(config.parse((ROOT / "configs/basic.toml").read_text() + extra, SPECS), "main", LAB,
              previous=a)
    from netstack import live

    live.commit(st, a, b, fk, "test")
    assert "nst-main-disp1" in fk.namespaces and fk.ifaces[("nst-main-disp1", "eth0")]
    assert State.load("main").plan == b
    live.commit(st, b, a, fk, "test")  # and away again
    assert "nst-main-disp1" not in fk.namespaces
    assert not any("disp1" in f for f in fk.files)
    assert reconcile.teardown(State.load("main"), fk) == []
    assert fk.leftovers() == {}


def test_live_change_refuses_what_it_cannot_do():
    import dataclasses

    from netstack import config
    from netstack.errors import UsageError
    from netstack.model import Daemon

    a = build(config.parse((ROOT / "configs/basic.toml").read_text(), SPECS), "main", LAB)
    c = dataclasses.replace(a, daemons=[Daemon("x", "nst-main-work", ("true",))])
    with pytest.raises(UsageError) as e:
        reconcile.diff(a, c)
    assert "down" in str(e.value)


def test_ipv6_literal_endpoint_is_admitted_without_dns(tmp_path):
    """An IPv6 literal endpoint is an address, never a name: it goes into the IPv6
    endpoint set in the kill switch's own transaction, and the tunnel's hook routes it to
    the netvm's IPv6 address."""
    import json

    from tests.unit.test_vpn_parsers import WG_MULLVAD_LIKE

    wg = tmp_path / "wg.conf"
    wg.write_text(WG_MULLVAD_LIKE.replace("185.65.134.1:51820", "[2001:db8::10]:51820"))
    cfg = tmp_path / "vpn6.toml"
    cfg.write_text((ROOT / "configs/vpn.toml").read_text().replace('"lab:wireguard"', f'"{wg}"')
                   + "\n[stack]\nipv6 = true\n")
    fk = FakeKernel()
    plan, st = bring_up(str(cfg), fk)
    info = plan.qube("sys-proxyvm").info
    assert transport(info, None) == [("2001:db8::10", "udp", 51820)]
    tx = next(e[2] for e in fk.events if e[0] == "nft" and e[1] == info.netns)
    sets = {c["add"]["set"]["name"]: c["add"]["set"] for c in tx["nftables"]
            if "set" in c.get("add", {})}
    assert sets["vpn_endpoints6"]["elem"] == [{"concat": ["2001:db8::10", "udp", 51820]}]
    assert "elem" not in sets["vpn_endpoints"]
    assert not [e for e in fk.events if e[0] == "resolve"]
    assert st.data.resolved["sys-proxyvm"] == {"2001:db8::10": ["2001:db8::10"]}
    spec = json.loads(fk.files[info.spec_path])
    assert {"dst": "2001:db8::10/128", "dev": "eth0", "via": info.gateway6} in spec["routes"]
    setconf = fk.files[info.conf_path]
    assert "Endpoint = [2001:db8::10]:51820" in setconf


def test_lab_servers_answer_before_any_clients_go_signal():
    """The first handshake is never lost (issue 16): `up` waits for the daemons others
    need (the lab's VPN servers, as their Daemon.ready says) before it writes a VPN
    qube's hook spec, the tunnel daemon's go signal."""
    fk = FakeKernel(resolve=RESOLVE)
    plan, _ = bring_up("configs/vpn.toml", fk)
    ready = {d.name: d.ready for d in plan.daemons if d.ready}
    assert ready == {"lab-wireguard": "hook", "lab-openvpn": "udp/1194"}
    info = plan.qube("sys-proxyvm").info
    kinds = [e[0] if e[0] != "write_file" else ("go" if e[1] == info.spec_path else "write")
             for e in fk.events]
    assert kinds.index("wait_ready") < kinds.index("go")
    assert [e for e in fk.events if e[0] == "wait_ready"] == \
        [("wait_ready", ("lab-openvpn", "lab-wireguard"))]


class Batching(FakeKernel):
    """The fake, also noting each batch call of the seam (what RealKernel sends as one
    netlink write per namespace)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.batches: list[tuple[str, int]] = []

    def veth_many(self, veths):
        self.batches.append(("veth", len(veths)))
        super().veth_many(veths)

    def addr_add_many(self, addrs):
        self.batches.append(("addr_add", len(addrs)))
        super().addr_add_many(addrs)

    def link_up_many(self, links):
        self.batches.append(("link_up", len(links)))
        super().link_up_many(links)

    def route_add_many(self, routes):
        self.batches.append(("route_add", len(routes)))
        super().route_add_many(routes)


@pytest.mark.parametrize("cfg", BASE_CONFIGS)
def test_links_addresses_and_routes_go_as_one_batch_each(cfg):
    """apply() hands each run of link, address, link-up and route steps over whole, and
    the batches cover exactly what the plan makes."""
    fk = Batching(resolve=RESOLVE)
    plan, _st = bring_up(cfg, fk)
    kinds = [k for k, _ in fk.batches]
    assert kinds == ["veth", "addr_add", "link_up", "route_add"], kinds
    sizes = dict(fk.batches)
    assert sizes["veth"] == len(plan.veths) and sizes["addr_add"] == len(plan.addrs)
    assert sizes["route_add"] == len(plan.routes)
    assert sizes["link_up"] == len([e for e in fk.events if e[0] == "link_up"])
