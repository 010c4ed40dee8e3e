"""The lab's private Tor network (TestingTorNetwork with fast voting): directory
authorities with keys made by tor-gencert, a middle relay and two exits, each in its own
lab namespace. torrc text is built by pure functions; key making is the only step that
runs programs.

A warm lab: the nodes' DataDirectories (identity and authority keys, so the DirAuthority
lines stay valid; cached consensus, certificates and descriptors) are kept between runs
under CACHE_ROOT/<digest of the network's shape>/, saved at `down` and restored at the
next `up --lab` of the same shape; `down --purge` removes them. Only the lab's own private
network is ever kept or restored: the public Tor network's gateways get nothing of it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator

from netstack.errors import ApplyError
from netstack.kernel import atomic_write, die_with_parent
from netstack.model import TorNode

OR_PORT, DIR_PORT = 5000, 7000

# Facts measured on this kind of machine (docs/field-notes.md, Tor): fast voting brings a
# client to 100 % in about 10 s; TestingTorNetwork allows the private and documentation
# addresses we use.
TESTING_OPTIONS = [
    "TestingTorNetwork 1", "AssumeReachable 1", "PathsNeededToBuildCircuits 0.67",
    "TestingDirAuthVoteExit *", "TestingDirAuthVoteGuard *", "TestingDirAuthVoteHSDir *",
    "TestingMinExitFlagThreshold 0", "V3AuthNIntervalsValid 2",
    "TestingV3AuthInitialVotingInterval 5", "TestingV3AuthInitialVoteDelay 2",
    "TestingV3AuthInitialDistDelay 2", "V3AuthVotingInterval 10", "V3AuthVoteDelay 2",
    "V3AuthDistDelay 2",
]


def node_role(host: str) -> str | None:
    """The lab host names of the private network's nodes say their role."""
    for prefix, role in (("auth", "authority"), ("relay", "relay"), ("exit", "exit"),
                         ("bridge", "bridge")):
        if host.startswith(prefix):
            return role
    return None


def dirauthority_lines(auths: list[tuple[TorNode, str, str]]) -> list[str]:
    """(node, v3 identity fingerprint, relay fingerprint) -> DirAuthority lines."""
    return [f"DirAuthority {n.name} orport={n.or_port} no-v2 v3ident={v3} "
            f"{n.address}:{n.dir_port} {fp}" for n, v3, fp in auths]


INITIAL_VOTING_INTERVAL = 5  # TestingV3AuthInitialVotingInterval above
# From writing the authorities' torrc to the first valid-after time they can make a
# consensus for: they schedule voting about 3.2 s after their torrc appears (the supervisor
# starts them, tor's start-up takes 2 s with the other nodes starting beside it) and vote
# for a valid-after time V at V-2; a second of margin (docs/field-notes.md, "A warm lab").
FIRST_ROUND_LEAD_S = 7


def voting_offset(now: float, lead: float = FIRST_ROUND_LEAD_S) -> int:
    """TestingV3AuthVotingStartOffset that puts a valid-after time `lead` seconds from
    `now` (voting times are otherwise multiples of the interval since midnight UTC, and a
    start just past one waited up to a whole interval more for the first consensus)."""
    return int(now + lead) % INITIAL_VOTING_INTERVAL


def node_torrc(node: TorNode, dirauths: list[str], resolv_conf: str,
               offset: int = 0) -> str:
    lines = [f"DataDirectory {node.dir}", "RunAsDaemon 0", f"Nickname {node.name}",
             "Log notice stdout", f"ControlSocket {node.control}", "SocksPort 0",
             f"Address {node.address}", f"ORPort {node.address}:{node.or_port}",
             *([] if node.role == "bridge" else [f"DirPort {node.address}:{node.dir_port}"]),
             "ContactInfo lab@netstack.invalid",
             "ServerDNSDetectHijacking 0", "ServerDNSTestAddresses", *TESTING_OPTIONS,
             *dirauths]
    if node.role == "bridge":  # obfs4 only: its identity was made before it starts
        from netstack.tor.obfs4 import OBFS4_PORT

        lines += ["BridgeRelay 1", "PublishServerDescriptor 0", "ExitRelay 0",
                  "ExitPolicy reject *:*", "ExtORPort auto",
                  "ServerTransportPlugin obfs4 exec /usr/bin/obfs4proxy",
                  f"ServerTransportListenAddr obfs4 {node.address}:{OBFS4_PORT}"]
    elif node.role == "authority":
        lines += ["AuthoritativeDirectory 1", "V3AuthoritativeDirectory 1", "ExitRelay 0",
                  "ExitPolicy reject *:*", f"TestingV3AuthVotingStartOffset {offset}"]
    elif node.role == "exit":
        lines += ["ExitRelay 1", "ExitPolicy accept *:*",
                  f"ServerDNSResolvConfFile {resolv_conf}", "ServerDNSAllowNonRFC953Hostnames 1"]
    else:
        lines += ["ExitRelay 0", "ExitPolicy reject *:*"]
    return "\n".join(lines) + "\n"


def start_keymaker(argv: list[str], stdin: str | None = None) -> subprocess.Popen:
    """A key-making child of `up`: it dies with `up` (a `kill -9` of `up` left tor-gencert
    running, writing keys into the directory the next `up` made again)."""
    return subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=die_with_parent())


# RSA-3072 key making took 1.15 s here, but more than 60 s in scripts/test-host's VM
# (software emulation on a loaded host): docs/field-notes.md, "A real NIC in the VM" ff.
KEYGEN_TIMEOUT = 600.0


def finish_keymaker(p: subprocess.Popen, stdin: str | None, what: str,
            timeout: float = KEYGEN_TIMEOUT) -> str:
    """The child's output; a child that does not finish in time is killed and named in
    one line (it was a traceback of subprocess.TimeoutExpired)."""
    try:
        out, err = p.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise ApplyError(f"lab Tor network: {what} did not finish in {timeout:.0f} s "
                         "(killed)") from None
    if p.returncode != 0:
        raise ApplyError(f"lab Tor network: {what} failed: {err.strip()[:200]}")
    return out


def generate(nodes: list[TorNode], base: str) -> list[str]:
    """Every node's keys, kept from an earlier run of the same shape (restore) or made now,
    then the torrc files. Returns the DirAuthority lines that every client of this network
    needs."""
    os.makedirs(base, mode=0o700, exist_ok=True)
    dirauths = restore(nodes)
    if dirauths is None:
        dirauths = _make_keys(nodes)
    lab_resolv = os.path.join(base, "resolv.conf")
    atomic_write(lab_resolv, lab_resolv_conf_text())
    from netstack.tor.obfs4 import OBFS4_PORT, make_state

    for n in nodes:
        if n.role == "bridge":
            pt = os.path.join(n.dir, "pt_state")
            cert = _state_cert(pt) or make_state(pt)
            atomic_write(bridge_line_path(base),
                         f"obfs4 {n.address}:{OBFS4_PORT} cert={cert} iat-mode=0\n")
    atomic_write(os.path.join(base, DIRAUTHS), "\n".join(dirauths) + "\n")
    offset = voting_offset(time.time())
    for n in nodes:  # the torrc last: the supervisor starts the node when it appears
        atomic_write(n.torrc, node_torrc(n, dirauths, lab_resolv, offset))
    return dirauths


def _make_keys(nodes: list[TorNode]) -> list[str]:
    """Make the authorities' keys (in parallel: tor-gencert's RSA-3072 takes about 1.2 s,
    and 3 of them with 7 `tor --list-fingerprint` took 3.2 s on 2 cores: docs/field-notes.md,
    "A warm lab"). Only the authorities' fingerprints go into the DirAuthority lines: the
    other nodes make their keys when they first start."""
    procs = []
    for n in nodes:
        d = n.dir
        for x in (d, os.path.join(d, "keys")):  # tor refuses a DataDirectory others read
            os.makedirs(x, mode=0o700, exist_ok=True)
            os.chmod(x, 0o700)
        if n.role != "authority":
            continue
        k = os.path.join(d, "keys")
        for f in ("authority_identity_key", "authority_signing_key", "authority_certificate"):
            with contextlib.suppress(FileNotFoundError):  # half made by an interrupted up:
                os.unlink(os.path.join(k, f))  # tor-gencert refuses to overwrite it
        argv = ["tor-gencert", "--create-identity-key", "--passphrase-fd", "0", "-i",
                f"{k}/authority_identity_key", "-s", f"{k}/authority_signing_key", "-c",
                f"{k}/authority_certificate", "-m", "12", "-a", f"{n.address}:{n.dir_port}"]
        procs.append((n, "gencert", start_keymaker(argv, "\n"), "\n"))
        argv = ["tor", "--list-fingerprint", "--DataDirectory", d, "--ORPort", str(n.or_port),
                "--Nickname", n.name, "--quiet"]
        procs.append((n, "fingerprint", start_keymaker(argv), None))
    v3: dict[str, str] = {}
    fps: dict[str, str] = {}
    for n, what, p, stdin in procs:
        out = finish_keymaker(p, stdin, f"{what} of {n.name}")
        if what == "fingerprint":
            fps[n.name] = "".join(out.strip().splitlines()[-1].split()[1:])
    for n in nodes:
        if n.role == "authority":
            v3[n.name] = _v3ident(n.dir)
    return dirauthority_lines([(n, v3[n.name], fps[n.name]) for n in nodes
                               if n.role == "authority"])


def _v3ident(d: str) -> str:
    with open(os.path.join(d, "keys", "authority_certificate")) as f:
        return next(x.split()[1] for x in f if x.startswith("fingerprint "))


def _state_cert(pt_state: str) -> str | None:
    """The cert of a kept obfs4 identity (obfs4.make_state's format), or None."""
    import base64

    try:
        with open(os.path.join(pt_state, "obfs4_state.json")) as f:
            st = json.load(f)
        raw = bytes.fromhex(st["node-id"]) + bytes.fromhex(st["public-key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return base64.b64encode(raw).decode().rstrip("=")


# --- the warm lab: kept DataDirectories ---------------------------------------------------
CACHE_ROOT = os.environ.get("NETSTACK_LAB_TOR_CACHE", "/var/lib/netstack/lab-tor")
CACHE_FORMAT = 1  # raise when what is kept changes meaning
DIRAUTHS = "dirauths"  # the network's DirAuthority lines, beside the nodes' directories
# Not kept: the lock and control socket of a running tor, its torrc (it names the stack's
# paths: written at every up), half-written files and logs.
_NOT_KEPT = {"lock", "control", "torrc"}
# Kept authority certificates expire (tor-gencert -m 12): a cache whose certificate ends
# within this many seconds is made again rather than restored.
CERT_MARGIN_S = 30 * 86400
# What a client of the lab network bootstraps from without a directory fetch (the gateway
# uses microdescriptors): docs/field-notes.md, "A warm lab".
CLIENT_SEED = ("cached-certs", "cached-microdesc-consensus", "cached-microdescs",
               "cached-microdescs.new")


def shape(nodes: Iterable[TorNode]) -> dict:
    """What makes two lab Tor networks the same one: the node set (names, roles,
    addresses, ports) and the options every node runs with. Stack names and paths are
    not part of it (the lab's addresses are the same in every stack)."""
    from netstack.tor.obfs4 import OBFS4_PORT

    return {"format": CACHE_FORMAT, "options": TESTING_OPTIONS, "obfs4_port": OBFS4_PORT,
            "nodes": sorted([n.name, n.role, n.address, n.or_port, n.dir_port]
                            for n in nodes)}


def cache_dir(nodes: Iterable[TorNode]) -> str:
    doc = json.dumps(shape(nodes), sort_keys=True, separators=(",", ":"))
    return os.path.join(CACHE_ROOT, hashlib.sha256(doc.encode()).hexdigest()[:16])


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One restore, save or purge at a time (stacks come up and go down concurrently)."""
    import fcntl

    os.makedirs(CACHE_ROOT, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(CACHE_ROOT, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _kept_dirauths(nodes: list[TorNode], d: str) -> list[str] | None:
    """The DirAuthority lines of a kept network if every node's keys are there and agree
    with them, and no authority certificate is about to expire; else None."""
    try:
        with open(os.path.join(d, "shape.json")) as f:
            if json.load(f) != json.loads(json.dumps(shape(nodes))):
                return None
        with open(os.path.join(d, DIRAUTHS)) as f:
            lines = [x for x in f.read().splitlines() if x]
        auths = []
        for n in nodes:
            nd = os.path.join(d, "nodes", n.name)
            with open(os.path.join(nd, "fingerprint")) as f:
                fp = f.read().split()[1]
            if n.role == "authority":
                auths.append((n, _v3ident(nd), fp))
                if _cert_expires(nd) - time.time() < CERT_MARGIN_S:
                    return None
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return lines if dirauthority_lines(auths) == lines else None


def _cert_expires(d: str) -> float:
    import calendar

    with open(os.path.join(d, "keys", "authority_certificate")) as f:
        line = next(x for x in f if x.startswith("dir-key-expires "))
    return calendar.timegm(time.strptime(line.split(" ", 1)[1].strip(), "%Y-%m-%d %H:%M:%S"))


def restore(nodes: list[TorNode]) -> list[str] | None:
    """Copy a kept network of this shape into the nodes' DataDirectories; returns its
    DirAuthority lines, or None (nothing kept, or kept for another shape: made anew)."""
    if not nodes:
        return None
    d = cache_dir(nodes)
    with _locked():
        dirauths = _kept_dirauths(nodes, d)
        if dirauths is None:  # one not to use (broken, certificate ending): made anew
            shutil.rmtree(d, ignore_errors=True)  # and kept at this stack's down
            return None
        for n in nodes:
            shutil.copytree(os.path.join(d, "nodes", n.name), n.dir, symlinks=True,
                            dirs_exist_ok=True)
    return dirauths


def save(nodes: list[TorNode], base: str) -> bool:
    """At `down`, with the nodes' tor processes ended: keep their DataDirectories for the
    next `up` of this shape. A cache made by another stack with other keys (two cold ups
    at once) is left as it is. Returns whether this network is kept."""
    try:
        with open(os.path.join(base, DIRAUTHS)) as f:
            lines = [x for x in f.read().splitlines() if x]
    except OSError:
        return False  # keys never made (an up that failed early), or an older netstack's
    if not nodes or not all(os.path.isfile(os.path.join(n.dir, "fingerprint"))
                            for n in nodes):
        return False
    d = cache_dir(nodes)
    with _locked():
        if os.path.isdir(d):
            try:
                with open(os.path.join(d, DIRAUTHS)) as f:
                    if [x for x in f.read().splitlines() if x] != lines:
                        return False
            except OSError:
                pass  # a broken cache: replaced below
        tmp = f"{d}.new{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "nodes"), mode=0o700)
        os.chmod(tmp, 0o700)
        for n in nodes:
            shutil.copytree(n.dir, os.path.join(tmp, "nodes", n.name), symlinks=True,
                            ignore=_ignore)
        atomic_write(os.path.join(tmp, "shape.json"), json.dumps(shape(nodes), indent=1))
        atomic_write(os.path.join(tmp, DIRAUTHS), "\n".join(lines) + "\n")
        old = f"{d}.old{os.getpid()}"
        if os.path.isdir(d):
            os.rename(d, old)
        os.rename(tmp, d)
        shutil.rmtree(old, ignore_errors=True)
    return True


def _ignore(src: str, names: list[str]) -> list[str]:
    import stat

    out = []
    for x in names:
        st = os.lstat(os.path.join(src, x))
        if x in _NOT_KEPT or stat.S_ISSOCK(st.st_mode) or x.endswith(".log") or \
                ".tmp" in x:
            out.append(x)
    return out


def purge_cache() -> bool:
    """`down --purge`: every kept lab Tor network goes. Returns whether one was there."""
    if not os.path.lexists(CACHE_ROOT):
        return False
    if os.path.islink(CACHE_ROOT):
        raise ApplyError(f"{CACHE_ROOT} is a symlink, not netstack's own directory; left "
                         "alone")
    with _locked():
        for x in os.listdir(CACHE_ROOT):
            if x != ".lock":
                shutil.rmtree(os.path.join(CACHE_ROOT, x), ignore_errors=True)
    shutil.rmtree(CACHE_ROOT, ignore_errors=True)
    from netstack.sandbox import HOME_ROOT

    if os.path.dirname(CACHE_ROOT) == HOME_ROOT:
        with contextlib.suppress(OSError):  # nothing else of netstack's left there
            os.rmdir(HOME_ROOT)
    return True


def seed_client(nodes: Iterable[TorNode], datadir: str, user: str) -> list[str]:
    """Give a client of the lab network (a gateway with `lab_network`) the consensus,
    certificates and microdescriptors a lab authority holds, so it builds circuits without
    waiting for a fetch (docs/field-notes.md, "A warm lab"). Never for the public
    network. The files belong to `user` (tor rewrites them after dropping root). Returns
    the files copied (none on a cold lab)."""
    import pwd

    src = next((n.dir for n in nodes if n.role == "authority"), None)
    done: list[str] = []
    if src is None:
        return done
    for name in CLIENT_SEED:
        s = os.path.join(src, name)
        if not os.path.isfile(s) or os.path.islink(s):
            continue
        try:
            with open(s, encoding="utf-8") as f:  # tor's directory documents are text
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue  # the client fetches what it lacks
        dst = os.path.join(datadir, name)
        atomic_write(dst, text, 0o600)  # before tor starts: nothing reads it yet
        u = pwd.getpwnam(user)
        os.chown(dst, u.pw_uid, u.pw_gid, follow_symlinks=False)
        done.append(name)
    return done


def bridge_line_path(base: str) -> str:
    """The lab bridge's line (`lab:obfs4` in a gateway's bridges), made with its identity."""
    return os.path.join(base, "obfs4-bridgeline")


def lab_resolv_conf_text() -> str:
    from netstack.addressing import lab_dns_server

    return f"nameserver {lab_dns_server()}\n"
