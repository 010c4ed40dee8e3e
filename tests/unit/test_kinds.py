"""Adding a qube kind is one spec, one runtime and one registry line (issue 25): an I2P-like
gateway written here, in the test, and registered for the test only, goes through config
validation, the plan, bring-up on the recording kernel, the audit of its generated rules and
`status`, with no other file of netstack touched."""

from __future__ import annotations

from typing import Any

import pytest

from netstack import reconcile
from netstack.errors import ConfigError
from netstack.kinds import registry
from netstack.kinds.registry import RUNTIMES, SPECS, Kind
from netstack.kinds.runtime import KindRuntime, LiveFacts
from netstack.kinds.spec import KindSpec, KindTraits, QubeContext
from netstack.model import Daemon, QubeInfo, UplinkSpec
from netstack.plan import build, load_inputs
from netstack.rules import common
from netstack.rules.nft import Ruleset
from netstack.state import State
from tests.fakekernel import FakeKernel

LAB = UplinkSpec("lab")
CONFIG = """
[qubes.sys-net]
kind = "net"

[qubes.sys-firewall]
kind = "firewall"
netvm = "sys-net"

[qubes.sys-i2p]
kind = "i2p"
netvm = "sys-firewall"
tunnels = 3

[qubes.eepsite]
kind = "app"
netvm = "sys-i2p"
"""


class I2pSpec(KindSpec):
    """A gateway that forwards its clients upstream (a stand-in for an I2P router's rules)
    and runs one daemon."""

    kind = "i2p"
    config_keys = frozenset({"tunnels"})
    traits = KindTraits(strict_replies=True, protection="i2p")

    def validate(self, q: Any) -> None:
        n = q.settings.get("tunnels", 2)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
            raise ConfigError(f"qube {q.name!r} field 'tunnels'", f"{n!r} is not 1-16",
                              "e.g. tunnels = 2")

    def rules(self, ctx: QubeContext, info: Any, rs: Ruleset) -> None:
        common.provide_network(rs, ctx.client_vifs, ctx.upstream_if)
        common.own_output_upstream(rs, ctx.upstream_if)

    def daemons(self, ctx: QubeContext, info: Any) -> list[Daemon]:
        return [Daemon(f"i2pd-{ctx.qube.name}", ctx.netns, ("i2pd", "--tunnels",
                                                            str(ctx.qube.settings["tunnels"])))]

    def client_env(self, q: QubeInfo) -> dict[str, str]:
        return {"I2P_PROXY": f"{q.ipv4}:4444"}


class I2pRuntime(KindRuntime):
    def __init__(self) -> None:
        self.prepared: list[str] = []

    def prepare(self, q: QubeInfo, rt: reconcile.Runtime) -> None:
        self.prepared.append(q.name)

    def status(self, q: QubeInfo, live: LiveFacts, k: Any) -> dict[str, Any]:
        return {"i2p": {"tunnels": q.settings["tunnels"]}}

    def status_lines(self, entry: dict[str, Any]) -> list[str]:
        return [f"i2p: {entry['i2p']['tunnels']} tunnels"]


@pytest.fixture
def i2p(monkeypatch, tmp_path):
    """The registry line, for this test only."""
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))
    kind = Kind(I2pSpec(), I2pRuntime())
    monkeypatch.setitem(registry.KINDS, "i2p", kind)
    cfg = tmp_path / "i2p.toml"
    cfg.write_text(CONFIG)
    return kind, str(cfg)


def test_a_new_kind_is_a_spec_a_runtime_and_a_line(i2p):
    kind, cfg = i2p
    assert SPECS["i2p"] is kind.spec and RUNTIMES["i2p"] is kind.runtime  # the views follow
    plan = build(load_inputs(cfg, "main", LAB, SPECS), "main", LAB)
    gw = plan.qube("sys-i2p")
    assert gw.traits.protection == "i2p" and gw.traits.provides_network  # copied in
    assert gw.client_env == {"I2P_PROXY": f"{gw.ipv4}:4444"}
    assert [d.argv for d in plan.daemons if d.netns == gw.netns] == [("i2pd", "--tunnels", "3")]
    assert plan.chain("eepsite")[1].name == "sys-i2p"

    fk = FakeKernel()
    st = State("main")
    st.create()
    fk.state_root = st.dir
    reconcile.up(plan, st, fk, RUNTIMES)
    assert kind.runtime.prepared == ["sys-i2p"]  # its runtime was called, with the plan's qube
    assert any(e[0] == "nft" and e[1] == gw.netns for e in fk.events)  # its rules loaded

    from netstack.audit import audit

    rulesets = {n.name: n.ruleset for n in plan.namespaces if n.ruleset}
    results, _ = audit(plan, rulesets, {})
    mine = {r.property: r.status for r in results if r.qube == "sys-i2p"}
    assert mine["default drop"] == "PASS" and any("spoof" in p for p in mine), mine
    assert RUNTIMES["i2p"].status_lines(
        RUNTIMES["i2p"].status(gw, LiveFacts([], {}, {}), fk)) == ["i2p: 3 tunnels"]
    reconcile.teardown(st, fk)
    assert fk.leftovers() == {}


def test_its_keys_are_validated_like_any_kind(i2p):
    from netstack import config

    bad = CONFIG.replace("tunnels = 3", "tunnels = 99")
    with pytest.raises(ConfigError, match="qube 'sys-i2p' field 'tunnels'.*not 1-16"):
        config.parse(bad, SPECS)
    with pytest.raises(ConfigError, match="unknown key 'hops'"):
        config.parse(CONFIG.replace("tunnels = 3", "hops = 3"), SPECS)


def test_without_the_line_the_kind_does_not_exist(tmp_path):
    from netstack import config

    with pytest.raises(ConfigError, match="'i2p' is not a kind"):
        config.parse(CONFIG, SPECS)
