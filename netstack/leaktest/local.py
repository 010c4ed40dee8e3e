"""Local channels out of an app qube: the ways around the chain that are not packets.
A host service on a filesystem unix socket (nscd, resolved's varlink, D-Bus, an X server)
does its work in the host's network; host state and other qubes' homes tell where the
workstation runs; host processes, mounts, setns into another namespace, /proc/sys and
nftables would let it undo the chain. Each check runs inside the workstation's sandbox, as
its user and as the sandbox's root, with only the Python standard library (the sandbox
sees /usr, not netstack). Connecting is all a socket check does: not one byte is sent.

A stand-in host resolver that the battery itself starts is the control: a unix socket in
/run that answers a name with its address, looked up from the host's side of the chain
(in the lab: from sys-net, the ISP address, at the lab's DNS server), as nscd or resolved
would. A host process the battery starts is the ptrace target. `sandbox=False` (tests
only) runs the same checks in the bare namespace: there the stand-in must be reported
reachable with the name it resolved around the chain, and root must ptrace the target."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from netstack.kernel import Kernel

# stdlib only: runs as `python3 -c` inside the sandbox; prints one JSON object
SCRIPT = r'''
import ctypes, json, os, socket, subprocess, sys
targets, standin, target_pid, marker = (json.loads(sys.argv[1]), sys.argv[2],
                                         int(sys.argv[3]), sys.argv[4])
out = {}
reached = []
for path in targets:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(path)
        reached.append(path)
    except OSError:
        pass
    finally:
        s.close()
out["unix-sockets"] = reached
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:  # the stand-in resolver: ask it a name, as glibc asks nscd
    s.connect(standin)
    s.sendall(b"web.lab.test\n")
    out["stand-in"] = s.recv(256).decode(errors="replace").strip() or "connected"
except OSError:
    out["stand-in"] = ""
finally:
    s.close()
def shown(p):
    try:
        return bool(os.listdir(p)) if os.path.isdir(p) else os.path.exists(p)
    except OSError:
        return False
out["host-state"] = [p for p in ("/run/netstack", "/var/lib/netstack", "/run/netns",
                                 "/etc/netns") if shown(p)]
mine = os.getpid()
procs = [d for d in os.listdir("/proc") if d.isdigit()]
out["host-processes"] = len(procs) > 8
libc = ctypes.CDLL(None, use_errno=True)
out["ptrace"] = False
try:  # only the battery's own host process counts (a pid number may mean another here)
    visible = marker.encode() in open("/proc/%d/cmdline" % target_pid, "rb").read()
except OSError:
    visible = False
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(16, target_pid, None, None) == 0:  # PTRACE_ATTACH
    out["ptrace"] = visible
    try:
        os.waitpid(target_pid, 0x40000000)  # __WALL: the tracee's stop
    except OSError:
        pass
    libc.ptrace(17, target_pid, None, None)  # PTRACE_DETACH
out["mount"] = libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0
out["setns"] = False
for d in ("/run/netns", "/var/run/netns"):
    if os.path.isdir(d):
        for n in os.listdir(d):
            try:
                fd = os.open(os.path.join(d, n), os.O_RDONLY)
                out["setns"] = out["setns"] or libc.setns(fd, 0x40000000) == 0
                os.close(fd)
            except OSError:
                pass
try:
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write(open("/proc/sys/net/ipv4/ip_forward").read())
    out["proc-sys"] = True
except OSError:
    out["proc-sys"] = False
def rd(p):
    try:
        with open(p) as f:
            return f.read().strip()
    except OSError:
        return None
out["ids"] = {"machine-id": rd("/etc/machine-id"),
              "boot_id": rd("/proc/sys/kernel/random/boot_id"), "cmdline": rd("/proc/cmdline")}
kid = os.fork()  # a nested user namespace: root over a fresh network namespace's nf_tables
if kid == 0:
    os._exit(0 if libc.unshare(0x10000000) == 0 else 1)  # CLONE_NEWUSER
out["userns"] = os.waitpid(kid, 0)[1] == 0
import errno, platform
NR = {"x86_64": {"io_uring_setup": 425, "bpf": 321, "perf_event_open": 298,
                 "userfaultfd": 323, "keyctl": 250},
      "aarch64": {"io_uring_setup": 425, "bpf": 280, "perf_event_open": 241,
                  "userfaultfd": 282, "keyctl": 219}}.get(platform.machine(), {})
libc.syscall.restype = ctypes.c_long
reached = []
for call, nr in NR.items():  # harmless arguments: each fails in the kernel if it gets there
    ctypes.set_errno(0)
    r = libc.syscall(nr, 0, 0, 0, 0, 0)
    if not (r == -1 and ctypes.get_errno() == errno.ENOSYS):
        reached.append(call)
out["kernel-surface"] = reached
name = "nstk_local_" + str(mine)
p = subprocess.run(["nft", "add", "table", "inet", name], capture_output=True)
out["nftables"] = p.returncode == 0
if out["nftables"]:
    subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)
print(json.dumps(out))
'''

# what each check means; a True (or a non-empty list) is a way around the chain
CHECKS = {
    "unix-sockets": "a host unix socket answered (its service works in the host's network)",
    "stand-in": "the stand-in host resolver answered",
    "host-state": "the stack's state, homes or namespaces are visible",
    "host-processes": "host processes are visible",
    "ptrace": "a host process could be traced (ptrace)",
    "mount": "mount works",
    "setns": "setns into another network namespace works",
    "proc-sys": "/proc/sys is writable",
    "nftables": "the qube can load nftables rules",
    "userns": "a nested user namespace (root over nf_tables of a fresh network namespace)",
    "kernel-surface": "kernel interfaces a sandbox refuses reached the kernel",
    "identity": "an identifier (machine-id, boot_id, kernel command line) is the host's or "
                "another qube's",
}
IDS = ("machine-id", "boot_id", "cmdline")


def host_ids() -> dict[str, str | None]:
    """The host's own identifiers, as a qube would read them without its own."""
    out: dict[str, str | None] = {}
    for k, p in (("machine-id", "/etc/machine-id"),
                 ("boot_id", "/proc/sys/kernel/random/boot_id"), ("cmdline", "/proc/cmdline")):
        try:
            with open(p) as f:
                out[k] = f.read().strip()
        except OSError:
            out[k] = None
    return out


def shared_ids(mine: dict[str, str | None], others: dict[str, dict[str, str | None]]
               ) -> list[str]:
    """Which of the qube's identifiers equal the host's or another qube's ('boot_id = host');
    an empty kernel command line tells nothing and is never shared, nor does Whonix's
    generic machine-id, which every Tor workstation shows on purpose."""
    from netstack.sandbox import WHONIX_MACHINE_ID

    out = []
    for k in IDS:
        v = mine.get(k)
        if not v or (k == "machine-id" and v == WHONIX_MACHINE_ID):
            continue
        out += [f"{k} = {who}" for who, ids in others.items() if ids.get(k) == v]
    return out


@dataclass
class LocalResult:
    who: str  # "user" | "root" (the sandbox's root)
    leaks: dict[str, str]  # check -> what was reachable
    error: str | None = None


def host_unix_sockets() -> list[str]:
    """Filesystem unix sockets listening in the host's namespace, from /proc/net/unix
    (abstract ones, '@...', are per network namespace and out of reach anyway)."""
    out = []
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            # Flags 00010000 = __SO_ACCEPTCON (listening); a path is the 8th column
            if len(parts) >= 8 and parts[3] == "00010000" and parts[7].startswith("/"):
                out.append(parts[7])
    return sorted(set(out))


@dataclass(frozen=True)
class Forward:
    """Where the stand-in resolver looks names up: from namespace `netns` (the host's side
    of the chain) at `server`. Lab stacks only: never a real resolver."""

    netns: str
    server: str


@contextlib.contextmanager
def stand_in(forward: Forward | None = None) -> Iterator[str]:
    """A host service on a unix socket, started by the battery and removed by it: the
    stand-in for nscd, resolved, D-Bus, X11. It answers anyone who connects; with
    `forward`, a name sent to it gets its address, looked up around the chain."""
    path = f"/run/nstk-standin-{secrets.token_hex(4)}.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o666)
    srv.listen(8)
    srv.settimeout(0.1)
    stop = threading.Event()

    def answer(c: socket.socket) -> bytes:
        if forward is None:
            return b"stand-in host service\n"
        c.settimeout(1)
        name = c.recv(256).decode(errors="replace").strip()
        if not name:
            return b"stand-in host service\n"
        from netstack.dnswire import resolve_in
        from netstack.errors import NetstackError

        try:
            return f"{name} is {', '.join(resolve_in(forward.netns, forward.server, name))}" \
                   f" (resolved by the host)\n".encode()
        except (NetstackError, OSError) as e:
            return f"{name}: {e}\n".encode()

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            with c, contextlib.suppress(OSError):
                c.sendall(answer(c))
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield path
    finally:
        stop.set()
        t.join()
        srv.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def host_process() -> Iterator[tuple[int, str]]:
    """A host process for the ptrace check, started by the battery and ended by its pid."""
    marker = f"nstk-ptrace-target-{secrets.token_hex(4)}"
    p = subprocess.Popen(["/usr/bin/python3", "-c", "import time; time.sleep(600)", marker])
    try:
        yield p.pid, marker
    finally:
        p.kill()
        p.wait()


SANDBOX = True  # tests switch it off (monkeypatch) for the anti-test


def ids_in(k: Kernel, stack: str, qube: str) -> dict[str, str | None]:
    """Another app qube's identifiers, read in its sandbox."""
    from netstack.stack import exec_argv

    cmd = ["/usr/bin/python3", "-c", "import json\ndef rd(p):\n try:\n  return open(p).read()"
           ".strip()\n except OSError:\n  return None\nprint(json.dumps({'machine-id': rd("
           "'/etc/machine-id'), 'boot_id': rd('/proc/sys/kernel/random/boot_id'), 'cmdline': "
           "rd('/proc/cmdline')}))"]
    p = subprocess.run(exec_argv(k, stack, qube, None, cmd), capture_output=True, text=True,
                       timeout=60)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


def run(k: Kernel, stack: str, ws: str, netns: str, forward: Forward | None = None,
        others: tuple[str, ...] = ()) -> list[LocalResult]:
    """The checks as the workstation's user and as the sandbox's root; `others`: app qubes
    whose identifiers must differ from the workstation's (as the host's must)."""
    from netstack.stack import exec_argv

    sandbox = SANDBOX
    # the bare namespace reaches every host socket: there only the stand-in is tried, so
    # nothing of a real host service is touched even by the anti-test
    targets = host_unix_sockets() if sandbox else []
    results = []
    with stand_in(forward) as standin, host_process() as (target, marker):
        for who in ("user", "root"):
            cmd = ["/usr/bin/python3", "-c", SCRIPT, json.dumps(targets), standin,
                   str(target), marker]
            if sandbox:
                argv = exec_argv(k, stack, ws, None, cmd, root_inside=who == "root")
            else:  # tests only: the bare namespace, what app qubes were
                argv = ["ip", "netns", "exec", netns,
                        *([] if who == "root" else ["setpriv", "--reuid=65534",
                                                    "--regid=65534", "--clear-groups",
                                                    "--"]), *cmd]
            p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            try:
                got = json.loads(p.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                results.append(LocalResult(who, {}, f"the local checks did not run: "
                                                    f"{p.stderr.strip()[-200:]}"))
                continue
            ids = {"host": host_ids(), **{q: ids_in(k, stack, q) for q in others}} \
                if who == "user" else {"host": host_ids()}
            got["identity"] = shared_ids(got.get("ids") or {}, ids)
            leaks = {k: (", ".join(v) if isinstance(v, list)
                         else f"{CHECKS[k]}: {v}" if isinstance(v, str) else CHECKS[k])
                     for k, v in got.items() if v and k in CHECKS}
            results.append(LocalResult(who, leaks))
    return results
