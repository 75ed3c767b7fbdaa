"""The package's shape (docs/ARCHITECTURE.md, "Layout"): imports point one way and never in a circle, and no file
or function grows past what a reader takes in at once. Read from the source with ``ast``, imports inside
functions included, so a lazy import cannot hide an edge."""

from __future__ import annotations

import ast
import os
from collections import defaultdict

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
PACKAGE = os.path.join(SRC, "blip2")

# The layers, lowest first, and what each may import from the package besides itself.
CORE = ("blip2._compat", "blip2._version", "blip2.cache", "blip2.hub", "blip2.config", "blip2.checkpoint",
        "blip2.generation", "blip2.generation_config", "blip2.logits_processing", "blip2.images", "blip2.processing",
        "blip2.tokenizer", "blip2.files", "blip2.loading", "blip2.placement", "blip2.quantized", "blip2.model_utils",
        "blip2.mapped", "blip2.layout_files", "blip2.converted")
ALLOWED = {
    "core": {"core"},
    "models": {"core", "models"},
    "fast": {"core", "models", "fast"},
    "convert": {"core", "models", "convert"},
    "train": {"core", "models", "train"},
    "eval": {"core", "models", "fast", "apps", "eval"},
    "apps": {"core", "models", "fast", "apps", "train", "eval", "convert"},
    "demo": {"core", "models", "fast", "apps", "train", "eval", "demo"},
    "root": {"core", "models", "fast", "apps", "convert"},
}
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
# Exceptions, each with its reason.
LONG_FILES: dict[str, str] = {}
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> dict[str, str]:
    """module name -> file path, for every .py file of the package."""
    out = {}
    for d, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _layer(module: str) -> str:
    if module == "blip2":
        return "root"
    if module in CORE:
        return "core"
    if module == "blip2.__main__":
        return "apps"  # ``python -m blip2``: the command line
    part = module.split(".")[1]
    if module == "blip2.demo":
        return "core"  # the package itself holds only the bundled models' paths (DEFAULT_MODEL)
    return part


def _imports(modules: dict[str, str]) -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from a import b`` counts a.b where that is a module)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def test_imports_point_one_way():
    modules = _modules()
    bad = []
    for source, targets in _imports(modules).items():
        for target in targets:
            if _layer(target) not in ALLOWED[_layer(source)]:
                bad.append(f"{source} imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_the_layering_test_sees_a_forbidden_import(tmp_path):
    """The check above is live: a model file that imported the speed layer (inside a function) would fail it."""
    models = tmp_path / "blip2" / "models"
    models.mkdir(parents=True)
    (tmp_path / "blip2" / "__init__.py").write_text("")
    (models / "__init__.py").write_text("")
    (models / "opt.py").write_text("def f():\n    from blip2.fast import native\n")
    fast = tmp_path / "blip2" / "fast"
    fast.mkdir()
    (fast / "__init__.py").write_text("")
    (fast / "native.py").write_text("")
    global SRC, PACKAGE
    old = SRC, PACKAGE
    SRC, PACKAGE = str(tmp_path), str(tmp_path / "blip2")
    try:
        edges = _imports(_modules())
    finally:
        SRC, PACKAGE = old
    assert "blip2.fast.native" in edges["blip2.models.opt"]
    assert _layer("blip2.fast.native") not in ALLOWED[_layer("blip2.models.opt")]


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = _cycle(_imports(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle_through_a_lazy_import():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def _source_files() -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(PACKAGE) for f in fs if f.endswith((".py", ".cpp")))


def test_no_file_is_too_long():
    long = {}
    for path in _source_files():
        rel = os.path.relpath(path, SRC)
        n = sum(1 for _ in open(path))
        if n > MAX_FILE_LINES and rel not in LONG_FILES:
            long[rel] = n
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_too_long():
    long = {}
    for path in _source_files():
        if not path.endswith(".py"):
            continue
        rel = os.path.relpath(path, SRC)
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                key = f"{rel}:{node.name}"
                if n > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    long[key] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
