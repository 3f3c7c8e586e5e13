"""jclip's layers point one way: every import of a jclip module, anywhere in the package, goes to a lower
layer or to its own part (../shared/DESIGN.md, "Layout")."""

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jclip"

# Parts of the package by layer, lowest first. A module may import its own part and lower layers;
# the command lines (`__main__` modules, `jclip.cli`, the package itself) may import anything.
LAYERS = (
    {"jclip.losses", "jclip.parallel", "jclip.host_memory"},
    {"jclip.models", "jclip.data"},
    {"jclip.parameter_layout"},
    {"jclip.checkpoint"},
    {"jclip.convert", "jclip.evaluate"},
    # training; jclip.load; weights out (OpenCLIP's layout); weight-space ensembles: none uses another
    {"jclip.train", "jclip.loaded_model", "jclip.export", "jclip.wise_ft"},
    {"jclip.plan"},
    {"jclip.cli", "jclip"},
)
ONLY_ITSELF = {"jclip.losses"}  # pure functions of arrays: JAX and nothing else of jclip


def part(module: str) -> str:
    """The part of the package a module belongs to: `jclip.X` for `jclip.X` and everything under it."""
    return ".".join(module.split(".")[:2])


def layer(module: str) -> int:
    if module.endswith(".__main__"):
        return len(LAYERS) - 1
    return next(index for index, parts in enumerate(LAYERS) if part(module) in parts)


def imported_modules(path: pathlib.Path, module: str) -> set[str]:
    """The jclip modules that `module` (at `path`) imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module}: a relative import; jclip imports absolutely"
            found |= {node.module} | {f"jclip.{alias.name}" for alias in node.names if node.module == "jclip"}
    return {name for name in found if name == "jclip" or name.startswith("jclip.")} - {"jclip"}


def package_modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def upward_imports() -> list[str]:
    problems = []
    for module, path in sorted(package_modules().items()):
        for target in sorted(imported_modules(path, module)):
            if part(target) == part(module):
                continue
            if part(module) in ONLY_ITSELF or (layer(target) >= layer(module) and not module.endswith(".__main__")):
                problems.append(f"{module} imports {target}")
    return problems


def test_imports_point_down_the_layers():
    assert upward_imports() == []


def test_the_walk_sees_every_kind_of_import(tmp_path, monkeypatch):
    """An upward import at the top, one inside a function, and a `from jclip import` of a module are all caught."""
    copy = tmp_path / "jclip"
    for path in PACKAGE.rglob("*.py"):
        target = copy / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (copy / "models" / "leak.py").write_text("from jclip import train\n")
    (copy / "data" / "leak.py").write_text("def f():\n    import jclip.evaluate.report\n")
    (copy / "convert" / "leak.py").write_text("from jclip.evaluate.tasks import Evaluator\n")
    (copy / "losses" / "leak.py").write_text("from jclip import parallel\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    assert upward_imports() == [
        "jclip.convert.leak imports jclip.evaluate.tasks",
        "jclip.data.leak imports jclip.evaluate.report",
        "jclip.losses.leak imports jclip.parallel",
        "jclip.models.leak imports jclip.train",
    ]
