"""Network namespaces by name, without side effects on the root namespace.

Own small layer instead of pyroute2.netns: its setns/pushns CREATE a namespace when the
name is missing (a typo would leave a stray namespace). Here entering never creates, and
switching affects only the calling thread (setns semantics), restored on exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED = 4096, 16384, 1 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def list_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _setns(fd: int) -> None:
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


def _ensure_dir() -> None:
    """Make /run/netns a shared mount point as iproute2 does, so `ip netns` sees ours."""
    os.makedirs(NETNS_DIR, exist_ok=True)
    if _libc.mount(b"", NETNS_DIR.encode(), b"none", MS_SHARED | MS_REC, None) == 0:
        return
    _check(_libc.mount(NETNS_DIR.encode(), NETNS_DIR.encode(), b"none", MS_BIND | MS_REC,
                       None), "bind /run/netns")
    _check(_libc.mount(b"", NETNS_DIR.encode(), b"none", MS_SHARED | MS_REC, None),
           "share /run/netns")


def create(name: str) -> None:
    """Create a named namespace; fails (EEXIST) if the name is taken."""
    _ensure_dir()
    p = path(name)
    os.close(os.open(p, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare")
        try:
            _check(_libc.mount(b"/proc/thread-self/ns/net", p.encode(), b"none", MS_BIND,
                               None), f"bind namespace {name}")
        finally:
            _setns(saved)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(p)
        raise
    finally:
        os.close(saved)


def unshare_thread() -> None:
    """Move the calling thread (only it: setns semantics) into a new unnamed namespace,
    gone when the last thing in it is (a probe's thread that ends)."""
    _check(_libc.unshare(CLONE_NEWNET), "unshare")


def delete(name: str) -> bool:
    """Unmount and remove a named namespace. Returns False if it did not exist."""
    p = path(name)
    if not os.path.exists(p):
        return False
    if _libc.umount2(p.encode(), MNT_DETACH) != 0 and ctypes.get_errno() != errno.EINVAL:
        e = ctypes.get_errno()
        raise OSError(e, f"umount {p}: {os.strerror(e)}")
    os.unlink(p)
    return True


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with this thread in namespace `name` (None: stay where we are)."""
    if name is None:
        yield
        return
    fd = os.open(path(name), os.O_RDONLY)  # never creates
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            _setns(fd)
        except OSError as e:
            if e.errno == errno.EINVAL:
                from netstack.errors import StateError

                raise StateError(f"{path(name)} is not a mounted namespace here (made from "
                                 "inside another mount namespace, e.g. `ip netns exec`? run "
                                 "netstack with `nsenter --net=...` instead)") from None
            raise
        try:
            yield
        finally:
            _setns(saved)
    finally:
        os.close(fd)
        os.close(saved)


def inode(name: str) -> int:
    return os.stat(path(name)).st_ino


def write_sysctl(name: str, key: str, value: str) -> None:
    """/proc/sys/net resolves to the namespace of the opening thread."""
    with entered(name), open(f"/proc/sys/{key}", "w") as f:
        f.write(value)


def read_sysctl(name: str, key: str) -> str:
    with entered(name), open(f"/proc/sys/{key}") as f:
        return f.read().strip()
