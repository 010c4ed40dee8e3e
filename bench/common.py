"""What every benchmark script shares: reaping detached children, the machine line, the
JSON result file."""

from __future__ import annotations

import json
import os
from typing import Any


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
