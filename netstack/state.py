"""The state file: every object `up` makes is recorded BEFORE it is made (an intent log),
so `down` can remove everything after a crash at any point, and `up` can tell a half-made
stack from a running one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

RUN_DIR = os.environ.get("NETSTACK_RUN_DIR", "/run/netstack")


def stack_dir(stack: str) -> str:
    return os.path.join(RUN_DIR, stack)


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: with the pid it identifies a process across pid reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(")") + 2:].split()[19])


def proc_alive(pid: int, start: int | None) -> bool:
    """True if `pid` is still the process we started (and not a zombie)."""
    st = proc_start_time(pid)
    if st is None or (start is not None and st != start):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        return data[data.rindex(")") + 2] != "Z"
    except OSError:
        return False


class State:
    """state.json (status, small), plan.json (written once) and objects.jsonl (the intent
    log, one line appended per object: O(1) per record whatever the stack's size)."""

    def __init__(self, stack: str, data: dict[str, Any] | None = None,
                 objects: list[dict[str, Any]] | None = None) -> None:
        self.stack = stack
        self.dir = stack_dir(stack)
        self.path = os.path.join(self.dir, "state.json")
        self.log_path = os.path.join(self.dir, "objects.jsonl")
        self.data: dict[str, Any] = data or {"stack": stack, "status": "partial"}
        self._objects: list[dict[str, Any]] = objects or []

    @classmethod
    def load(cls, stack: str) -> State | None:
        d = stack_dir(stack)
        try:
            with open(os.path.join(d, "state.json")) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        objects = []
        with contextlib.suppress(FileNotFoundError), open(os.path.join(d, "objects.jsonl")) as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line cut by a crash
                    objects.append(json.loads(line))
        with contextlib.suppress(FileNotFoundError), open(os.path.join(d, "plan.json")) as f:
            data["plan"] = json.load(f)
        return cls(stack, data, objects)

    @staticmethod
    def stacks() -> list[str]:
        try:
            return sorted(d for d in os.listdir(RUN_DIR)
                          if os.path.exists(os.path.join(RUN_DIR, d, "state.json")))
        except FileNotFoundError:
            return []

    @property
    def objects(self) -> list[dict[str, Any]]:
        return self._objects

    def save(self) -> None:
        _make_stack_dir(self.dir)
        small = {k: v for k, v in self.data.items() if k != "plan"}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(small, f)
        os.replace(tmp, self.path)

    def record(self, **obj: Any) -> None:
        """Write the intent before acting on it."""
        self._objects.append(obj)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(obj) + "\n")
        _crash_point(len(self._objects))

    def set(self, **kv: Any) -> None:
        if "plan" in kv:
            _make_stack_dir(self.dir)
            with open(os.path.join(self.dir, "plan.json"), "w") as f:
                json.dump(kv["plan"], f)
        self.data.update(kv)
        self.save()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.dir)


def _make_stack_dir(d: str) -> None:
    """0711: daemons that drop root (tor as debian-tor) must traverse to their own
    directory; nothing here can be listed, and secrets inside are 0600 or in 0700 dirs."""
    if not os.path.isdir(d):
        os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o711)


def _crash_point(n: int) -> None:
    """Test hook: NETSTACK_TEST_CRASH_AFTER=N kills this process (SIGKILL, no cleanup) right
    after the N-th object is recorded, to prove `down` recovers from a crash mid-`up`."""
    want = os.environ.get("NETSTACK_TEST_CRASH_AFTER")
    if want and int(want) == n:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
