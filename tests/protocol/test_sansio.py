"""protocol/ is sans-IO: no trio, sockets, event loops or clocks (STYLE.md, h11)."""

import ast
import subprocess
import sys
from pathlib import Path

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol"
FORBIDDEN = {"trio", "socket", "asyncio", "time", "datetime", "selectors", "threading", "swarm", "peer", "verify"}


def test_no_module_of_protocol_imports_io_or_clocks():
    for path in PROTOCOL.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_importing_the_protocol_does_not_load_trio():
    modules = sorted(p.stem for p in PROTOCOL.glob("*.py") if p.stem != "__init__")
    code = "import sys, protocol\n" + "".join(f"import protocol.{m}\n" for m in modules) + (
        "assert 'trio' not in sys.modules, 'trio imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROTOCOL.parent)
