"""An app qube's sandbox refuses what would attack the host's kernel instead of the network
(nested user namespaces, io_uring, bpf, perf, userfaultfd, keyrings) and shows no identifier
of the host (machine-id, boot_id, kernel command line): each refusal tried inside the
sandbox, as its user and as its root, with an anti-test in the same sandbox without the
protection (root)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from netstack import sandbox
from netstack.stack import exec_argv
from tests.integration.util import cli
from tests.realkernel import KERNEL

pytestmark = pytest.mark.root

PROBE = r"""
import ctypes, errno, json, os, platform, subprocess
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {"x86_64": {"io_uring_setup": 425, "bpf": 321, "perf_event_open": 298,
                 "userfaultfd": 323, "keyctl": 250},
      "aarch64": {"io_uring_setup": 425, "bpf": 280, "perf_event_open": 241,
                  "userfaultfd": 282, "keyctl": 219}}[platform.machine()]
out = {}
for call, nr in NR.items():
    ctypes.set_errno(0)
    r = libc.syscall(nr, 0, 0, 0, 0, 0)
    out[call] = errno.errorcode.get(ctypes.get_errno(), "ok") if r == -1 else "ok"
def ran(*argv):
    return subprocess.run(argv, capture_output=True).returncode == 0
out["unshare -Ur"] = ran("unshare", "-Ur", "true")
out["unshare -Urn nft"] = ran("unshare", "-Urn", "nft", "add", "table", "inet", "x")
out["unshare -Urm mount"] = ran("unshare", "-Urm", "mount", "-t", "tmpfs", "none", "/tmp")
print(json.dumps(out))
"""
CALLS = ("io_uring_setup", "bpf", "perf_event_open", "userfaultfd", "keyctl")
NESTED = ("unshare -Ur", "unshare -Urn nft", "unshare -Urm mount")
IDS = "cat /etc/machine-id /proc/sys/kernel/random/boot_id; echo \"[$(cat /proc/cmdline)]\""


def probe(argv: list[str]) -> dict:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def unprotected(argv: list[str]) -> list[str]:
    """The same sandbox without the seccomp filter and with nested user namespaces."""
    i = argv.index("bwrap")
    bw = [a for a in argv[i:] if a != "--disable-userns"]
    if "--seccomp" in bw:  # drop the wrapper's `sh -c ... FILE` and the option
        j = bw.index("--seccomp")
        del bw[j:j + 2]
    head = argv[:i]
    if head[-4:-2] == ["sh", "-c"]:
        head = head[:-4]
    return head + bw


@pytest.mark.parametrize("root", [False, True], ids=["user", "sandbox-root"])
def test_the_sandbox_refuses_the_kernels_attack_surface(basic_stack, root):
    argv = exec_argv(KERNEL, basic_stack, "work", None, ["/usr/bin/python3", "-c", PROBE],
                     root_inside=root)
    got = probe(argv)
    assert {c: got[c] for c in CALLS} == dict.fromkeys(CALLS, "ENOSYS"), got
    assert not any(got[n] for n in NESTED), got
    # anti-test: the same sandbox without the filter and with nested user namespaces
    bare = probe(unprotected(argv))
    assert all(bare[c] != "ENOSYS" for c in CALLS), bare  # each reached the kernel
    if not root:  # (the sandbox's root, with no capabilities, cannot map its ids anew)
        assert bare["unshare -Ur"] and bare["unshare -Urm mount"], bare
        assert bare["unshare -Urn nft"], bare  # root of a fresh netns: nf_tables is open


def test_each_qube_has_its_own_identity(basic_stack):
    def ids(q: str) -> list[str]:
        return cli("--stack", basic_stack, "exec", q, "--", "sh", "-c", IDS,
                   env={"SUDO_USER": ""}).stdout.split("\n")[:3]

    host = [Path(p).read_text().strip() for p in ("/etc/machine-id",
                                                  "/proc/sys/kernel/random/boot_id")]
    work, personal = ids("work"), ids("personal")
    assert work[2] == personal[2] == "[]"  # no kernel command line
    for i in (0, 1):
        assert len({work[i], personal[i], host[i]}) == 3, (work, personal, host)
    assert len(work[0]) == 32 and int(work[0], 16) >= 0  # a machine-id's form
    # stable: the same machine-id next time (the boot_id too, until the next `up`)
    assert ids("work")[:2] == work[:2]
    # anti-test: without the override the sandbox shows the host's
    argv = exec_argv(KERNEL, basic_stack, "work", None, ["sh", "-c", IDS])
    plain = [a for a in argv]
    for target in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id", "/proc/cmdline"):
        j = plain.index(target)
        del plain[j - 2:j + 1]
    p = subprocess.run(plain, capture_output=True, text=True, timeout=60)
    assert p.stdout.split("\n")[:2] == host


def test_a_tor_workstation_shows_whonixs_generic_machine_id(tor_lab):
    out = cli("--stack", tor_lab.stack, "exec", "anon-whonix", "--", "cat",
              "/etc/machine-id", env={"SUDO_USER": ""}).stdout.strip()
    assert out == sandbox.WHONIX_MACHINE_ID
