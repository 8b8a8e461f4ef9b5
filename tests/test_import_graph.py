"""The import graph: every arrow points into the core (``lethe/``), and no module imports itself back.

Imports are read from the source (every ``import`` statement, also those inside functions), so a lazy
import counts like any other. lethe refers to outer classes only by import path in data (a preset's
``class_path``, ``lethe.registry``), which is not an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lethe", "lightning_modules", "datamodules", "callbacks")
OUTER = ("lightning_modules", "datamodules", "callbacks", "benchmarks", "scripts")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, me: str | None = None) -> set[str]:
    """The project modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod`` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = me or module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in (*PACKAGES, *OUTER):
                out.add(name)
    return out


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mods[module_name(path)] = path
    return mods


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    edges = {}
    for name, path in mods.items():
        targets = set()
        for imp in imports_of(path):
            # resolve to the longest prefix that is a project module (``from lethe import lm`` -> lethe.lm)
            parts = imp.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in mods:
                    if cand != name:
                        targets.add(cand)
                    break
            else:
                targets.add(imp)  # an outer folder that is not a package here (benchmarks, scripts)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_core_imports_nothing_from_the_outer_folders():
    bad = [f"{m} -> {t}" for m, ts in graph().items() if m.split(".")[0] == "lethe"
           for t in sorted(ts) if t.split(".")[0] in OUTER]
    assert not bad, "lethe/ must not import the outer folders:\n" + "\n".join(bad)


def test_no_import_circles():
    found = cycles(graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_violations(tmp_path):
    """The walker would catch an outward arrow and a circle (so the two tests above can fail)."""
    edges = {"lethe.a": {"callbacks.x"}, "callbacks.x": {"lethe.a"}, "lethe.b": set()}
    assert cycles(edges) == [["callbacks.x", "lethe.a"]]
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from callbacks.process_group import CleanDistributedExit\n")
    assert "callbacks.process_group" in imports_of(src, "lethe.m")  # a lazy import inside a function counts


def test_lightning_modules_hold_lightning_modules():
    """The rule the README names: algorithms live in lethe/, lightning_modules/ holds LightningModules."""
    import importlib
    import inspect

    import lightning as L

    for name, path in project_modules().items():
        if not name.startswith("lightning_modules.") or path.name == "__init__.py":
            continue
        mod = importlib.import_module(name)
        own = [obj for _, obj in inspect.getmembers(mod, inspect.isclass) if obj.__module__ == name]
        stray = [c.__name__ for c in own if not issubclass(c, L.LightningModule)]
        assert own and not stray, f"{name}: classes that are not LightningModules belong in lethe/: {stray}"
