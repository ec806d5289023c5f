"""The layers of the code, checked on every run, so a shortcut never creeps back in.

* **kernel** (`livestain/` less the application modules): the wire protocol, shared
  memory, security, the run store and its readers, status model, small numerics. It
  imports nothing of livestain's above it.
* **parts** (`livestain.devices`, `.acquisition`, `.inference`, `.ui`): each imports the
  kernel and itself, never another part (data flows devices -> acquisition -> wire ->
  inference -> ui through processes and files, not imports), and ``inference`` never
  imports pymmcore (a worker runs on hosts without it).
* **application** (`livestain.cli`, `.run_commands`, `.launch`, `.runconfig`, `.bundled`,
  `.simpretrain`): wires the
  parts together; nothing below imports it.

Imports inside functions count: they are imports all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("devices", "acquisition", "inference", "ui")
APPLICATION = {"cli", "run_commands", "launch", "runconfig", "bundled", "simpretrain"}


def _imports(path: Path, package: str) -> set[str]:
    """Every livestain module ``path`` imports (absolute, relative resolved), anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the file's own package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] in ("pymmcore_plus", "pymmcore"):
        return "pymmcore"
    if parts[0] != "livestain":
        return None
    if len(parts) == 1:
        return "kernel"
    if parts[1] in PARTS:
        return parts[1]
    return "application" if parts[1] in APPLICATION else "kernel"


def _modules() -> list[tuple[Path, str, str]]:
    """(file, its package as imported, its layer) of every shipped module."""
    out = []
    for path in sorted((ROOT / "livestain").glob("*.py")):
        out.append((path, "livestain", "application" if path.stem in APPLICATION else "kernel"))
    for part in PARTS:
        for path in sorted((ROOT / part).rglob("*.py")):
            rel = path.relative_to(ROOT / part).parent.parts
            out.append((path, ".".join(("livestain", part, *rel)), part))
    return out


def test_no_layer_imports_one_above_it_or_beside_it() -> None:
    wrong = []
    for path, package, layer in _modules():
        for module in _imports(path, package):
            target = _layer(module)
            if target is None or target == layer or target == "kernel" and layer != "kernel":
                continue
            if target == "pymmcore" and layer != "inference":
                continue
            if layer == "application" and target in PARTS:
                continue  # the application wires the parts together
            wrong.append(f"{path.relative_to(ROOT)} ({layer}) imports {module} ({target})")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_shortcut_inside_a_function(tmp_path) -> None:
    """The rule itself: an import inside a function, relative or absolute, is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from livestain.inference.predict import Predictor\n"
                     "def g():\n    from ..ui import window\n")
    found = _imports(probe, "livestain.acquisition")
    assert {"livestain.inference.predict", "livestain.ui"} <= found
    assert {_layer(m) for m in found} == {"inference", "ui"}
    assert _layer("livestain.store") == "kernel" and _layer("livestain.cli") == "application"


#: The most lines one class may take: past it, a class does several jobs (#14).
MAX_CLASS_LINES = 300


def _long_classes(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES]


def test_no_shipped_class_is_over_300_lines() -> None:
    long = [f"{path.relative_to(ROOT)}: {name} is {lines} lines"
            for path, _, _ in _modules() for name, lines in _long_classes(path)]
    assert not long, "\n".join(long)


def test_the_size_check_sees_a_long_class(tmp_path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("class Big:\n" + "    x = 1\n" * MAX_CLASS_LINES + "class Small:\n    pass\n")
    assert _long_classes(probe) == [("Big", MAX_CLASS_LINES + 1)]


def test_every_command_is_registered_one_way_with_its_handler() -> None:
    """One CLI style: each command group's ``register`` adds subcommands whose handler is
    their ``func`` default; `livestain.cli.main` has no table of its own to fall back on."""
    import argparse

    from livestain.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"demo", "run", "worker", "view", "status", "stop", "train", "predict", "evaluate",
            "predict-run", "adapt", "simulate", "audit"} <= set(sub.choices)
    missing = [name for name, parser in sub.choices.items() if not callable(parser.get_default("func"))]
    assert not missing, f"commands without a handler: {missing}"
