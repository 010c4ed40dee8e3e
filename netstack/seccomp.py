"""The seccomp filter of every app qube's sandbox, compiled by libseccomp (Debian's
python3-seccomp) and handed to bubblewrap (`--seccomp FD`).

Refused with ENOSYS (as if this kernel had none of them: programs that can do without, such
as those trying io_uring first, fall back instead of failing), because a hostile program in
a workstation would use them to attack the host's kernel rather than the network, and no
workstation program needs them:
- io_uring_setup/enter/register: a second system-call interface that seccomp cannot see
  into, behind many recent kernel privilege escalations;
- bpf: loading programs into the kernel (unprivileged eBPF);
- perf_event_open: kernel profiling, a long history of exploits and side channels;
- userfaultfd: used to win races in kernel exploits;
- add_key, keyctl, request_key: the kernel keyrings, shared more widely than a sandbox;
- unshare and clone with CLONE_NEWUSER are stopped by bubblewrap's own `--disable-userns`
  (a nested user namespace hands root over a fresh network namespace, and with it the whole
  nf_tables attack surface), not here: clone's flags live in a register only for clone, not
  clone3, and bubblewrap's switch covers both.

The filter depends only on the architecture: it is compiled once per host into a root-owned,
world-readable file and reused."""

from __future__ import annotations

import errno
import os
import tempfile

from netstack.errors import NetstackError

REFUSED = ("io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open",
           "userfaultfd", "add_key", "keyctl", "request_key")
VERSION = 2  # bump when REFUSED changes: a new file name, never a stale filter
FD = 9  # the descriptor bubblewrap reads the filter from (opened by the wrapper below)


def path(run_dir: str) -> str:
    return os.path.join(run_dir, f"sandbox-seccomp-v{VERSION}.bpf")


def compile_filter(out: str) -> str:
    """The BPF program refusing REFUSED with ENOSYS (allowing the rest), written atomically
    to `out` unless it is there already. The path is returned."""
    if os.path.exists(out):
        return out
    try:
        import seccomp  # Debian's python3-seccomp: the venv sees it (system site packages)
    except ImportError:
        raise NetstackError("the sandbox's seccomp filter needs libseccomp's Python binding: "
                            "install python3-seccomp (scripts/setup.sh does)") from None
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in REFUSED:
        f.add_rule(seccomp.ERRNO(errno.ENOSYS), name)
    os.makedirs(os.path.dirname(out), mode=0o711, exist_ok=True)
    with tempfile.TemporaryFile() as fh:  # libseccomp writes to a descriptor
        f.export_bpf(fh)
        fh.seek(0)
        bpf = fh.read()
    from netstack.codec import atomic_write

    atomic_write(out, bpf, 0o644)  # read by the unprivileged account the sandbox starts as
    return out


def wrap(bpf: str, bwrap_argv: list[str]) -> list[str]:
    """bubblewrap's argv with `--seccomp FD` and a shell that opens the filter on FD first
    (bubblewrap takes the program only as a descriptor; the shell runs as the sandbox's
    account, after setpriv, and opens a world-readable file)."""
    assert bwrap_argv[0] == "bwrap"
    return ["sh", "-c", f'exec "$@" {FD}<"$0"', bpf,
            "bwrap", "--seccomp", str(FD), *bwrap_argv[1:]]
