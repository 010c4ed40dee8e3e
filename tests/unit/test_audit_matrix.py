"""Issue 30 item 5: `audit --ruleset FILE --matrix [--port tcp/22]`, pure: the address
classes a ruleset treats alike for a service, which class reaches which (yes / some /
maybe), merged as fffuu merges them, as a table and as Graphviz DOT; bounded on the
real-world fixtures."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from netstack import cli
from netstack.audit import matrix
from netstack.errors import UsageError
from tests import cpuscale
from tests.unit.test_audit_expect import ACCEPT, doc, m, meta, pl

ROOT = Path(__file__).resolve().parents[2]


def net(a: str, n: int) -> dict:
    return {"prefix": {"addr": a, "len": n}}


FWD = [
    [m(pl("ip", "saddr"), "10.0.0.5"), {"drop": None}],
    [m(pl("ip", "saddr"), net("10.0.0.0", 24)), m(pl("ip", "daddr"), net("10.1.0.0", 24)),
     m(pl("tcp", "dport"), 22), ACCEPT],
    [m(meta("iifname"), "eth1"), m(pl("ip", "saddr"), net("10.2.0.0", 16)),
     m(pl("tcp", "dport"), 22), ACCEPT],
]


def the(ms: list[matrix.Matrix], hook: str, family: str = "ipv4") -> matrix.Matrix:
    return next(x for x in ms if x.hook == hook and x.family == family)


def edges(mx: matrix.Matrix) -> dict[tuple[str, str], str]:
    return {(tuple(mx.nodes[i].cidrs()), tuple(mx.nodes[j].cidrs())): e
            for (i, j), e in mx.edges.items()}


def test_classes_and_reach_for_one_service() -> None:
    ms = matrix.matrices(doc([], FWD), "t", matrix.parse_port("tcp/22"))
    f = the(ms, "forward")
    classes = sorted(tuple(n.cidrs(99)) for n in f.nodes)
    # 10.0.0.5 is dropped as a source and accepted as no destination: like the rest
    assert len(classes) == 4, classes
    assert ("10.1.0.0/24",) in classes and ("10.2.0.0/16",) in classes
    a = next(c for c in classes if "10.0.0.0/30" in c)
    assert "10.0.0.5/32" not in a and "10.0.0.4/32" in a  # the /24 but .5
    e = edges(f)
    assert e[(tuple(f.nodes[[tuple(n.cidrs(99)) for n in f.nodes].index(a)].cidrs()),
              ("10.1.0.0/24",))] == "yes"
    some = [v for (s, _), v in e.items() if s == ("10.2.0.0/16",)]
    assert some and set(some) == {"some"}  # only on eth1
    src = [tuple(n.cidrs()) for n in f.nodes].index(("10.2.0.0/16",))
    assert {tuple(v) for (i, _), v in f.via.items() if i == src} == {("eth1>any",)}
    assert len(e) == 1 + len(some)  # nothing else reaches anything
    # the input path has no rule: nothing is accepted there, one class
    i = the(ms, "input")
    assert len(i.nodes) == 1 and not i.edges


def test_a_port_no_rule_opens_is_one_class_with_no_edge() -> None:
    ms = matrix.matrices(doc([], FWD), "t", matrix.parse_port("tcp/23"))
    f = the(ms, "forward")
    assert len(f.nodes) == 1 and not f.edges
    assert f.nodes[0].cidrs() == ["0.0.0.0/0"]


def test_each_service_the_ruleset_names() -> None:
    d = doc([[m(pl("udp", "dport"), {"set": [53, 67]}), ACCEPT]], FWD)
    names = [str(s) for s in matrix.services(d, matrix.view(d, "t").evaluator())]
    assert names == ["tcp/22", "udp/53", "udp/67"]
    ms = matrix.matrices(d, "t", None)
    dns = the([x for x in ms if str(x.service) == "udp/53"], "input")
    assert list(dns.edges.values()) == ["yes"] and len(dns.nodes) == 1


def test_limit_is_maybe_never_yes() -> None:
    d = doc([[m(pl("tcp", "dport"), 22), {"limit": {"rate": 5, "per": "second"}}, ACCEPT]])
    i = the(matrix.matrices(d, "t", matrix.parse_port("tcp/22")), "input")
    assert set(i.edges.values()) <= {"maybe", "some"} and i.edges


def test_dot_text() -> None:
    ms = matrix.matrices(doc([], FWD), "t", matrix.parse_port("tcp/22"))
    text = matrix.dot(ms)
    assert text.startswith("digraph services {") and text.rstrip().endswith("}")
    assert "10.1.0.0/24" in text and "style=solid" in text and "style=dashed" in text
    assert text.count("subgraph cluster_") == len(ms)


def test_parse_port_refusals() -> None:
    for bad in ("tcpp/22", "icmp/8", "tcp/70000", "tcp/x"):
        with pytest.raises(UsageError):
            matrix.parse_port(bad)
    assert str(matrix.parse_port("udp/53")) == "udp/53"
    assert str(matrix.parse_port("icmp")) == "icmp"


@pytest.mark.parametrize("name", ["router.json", "server.json"])
def test_bounded_on_the_realworld_fixtures(name: str) -> None:
    d = json.loads((ROOT / "tests" / "realworld" / name).read_text())
    for port in (matrix.parse_port("tcp/22"), None):
        t0 = time.process_time()
        ms = matrix.matrices(d, name, port)
        spent = time.process_time() - t0
        # about 1.3 s alone (docs/benchmarks.md); the margin is for a loaded CI machine
        bound = 4.0 * cpuscale.factor()  # a slow host (the VM under emulation) gets more
        assert ms and spent < bound, f"{name} {port}: {spent:.2f} s of CPU, bound {bound:.1f}"


def test_server_blocklists_are_classes() -> None:
    """The fixture's allow_1 set (192.0.2.4/30) is the one IPv4 class that reaches ssh."""
    d = json.loads((ROOT / "tests" / "realworld" / "server.json").read_text())
    i = the(matrix.matrices(d, "s", matrix.parse_port("tcp/22")), "input")
    srcs = {tuple(i.nodes[a].cidrs()) for (a, _), e in i.edges.items() if e in ("yes", "some")}
    assert srcs == {("192.0.2.4/30",)}, srcs


def test_cli_table_dot_and_svg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "r.json"
    f.write_text(json.dumps(doc([], FWD)))
    dot, svg = tmp_path / "m.dot", tmp_path / "m.svg"
    rc = cli.main(["audit", "--ruleset", str(f), "--matrix", "--port", "tcp/22",
                   "--dot", str(dot), "--svg", str(svg)])
    out = capsys.readouterr().out
    assert rc == 0 and "== tcp/22 forward (ipv4): 4 classes ==" in out, out
    assert dot.read_text().startswith("digraph")
    if shutil.which("dot"):
        assert svg.read_text().lstrip().startswith(("<?xml", "<svg"))
    else:
        assert "no SVG: Graphviz `dot` is not installed" in out and not svg.exists()
    rc = cli.main(["audit", "--ruleset", str(f), "--matrix", "--json"])
    j = json.loads(capsys.readouterr().out)
    assert rc == 0 and j["matrices"] and j["dot"].startswith("digraph")
    assert cli.main(["audit", "--ruleset", str(f), "--port", "tcp/22"]) == 2
    assert "--port goes with --matrix" in capsys.readouterr().err
    assert cli.main(["audit", "--ruleset", str(f), "--matrix", "--port", "tcp/0x"]) == 2


def test_router_forward_classes_by_interface() -> None:
    """The router fixture's web (tcp/443) forwarded: the public addresses (guests and the
    LAN reach them on the WAN), the private ones (the LAN only), the LAN's hosts (the
    `ip daddr @lan_hosts_N tcp dport { 80, 443 } accept` rules: from anywhere) are three
    classes, told apart by the interfaces each is reached on."""
    d = json.loads((ROOT / "tests" / "realworld" / "router.json").read_text())
    f = the(matrix.matrices(d, "r", matrix.parse_port("tcp/443")), "forward")
    assert len(f.nodes) == 3, matrix.table([f])
    pub = next(k for k, n in enumerate(f.nodes) if n.cidrs()[0] == "all but")
    hosts = next(k for k, n in enumerate(f.nodes) if "10.0.0.10/31" in n.cidrs(99))
    assert all(f.via[(i, pub)] == ["guest0>wan0", "lan0>wan0"] for i in range(3))
    assert all("guest0>wan0" not in f.via[(i, j)] for i in range(3) for j in range(3)
               if j not in (pub, hosts))
    assert all(any(v.startswith("any>") for v in f.via[(i, hosts)]) for i in range(3))
