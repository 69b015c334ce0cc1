"""The layering, enforced: imports point one way (no cycle of any kind, ``TYPE_CHECKING`` imports included; the
core never imports a host; the execution wing never imports a host; the library never imports the drivers'
folder; drivers never import a device module), and only the device modules talk to ``torch.cuda`` /
``torch.npu``. Read from the source, so a violation fails here before it can hide behind a lazy import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> the package it installs as (pyproject's package-dir)
PACKAGES = {"lvsa": ROOT / "lvsa", "lvsa.backends": ROOT / "backends", "lvsa.devices": ROOT / "devices",
            "lvsa_app": ROOT / "examples" / "app", "lvsa_vllm_omni": ROOT / "lvsa_vllm_omni"}
#: the hosts: what puts lvsa into a model (diffusers' processors and hooks, context parallelism on a pipeline;
#: vLLM-Omni's attention backend)
HOSTS = ("lvsa.adapters", "lvsa.parallel", "lvsa_vllm_omni")
MODEL_SIDE = (*HOSTS, "lvsa_app")
#: the execution wing: the one place a layer call is executed
WING = "lvsa.attention"
#: the example application: the library never imports it
APPLICATION = "lvsa_app"
DRIVERS, DEVICES = "lvsa.backends", "lvsa.devices"


def core_modules(names) -> set[str]:
    """The library's own modules below the hosts, found in lvsa/ (not kept by hand): everything there but the
    hosts and the package's front door (``lvsa/__init__``, which re-exports every layer)."""
    return {name for name in names if name.startswith("lvsa.") and not name.startswith((*HOSTS, DRIVERS, DEVICES))}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path], type_checking: bool = True) -> set[str]:
    """The lvsa modules ``name`` imports, anywhere in its body (inside functions too); those under
    ``if TYPE_CHECKING:`` (annotations only) too unless ``type_checking`` is False."""
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
            if not type_checking and "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(t for t in targets(node) if t in known and t != name)

        visit_ImportFrom = visit_Import

    Visitor().visit(ast.parse(path.read_text()))
    return found


def graph(type_checking: bool = True) -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known, type_checking) for name, path in known.items()}


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
    """Not even one held open by ``if TYPE_CHECKING:`` imports."""
    assert cycles(graph()) == []


def test_type_checking_imports_are_seen():
    with_annotations, without = graph(), graph(type_checking=False)
    assert "lvsa.adapters.runtime" in with_annotations["lvsa.adapters.wan"]
    assert "lvsa.adapters.runtime" not in without["lvsa.adapters.wan"]


def test_the_cycle_finder_finds_one():
    """The check above could pass by finding nothing: a known cycle must be reported."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_sees_function_local_imports():
    edges = graph()
    assert "lvsa.settings" in edges["lvsa.attention.drivers"]  # inside sparse_attention
    assert "lvsa.adapters" in edges["lvsa.parallel"]


def test_the_core_never_imports_the_model_side():
    edges = graph()
    core = core_modules(edges)
    assert {"lvsa.plan", "lvsa.settings.schema", "lvsa.attention.executor", "lvsa.kernels.split"} <= core
    bad = {name: sorted(t for t in edges[name] if t.startswith(MODEL_SIDE)) for name in core}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_execution_wing_never_imports_a_host():
    edges = graph()
    wing = [name for name in edges if name == WING or name.startswith(WING + ".")]
    assert len(wing) >= 5, wing
    bad = {name: sorted(t for t in edges[name] if t.startswith(MODEL_SIDE)) for name in wing}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_library_never_imports_the_drivers():
    """Drivers are plug-ins found by entry point; what they share lives in lvsa.kernels."""
    edges = graph()
    library = [name for name in edges if name.startswith(("lvsa.", "lvsa_app", "lvsa_vllm_omni")) or name == "lvsa"]
    library = [name for name in library if not name.startswith((DRIVERS, DEVICES))]
    bad = {name: sorted(t for t in edges[name] if t.startswith(DRIVERS)) for name in library}
    assert {k: v for k, v in bad.items() if v} == {}
    assert all(edges[name] for name in edges if name.startswith(DRIVERS + ".") and name != DRIVERS)


def test_drivers_never_import_a_device_module():
    edges = graph()
    drivers = [name for name in edges if name.startswith(DRIVERS + ".")]
    assert {"lvsa.backends.fa4", "lvsa.backends.npu"} <= set(drivers)
    bad = {name: sorted(t for t in edges[name] if t.startswith(DEVICES)) for name in drivers}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_vllm_omni_host_goes_through_the_executor():
    """The serving host executes layer calls through the wing, as the diffusers host does, never through the
    diffusers host itself."""
    edges = graph()
    assert "lvsa.attention" in edges["lvsa_vllm_omni.host"]
    bad = {name: sorted(t for t in targets if t.startswith(("lvsa.adapters", "lvsa.parallel", "lvsa_app")))
           for name, targets in edges.items() if name.startswith("lvsa_vllm_omni")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_drivers_folder_holds_drivers_only():
    """Every module of backends/ is the target of an lvsa.backends entry point (shared pieces are elsewhere)."""
    import tomllib

    targets = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lvsa.backends"]
    registered = {value.split(":")[0] for value in targets.values()}
    found = {name for name in modules() if name.startswith(DRIVERS + ".")}
    assert found == registered


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
