"""What every benchmark script shares: reaping detached children, the machine line, the
JSON result file."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any


def timed(argv: list[str]) -> tuple[float, str]:
    """Wall seconds of one command (which must succeed), and what it printed."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, p.stdout


def reap() -> None:
    """Reap children the stack detached (we may be their nearest living ancestor)."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "kernel": os.uname().release}


def write(path: str, res: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {path}")
