"""The per-stack supervisor: serves the lab services and runs daemons as its own children,
waits on them and restarts them with backoff. PID 1 on some hosts never reaps orphans, so
every daemon is a child that this process waits for. It records its children with their
start times in supervisor.json, so `down` can end them by PID even if it dies.

Run as `python -m netstack.supervisor STACK_DIR TOKEN` by `up` only. Its first act is to
write supervisor.pid (pid, start time, TOKEN): `up` recorded the token in the intent log
before starting it, so a crash of `up` at any moment leaves it findable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from netstack import codec, journal
from netstack.errors import DamagedFile
from netstack.kernel import Kernel, proc_start_time

if TYPE_CHECKING:  # see _model_names
    from netstack.model import Daemon

BACKOFF_MIN, BACKOFF_MAX = 0.2, 10.0
SPEC, STATUS, PIDFILE = "supervisor-spec.json", "supervisor.json", "supervisor.pid"


@dataclass
class ServiceSpec:
    name: str
    type: str  # http | dns | sink
    netns: str
    fds: dict[str, int]
    zone: dict[str, str]
    log: str


@dataclass
class SupervisorSpec:
    stack: str
    services: list[ServiceSpec]
    daemons: list[Daemon]
    # "module:function" of the call layer's thread (netstack.calls:serve), handed down as
    # data like a daemon's monitor: this layer never imports the executor above it
    calls: str | None = None
    # "module:function" of the uplink watch (netstack.watch:serve) when the config says
    # `watch = true`: data too, the watch lives in a layer above this one
    watch: str | None = None

    @classmethod
    def codec_names(cls) -> dict[str, Any]:
        """The model's Daemon, for codec (this module imports the model lazily)."""
        from netstack.model import Daemon

        return {"Daemon": Daemon}


@dataclass
class Child:
    name: str
    pid: int
    start: int | None
    restarts: int = 0
    started_at: float = 0.0
    last_exit: int | None = None
    configured: bool = False
    configured_at: float | None = None
    health: dict[str, Any] = field(default_factory=dict)  # from the daemon's monitor


@dataclass
class SupervisorStatus:
    pid: int
    start: int | None
    children: dict[str, Child] = field(default_factory=dict)


def read_status(stack_dir: str) -> SupervisorStatus | None:
    """None when the supervisor has not written it yet or it cannot be read (`down` then
    ends the supervisor by its pid file; its children die with their process group)."""
    try:
        return codec.read(os.path.join(stack_dir, STATUS), SupervisorStatus)
    except (FileNotFoundError, DamagedFile):
        return None


def _private_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def _model_names() -> None:
    """SupervisorSpec names model.Daemon, and codec resolves it in this module: imported
    when a spec is read. Readers of the status file only (`down`, `status`) do without the
    model's dataclasses (~13 ms, docs/field-notes.md "Python start-up")."""
    from netstack.model import Daemon

    globals()["Daemon"] = Daemon


class Supervisor:
    def __init__(self, stack_dir: str, kernel: Kernel) -> None:
        _model_names()
        self.dir = stack_dir
        self.kernel = kernel  # made by main(), this program's entry; each thread forks it
        self.spec = codec.read(os.path.join(stack_dir, SPEC), SupervisorSpec)
        self.children: dict[str, Child] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.status_lock = threading.Lock()
        self.hooks: dict[str, subprocess.Popen] = {}
        self.quick: set[str] = set()  # daemons a monitor restarted: no backoff

    def write_status(self) -> None:
        """Atomic and serialised: several watcher threads report at once."""
        with self.status_lock:
            codec.write(os.path.join(self.dir, STATUS),
                        SupervisorStatus(os.getpid(), proc_start_time(os.getpid()),
                                         self.children))

    def start_daemon(self, d: Daemon) -> None:
        argv = ["ip", "netns", "exec", d.netns, *d.argv]
        log = _private_append(os.path.join(self.dir, f"{d.name}.log"))
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            os.close(log)
        prev = self.children.get(d.name)
        self.procs[d.name] = p
        self.children[d.name] = Child(d.name, p.pid, proc_start_time(p.pid),
                                      prev.restarts + 1 if prev else 0, time.time(),
                                      prev.last_exit if prev else None)
        self.write_status()
        c = self.children[d.name]
        journal.send(f"{d.name}: {'restarted' if c.restarts else 'started'} (pid {p.pid})",
                     journal.WARNING if c.restarts else journal.INFO, stack=self.spec.stack,
                     event="daemon-start", daemon=d.name, netns=d.netns, pid=p.pid,
                     restarts=c.restarts)

    def watch(self, d: Daemon) -> None:
        backoff = BACKOFF_MIN
        while d.requires and not os.path.exists(d.requires):  # `up` writes its go signal
            if self.stopping.wait(0.01):
                return
        while not self.stopping.is_set():
            with self.lock:
                if self.stopping.is_set():
                    return
                self.start_daemon(d)
                p = self.procs[d.name]
            started = time.monotonic()
            if d.post_start:
                threading.Thread(target=self.post_start, args=(d, p), daemon=True).start()
            rc = p.wait()
            with self.lock:
                self.children[d.name].last_exit = rc
                self.write_status()
            stopping = self.stopping.is_set()
            journal.send(f"{d.name}: exited with {rc} (pid {p.pid})"
                         + ("" if stopping or not d.restart else "; restarting"),
                         journal.INFO if stopping else journal.WARNING, stack=self.spec.stack,
                         event="daemon-exit", daemon=d.name, netns=d.netns, pid=p.pid,
                         exit_status=rc)
            if self.stopping.is_set() or not d.restart:
                return
            if time.monotonic() - started > 30:
                backoff = BACKOFF_MIN
            with self.lock:
                quick = d.name in self.quick
                self.quick.discard(d.name)
            if quick:
                continue
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def post_start(self, d: Daemon, p: subprocess.Popen) -> None:
        """Configure what the daemon made (e.g. its tunnel device); on failure end the
        daemon so it restarts with backoff rather than run half configured."""
        env = dict(os.environ, NETSTACK_DAEMON_PID=str(p.pid))
        argv = ["ip", "netns", "exec", d.netns, *d.post_start]
        log = _private_append(os.path.join(self.dir, f"{d.name}.log"))
        try:
            with self.lock:
                if self.stopping.is_set():
                    return
                hook = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=log, env=env, text=True)
                self.hooks[d.name] = hook
        finally:
            os.close(log)
        assert hook.stdout is not None
        for line in hook.stdout:
            if line.strip() == "configured":
                with self.lock:
                    c = self.children.get(d.name)
                    if c and c.pid == p.pid:
                        c.configured, c.configured_at = True, time.time()
                        self.write_status()
        rc = hook.wait()
        if rc != 0 and p.poll() is None and not self.stopping.is_set():
            p.kill()

    def monitor(self, d: Daemon) -> None:
        """Run the daemon's health monitor (e.g. Tor's control port events), which reports
        through `report`; status reads the result instead of asking the daemon itself."""
        import importlib

        mod, _, fn = d.monitor[0].partition(":")
        watch = getattr(importlib.import_module(mod), fn)

        def report(h: dict[str, Any]) -> None:
            with self.lock:
                c = self.children.get(d.name)
                if c is not None:
                    c.health = {**h, "updated": round(time.time(), 1)}
                    self.write_status()
        def restart() -> None:
            """End the daemon now; it comes back at once (no backoff): a monitor asked."""
            with self.lock:
                p = self.procs.get(d.name)
                self.quick.add(d.name)
            if p is not None and p.poll() is None:
                p.kill()
        try:
            watch(*d.monitor[1:], report=report, stopping=self.stopping, restart=restart,
                  kernel=self.kernel.fork())
        except Exception as e:  # noqa: BLE001 - a broken monitor must not stop the daemons
            report({"error": f"monitor failed: {e}"})
            journal.send(f"{d.name}: health monitor failed: {e}", journal.ERR,
                         stack=self.spec.stack, event="monitor-failed", daemon=d.name)

    def serve_calls(self) -> None:
        """The call layer between app qubes (netstack.calls) until the stack stops; a
        crash is logged and the layer restarted after a pause (no call is served
        meanwhile: every call fails closed)."""
        import importlib
        import traceback

        assert self.spec.calls is not None
        mod, _, fn = self.spec.calls.partition(":")
        serve = getattr(importlib.import_module(mod), fn)
        while not self.stopping.is_set():
            try:
                serve(self.dir, self.stopping, self.kernel.fork())
            except Exception:  # noqa: BLE001 - the daemons must run on
                traceback.print_exc()
                self.stopping.wait(BACKOFF_MIN)

    def watch_uplink(self) -> None:
        """The uplink watch (netstack.watch) until the stack stops; it restarts itself."""
        import importlib
        import traceback

        assert self.spec.watch is not None
        mod, _, fn = self.spec.watch.partition(":")
        try:
            getattr(importlib.import_module(mod), fn)(self.spec.stack, self.stopping,
                                                       self.kernel.fork())
        except Exception:  # noqa: BLE001 - the daemons must run on; status says why
            traceback.print_exc()

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def run(self) -> None:
        from netstack.lab.serve import run_service

        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        from netstack.rules.names import watch as watch_rule_names

        for s in self.spec.services:
            threading.Thread(target=run_service, args=(s,), daemon=True).start()
        threading.Thread(target=watch_rule_names,
                         args=(self.dir, self.stopping, self.kernel.fork()),
                         daemon=True).start()
        if self.spec.calls:
            threading.Thread(target=self.serve_calls, daemon=True).start()
        if self.spec.watch:
            threading.Thread(target=self.watch_uplink, daemon=True).start()
        for d in self.spec.daemons:
            threading.Thread(target=self.watch, args=(d,), daemon=True).start()
            if d.monitor:
                threading.Thread(target=self.monitor, args=(d,), daemon=True).start()
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


def write_pidfile(stack_dir: str, token: str) -> None:
    from netstack.state import PidFile

    codec.write(os.path.join(stack_dir, PIDFILE),
                PidFile(os.getpid(), proc_start_time(os.getpid()), token))


def main() -> None:
    stack_dir, token = sys.argv[1], sys.argv[2]
    write_pidfile(stack_dir, token)  # first: from now on `down` finds us
    if not os.path.exists(os.path.join(stack_dir, "state.json")):
        return  # the stack was taken down while we started
    from netstack.kernel import RealKernel

    Supervisor(stack_dir, RealKernel()).run()
    # Every daemon is ended and waited for, the logs are line-buffered: what is left is the
    # interpreter's teardown, ~15 ms that `down` would wait out (docs/field-notes.md,
    # "Processes"); the service threads are daemon threads, which it would not join.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
