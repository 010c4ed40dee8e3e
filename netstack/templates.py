"""Templates (Qubes' TemplateVMs, issue 28 item 3): a Debian root file system under
/var/lib/netstack/templates/NAME/root that app qubes with `template = "NAME"` see as their
root, read-only underneath a throw-away overlay; only their home persists.

What a command in such a qube sees is made per command, in the private mount namespace
that `ip netns exec` gives it (a slave of the host's: nothing mounted there reaches the
host, and it is gone with the command's last process, also after a kill -9): a tmpfs, an
overlay whose lower layers are the template (and, for `--root`, a skeleton of its
directories owned by the sandbox's account, see `skeleton`), its upper layer on that
tmpfs; bubblewrap then takes the overlay as `/`. bubblewrap 0.8 (Debian 12) has no
`--overlay-src`/`--tmp-overlay` (they came in 0.9): the overlay is mounted by root before
the sandbox starts, with the same effect (docs/field-notes.md "Templates").

The template itself changes only through `netstack template update` (netstack/template_cmd.py)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass, field

from netstack.errors import UsageError

TEMPLATE_ROOT = "/var/lib/netstack/templates"
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
# an empty directory of the host: each templated command's own mount namespace mounts its
# tmpfs and overlay over it (the host's stays empty)
MOUNT_POINT = "/run/netstack-overlay"
META = "template.json"
SKELETONS = ".skel"  # TEMPLATE_ROOT/.skel/NAME/UID: see skeleton()
# files and directories every template has, so bubblewrap can bind the qube's own over them
# without creating anything in a root the sandbox's account cannot write
NEEDED_FILES = ("etc/resolv.conf", "etc/hosts", "etc/hostname", "etc/nsswitch.conf",
                "etc/machine-id")
NEEDED_DIRS = ("etc", "home/user", "root", "tmp", "run", "proc", "dev")

# run as root by `ip netns exec` in the command's private mount namespace: $1 the lower
# layers, $2 the mount point; then the sandbox's own command line
PRELUDE = r'''set -e
mount -t tmpfs -o mode=0755 netstack-root "$2"
mkdir "$2/upper" "$2/work" "$2/root"
mount -t overlay netstack-root -o "lowerdir=$1,upperdir=$2/upper,workdir=$2/work" "$2/root"
shift 2
exec "$@"
'''


@dataclass
class TemplateMeta:
    """template.json beside the root: how it was made and when it was last updated."""

    name: str
    suite: str
    variant: str
    include: list[str] = field(default_factory=list)
    source: str | None = None  # `create --from DIR`: copied from there, not built
    created: str = ""
    updated: str | None = None
    profile: str | None = None  # `create --profile`: what the template is for
    wanted: list[str] = field(default_factory=list)  # installed by the next `update`


def check_name(name: object, where: str) -> str:
    """A template's name (a directory name): 1-31 characters a-z, 0-9, '-'."""
    from netstack.errors import ConfigError

    if not isinstance(name, str) or not NAME_RE.match(name) or name.endswith("-"):
        raise ConfigError(where, f"{name!r} is not a template name",
                          "use 1-31 characters a-z, 0-9 and '-', starting with a letter")
    return name


def path(name: str) -> str:
    return os.path.join(TEMPLATE_ROOT, name)


def root(name: str) -> str:
    """The template's root file system."""
    return os.path.join(path(name), "root")


def exists(name: str) -> bool:
    return os.path.isfile(os.path.join(path(name), META)) and os.path.isdir(root(name))


def require(name: str, who: str) -> str:
    """The root of an existing template, or one line saying how to make it."""
    if not exists(name):
        raise UsageError(f"{who}: template {name!r} does not exist (fix: `netstack template "
                         f"create {name}`, or remove `template` from the qube's table)")
    return root(name)


def skeleton(name: str, uid: int, gid: int) -> str:
    """Every directory of the template, empty, owned by the sandbox's account (made once
    per template and account, removed by `template update` and `remove`). As the top lower
    layer it gives the overlay's directories that owner, so root inside the sandbox (`--root`,
    the account mapped to 0) may create, replace and remove files anywhere in its view, as
    root of a Qubes app qube may, while the template's files stay root's and unchanged.
    Without `--root` the view is the template's own: the account writes nothing outside
    its home and the fresh /tmp."""
    out = os.path.join(TEMPLATE_ROOT, SKELETONS, name, str(uid))
    if os.path.isdir(out):
        return out
    src = root(name)
    tmp = f"{out}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(out), mode=0o700, exist_ok=True)
    for d, dirs, _files in os.walk(src):
        rel = os.path.relpath(d, src)
        dst = tmp if rel == "." else os.path.join(tmp, rel)
        os.mkdir(dst)
        os.chmod(dst, os.lstat(d).st_mode & 0o7777)
        os.chown(dst, uid, gid)
        dirs[:] = [x for x in dirs if not os.path.islink(os.path.join(d, x))]
    try:
        os.rename(tmp, out)
    except OSError:  # another command made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def drop_skeletons(name: str) -> None:
    shutil.rmtree(os.path.join(TEMPLATE_ROOT, SKELETONS, name), ignore_errors=True)


def lowers(name: str, uid: int, gid: int, root_inside: bool) -> str:
    """The overlay's lowerdir option: the template, under its skeleton for `--root`."""
    base = require(name, "exec")
    return f"{skeleton(name, uid, gid)}:{base}" if root_inside else base


def prelude(lower: str) -> list[str]:
    """The command line that mounts the throw-away root, then runs what follows it."""
    os.makedirs(MOUNT_POINT, mode=0o755, exist_ok=True)
    return ["sh", "-c", PRELUDE, "netstack-root", lower, MOUNT_POINT]


def prepare(rootfs: str) -> None:
    """What every template needs beyond what mmdebstrap made (see NEEDED_*)."""
    for d in NEEDED_DIRS:
        os.makedirs(os.path.join(rootfs, d), mode=0o755, exist_ok=True)
    for f in NEEDED_FILES:
        p = os.path.join(rootfs, f)
        if not os.path.lexists(p):
            with open(p, "w"):
                pass
            os.chmod(p, 0o644)


def names() -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(TEMPLATE_ROOT) if exists(n))
    return []
