"""The kinds a config may name: each a pure spec and a runtime. Adding a kind (say an I2P
gateway) is its spec module, its runtime module and one line here; no other module
names a kind (tests/unit/test_kinds.py adds one in a test to show it).

Only the command layer imports this registry: it hands the specs to config validation and
plan.build (which copy each kind's traits into the plan) and the runtimes to reconcile and
status. Lower layers read the plan's data, never the registry (tests/unit/test_layers.py)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from netstack.kinds.app import AppSpec
from netstack.kinds.app_runtime import AppRuntime
from netstack.kinds.firewall import FirewallSpec
from netstack.kinds.net import NetSpec
from netstack.kinds.net_runtime import NetRuntime
from netstack.kinds.runtime import KindRuntime
from netstack.kinds.spec import KindSpec
from netstack.kinds.tor import TorSpec
from netstack.kinds.tor_runtime import TorRuntime
from netstack.kinds.vpn import VpnSpec
from netstack.kinds.vpn_runtime import VpnRuntime


@dataclass(frozen=True)
class Kind:
    spec: KindSpec
    runtime: KindRuntime


KINDS: dict[str, Kind] = {k.spec.kind: k for k in (
    Kind(NetSpec(), NetRuntime()),
    Kind(FirewallSpec(), KindRuntime()),
    Kind(VpnSpec(), VpnRuntime()),
    Kind(TorSpec(), TorRuntime()),
    Kind(AppSpec(), AppRuntime()),
)}


class _Half(Mapping[str, Any]):
    """One half of KINDS by kind name, read live (a kind a test adds shows up here too)."""

    def __init__(self, half: str) -> None:
        self._half = half

    def __getitem__(self, kind: str) -> Any:
        return getattr(KINDS[kind], self._half)

    def __iter__(self) -> Iterator[str]:
        return iter(KINDS)

    def __len__(self) -> int:
        return len(KINDS)


SPECS: Mapping[str, KindSpec] = _Half("spec")
RUNTIMES: Mapping[str, KindRuntime] = _Half("runtime")
