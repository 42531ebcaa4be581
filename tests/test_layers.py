"""The package's shape, read from its source: layers that import only downward, no import circles, no class or
function over ~300 lines, and a README Layout that lists every module with its one idea."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "biaslab"

#: the layers, lowest first (biaslab/__init__.py states them); a module may import its own layer and lower ones
LAYERS = ("core", "engines", "frameworks", "workflows", "figures", "llm", "cli")
#: modules outside the layers: the version (importable by all), the package facade and ``python -m biaslab``
OUTSIDE = {"biaslab": None, "biaslab.__main__": None, "biaslab._version": -1}
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Every biaslab module ``name`` imports, at the top or inside functions (both are real dependencies)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # ``from . import x`` may name a module
                full = f"{target}.{alias.name}"
                out.add(full if full in MODULES else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in MODULES and m != name}


def layer(name: str) -> int | None:
    if name in OUTSIDE:
        return OUTSIDE[name]
    return LAYERS.index(name.split(".")[1])


def test_every_module_sits_in_a_layer():
    stray = [m for m in MODULES if m not in OUTSIDE and m.split(".")[1] not in LAYERS]
    assert not stray, f"modules outside the layer folders: {stray}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for name in MODULES:
        lv = layer(name)
        if lv is None:
            continue
        for dep in imports(name):
            if dep == "biaslab":
                upward.append(f"{name} imports the package facade biaslab (import the module that defines it)")
                continue
            ld = layer(dep)
            if ld is not None and ld > lv:
                upward.append(f"{name} ({LAYERS[lv]}) imports {dep} ({LAYERS[ld]})")
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    graph = {m: imports(m) - {"biaslab"} for m in MODULES}  # the facade imports down; nothing imports it back
    circles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not circles, "\n".join(circles)


def test_no_class_or_function_over_300_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_every_package_says_what_it_holds_and_what_it_imports():
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "biaslab":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert len(doc) > 80, f"{name}/__init__.py needs a paragraph saying what the layer holds"


def test_readme_layout_lists_every_module_with_its_idea():
    """The Layout section names every module file (``folder/file.py``) and nothing that does not exist."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    section = section[: section.index("\n## ", 4)]
    listed = set(re.findall(r"`([\w/]+\.py)`", section))
    files = {str(p.relative_to(PKG)) for p in MODULES.values() if p.name != "__init__.py" or p.parent != PKG}
    files = {f for f in files if not f.endswith("__init__.py")} | {
        str(p.relative_to(PKG)) for p in MODULES.values() if p.name == "__init__.py" and p.parent != PKG
        and p.read_text().count("\n") > 40}  # packages whose __init__ holds code
    missing = sorted(files - listed - {"__main__.py", "_version.py"})
    unknown = sorted(f for f in listed if not (PKG / f).exists())
    assert not missing, f"README Layout does not list: {missing}"
    assert not unknown, f"README Layout lists files that do not exist: {unknown}"
