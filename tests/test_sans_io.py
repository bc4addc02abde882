"""theta.core stays sans-IO: no trio, no sockets, no clock."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import theta.core

CORE = Path(theta.core.__file__).parent
FORBIDDEN_MODULES = {"trio", "socket", "asyncio", "selectors", "time", "aioquic"}


def test_core_imports_with_io_modules_blocked() -> None:
    blocked = ", ".join(repr(name) for name in sorted(FORBIDDEN_MODULES - {"time"}))
    script = (
        "import sys\n"
        f"for name in ({blocked},):\n"
        "    sys.modules[name] = None\n"
        "import theta.core\n"
        "frame = theta.core.encode_frame(theta.core.Heartbeat(1, 2))\n"
        "assert theta.core.FrameDecoder(theta.core.Channel.CONTROL).feed(frame)\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_core_sources_import_no_io_or_clock() -> None:
    for path in sorted(CORE.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN_MODULES, f"{path.name} imports {name}"
