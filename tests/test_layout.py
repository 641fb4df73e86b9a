"""The package layout shows the architecture: the core never reaches into data, training or apps; no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import iterwego

PKG = Path(iterwego.__file__).parent
CORE = {
    "config",
    "model",
    "layers",
    "aligner",
    "guidance",
    "fusion",
    "decode",
    "metrics",
    "encoders",
    "images",
    "capture_time",
    "frozen_bert",
    "batch",
    "device",
    "io",
    "errors",
    "pretrained",
    "tables",  # the one presentation module: tables and shares that the CLI, reports and model cards print
}
OUTER = ("data", "training", "apps", "compat")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["iterwego", *parts])


def _imports(path: Path) -> set[str]:
    """Every iterwego module ``path`` imports, at the top or inside a function (lazy imports count too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("iterwego"):
                continue
            for alias in node.names:  # `from . import x` may name a module
                sub = f"{mod}.{alias.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).is_file() else mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("iterwego")}
    return {m for m in out if m != name and m != "iterwego"}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def test_core_imports_only_core():
    for mod, deps in _graph().items():
        short = mod.removeprefix("iterwego.")
        if short in CORE:
            bad = sorted(d for d in deps if d.removeprefix("iterwego.").split(".")[0] in OUTER)
            assert not bad, f"core module {mod} imports {bad}"


def test_no_import_cycle():
    g = _graph()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d) :] + [m, d]))
            if d in g and state.get(d) is None:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(g):
        if state.get(m) is None:
            visit(m, [])


def test_public_api_resolves():
    for name in iterwego.__all__:
        assert getattr(iterwego, name) is not None
    assert iterwego.IterWeGO.forward.__doc__ and "figure" in iterwego.model.__doc__


BENCHMARKS = PKG.parents[1] / "benchmarks"


def _private_uses(path: Path) -> list[str]:
    """Private iterwego names ``path`` reaches in another module: ``from m import _x`` and ``m._x`` on a module."""
    name = _module_name(path) if path.is_relative_to(PKG) else path.stem
    package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
    private = lambda n: n.startswith("_") and not (n.startswith("__") and n.endswith("__"))  # noqa: E731
    modules, out = {}, []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            if not mod.startswith("iterwego") or mod == name:
                continue
            for a in node.names:
                if private(a.name):
                    out.append(f"from {mod} import {a.name}")
                sub = f"{mod}.{a.name}"
                if (PKG.parent / (sub.replace(".", "/") + ".py")).is_file():
                    modules[a.asname or a.name] = sub
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("iterwego"):
                    modules[a.asname or a.name.split(".")[0]] = a.name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in modules:
                out.append(f"{modules[base.id]}.{node.attr}")
    return out


def test_no_private_name_crosses_a_module_boundary():
    """A leading underscore means "this file only": the package and the benchmarks import only public names."""
    files = [*PKG.rglob("*.py"), *BENCHMARKS.glob("*.py")]
    bad = {str(p.relative_to(PKG.parents[1])): uses for p in files if (uses := _private_uses(p))}
    assert not bad, bad


def test_the_private_name_check_sees_one(tmp_path):
    mod = PKG / "decode.py"  # any real module path: the check reads the source it is given
    src = tmp_path / "x.py"
    src.write_text("from iterwego.apps.order import _story_batch\nfrom iterwego import decode\ndecode._helper()\n")
    assert _private_uses(src) == ["from iterwego.apps.order import _story_batch", "iterwego.decode._helper"]
    assert _private_uses(mod) == []


def test_every_function_fits_on_a_screen_or_two():
    """No function in the package is longer than 80 lines: a longer one usually hides two."""
    long = [
        f"{p.relative_to(PKG)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for p in PKG.rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80
    ]
    assert not long, long
