"""The per-stack supervisor: serves the lab services and runs daemons as its own children,
waits on them and restarts them with backoff. PID 1 on some hosts never reaps orphans, so
every daemon is a child that this process waits for. It records its children with their
start times in supervisor.json, so `down` can end them by PID even if it dies.

Run as `python -m netstack.supervisor STACK_DIR` by `up` only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from netstack.state import proc_start_time

BACKOFF_MIN, BACKOFF_MAX = 0.2, 10.0


class Supervisor:
    def __init__(self, stack_dir: str) -> None:
        self.dir = stack_dir
        with open(os.path.join(stack_dir, "supervisor-spec.json")) as f:
            self.spec: dict[str, Any] = json.load(f)
        self.children: dict[str, dict[str, Any]] = {}  # name -> pid, start, restarts
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.status_lock = threading.Lock()
        self.hooks: dict[str, subprocess.Popen] = {}

    def write_status(self) -> None:
        """Atomic and serialised: several watcher threads report at once."""
        with self.status_lock:
            tmp = os.path.join(self.dir, f"supervisor.json.{threading.get_ident()}")
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "start": proc_start_time(os.getpid()),
                           "children": self.children}, f)
            os.replace(tmp, os.path.join(self.dir, "supervisor.json"))

    def start_daemon(self, d: dict[str, Any]) -> None:
        argv = ["ip", "netns", "exec", d["netns"], *d["argv"]]
        with open(os.path.join(self.dir, f"{d['name']}.log"), "ab") as log:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        prev = self.children.get(d["name"], {})
        self.procs[d["name"]] = p
        self.children[d["name"]] = {
            "name": d["name"], "pid": p.pid, "start": proc_start_time(p.pid),
            "restarts": prev.get("restarts", -1) + 1, "started_at": time.time(),
            "last_exit": prev.get("last_exit")}
        self.write_status()

    def watch(self, d: dict[str, Any]) -> None:
        backoff = BACKOFF_MIN
        req = d.get("requires")
        while req and not os.path.exists(req):  # `up` writes it once the config is ready
            if self.stopping.wait(0.01):
                return
        while not self.stopping.is_set():
            with self.lock:
                if self.stopping.is_set():
                    return
                self.start_daemon(d)
                p = self.procs[d["name"]]
            started = time.monotonic()
            if d.get("post_start"):
                threading.Thread(target=self.post_start, args=(d, p), daemon=True).start()
            rc = p.wait()
            with self.lock:
                self.children[d["name"]]["last_exit"] = rc
                self.write_status()
            if self.stopping.is_set() or not d.get("restart", True):
                return
            if time.monotonic() - started > 30:
                backoff = BACKOFF_MIN
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def post_start(self, d: dict[str, Any], p: subprocess.Popen) -> None:
        """Configure what the daemon made (e.g. its tunnel device); on failure end the
        daemon so it restarts with backoff rather than run half configured."""
        env = dict(os.environ, NETSTACK_DAEMON_PID=str(p.pid))
        argv = ["ip", "netns", "exec", d["netns"], *d["post_start"]]
        with open(os.path.join(self.dir, f"{d['name']}.log"), "ab") as log:
            with self.lock:
                if self.stopping.is_set():
                    return
                hook = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=log, env=env, text=True)
                self.hooks[d["name"]] = hook
            assert hook.stdout is not None
            for line in hook.stdout:
                if line.strip() == "configured":
                    with self.lock:
                        c = self.children.get(d["name"])
                        if c and c["pid"] == p.pid:
                            c["configured"] = True
                            c["configured_at"] = time.time()
                            self.write_status()
            rc = hook.wait()
        if rc != 0 and p.poll() is None and not self.stopping.is_set():
            p.kill()

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def run(self) -> None:
        from netstack.lab.services import run_service

        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for s in self.spec["services"]:
            threading.Thread(target=run_service, args=(s,), daemon=True).start()
        for d in self.spec["daemons"]:
            threading.Thread(target=self.watch, args=(d,), daemon=True).start()
        self.write_status()
        state_file = os.path.join(self.dir, "state.json")
        # Also stop if the stack's state vanished (a `down` that raced our start).
        while not self.stopping.wait(1.0):
            if not os.path.exists(state_file):
                self.stopping.set()
        with self.lock:
            procs = list(self.procs.values()) + list(self.hooks.values())
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 3
        for p in procs:
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main() -> None:
    Supervisor(sys.argv[1]).run()


if __name__ == "__main__":
    main()
