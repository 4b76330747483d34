"""The package's floors: a module imports only its own floor or those below, never the application."""

import ast

from conftest import ROOT

PACKAGE = ROOT / "platform" / "wanray"
# Bottom to top. Drivers (pipelines/), the UI (ui/), benchmarks and tests sit above them all.
FLOORS = [
    ("errors", "io", "storage", "compat", "backends", "buckets", "sections", "config", "schema", "devices", "wan"),
    ("models", "model_files", "runtime", "encoding", "context_parallel", "ring_attention"),
    ("data",),
    ("train",),
    ("infer",),
]
APPLICATION = ("pipelines", "ui", "benchmarks", "tests", "conftest")


def module_name(path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    return next(i for i, names in enumerate(FLOORS) if top in names)


def imports(path) -> set[str]:
    """Every module `path` imports, at module level or inside a function, relative imports resolved."""
    package = module_name(path).split(".")[:-1] if path.name != "__init__.py" else module_name(path).split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            if module == "wanray" or not node.module:  # from wanray import models, from . import io
                found.update(f"{module}.{a.name}" for a in node.names)
            else:
                found.add(module)
    return found


def calls(path) -> set[str]:
    """Dotted names of everything `path` calls (e.g. "ray.init", "importlib.import_module")."""

    def dotted(node):
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            inner = dotted(node.value)
            return inner and f"{inner}.{node.attr}"
        return None

    return {dotted(n.func) for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)} - {None}


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}
CALLS = {module_name(p): calls(p) for p in PACKAGE.rglob("*.py")}
LIBRARY = {m: {i for i in deps if i.startswith("wanray.")} for m, deps in GRAPH.items() if m != "wanray"}


def test_the_library_never_imports_the_application():
    for module, deps in GRAPH.items():
        assert not {d for d in deps if d.split(".")[0] in APPLICATION}, module


def test_every_import_goes_to_the_same_floor_or_below():
    for module, deps in LIBRARY.items():
        for dep in deps:
            assert floor(dep) <= floor(module), f"{module} (floor {floor(module)}) imports {dep} (floor {floor(dep)})"


def test_only_drivers_join_ray_and_data_and_runtime_stay_apart():
    assert not [m for m, deps in LIBRARY.items() if "wanray.runtime" in deps]
    assert not [d for d in LIBRARY["wanray.runtime"] if d.startswith("wanray.data")]
    joins = {m for m, names in CALLS.items() if names & {"ray.init", "ray.shutdown", "connect_ray"}}
    assert joins == {"wanray.runtime"}, joins


def test_nothing_is_imported_behind_the_walker_s_back():
    hidden = {m for m, names in CALLS.items() if names & {"importlib.import_module", "__import__"}}
    assert not hidden, hidden


def test_no_import_cycles():
    def visit(module, path):
        assert module not in path, " -> ".join([*path, module])
        for dep in LIBRARY.get(module, ()):
            visit(dep, (*path, module))

    for module in LIBRARY:
        visit(module, ())
