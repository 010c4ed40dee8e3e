"""The lab's private Tor network (TestingTorNetwork with fast voting): directory
authorities whose keys are made in-process (make_relay_identity, make_authority_cert), a
middle relay and two exits, each in its own lab namespace. torrc text is built by pure
functions.

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
import time
from collections.abc import Iterable, Iterator

from netstack.errors import ApplyError
from netstack.kernel import atomic_write
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
# The authorities start with their first vote held: an initial voting interval this long
# puts their first valid-after time up to 5 min away, and netstack.tor.firstvote (run by
# the supervisor beside the first authority) moves them all to the 5-s schedule once every
# authority holds every relay's descriptor, so the first consensus lists the exits and
# guards (docs/field-notes.md, "The first consensus"). If that hook never ran, the network
# still votes at the held time (30 min divides by it, as tor requires).
HOLD_VOTING_INTERVAL = 300
HOLD_MARGIN_S = 30  # a held valid-after time nearer than this is moved on by MAX_OFFSET
MAX_OFFSET = 10  # tor: the offset may not exceed the voting intervals (V3AuthVotingInterval)


def hold_offset(now: float) -> int:
    """TestingV3AuthVotingStartOffset for the held schedule: the held valid-after time (a
    multiple of HOLD_VOTING_INTERVAL since midnight UTC, plus this) is at least MAX_OFFSET
    s away (HOLD_MARGIN_S or more in 9 of 10 starts), so the first vote waits for the
    release, which comes 4-8 s after the torrc."""
    left = HOLD_VOTING_INTERVAL - int(now) % HOLD_VOTING_INTERVAL
    return MAX_OFFSET if left < HOLD_MARGIN_S else 0


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
    elif node.role == "authority":  # the first vote held until the relays are in
        lines = [x for x in lines if not x.startswith("TestingV3AuthInitialVotingInterval ")]
        lines += ["AuthoritativeDirectory 1", "V3AuthoritativeDirectory 1", "ExitRelay 0",
                  "ExitPolicy reject *:*",
                  f"TestingV3AuthInitialVotingInterval {HOLD_VOTING_INTERVAL}",
                  f"TestingV3AuthVotingStartOffset {offset}"]
    elif node.role == "exit":
        lines += ["ExitRelay 1", "ExitPolicy accept *:*",
                  f"ServerDNSResolvConfFile {resolv_conf}", "ServerDNSAllowNonRFC953Hostnames 1"]
    else:
        lines += ["ExitRelay 0", "ExitPolicy reject *:*"]
    return "\n".join(lines) + "\n"


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
    offset = hold_offset(time.time())
    for n in nodes:  # the torrc last: the supervisor starts the node when it appears
        atomic_write(n.torrc, node_torrc(n, dirauths, lab_resolv, offset))
    return dirauths


def _make_keys(nodes: list[TorNode]) -> list[str]:
    """Make the authorities' keys in-process: the relay identity (make_relay_identity) and
    the v3 identity and signing keys with their certificate (make_authority_cert). Only
    the authorities' fingerprints go into the DirAuthority lines: the other nodes make
    their keys when they first start."""
    for n in nodes:
        d = n.dir
        for x in (d, os.path.join(d, "keys")):  # tor refuses a DataDirectory others read
            os.makedirs(x, mode=0o700, exist_ok=True)
            os.chmod(x, 0o700)
    auths = [(n, make_relay_identity(os.path.join(n.dir, "keys")),
              make_authority_cert(os.path.join(n.dir, "keys"), f"{n.address}:{n.dir_port}"))
             for n in nodes if n.role == "authority"]
    return dirauthority_lines([(n, v3, fp) for n, fp, v3 in auths])


def make_relay_identity(keys_dir: str) -> str:
    """A relay's RSA identity key (1024 bits: tor requires that size) where tor reads it,
    keys/secret_id_key; tor makes the rest (ed25519, onion keys) at its first start, as
    `tor --list-fingerprint` did here before, a tor start of 0.2 s each on a quiet host and
    seconds beside other work. Returns the fingerprint of the DirAuthority line."""
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(65537, 1024)
    atomic_write(os.path.join(keys_dir, "secret_id_key"), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()).decode(), 0o600)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.PKCS1)
    return hashlib.sha1(der).hexdigest().upper()


# A lab authority's v3 keys. tor-gencert makes a 3072-bit identity key (the public
# network's size) and a 2048-bit signing key: 1.15 s for one, and 3 at once took 3.2 s on
# a quiet host and up to 50 s beside other work, the largest part of a cold `up`
# (docs/field-notes.md, "The first consensus"). tor checks no size for either (the
# certificate's keys are NEED_KEY, any size): a private lab network's throwaway keys are
# made smaller, in-process with `cryptography`, in the format tor-gencert writes.
LAB_IDENTITY_BITS, LAB_SIGNING_BITS = 2048, 1024
CERT_MONTHS = 12  # as `tor-gencert -m 12` did


def _pem_public(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.PKCS1).decode()


def _rsa_raw_sign(key, data: bytes) -> bytes:
    """OpenSSL's RSA_private_encrypt with PKCS#1 v1.5 padding (tor-gencert's signatures):
    the bytes themselves are padded and signed, without a DigestInfo around them, which
    `cryptography`'s sign() always adds."""
    nums = key.private_numbers()
    k = (key.key_size + 7) // 8
    em = b"\x00\x01" + b"\xff" * (k - 3 - len(data)) + b"\x00" + data
    return pow(int.from_bytes(em, "big"), nums.d, nums.public_numbers.n).to_bytes(k, "big")


def _b64_lines(b: bytes) -> str:
    import base64

    t = base64.b64encode(b).decode()
    return "".join(t[i:i + 64] + "\n" for i in range(0, len(t), 64))


def make_authority_cert(keys_dir: str, address: str, now: float | None = None) -> str:
    """authority_identity_key, authority_signing_key and authority_certificate in
    `keys_dir`, as tor-gencert writes them (a v3 key certificate: the identity key
    certifies the signing key, which cross-certifies the identity's digest). Returns the
    v3 identity fingerprint."""
    import calendar
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    ident = rsa.generate_private_key(65537, LAB_IDENTITY_BITS)
    signing = rsa.generate_private_key(65537, LAB_SIGNING_BITS)
    der = ident.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.PKCS1)
    digest = hashlib.sha1(der).digest()
    fp = digest.hex().upper()
    t = time.gmtime(now if now is not None else time.time())
    mon = t.tm_mon - 1 + CERT_MONTHS
    exp = calendar.timegm((t.tm_year + mon // 12, mon % 12 + 1, min(t.tm_mday, 28),
                           t.tm_hour, t.tm_min, t.tm_sec, 0, 0, 0))
    fmt = "%Y-%m-%d %H:%M:%S"
    body = (f"dir-key-certificate-version 3\ndir-address {address}\nfingerprint {fp}\n"
            f"dir-key-published {time.strftime(fmt, t)}\n"
            f"dir-key-expires {time.strftime(fmt, time.gmtime(exp))}\n"
            f"dir-identity-key\n{_pem_public(ident)}dir-signing-key\n{_pem_public(signing)}"
            f"dir-key-crosscert\n-----BEGIN ID SIGNATURE-----\n"
            f"{_b64_lines(_rsa_raw_sign(signing, digest))}-----END ID SIGNATURE-----\n"
            "dir-key-certification\n")
    sig = _rsa_raw_sign(ident, hashlib.sha1(body.encode()).digest())
    cert = body + f"-----BEGIN SIGNATURE-----\n{_b64_lines(sig)}-----END SIGNATURE-----\n"
    for name, key in (("authority_identity_key", ident), ("authority_signing_key", signing)):
        atomic_write(os.path.join(keys_dir, name), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()).decode(), 0o600)
    atomic_write(os.path.join(keys_dir, "authority_certificate"), cert, 0o600)
    return fp


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
# Kept authority certificates expire (CERT_MONTHS): a cache whose certificate ends
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
    """The DirAuthority lines of a kept network if every node's directory is there and
    the authorities' keys agree with them, and no authority certificate is about to
    expire; else None."""
    try:
        with open(os.path.join(d, "shape.json")) as f:
            if json.load(f) != json.loads(json.dumps(shape(nodes))):
                return None
        with open(os.path.join(d, DIRAUTHS)) as f:
            lines = [x for x in f.read().splitlines() if x]
        auths = []
        for n in nodes:
            nd = os.path.join(d, "nodes", n.name)
            if not os.path.isdir(nd):
                return None
            if n.role != "authority":
                continue  # a relay's keys, if kept, are its own: no line names them
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


STACKS = "stacks"  # in a kept network: the stacks whose `down` kept it, one per line


def _stacks_of(d: str) -> list[str]:
    try:
        with open(os.path.join(d, STACKS)) as f:
            return [x for x in f.read().splitlines() if x]
    except OSError:
        return []


def save(nodes: list[TorNode], base: str, stack: str | None = None) -> bool:
    """At `down`, with the nodes' tor processes ended: keep their DataDirectories for the
    next `up` of this shape, naming `stack` among those that kept it (so that its
    `down --purge` removes this network and leaves other shapes' alone). A cache made by
    another stack with other keys (two cold ups at once) is left as it is. Returns whether
    this network is kept."""
    try:
        with open(os.path.join(base, DIRAUTHS)) as f:
            lines = [x for x in f.read().splitlines() if x]
    except OSError:
        return False  # keys never made (an up that failed early), or an older netstack's
    # the authorities' keys are the network (the DirAuthority lines); a relay that had not
    # started when `down` came (a loaded host) is kept without keys and makes them at the
    # next start, as on a cold up
    if not nodes or not all(os.path.isfile(os.path.join(n.dir, "fingerprint"))
                            for n in nodes if n.role == "authority"):
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
        kept_by = _stacks_of(d) + ([stack] if stack else [])
        atomic_write(os.path.join(tmp, STACKS), "".join(f"{x}\n" for x in
                                                         dict.fromkeys(kept_by)))
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


def purge_cache(stack: str | None = None) -> bool:
    """`down --purge`: the kept lab Tor networks `stack` kept (a network of the same shape
    kept by other stacks too goes with it: they share it; other shapes stay), and those
    nobody owns (kept by a netstack before networks named their stacks, or the half-made
    copy of a `down` killed while saving: `stacks` missing), or every one (stack None).
    CACHE_ROOT goes when nothing is left in it. Returns whether one went; what could not
    be removed is an ApplyError naming it."""
    if not os.path.lexists(CACHE_ROOT):
        return False
    if os.path.islink(CACHE_ROOT):
        raise ApplyError(f"{CACHE_ROOT} is a symlink, not netstack's own directory; left "
                         "alone")
    gone, stuck = False, []
    with _locked():
        for x in os.listdir(CACHE_ROOT):
            d = os.path.join(CACHE_ROOT, x)
            owners = _stacks_of(d)
            if x == ".lock" or not (stack is None or stack in owners or not owners):
                continue
            if os.path.islink(d):  # never followed: the link itself goes
                os.unlink(d)
            else:
                shutil.rmtree(d, ignore_errors=True)
            if os.path.lexists(d):
                stuck.append(d)
            else:
                gone = True
        if stuck:
            raise ApplyError(f"could not remove the kept lab Tor network {', '.join(stuck)}"
                             "; remove it by hand")
        if set(os.listdir(CACHE_ROOT)) - {".lock"}:
            return gone
    shutil.rmtree(CACHE_ROOT, ignore_errors=True)
    from netstack.sandbox import HOME_ROOT

    if os.path.dirname(CACHE_ROOT) == HOME_ROOT:
        with contextlib.suppress(OSError):  # nothing else of netstack's left there
            os.rmdir(HOME_ROOT)
    return gone


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
