"""Every command in an app qube runs in a bubblewrap sandbox (the one Flatpak uses) inside
the qube's network namespace: its own user, PID, IPC, UTS (hostname = the qube) and cgroup
namespaces; the system read-only (/usr, /etc with the qube's own resolv.conf,
nsswitch.conf, hosts and hostname, which `ip netns exec` binds over the host's); a fresh
/tmp, /run and /dev/shm, a minimal /dev and its own /proc; the qube's persistent home. No
host unix socket (they live in /run, /tmp and /var, none of which is there), no host state
directory, no other qube's files. The sandbox is entered as an unprivileged host user with
no_new_privs and no capabilities: "root" inside (`--root`) is root of the sandbox's user
namespace only, which owns no network namespace and no host file."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from netstack.errors import UsageError

DEFAULT_ACCOUNT = "netstack-qube"  # made by scripts/setup.sh when no sudo user is at hand
HOME_ROOT = "/var/lib/netstack"
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def account(user: str | None, sudo_user: str | None) -> Account:
    """Who the sandbox runs as on the host: --user, else the invoking sudo user, else the
    dedicated account. Never host root."""
    name = user or (sudo_user if sudo_user and sudo_user != "root" else None) \
        or DEFAULT_ACCOUNT
    if name == "root" or name == "0":
        raise UsageError("--user root: a qube never runs as host root; use --root for root "
                         "inside the sandbox (root of its own user namespace only)")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if name == DEFAULT_ACCOUNT:
            raise UsageError(f"no user to run as: give --user NAME, run through sudo, or run "
                             f"scripts/setup.sh (it creates the account {DEFAULT_ACCOUNT})"
                             ) from None
        raise UsageError(f"--user {name!r}: no such user") from None
    if pw.pw_uid == 0:
        raise UsageError(f"--user {name!r} is uid 0: a qube never runs as host root")
    return Account(name, pw.pw_uid, pw.pw_gid)


@dataclass(frozen=True)
class Grant:
    """One thing of the host a qube is given (only `gui = true` grants anything): the
    host socket, where it appears inside, and the environment that tells apps."""

    display: str  # wayland | x11
    path: str  # on the host
    inside: str
    env: tuple[tuple[str, str], ...]
    xauthority: str | None = None
    readonly: bool = False  # a file to read (the lab CA of `netstack check`)

    @property
    def warning(self) -> str | None:
        return X11_WARNING if self.display == "x11" else None

    def describe(self) -> str:
        return f"gui: {self.display} ({self.path})"


X11_WARNING = ("X11 display granted: a qube with gui = true can read other windows' input "
               "and contents (X11 has no isolation); use a Wayland session")


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def gui_grant(env: Mapping[str, str], who: Account, inside_uid: int | None = None
              ) -> Grant | None:
    """The display of the account the sandbox runs as: its Wayland socket when it has one
    ($XDG_RUNTIME_DIR or /run/user/UID, $WAYLAND_DISPLAY or wayland-0), else its X11
    socket (/tmp/.X11-unix/XN from $DISPLAY) with its Xauthority. None: no display."""
    uid = who.uid if inside_uid is None else inside_uid
    runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{who.uid}"
    wl = env.get("WAYLAND_DISPLAY") or "wayland-0"
    path = wl if wl.startswith("/") else os.path.join(runtime, wl)
    if _is_socket(path):
        return Grant("wayland", path, f"/run/user/{uid}/wayland-0",
                     (("XDG_RUNTIME_DIR", f"/run/user/{uid}"), ("WAYLAND_DISPLAY", "wayland-0")))
    m = re.fullmatch(r"(?:unix)?:(\d{1,4})(?:\.\d+)?", env.get("DISPLAY", ""))
    if m:
        path = f"/tmp/.X11-unix/X{m.group(1)}"
        if _is_socket(path):
            xauth = env.get("XAUTHORITY") or os.path.join(pwd.getpwuid(who.uid).pw_dir,
                                                          ".Xauthority")
            return Grant("x11", path, path,
                         (("DISPLAY", f":{m.group(1)}"),
                          *((("XAUTHORITY", "/run/netstack-x11/Xauthority"),)
                            if os.path.isfile(xauth) else ())),
                         xauth if os.path.isfile(xauth) else None)
    return None


def home_dir(stack: str, qube: str) -> str:
    """The qube's persistent home on the host (kept across `down`/`up`, like an app
    qube's private volume)."""
    return os.path.join(HOME_ROOT, stack, qube, "home")


# Whonix gives every workstation this same machine-id, so that it tells nothing apart
# (Whonix's dist-base-files); a Tor workstation here does the same.
WHONIX_MACHINE_ID = "b08dfa6083e7567a1921a715000001fb"
# the one directory of a stack's state that sandboxes read (as their unprivileged account):
# identity files and the seccomp filter, nothing secret; everything else there is root's
PUBLIC = "public"


@dataclass(frozen=True)
class Identity:
    """What a program may read to tell one machine from another, as the qube shows it:
    files bound over /etc/machine-id, /proc/sys/kernel/random/boot_id and /proc/cmdline
    (the host's are the same in every qube, so any program that reports them would link a
    Tor workstation to the user's other qubes)."""

    machine_id: str  # a file holding the qube's machine-id
    boot_id: str  # a file holding the qube's boot_id (new at each `up`)
    cmdline: str  # an empty file: the host's kernel command line is none of its business


def make_identity(public_dir: str, persist_dir: str | None, qube: str, whonix: bool,
                  ) -> Identity:
    """The qube's identity files, made on first use: a Tor workstation's machine-id is
    Whonix's generic one; any other qube's is its own, random once and kept beside its home
    (persist_dir; None: a disposable's, gone with the stack's run directory, whose
    world-readable part public_dir is); its boot_id is random once per `up` (the stack's
    run directory goes at `down`). Files are world-readable
    (the sandbox starts as an unprivileged account), in directories only root writes."""
    import uuid

    def put(path: str, text: str) -> str:
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            with contextlib.suppress(FileExistsError):  # two first uses: the first one wins
                os.link(tmp, path)
            os.unlink(tmp)
        return path

    ids = public_dir
    if whonix:
        mid = put(os.path.join(ids, "whonix-machine-id"), WHONIX_MACHINE_ID + "\n")
    else:
        mid = put(os.path.join(persist_dir or ids, f"{qube}.machine-id" if not persist_dir
                               else "machine-id"), uuid.uuid4().hex + "\n")
    return Identity(mid, put(os.path.join(ids, f"{qube}.boot_id"), str(uuid.uuid4()) + "\n"),
                    put(os.path.join(ids, "empty"), ""))


CALLS = "calls"  # under PUBLIC: one directory per app qube, its call socket and client
CALL_INSIDE = "/run/netstack-call"  # where that directory appears in the sandbox


def call_dir(public_dir: str, qube: str) -> str:
    """The qube's call directory (made on first use): the stack's supervisor puts the
    qube's one call socket (`sock`) in it, and it holds the client `netstack-call`
    (netstack/callclient.py, standard library only). Root's, world-readable: the sandbox
    enters as an unprivileged account; who calls is told by the socket and checked against
    the caller's network namespace (netstack.calls), never by the path."""
    from netstack import callclient, codec

    d = os.path.join(public_dir, CALLS, qube)
    client = os.path.join(d, "netstack-call")
    if not os.path.exists(client):
        os.makedirs(d, mode=0o755, exist_ok=True)
        os.chmod(d, 0o755)  # (whatever the umask)
        os.chmod(os.path.dirname(d), 0o711)  # no listing of the qubes' directories
        with open(callclient.__file__, "rb") as f:
            codec.atomic_write(client, f.read(), 0o755)
    return d


def argv(netns: str, qube: str, who: Account, home: str | None, cmd: list[str],
         root_inside: bool = False, grants: tuple[Grant, ...] = (),
         extra_env: dict[str, str] | None = None, identity: Identity | None = None,
         seccomp_bpf: str | None = None, template: str | None = None,
         calls: str | None = None) -> list[str]:
    """The command line: enter the namespace (as root, to join it), drop to the account
    with no_new_privs, then bubblewrap, with no nested user namespaces
    (`--disable-userns`) and, given seccomp_bpf, the seccomp filter of netstack.seccomp.
    home None: an empty one, gone at exit. template: the overlay's lower layers
    (netstack.templates.lowers): the root is then the template under a throw-away overlay
    mounted by netstack.templates.prelude, instead of the host's /usr and /etc. calls: the
    qube's call directory (call_dir), bound at CALL_INSIDE and put on PATH
    (`netstack-call`)."""
    inside_uid, inside_gid = (0, 0) if root_inside else (who.uid, who.gid)
    home_in = "/root" if root_inside else "/home/user"
    if template is not None:
        from netstack.templates import MOUNT_POINT

        # the template's /etc, with the qube's own names and resolvers bound over it
        fs = ["--bind", f"{MOUNT_POINT}/root", "/"]
        for f in ("resolv.conf", "hosts", "hostname", "nsswitch.conf"):
            own = f"/etc/netns/{netns}/{f}"
            if os.path.exists(own):
                fs += ["--ro-bind", own, f"/etc/{f}"]
        fs += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm", "--tmpfs", "/tmp",
               "--tmpfs", "/run",
               *(["--bind", home, home_in] if home else ["--tmpfs", home_in])]
    else:
        fs = _host_view(home, home_in)
    if identity is not None:  # after /etc and /proc: these files are bound over theirs
        if template is not None or os.path.exists("/etc/machine-id"):
            fs += ["--ro-bind", identity.machine_id, "/etc/machine-id"]
        fs += ["--ro-bind", identity.boot_id, "/proc/sys/kernel/random/boot_id",
               "--ro-bind", identity.cmdline, "/proc/cmdline"]
    if calls is not None:  # the call layer: read-only, the socket in it still connects
        fs += ["--ro-bind", calls, CALL_INSIDE]
    env = ["--clearenv", "--setenv", "PATH", PATH + (f":{CALL_INSIDE}" if calls else ""),
           "--setenv", "HOME", home_in,
           "--setenv", "USER", "root" if root_inside else who.name,
           "--setenv", "LANG", os.environ.get("LANG", "C.UTF-8")]
    if os.environ.get("TERM"):
        env += ["--setenv", "TERM", os.environ["TERM"]]
    for k, v in sorted((extra_env or {}).items()):  # what the qube's netvm offers
        env += ["--setenv", k, v]
    for g in grants:  # nothing else of the host is ever bound in
        fs += ["--ro-bind" if g.readonly else "--bind", g.path, g.inside]
        if g.xauthority:
            fs += ["--ro-bind", g.xauthority, "/run/netstack-x11/Xauthority"]
        for k, v in g.env:
            env += ["--setenv", k, v]
    bw = ["bwrap", "--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc",
          "--unshare-uts", "--unshare-cgroup-try", "--hostname", qube,
          "--uid", str(inside_uid), "--gid", str(inside_gid),
          *fs, *env, "--chdir", home_in, "--die-with-parent", "--new-session",
          "--cap-drop", "ALL", "--", *cmd]
    if seccomp_bpf:
        from netstack import seccomp

        bw = seccomp.wrap(seccomp_bpf, bw)
    pre: list[str] = []
    if template is not None:
        from netstack.templates import prelude

        pre = prelude(template)  # as root, in the command's own mount namespace
    return ["ip", "netns", "exec", netns, *pre,
            "setpriv", f"--reuid={who.uid}", f"--regid={who.gid}", "--clear-groups",
            "--no-new-privs", "--", *bw]


def _host_view(home: str | None, home_in: str) -> list[str]:
    """No template: the host's /usr and /etc read-only, the rest fresh."""
    fs = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    if os.path.isdir("/etc/netns"):  # every qube's name and resolvers: not this qube's
        fs += ["--tmpfs", "/etc/netns"]
    for link in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        target = os.readlink(f"/{link}") if os.path.islink(f"/{link}") else None
        if target:  # merged /usr: /bin -> usr/bin
            fs += ["--symlink", target, f"/{link}"]
        elif os.path.isdir(f"/{link}"):
            fs += ["--ro-bind", f"/{link}", f"/{link}"]
    return fs + ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm", "--tmpfs", "/tmp",
                 "--tmpfs", "/run", "--tmpfs", "/var", "--dir", "/var/tmp",
                 "--symlink", "../run", "/var/run",
                 *(["--bind", home, home_in] if home else ["--tmpfs", home_in])]


def make_home(path: str, who: Account) -> None:
    """The home exists, owned by the account (created on first use, kept afterwards)."""
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    if not os.path.isdir(path):
        os.mkdir(path, 0o700)
    st = os.stat(path)
    if (st.st_uid, st.st_gid) != (who.uid, who.gid):
        os.chown(path, who.uid, who.gid)


def purge_homes(stack: str) -> bool:
    """`down --purge`: the stack's homes go too. Only HOME_ROOT/STACK itself, a real
    directory (never through a symlink), is removed."""
    from netstack.names import check_stack

    d = os.path.join(HOME_ROOT, check_stack(stack))
    if not os.path.lexists(d):
        return False
    if os.path.islink(d) or os.path.realpath(d) != os.path.join(
            os.path.realpath(HOME_ROOT), stack):
        raise UsageError(f"{d} is not netstack's own directory (a symlink?); left alone")
    shutil.rmtree(d)
    with contextlib.suppress(OSError):  # the last stack's homes gone: the folder too
        os.rmdir(HOME_ROOT)
    return True
