"""No import cycle anywhere in guppy (guppy/, kernels/ as guppy.kernels, csrc/ as guppy.csrc) or bench/, imports inside
functions included. Read from the source (the AST), not by importing: a lazy import that closes a cycle only fails
at the call that runs it, and importing would hide it."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"guppy": "guppy", "guppy.kernels": "kernels", "guppy.csrc": "csrc", "bench": "bench"}


def modules() -> dict:
    """{module name: path} for every .py file of the packages, as installed (setup.py's package_dir)."""
    out = {}
    for package, folder in PACKAGES.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            if dirpath != os.path.join(ROOT, folder) and "__init__.py" not in filenames:
                continue
            for f in filenames:
                if f.endswith(".py") and not f.startswith("test_"):
                    name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                    out[name] = os.path.join(dirpath, f)
    return out


def imports_of(name: str, path: str, known: dict) -> set:
    """The modules of `known` that the file imports, at any depth of its AST (importlib.import_module of a literal
    name included). `from X import Y` imports X.Y when that is a module, else X. Relative imports resolve against the
    file's package."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)                                  # importlib.import_module("guppy.x")
    return {m for m in found if m in known and m != name}


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph() -> dict:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_the_graph_sees_every_package_and_lazy_imports():
    graph = import_graph()
    assert {"guppy.cli", "guppy.kernels.attention", "guppy.csrc.extension", "bench.kernels"} <= set(graph)
    assert "guppy.kernels._utils" in graph["guppy.kernels.attention"]     # a module-level import
    assert "guppy.csrc.extension" in graph["guppy.targets"]               # an import inside a function


def test_function_level_relative_and_importlib_imports_count(tmp_path):
    f = tmp_path / "z.py"
    f.write_text("import os\n\ndef g():\n    from .x import thing\n    importlib.import_module('guppy.y')\n")
    known = {"guppy.x": "", "guppy.y": "", "guppy.z": str(f)}
    assert imports_of("guppy.z", str(f), known) == {"guppy.x", "guppy.y"}


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
