"""The layering, enforced: imports point one way (no cycle; the core never imports the model side), and only
the device modules talk to ``torch.cuda`` / ``torch.npu``. Read from the source, so a violation fails here
before it can hide behind a lazy import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> the package it installs as (pyproject's package-dir)
PACKAGES = {"lvsa": ROOT / "lvsa", "lvsa.backends": ROOT / "backends", "lvsa.devices": ROOT / "devices",
            "lvsa_app": ROOT / "examples" / "app"}
#: what the drivers, devices and the model side build on; it must never reach up to them
CORE = {"lvsa.settings", "lvsa.geometry", "lvsa.plan", "lvsa.driver", "lvsa.device", "lvsa.registry",
        "lvsa.dispatch", "lvsa.driver_status", "lvsa.errors", "lvsa.log", "lvsa.ulysses", "lvsa.riflex", "lvsa.files"}
MODEL_SIDE = ("lvsa.adapters", "lvsa.parallel", "lvsa_app")
#: the example application: the library never imports it
APPLICATION = "lvsa_app"


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The lvsa modules ``name`` imports, anywhere in its body (inside functions too), except under
    ``if TYPE_CHECKING:`` (annotations only)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = package
        for _ in range(node.level - 1):
            base = base.rsplit(".", 1)[0]
        module = (base + ("." + node.module if node.module else "")) if node.level else node.module
        # "from . import log" imports the submodule, not the package's body
        return [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(t for t in targets(node) if t in known and t != name)

        visit_ImportFrom = visit_Import

    Visitor().visit(ast.parse(path.read_text()))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    """The check above could pass by finding nothing: a known cycle must be reported."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_sees_function_local_imports():
    edges = graph()
    assert "lvsa.dispatch" in edges["lvsa.adapters.runtime"]
    assert "lvsa.adapters" in edges["lvsa.parallel"]


def test_the_core_never_imports_the_model_side():
    edges = graph()
    assert CORE <= set(edges), CORE - set(edges)
    bad = {core: sorted(t for t in edges[core] if t.startswith(MODEL_SIDE)) for core in CORE}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_library_never_imports_the_application():
    edges = graph()
    assert any(name.startswith(APPLICATION) for name in edges), "the check no longer sees the application"
    assert any(t.startswith("lvsa.") for t in edges["lvsa_app.generation"]), "the graph misses its imports"
    bad = {name: sorted(t for t in targets if t.startswith(APPLICATION))
           for name, targets in edges.items() if not name.startswith(APPLICATION)}
    assert {k: v for k, v in bad.items() if v} == {}


def _device_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and node.attr in ("cuda", "npu") and isinstance(node.value, ast.Name)
                and node.value.id == "torch"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: torch.{node.attr}")
    return found


def test_only_device_modules_call_torch_cuda_or_npu():
    folders = [ROOT / "lvsa", ROOT / "backends", ROOT / "benchmarks", ROOT / "examples"]
    calls = [call for folder in folders for path in sorted(folder.rglob("*.py")) for call in _device_calls(path)]
    assert calls == []
    assert _device_calls(ROOT / "devices" / "cuda.py"), "the check no longer recognises torch.cuda"
