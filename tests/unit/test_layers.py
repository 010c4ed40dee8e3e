"""The layers of netstack as a contract the import graph must keep (issue 25). grimp (the
graph library of import-linter) reads every import statement of the package, those
inside functions included (only `if TYPE_CHECKING:` blocks are left out: they never run).
Three promises, each a test:

- every module is placed in a layer below (a new module must be placed: the table is
  the architecture, docs/architecture.md explains it);
- no module imports one of a higher layer, not even inside a function;
- the import graph has no cycle at all.

The one way down for what a lower layer needs of a higher one is data (the plan carries
each kind's traits) or an argument (config validation gets the kind specs, reconcile the
kind runtimes, everything the kernel), never an import."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import grimp
import pytest

# bottom to top; siblings in one layer may import each other (the graph stays acyclic)
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["netstack", "errors", "codec", "names", "netns", "seccomp", "rules",
                    "callclient", "rules.nft", "audit.space", "leaktest", "leaktest.catalogue",
                    "leaktest.prober", "leaktest.send", "vpn", "vpn.kernelwg", "vpn.checks",
                    "tor", "tor.control", "lab", "lab.pki", "kinds", "schema", "rtnl",
                    "nl80211", "journal"]),
    ("model and kernel seam", ["model", "fastpath", "hostcaps", "dnswire", "pathfacts",
                               "sandbox", "templates", "kernel"]),
    ("pure derivations", ["addressing", "config", "invariants", "audit.invariants",
                          "rules.common", "rules.qubefw",
                          "rules.host", "vpn.wgconf", "vpn.ovpnconf", "vpn.info", "vpn.health",
                          "vpn.runtime", "tor.obfs4", "tor.network", "tor.firstvote", "tor.gateway",
                          "tor.filter", "dhcp", "audit.evaluator", "audit.properties",
                          "audit.clientrules", "audit.paths", "audit.e2e", "audit.drift",
                          "audit.onefile", "policy", "lab.services", "lab.sink", "lab.serve",
                          "lab.content", "lab.stun", "lab.vpnserver", "vpn.natpmp",
                          "vpn.portfwd", "lab.natpmpd", "lab.isp", "watchfilter",
                          "audit.expect", "audit.matrix"]),
    ("kind specs", ["kinds.spec", "kinds.net", "kinds.firewall", "kinds.vpn", "kinds.tor",
                    "kinds.app"]),
    ("plan", ["plan", "lab.plan"]),
    ("apply", ["state", "supervisor", "processes", "reconcile", "health", "rules.names"]),
    ("kind runtimes", ["kinds.runtime", "kinds.net_runtime", "kinds.vpn_runtime",
                       "kinds.tor_runtime", "kinds.app_runtime", "vpn.failover", "vpn.hook",
                       "vpn.portfwd_run", "connectivity"]),
    ("kind registry", ["kinds.registry"]),
    ("live changes", ["live", "stack", "disposable", "firewall_live", "attach", "service",
                      "executor", "template_cmd", "calls"]),
    ("proofs", ["audit", "audit.oracle", "audit.replay", "audit.whatif", "audit.rulesetfile",
                "leaktest.battery", "leaktest.rulecases", "leaktest.local", "leaktest.callcheck",
                "leaktest.capture", "leaktest.endpoints", "check", "metrics", "watch"]),
    ("commands", ["cli", "pytest_plugin", "completion"]),
]


def _full(m: str) -> str:
    return "netstack" if m == "netstack" else f"netstack.{m}"


LAYER_OF = {_full(m): i for i, (_name, mods) in enumerate(LAYERS) for m in mods}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("netstack", exclude_type_checking_imports=True, cache_dir=None)


def test_every_module_has_a_layer(graph: grimp.ImportGraph) -> None:
    missing = sorted(m for m in graph.modules if m not in LAYER_OF)
    assert not missing, f"place these modules in LAYERS (tests/unit/test_layers.py): {missing}"


def test_no_import_goes_up(graph: grimp.ImportGraph) -> None:
    up = []
    for m in graph.modules:
        for x in graph.find_modules_directly_imported_by(m):
            if LAYER_OF.get(x, -1) > LAYER_OF.get(m, 99):
                for d in graph.get_import_details(importer=m, imported=x):
                    up.append(f"{m}:{d['line_number']} ({LAYERS[LAYER_OF[m]][0]}) imports {x} "
                              f"({LAYERS[LAYER_OF[x]][0]})")
    assert not up, "upward imports:\n" + "\n".join(sorted(up))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycles_finder_finds_a_cycle() -> None:
    """The detector's anti-test: a known cycle is found, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle(graph: grimp.ImportGraph) -> None:
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert cycles(edges) == []


def test_upward_import_is_caught(graph: grimp.ImportGraph) -> None:
    """The contract's anti-test: the graph does see a function-level import (this is how
    model.py once reached the kind registry), so an upward one would be named."""
    details = graph.get_import_details(importer="netstack.check",
                                       imported="netstack.kinds.registry")
    assert details, "expected check's function-level import of the registry in the graph"
    assert LAYER_OF["netstack.kinds.registry"] < LAYER_OF["netstack.check"]


# Where a RealKernel may be made: the entry of each program (the CLI, the supervisor, the
# DHCP client's hook, the NAT-PMP renewer, the pytest plugin's fixture) and Kernel.fork
# (another thread's own handles, derived from the entry's). Everything else is handed the
# kernel.
KERNEL_ENTRIES = {("netstack/cli.py", "main"), ("netstack/supervisor.py", "main"),
                  ("netstack/dhcp.py", "main"), ("netstack/pytest_plugin.py", "netstack_chain"),
                  ("netstack/kernel.py", "fork"), ("netstack/vpn/portfwd_run.py", "main")}


def kernel_made(root: Any) -> list[tuple[str, str, int]]:
    """(file, enclosing function, line) of every RealKernel() call under `root`."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root.parent))
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "RealKernel":
                    out.append((rel, fn.name, node.lineno))
        for node in tree.body:  # module level
            for sub in ast.walk(node):
                if isinstance(node, ast.FunctionDef | ast.ClassDef):
                    break
                if isinstance(sub, ast.Call) and getattr(sub.func, "id", None) == "RealKernel":
                    out.append((rel, "<module>", sub.lineno))
    return out


def test_the_kernel_is_made_only_at_entries() -> None:
    made = kernel_made(Path(__file__).resolve().parents[2] / "netstack")
    stray = [m for m in made if (m[0], m[1]) not in KERNEL_ENTRIES]
    assert not stray, f"RealKernel() made below a program's entry (pass it down): {stray}"
    assert {(f, fn) for f, fn, _ in made} == KERNEL_ENTRIES  # the list is not stale


def test_the_kernel_check_sees_a_stray_kernel(tmp_path: Path) -> None:
    pkg = tmp_path / "netstack"
    pkg.mkdir()
    (pkg / "deep.py").write_text("def helper():\n    k = RealKernel()\n    return k\n")
    assert kernel_made(pkg) == [("netstack/deep.py", "helper", 2)]
