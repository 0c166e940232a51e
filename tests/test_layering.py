"""The packages' dependency rules (DESIGN.md "Layout"; STYLE.md "Everyday habits"):

- dependencies flow one way, peer -> verify -> swarm -> protocol: a package imports
  only those below it, and nothing imports peer;
- outside protocol/, nobody imports a private ``protocol._x`` module: the package's
  public surface is ``protocol/__init__.py``.

Every import counts, including those inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("protocol", "swarm", "verify", "peer")  # each may import only those before it
CONSUMERS = ("bench",)  # applications on top: they may import anything public


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    return _imports_of(path, root=ROOT)


def _imports_of(path: Path, *, root: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of everything ``path`` imports, ``from x import y``
    giving ``x.y`` (so a private submodule imported by name is seen)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[:-1]  # what a relative import of level 1 is relative to
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _is_private_protocol(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "protocol" and len(parts) > 1 and parts[1].startswith("_") and not parts[1].startswith("__")


@pytest.mark.parametrize("package", LAYERS)
def test_dependencies_flow_down(package):
    allowed = set(LAYERS[: LAYERS.index(package) + 1])
    bad = []
    for path in _modules(package):
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top in LAYERS and top not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, f"{package}/ may import only {sorted(allowed)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", [p for p in LAYERS if p != "protocol"] + list(CONSUMERS))
def test_nothing_outside_protocol_imports_its_private_modules(package):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for path in _modules(package) for line, name in _imports(path) if _is_private_protocol(name)]
    assert not bad, "use the public surface (protocol/__init__.py):\n" + "\n".join(bad)


def test_the_checker_resolves_relative_and_nested_imports(tmp_path):
    module = tmp_path / "pkg" / "sub" / "mod.py"
    module.parent.mkdir(parents=True)
    module.write_text("from ..x import y\ndef f():\n    from protocol import _messages as M\n")
    names = [name for _, name in _imports_of(module, root=tmp_path)]
    assert names == ["pkg.x.y", "protocol._messages"]
    assert _is_private_protocol(names[1])
    assert not _is_private_protocol("protocol.Forward")
