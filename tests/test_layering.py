"""The import rules of DESIGN.md's layering, checked on the source: no circles between project
modules; the core imports neither passes, executors, apps nor the product surface; passes/ and
executors/ import only the core; function-level imports of project modules are not used to
dodge cycles."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("graphgen", "passes", "executors")
# the core: what passes/ and executors/ may import
CORE = ("graphgen.config", "graphgen.build", "graphgen.costs", "graphgen.verify", "graphgen.quant_format",
        "graphgen.streams", "graphgen.models", "graphgen.sampling", "graphgen.stopping", "graphgen.progress")
# function-level imports of project modules allowed, with why
LAZY_OK = {("graphgen", "graphgen.api"),  # graphgen/__init__: LLM on first use (keeps the core light)
           ("executors.async_streams", "executors.cuda")}  # the CUDA-only module, on a GPU machine


def modules():
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, f, parts[-1] == "__init__"


def imports(name: str, f: Path, is_pkg: bool):
    """(imported project module, at top level?) for each import in f."""
    tree = ast.parse(f.read_text())
    top = set(id(n) for n in tree.body)
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in PACKAGES:
                yield t, id(node) in top


def graph():
    known = {n for n, _, _ in modules()}
    g = nx.DiGraph()
    lazy = set()
    for name, f, is_pkg in modules():
        g.add_node(name)
        for t, at_top in imports(name, f, is_pkg):
            while t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                if at_top:
                    g.add_edge(name, t)
                else:
                    lazy.add((name, t))
    return g, lazy


def is_core(m: str) -> bool:
    return any(m == c or m.startswith(c + ".") for c in CORE)


def test_no_import_circles():
    g, _ = graph()
    # a package's __init__ importing its own submodules is not a circle between modules
    h = g.copy()
    h.remove_edges_from([(a, b) for a, b in g.edges if b.startswith(a + ".") or a.startswith(b + ".")])
    assert list(nx.simple_cycles(h)) == []


def test_imports_point_one_way():
    g, _ = graph()
    bad = []
    for a, b in g.edges:
        if is_core(a) and not is_core(b) and b != "graphgen":
            bad.append(f"core {a} imports {b}")
        if a.split(".")[0] in ("passes", "executors") and b.split(".")[0] == "graphgen" and not is_core(b):
            bad.append(f"{a} imports {b}, which is not the core")
        if a.startswith("passes") and b.startswith("executors"):
            bad.append(f"{a} imports the runtime {b}")
    assert bad == []


def test_function_level_imports_are_only_the_listed_ones():
    _, lazy = graph()
    assert lazy <= LAZY_OK, f"function-level imports of project modules: {sorted(lazy - LAZY_OK)}"
