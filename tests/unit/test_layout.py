"""Shape rules of the code, checked on its syntax tree: no module reaches into another's
private names, and no module outside roles/ branches on a qube's kind."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("netstack", "tests", "bench") for p in (ROOT / d).rglob("*.py"))


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def imported_modules(tree: ast.Module) -> set[str]:
    """Local names bound to modules of ours (import x.y as z, from x import module)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("netstack", "tests"):
                    out.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] in ("netstack", "tests"):
            for a in node.names:
                mod = ROOT / (node.module.replace(".", "/")) / f"{a.name}.py"
                pkg = ROOT / (node.module.replace(".", "/")) / a.name / "__init__.py"
                if mod.exists() or pkg.exists():
                    out.add(a.asname or a.name)
    return out


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        mods = imported_modules(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import "
                        f"{a.name}" for a in node.names if private(a.name)]
            elif isinstance(node, ast.Attribute) and private(node.attr) and \
                    isinstance(node.value, ast.Name) and node.value.id in mods:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} "
                           f"{node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_private_import():
    tree = ast.parse("from netstack.state import _x\nimport netstack.apply as a\na._y\n")
    mods = imported_modules(tree) | {"a"}
    hits = [n for n in ast.walk(tree) if (isinstance(n, ast.ImportFrom) and
                                          any(private(a.name) for a in n.names))
            or (isinstance(n, ast.Attribute) and private(n.attr)
                and isinstance(n.value, ast.Name) and n.value.id in mods)]
    assert len(hits) == 2


def test_no_branch_on_kind_outside_roles():
    """`if q.kind == "vpn"` belongs in kinds/: elsewhere, read the plan's traits. A comparison of a
    `kind` (attribute or key) with the name of a qube kind is a branch on the kind; other
    kinds (a link's "veth", a leak's "link") are not qube kinds."""
    from netstack.kinds.registry import KINDS as ROLES

    def names(x: ast.AST) -> set[str]:
        if isinstance(x, ast.Constant) and isinstance(x.value, str):
            return {x.value}
        if isinstance(x, ast.Tuple | ast.List | ast.Set):
            return {e.value for e in x.elts if isinstance(e, ast.Constant)}
        return set()

    bad = []
    for path in (ROOT / "netstack").rglob("*.py"):
        if "kinds" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            if any(isinstance(x, ast.Attribute | ast.Subscript) and
                   ((isinstance(x, ast.Attribute) and x.attr == "kind") or
                    (isinstance(x, ast.Subscript) and isinstance(x.slice, ast.Constant)
                     and x.slice.value == "kind")) for x in sides) and \
                    any(names(x) & set(ROLES) for x in sides):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


def test_the_kind_check_sees_a_branch_on_a_qube_kind(tmp_path, monkeypatch):
    """The check above fails on the branch it forbids (and not on a link's kind)."""
    import netstack

    root = tmp_path / "netstack"
    root.mkdir()
    (root / "bad.py").write_text('def f(q):\n    return q.kind == "vpn" or q["kind"] in '
                                 '("tor",)\n')
    (root / "fine.py").write_text('def g(x):\n    return x["kind"] not in ("veth",)\n')
    import sys

    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="bad.py"):
        test_no_branch_on_kind_outside_roles()
    assert netstack  # the registry still imports from the real tree


def test_comments_cite_the_projects_own_field_notes():
    """Facts measured on the host live in docs/field-notes.md (the project's own); a
    comment citing another file (the old FIELD-NOTES) points nowhere a reader can go."""
    bad = [f"{p.relative_to(ROOT)}:{i + 1}" for p in (ROOT / "netstack").rglob("*.py")
           for i, line in enumerate(p.read_text().splitlines()) if "FIELD-NOTES" in line]
    assert not bad, bad
    assert (ROOT / "docs" / "field-notes.md").exists()
