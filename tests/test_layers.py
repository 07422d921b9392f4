"""The layering of docs/design.md ("What may import what"), checked on every module's imports.

A module may import only from the packages its row allows; `protocol` does no I/O, the lab
never imports the engine (it plays the other side), and nothing imports the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "mxguard"

# package -> the mxguard packages (first component after "mxguard.") it may import
ALLOWED: dict[str, set[str]] = {
    "protocol": {"protocol"},
    "adapters": {"protocol", "adapters"},
    "config": {"adapters", "protocol", "config"},
    "learned": {"protocol", "adapters", "config", "learned"},
    "engine": {"protocol", "adapters", "config", "engine", "learned"},
    "postfix": {"engine", "adapters", "protocol", "config", "postfix", "learned"},
    "tlsrpt": {"engine", "adapters", "protocol", "config", "tlsrpt", "learned"},
    "lab": {"protocol", "adapters", "lab"},
    "demo": {"engine", "lab", "adapters", "protocol", "config", "demo"},
    "audit": {"engine", "adapters", "protocol", "config", "audit"},
    "owner": {"engine", "adapters", "protocol", "config", "audit", "owner"},
}


def _package(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _imported(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "mxguard":
                names = [f"mxguard.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mxguard" and len(parts) > 1:
                found.add(parts[1])
    return found


MODULES = sorted(p for p in SRC.rglob("*.py") if _package(p) in ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(SRC)) for p in MODULES])
def test_module_imports_only_what_its_layer_may(path: Path) -> None:
    wrong = _imported(ast.parse(path.read_text(encoding="utf-8"))) - ALLOWED[_package(path)]
    assert not wrong, f"{path.relative_to(SRC)} imports mxguard.{', mxguard.'.join(sorted(wrong))}"


def test_nothing_imports_the_command_line() -> None:
    for path in SRC.rglob("*.py"):
        if _package(path) in ("cli", "__main__"):
            continue
        assert "cli" not in _imported(ast.parse(path.read_text(encoding="utf-8"))), path
