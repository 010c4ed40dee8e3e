"""`netstack template create|update|remove|list` (issue 28 item 3; netstack/templates.py
says how qubes see a template).

- create: mmdebstrap builds a Debian root (`--variant`, `--include`) from Debian's
  packages into a directory beside the templates, which becomes the template by one
  rename once it is whole (`--from DIR` copies an existing root instead). The host's
  network is used here, as the host's own apt does: nothing of a qube runs yet.
- update: the package manager runs in the template with one network path: a disposable
  qube of the running stack behind the qube the config names (`[stack] updatevm`, else the
  most private path: a Tor gateway, else a VPN; `--via` overrides), as Qubes' updates proxy
  does. The disposable is a live change like `run` (invariants hold), removed after. apt
  runs as root in a chroot of the template inside that qube's namespace: the template's
  packages are trusted as the host's apt trusts Debian's (signatures checked by apt,
  maintainer scripts run as root).
- remove: the template's directory and its skeletons go."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import shutil
import subprocess
import sys
from typing import Any

from netstack import templates
from netstack.errors import ApplyError, UsageError
from netstack.kernel import Kernel

VARIANTS = ("essential", "apt", "minbase", "required", "important", "standard")
DEFAULT_SUITE = "bookworm"


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a template is for: the packages it needs beyond the variant, and the files it
    gets (path inside the root -> text, or a symlink's target when it starts with '->')."""

    packages: tuple[str, ...]
    files: tuple[tuple[str, str], ...]
    about: str


# A Whonix-Workstation-like template: what Tor Browser (the Firefox ESR build the Tor
# Project ships, started with TOR_SKIP_LAUNCH against the gateway: the Tor kind's client
# environment) needs from Debian 12 to run and to be verified and unpacked, torsocks for
# the rest, and Whonix's anti-fingerprinting defaults that live in a root file system:
# the clock's zone is UTC, the locale C.UTF-8 (the qube's own names and resolver are bound
# over /etc by the sandbox).
PROFILES = {
    "whonix-workstation": Profile(
        packages=("libgtk-3-0", "libdbus-glib-1-2", "libx11-xcb1", "libxt6", "libxtst6",
                  "libasound2", "libpci3", "libegl1", "fonts-dejavu-core", "xauth",
                  "ca-certificates", "xz-utils", "gpg", "gpgv", "curl", "torsocks"),
        files=(("etc/timezone", "Etc/UTC\n"),
               ("etc/localtime", "->/usr/share/zoneinfo/Etc/UTC"),
               ("etc/default/locale", "LANG=C.UTF-8\n")),
        about="Tor Browser's needs and Whonix-Workstation's defaults (UTC, C.UTF-8)"),
}


def profile(name: str | None) -> Profile | None:
    """--profile NAME, checked."""
    if name is None:
        return None
    if name not in PROFILES:
        raise UsageError(f"--profile {name!r}: use one of {', '.join(sorted(PROFILES))}")
    return PROFILES[name]


def apply_profile(rootfs: str, prof: Profile) -> None:
    """Write a profile's files into a template root (never following a link of the root
    outside it: each path's directory is made by us, the file replaced, not written
    through)."""
    for rel, text in prof.files:
        path = os.path.join(rootfs, rel)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)
        if text.startswith("->"):
            os.symlink(text[2:], path)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)


def update_steps(pkgs: list[str]) -> str:
    """The shell steps apt runs in the template: refresh, upgrade, install what was asked
    (and what a profile still wants), then drop the downloaded archives."""
    steps = "apt-get update && apt-get -y -o Dpkg::Options::=--force-confold dist-upgrade"
    if pkgs:
        steps += " && apt-get -y install " + " ".join(pkgs)
    return steps + " && apt-get clean"


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"netstack template {what} needs root (it writes "
                         f"{templates.TEMPLATE_ROOT}): run it with sudo")


def packages(include: str | None) -> list[str]:
    """--include PKG,PKG: Debian package names (checked, so nothing else reaches apt)."""
    import re

    out = [p for p in (include or "").split(",") if p]
    for p in out:
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]{0,99}", p):
            raise UsageError(f"--include {p!r}: not a Debian package name (fix: lower-case "
                             "letters, digits, '+', '-', '.', separated by commas)")
    return out


def _write_meta(name: str, meta: templates.TemplateMeta, base: str | None = None) -> None:
    from netstack import codec

    codec.write(os.path.join(base or templates.path(name), templates.META), meta, 0o644)


def _meta(name: str) -> templates.TemplateMeta:
    from netstack import codec

    return codec.read(os.path.join(templates.path(name), templates.META),
                      templates.TemplateMeta)


def create(name: str, include: str | None = None, variant: str = "minbase",
           suite: str = DEFAULT_SUITE, mirror: str | None = None,
           source: str | None = None, profile_name: str | None = None) -> dict[str, Any]:
    import time

    templates.check_name(name, "template NAME")
    pkgs = packages(include)
    prof = profile(profile_name)
    if prof is not None:
        pkgs += [p for p in prof.packages if p not in pkgs]
    if variant not in VARIANTS:
        raise UsageError(f"--variant {variant!r}: use one of {', '.join(VARIANTS)}")
    _require_root("create")
    if templates.exists(name) or os.path.lexists(templates.path(name)):
        raise UsageError(f"template {name!r} exists already (fix: `netstack template remove "
                         f"{name}` first, or `template update {name}`)")
    os.makedirs(templates.TEMPLATE_ROOT, mode=0o755, exist_ok=True)
    lock = build_lock(name)
    if lock is None:
        raise UsageError(f"template {name!r} is being made by another `netstack template "
                         "create` (fix: wait for it to end, or end it)")
    global _LOCK_FD
    _LOCK_FD = lock  # held by this process and every builder it starts (pass_fds)
    building = os.path.join(templates.TEMPLATE_ROOT, f".{name}.building")
    shutil.rmtree(building, ignore_errors=True)  # an interrupted create's
    os.mkdir(building, 0o755)
    rootfs = os.path.join(building, "root")
    t0 = time.monotonic()
    try:
        if source:
            if not os.path.isdir(source):
                raise UsageError(f"--from {source}: no such directory (fix: the path of a "
                                 "Debian root file system, e.g. one mmdebstrap made)")
            if not os.path.isfile(os.path.join(source, "usr/bin/apt-get")):
                raise UsageError(f"--from {source}: not a Debian root file system (no "
                                 "usr/bin/apt-get)")
            _run(["cp", "-a", "--", source, rootfs], "copying " + source)
        else:
            if shutil.which("mmdebstrap") is None:
                raise UsageError("mmdebstrap is not installed (fix: apt-get install "
                                 "mmdebstrap)")
            argv = ["mmdebstrap", f"--variant={variant}", "--mode=root", "--format=directory",
                    *([f"--include={','.join(pkgs)}"] if pkgs else []), suite, rootfs,
                    *([mirror] if mirror else [])]
            _run(argv, "mmdebstrap")
        templates.prepare(rootfs)
        if prof is not None:
            apply_profile(rootfs, prof)
        # a copied root has none of the packages asked for: the next `update` installs
        # them through the stack (Qubes' updates proxy), never the host's network
        meta = templates.TemplateMeta(name, suite, variant, [] if source else pkgs, source,
                                      _now(), profile=profile_name,
                                      wanted=pkgs if source else [])
        _write_meta(name, meta, building)
        os.rename(building, templates.path(name))
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    finally:
        os.close(lock)
        _LOCK_FD = None
    return {**dataclasses.asdict(meta), "path": templates.path(name),
            "seconds": round(time.monotonic() - t0, 1)}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


_LOCK_FD: int | None = None  # the create's build lock (build_lock)


def build_lock(name: str) -> int | None:
    """The lock of making template `name` (flock on .locks/NAME), or None when another
    create holds it. Its descriptor is handed to the builders (cp, mmdebstrap): a create
    killed midway keeps its name locked while a builder of its still writes, so neither a
    second create nor the sweep of half-made templates races a live writer."""
    import fcntl

    d = os.path.join(templates.TEMPLATE_ROOT, ".locks")
    os.makedirs(d, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(d, name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _die_with_parent() -> None:
    """In a builder, before exec: killed when the create is (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run(argv: list[str], what: str) -> None:
    """A step whose output the user watches (stderr); its failure is one line. The step
    holds the build lock too and dies with the create."""
    p = subprocess.run(argv, stdout=sys.stderr, stderr=subprocess.PIPE, text=True,
                       pass_fds=(_LOCK_FD,) if _LOCK_FD is not None else (),
                       preexec_fn=_die_with_parent)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no message"])[-1]
        sys.stderr.write(p.stderr)
        raise ApplyError(f"template: {what} failed (exit {p.returncode}): {last}")


def remove(name: str) -> bool:
    templates.check_name(name, "template NAME")
    _require_root("remove")
    d = templates.path(name)
    if not os.path.lexists(d):
        return False
    if os.path.islink(d) or not templates.exists(name):
        raise UsageError(f"{d} is not a netstack template (no {templates.META}); left alone")
    for stack, qube in users(name):
        raise UsageError(f"template {name!r} is in use by qube {qube!r} of stack {stack!r} "
                         f"(fix: `netstack --stack {stack} down` first, or give the qube "
                         "another template)")
    templates.drop_skeletons(name)
    gone = os.path.join(templates.TEMPLATE_ROOT, f".{name}.removing")
    os.rename(d, gone)  # a qube started from now on finds no template
    shutil.rmtree(gone)
    for empty in (os.path.join(templates.TEMPLATE_ROOT, templates.SKELETONS),
                  templates.TEMPLATE_ROOT):  # the last template gone: its folders too
        with contextlib.suppress(OSError):
            os.rmdir(empty)
    return True


def users(name: str) -> list[tuple[str, str]]:
    """(stack, qube) of every running stack's qube on this template."""
    from netstack.errors import NetstackError
    from netstack.state import State

    out = []
    for stack in State.stacks():
        try:
            st = State.load(stack)
            plan = st.plan if st is not None else None
        except (NetstackError, OSError):  # a damaged stack: its qubes are not known
            continue
        out += [(stack, q.name) for q in (plan.qubes if plan else [])
                if q.settings.get("template") == name]
    return out


def sweep_stale() -> list[str]:
    """Remove what a `template create` killed midway left (`.NAME.building`, hundreds of
    MB): its builder's pid is gone. Returns the names swept."""
    out = []
    try:
        entries = os.listdir(templates.TEMPLATE_ROOT)
    except OSError:
        return out
    for e in entries:
        if not (e.startswith(".") and e.endswith(".building")):
            continue
        d = os.path.join(templates.TEMPLATE_ROOT, e)
        name = e[1:-len(".building")]
        lock = build_lock(name)
        if lock is None:
            continue  # its create, or a builder of a killed one, still runs
        try:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(lock)
        out.append(name)
    return out


def listing() -> list[dict[str, Any]]:
    if os.geteuid() == 0:
        sweep_stale()
    return [{**dataclasses.asdict(_meta(n)), "path": templates.path(n)}
            for n in templates.names()]


def update_via(plan: Any, via: str | None) -> tuple[str, str]:
    """The qube the update's traffic leaves through, and why: --via, else the config's
    [stack] updatevm, else the most private path of the stack (a Tor gateway first)."""
    if via is None and getattr(plan, "updatevm", None):
        via, why = plan.updatevm, "[stack] updatevm"
    elif via is not None:
        why = "--via"
    else:
        providers = [q for q in plan.qubes if q.traits.provides_network]
        best = max(providers, key=lambda q: (q.traits.privacy, len(plan.chain(q.name))))
        return best.name, "the most private path (no [stack] updatevm)"
    if not plan.has_qube(via) or not plan.qube(via).traits.provides_network:
        raise UsageError(f"--via {via!r}: not a qube of stack {plan.stack!r} that provides "
                         "network; use one of " + ", ".join(
                             q.name for q in plan.qubes if q.traits.provides_network))
    return via, why


# as root in the update qube's namespace, in a mount namespace of its own (`ip netns exec`
# makes one; nothing mounted here reaches the host): the template gets a /proc, the few
# devices apt and dpkg open, and the qube's resolv.conf; then apt runs in the chroot
UPDATE_SCRIPT = r'''set -e
r=$1; shift
mount -t proc proc "$r/proc"
mount -t tmpfs -o mode=0755 dev "$r/dev"
for d in null zero full random urandom tty; do
  touch "$r/dev/$d"; mount --bind "/dev/$d" "$r/dev/$d"
done
mount --bind /etc/resolv.conf "$r/etc/resolv.conf"
exec chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
  DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 /bin/sh -c "$1"
'''


def update(stack: str, name: str, via: str | None, install: str | None,
           kernel: Kernel) -> dict[str, Any]:
    import time

    from netstack import disposable
    from netstack.state import require

    templates.check_name(name, "template NAME")
    pkgs = packages(install)
    _require_root("update")
    rootfs = templates.require(name, "template update")
    st = require(stack)
    assert st.plan is not None
    netvm, why = update_via(st.plan, via)
    meta = _meta(name)
    pkgs += [p for p in meta.wanted if p not in pkgs]
    t0 = time.monotonic()
    q = disposable.add(stack, netvm, "red", kernel=kernel)  # a live change: invariants hold
    try:
        steps = update_steps(pkgs)
        p = subprocess.run(["ip", "netns", "exec", q.netns, "unshare", "--pid", "--fork",
                            "--ipc", "--uts", "sh", "-c", UPDATE_SCRIPT, "netstack-update",
                            rootfs, steps], stdout=sys.stderr, stderr=sys.stderr)
    finally:
        disposable.remove(stack, [q.name], kernel)
    templates.drop_skeletons(name)  # the template's directories may have changed
    if p.returncode != 0:
        raise ApplyError(f"template update {name}: apt failed (exit {p.returncode}) in a "
                         f"qube behind {netvm}; the output above says why (fix: the "
                         "template's /etc/apt/sources.list, or the way through --via)")
    meta.updated = _now()
    meta.include += [p for p in meta.wanted if p not in meta.include]
    meta.wanted = []
    _write_meta(name, meta)
    return {"template": name, "via": netvm, "why": why, "qube": q.name,
            "installed": pkgs, "seconds": round(time.monotonic() - t0, 1)}
