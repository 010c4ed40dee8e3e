"""What a provider file may point at, checked before anything is made: files it references
stay inside its own folder (regular files of a sane size, no symlink out), and endpoints are
routable unicast addresses outside the chain's own ranges, or well-formed host names."""

from __future__ import annotations

import ipaddress
import os
import re
import stat

from netstack.errors import ConfigError

MAX_KEY_FILE = 256 * 1024
# the chain's own address ranges: an endpoint there would be a qube, the virtual DNS, the
# host's NAT link or Tor's mapped addresses, never a VPN server
CHAIN_RANGES = [ipaddress.ip_network(n) for n in (
    "10.136.0.0/16", "10.137.0.0/16", "10.139.0.0/16", "10.192.0.0/10", "fd09:24ef:4179::/64")]
HOST_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9-_]{0,61}[A-Za-z0-9])?)"
                     r"(\.[A-Za-z0-9_]([A-Za-z0-9-_]{0,61}[A-Za-z0-9])?)*\.?$")


def read_referenced(base_dir: str, name: str, where: str) -> str:
    """A file named by a provider file: inside the provider file's own folder (after
    following symlinks), a regular file, at most MAX_KEY_FILE bytes, UTF-8 text."""
    fix = "keep the key and credential files next to the provider file"
    base = os.path.realpath(base_dir)
    path = os.path.realpath(os.path.join(base_dir, name))
    if not (path.startswith(base + os.sep)):
        raise ConfigError(where, f"{name!r} is outside the provider file's folder", fix)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(where, f"cannot read {name!r}: {e.strerror}", fix) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(where, f"{name!r} is not a regular file", fix)
    if st.st_size > MAX_KEY_FILE:
        raise ConfigError(where, f"{name!r} is {st.st_size} bytes, more than a key file "
                          f"({MAX_KEY_FILE})", fix)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
        return data.decode("utf-8-sig")
    except OSError as e:
        raise ConfigError(where, f"cannot read {name!r}: {e.strerror}", fix) from None
    except UnicodeDecodeError:
        raise ConfigError(where, f"{name!r} is not text (a key in PEM or base64)", fix) from None


def check_address(addr: str, where: str) -> None:
    """An endpoint address must be one a VPN server can have."""
    a = ipaddress.ip_address(addr)
    bad = ("unspecified" if a.is_unspecified else "loopback" if a.is_loopback
           else "multicast" if a.is_multicast else "link-local" if a.is_link_local
           else "broadcast" if a == ipaddress.ip_address("255.255.255.255")
           else "in 0.0.0.0/8" if a.version == 4 and a in ipaddress.ip_network("0.0.0.0/8")
           else None)
    if bad:
        raise ConfigError(where, f"{addr} is {bad}, not a VPN server's address",
                          "use the server address your provider gives")
    for net in CHAIN_RANGES:
        if a.version == net.version and a in net:
            raise ConfigError(where, f"{addr} is inside netstack's own range {net}",
                              "use the server address your provider gives")


def check_host(host: str, where: str) -> None:
    """An address (checked as above) or one well-formed host name, never a list."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOST_RE.match(host):
            raise ConfigError(where, f"{host!r} is neither an address nor a host name",
                              "give one server per line, e.g. vpn.example.net:51820") from None
        return
    check_address(host, where)
