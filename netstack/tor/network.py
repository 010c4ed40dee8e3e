"""The lab's private Tor network (TestingTorNetwork with fast voting): directory
authorities with keys made by tor-gencert at start, a middle relay and two exits, each in
its own lab namespace. torrc text is built by pure functions; key making is the only step
that runs programs."""

from __future__ import annotations

import os
import subprocess

from netstack.errors import ApplyError
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


def node_torrc(node: TorNode, dirauths: list[str], resolv_conf: str) -> str:
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
                  "ExitPolicy reject *:*"]
    elif node.role == "exit":
        lines += ["ExitRelay 1", "ExitPolicy accept *:*",
                  f"ServerDNSResolvConfFile {resolv_conf}", "ServerDNSAllowNonRFC953Hostnames 1"]
    else:
        lines += ["ExitRelay 0", "ExitPolicy reject *:*"]
    return "\n".join(lines) + "\n"


def _start(argv: list[str], stdin: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, stdin: str | None, what: str) -> str:
    out, err = p.communicate(stdin, timeout=60)
    if p.returncode != 0:
        raise ApplyError(f"lab Tor network: {what} failed: {err.strip()[:200]}")
    return out


def generate(nodes: list[TorNode], base: str) -> list[str]:
    """Make every node's keys (in parallel: tor-gencert's RSA-3072 takes ~1.5 s), write the
    torrc files. Returns the DirAuthority lines that every client of this network needs."""
    lab_resolv = os.path.join(base, "resolv.conf")
    procs = []
    os.makedirs(base, mode=0o700, exist_ok=True)
    for n in nodes:
        d = n.dir
        os.makedirs(os.path.join(d, "keys"), mode=0o700, exist_ok=True)
        if n.role == "authority":
            k = os.path.join(d, "keys")
            argv = ["tor-gencert", "--create-identity-key", "--passphrase-fd", "0", "-i",
                    f"{k}/authority_identity_key", "-s", f"{k}/authority_signing_key", "-c",
                    f"{k}/authority_certificate", "-m", "12", "-a",
                    f"{n.address}:{n.dir_port}"]
            procs.append((n, "gencert", _start(argv, "\n"), "\n"))
        argv = ["tor", "--list-fingerprint", "--DataDirectory", d, "--ORPort", str(n.or_port),
                "--Nickname", n.name, "--quiet"]
        procs.append((n, "fingerprint", _start(argv), None))
    v3: dict[str, str] = {}
    fps: dict[str, str] = {}
    for n, what, p, stdin in procs:
        out = _finish(p, stdin, f"{what} of {n.name}")
        if what == "fingerprint":
            fps[n.name] = "".join(out.strip().splitlines()[-1].split()[1:])
    for n in nodes:
        if n.role == "authority":
            with open(os.path.join(n.dir, "keys", "authority_certificate")) as f:
                v3[n.name] = next(x.split()[1] for x in f if x.startswith("fingerprint "))
    dirauths = dirauthority_lines([(n, v3[n.name], fps[n.name]) for n in nodes
                                   if n.role == "authority"])
    with open(lab_resolv, "w") as f:
        f.write(lab_resolv_conf_text())
    from netstack.tor.obfs4 import OBFS4_PORT, make_state

    for n in nodes:
        if n.role == "bridge":
            cert = make_state(os.path.join(n.dir, "pt_state"))
            with open(bridge_line_path(base), "w") as f:
                f.write(f"obfs4 {n.address}:{OBFS4_PORT} cert={cert} iat-mode=0\n")
    for n in nodes:  # the torrc last: the supervisor starts the node when it appears
        with open(n.torrc + ".tmp", "w") as f:
            f.write(node_torrc(n, dirauths, lab_resolv))
        os.replace(n.torrc + ".tmp", n.torrc)
    return dirauths


def bridge_line_path(base: str) -> str:
    """The lab bridge's line (`lab:obfs4` in a gateway's bridges), made with its identity."""
    return os.path.join(base, "obfs4-bridgeline")


def lab_resolv_conf_text() -> str:
    from netstack.addressing import lab_dns_server

    return f"nameserver {lab_dns_server()}\n"
