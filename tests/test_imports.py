"""The house's walls, read from the source (ast only, no import): no import cycle inside
`peft_lightning`, no function-local `peft_lightning` import, and the rooms that must not reach
back: the encoder knows no adapter and no fast path, `fastpath/` knows no model, nothing imports
`train.py`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "peft_lightning"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> list[tuple[str, ast.stmt, bool]]:
    """(imported module, statement, at module level) for each `peft_lightning` module `path` imports."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    top |= {id(n) for node in tree.body if isinstance(node, ast.If) for n in node.body + node.orelse}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` up
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from pkg import name` the package
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        found += [(t, node, id(node) in top) for t in targets if t in known and t != name]
    return found


def graph() -> tuple[dict[str, set[str]], list[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    edges: dict[str, set[str]] = {module_name(f): set() for f in files}
    local = []
    for f in files:
        for target, node, at_top in imports(f, known):
            edges[module_name(f)].add(target)
            if not at_top:
                local.append(f"{f.relative_to(PACKAGE.parent)}:{node.lineno} imports {target} inside a function")
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    edges, _ = graph()
    assert cycles(edges) == []


def test_no_function_local_package_import():
    _, local = graph()
    assert local == []


def test_the_checks_find_a_cycle_and_a_local_import(tmp_path, monkeypatch):
    """The two checks above, on a package made to fail them."""
    pkg = tmp_path / "peft_lightning"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from peft_lightning.b import x\n")
    (pkg / "b.py").write_text("x = 1\n\ndef f():\n    from peft_lightning import a\n    return a\n")
    (pkg / "c.py").write_text("from peft_lightning import a\n")  # the submodule, not the package
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    edges, local = graph()
    assert cycles(edges) == [["peft_lightning.a", "peft_lightning.b"]]
    assert local == ["peft_lightning/b.py:4 imports peft_lightning.a inside a function"]
    assert edges["peft_lightning.c"] == {"peft_lightning.a"}


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("peft_lightning.encoder", ("peft_lightning.adapters", "peft_lightning.fastpath")),
        ("peft_lightning.layers", ("peft_lightning.adapters", "peft_lightning.fastpath", "peft_lightning.encoder")),
        ("peft_lightning.adapters.peft_format", ("peft_lightning.",)),  # a leaf: json and safetensors only
    ]
    + [
        (f"peft_lightning.fastpath.{m}", ("peft_lightning.adapters", "peft_lightning.model", "peft_lightning.encoder"))
        for m in ("kernels", "cast", "arena", "plan", "precision")
    ],  # fmt: skip
)
def test_rooms_that_must_not_reach_back(module, forbidden):
    edges, _ = graph()
    assert not [t for t in edges[module] if t.startswith(forbidden)], edges[module]


def test_nothing_imports_the_train_entry_point():
    edges, _ = graph()
    assert [m for m, targets in edges.items() if "peft_lightning.train" in targets] == []
