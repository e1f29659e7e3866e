"""The runtime depends on nothing above it, and the package has no import cycle (issue 19, item 5):
read from the source (AST), so a lazy import inside a function counts as much as a top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ABOVE_THE_RUNTIME = ("aldm.models", "aldm.export", "aldm.calibration", "aldm.training", "aldm.preprocess",
                     "aldm.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False, module: str | None = None) -> list[tuple[int, str]]:
    """(line, module) for every import in the file: absolute names, relative ones resolved;
    `from a import b` counts as a.b when a.b is a module of the package, else as a."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    here = (module or module_name(path)).split(".")
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = here if path.name == "__init__.py" else here[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if _is_module(sub) else base))
    return out


def _is_module(name: str) -> bool:
    p = SRC.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def package_files() -> list[Path]:
    return sorted((SRC / "aldm").rglob("*.py"))


def test_the_runtime_imports_nothing_above_it():
    bad = []
    for path in sorted((SRC / "aldm" / "runtime").rglob("*.py")):
        for line, name in imports(path):
            if any(name == p or name.startswith(p + ".") for p in ABOVE_THE_RUNTIME):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    """The check itself: an import inside a function and a relative import are both found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from aldm.export import check\n    from ..models import ALDM\n")
    names = [n for _, n in imports(probe, module="aldm.runtime.probe")]
    assert "aldm.export.check" in names and "aldm.models" in names
    assert imports(probe, top_level_only=True, module="aldm.runtime.probe") == []


def test_no_import_cycle_at_import_time():
    """Module-level imports between the package's modules form no cycle (a lazy import inside a
    function runs after both modules exist, so only these can deadlock an import)."""
    graph: dict[str, set[str]] = {}
    for path in package_files():
        me = module_name(path)
        graph[me] = {n for _, n in imports(path, top_level_only=True)
                     if n.startswith("aldm") and n != me and _is_module(n)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
