"""The package structure of ``curate/`` (issue 15), checked by walking every import with ast.

* no import cycle between modules (imports inside functions count too);
* no upward import: packages are layered in data-flow order (:data:`LAYERS`) and a module
  imports only from its own layer or earlier ones;
* no private name (leading underscore) imported or used from another package;
* an import inside a function says why on its line (``# lazy: ...``): an optional extra, or a
  heavy module kept off ``curate run``'s start-up path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "curate"

#: package -> layer; the core modules directly under curate/ are one package, "core"
LAYERS = {name: i for i, name in enumerate(
    ["core", "catalog", "engine", "shards", "pool", "features", "run", "train", "evaluate", "tic", "demo", "explore", "cli"])}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # curate/__init__.py
    if module == "curate.__main__":
        return "cli"  # `python -m curate` is the command line
    if (PKG / parts[1]).is_dir():
        return parts[1]
    return "core"


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


class Import:
    def __init__(self, src: str, target: str, names: list[str], line: int, nested: bool, text: str):
        self.src, self.target, self.names, self.line, self.nested, self.text = src, target, names, line, nested, text

    def __repr__(self):
        return f"{MODULES[self.src].relative_to(PKG.parent)}:{self.line}: {self.text.strip()}"


def _imports(module: str) -> list[Import]:
    path = MODULES[module]
    src = path.read_text()
    lines = src.splitlines()
    tree = ast.parse(src)
    is_pkg = path.name == "__init__.py"
    out = []

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target == "curate" or target.startswith("curate."):
                    text = "\n".join(lines[child.lineno - 1: child.end_lineno])
                    for a in child.names:
                        sub = f"{target}.{a.name}"
                        if sub in MODULES:  # `from curate.x import module`
                            out.append(Import(module, sub, [], child.lineno, nested, text))
                        else:
                            out.append(Import(module, target, [a.name], child.lineno, nested, text))
            elif isinstance(child, ast.Import):
                text = "\n".join(lines[child.lineno - 1: child.end_lineno])
                for a in child.names:
                    if a.name == "curate" or a.name.startswith("curate."):
                        out.append(Import(module, a.name, [], child.lineno, nested, text))
            visit(child, inner)

    visit(tree, False)
    return out


IMPORTS = {m: _imports(m) for m in MODULES}


def test_every_module_is_in_a_layer():
    assert {package_of(m) for m in MODULES} <= set(LAYERS), "a new package needs a place in LAYERS"


def test_no_import_cycles():
    graph = {m: sorted({i.target for i in IMPORTS[m] if i.target in MODULES and i.target != m}) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_upward_imports():
    bad = [i for m in MODULES for i in IMPORTS[m]
           if i.target in MODULES and LAYERS[package_of(i.target)] > LAYERS[package_of(m)]]
    assert not bad, "imports from a later layer:\n" + "\n".join(map(repr, bad))


def test_no_private_names_across_packages():
    bad = [i for m in MODULES for i in IMPORTS[m]
           if package_of(i.target) != package_of(m) and any(n.startswith("_") and not n.startswith("__") for n in i.names)]
    # `import curate.x.y as M` then `M._name`
    for m, path in MODULES.items():
        aliases = {}
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("curate.") and a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("curate"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and package_of(aliases[node.value.id]) != package_of(m)):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "private names used from another package:\n" + "\n".join(map(str, bad))


def test_imports_inside_functions_say_why():
    bad = []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    text = " ".join(lines[node.lineno - 1: node.end_lineno])
                    if "# lazy:" not in text:
                        bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    bad = sorted(set(bad))
    assert not bad, f"{len(bad)} imports inside functions without a '# lazy:' reason:\n" + "\n".join(bad)


@pytest.mark.parametrize("case", [
    ("curate.run.runner", "run", 6), ("curate.cli.main", "cli", 12), ("curate.subset", "core", 0),
    ("curate", "core", 0), ("curate.pool.recipes.periods", "pool", 4), ("curate.explore.app", "explore", 11),
])
def test_layers_of_known_modules(case):
    module, package, layer = case
    assert package_of(module) == package and LAYERS[package] == layer
