"""The qube table: load a TOML config and validate it into a Topology.

The topology is the one source of truth; everything else is derived from it by pure
functions. Validation never touches the host, so an invalid config changes nothing. The
kinds a config may name are handed in (`kinds`: kind name -> its spec, from
netstack/kinds/registry.py by the command layer): this module never looks one up itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netstack.errors import ConfigError
from netstack.model import FwRule, Invariant

if TYPE_CHECKING:
    from netstack.kinds.spec import KindSpec

    Kinds = Mapping[str, KindSpec]

if TYPE_CHECKING:  # status imports this module (through roles) and reads no TOML: tomllib
    from pathlib import Path  # and pathlib cost it ~15 ms (docs/field-notes.md)

LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")
# A qube name becomes part of a namespace name (nst-STACK-QUBE) and of file paths under
# /etc/netns; keep it to what every tool accepts.
QUBE_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
MAX_QUBES = 250  # one /24 of 10.137.0.0/16 for qube addresses, .1-.250

COMMON_KEYS = {"kind", "netvm", "label", "firewall", "tags"}
MAX_FILE = 1 << 20  # config and provider files: a sane size
STACK_KEYS = {"ipv6", "default_dispvm", "updatevm", "policy", "services", "ask_timeout",
              "call_max_bytes", "watch", "on_leak"}
TOP_KEYS = {"qubes", "stack", "invariant"}


@dataclass(frozen=True)
class Qube:
    """One network compartment as written in the config."""

    name: str
    kind: str
    netvm: str | None
    label: str
    settings: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # its Qubes-style rule list, validated (None: no list); enforced in its netvm
    firewall: tuple[FwRule, ...] | None = field(default=None, hash=False, compare=False)
    # `tags = [...]`: what `[[invariant]]` selectors match (netstack/invariants.py)
    tags: tuple[str, ...] = field(default=(), hash=False, compare=False)


@dataclass(frozen=True)
class Topology:
    """Validated qubes forming a tree rooted at the one `net` qube."""

    qubes: tuple[Qube, ...]
    ipv6: bool = False
    source: str = "<memory>"
    default_dispvm: str | None = None  # disposables are made like this app qube (Qubes)
    # the call layer (docs/calls.md): as written, relative to the config's directory
    policy: str = "policy.d"
    services: str | None = None
    ask_timeout: float = 60.0
    call_max_bytes: int = 64 << 20
    # the kinds it was validated with (kind -> spec): plan.build derives each qube with it
    kinds: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    invariants: tuple[Invariant, ...] = ()  # the config's [[invariant]] tables
    updatevm: str | None = None  # `template update` goes out through it (Qubes' updatevm)
    # the uplink watch (netstack/watch.py): run by the supervisor; "cut" sets the uplink
    # down at the first packet the chain does not allow, "log" only raises the alarm
    watch: bool = False
    on_leak: str = "log"

    def __getitem__(self, name: str) -> Qube:
        for q in self.qubes:
            if q.name == name:
                return q
        raise KeyError(name)

    @property
    def root(self) -> Qube:
        """The net qube (a qube cut off with `netstack attach Q none` has no netvm too)."""
        return next(q for q in self.qubes
                    if q.netvm is None and self.kinds[q.kind].traits.owns_uplink)

    def children(self, name: str) -> list[Qube]:
        """Qubes whose netvm is `name`, sorted by name so derived data is deterministic."""
        return sorted((q for q in self.qubes if q.netvm == name), key=lambda q: q.name)

    def tree_order(self) -> list[Qube]:
        """Breadth-first from the net qube; siblings by name. Defines qube ids."""
        order, queue = [], [self.root]
        while queue:
            q = queue.pop(0)
            order.append(q)
            queue.extend(self.children(q.name))
        cut_off = sorted((q for q in self.qubes if q.netvm is None and q is not self.root),
                         key=lambda q: q.name)
        return order + cut_off


ETC_DIR = "/etc/netstack"  # a host's configs: `netstack up NAME` reads ETC_DIR/NAME.toml
SHARE_DIR = "/usr/share/netstack"  # the Debian package's shipped configs (scripts/build-deb)


def shipped_configs(checkout: str | Path) -> Path:
    """The configs shipped with netstack: `checkout`'s configs/ when netstack runs from its
    source tree, else where an installed netstack has them: the Debian package's
    SHARE_DIR/configs, or PREFIX/share/netstack/configs beside a pip-installed one."""
    here = Path(checkout) / "configs"
    if here.is_dir():
        return here
    import sys

    for d in (Path(sys.prefix) / "share" / "netstack" / "configs", Path(SHARE_DIR, "configs")):
        if d.is_dir():
            return d
    return Path(SHARE_DIR, "configs")
CONFIG_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def resolve(arg: str | Path, shipped: str | Path) -> str:
    """The config file a command means: a path as given; else a bare NAME, as a system
    tool's users write it (`netstack up work`), is NAME.toml in /etc/netstack
    ($NETSTACK_CONFIG_DIR when set), then in the configs shipped with netstack (`shipped`,
    so `netstack up tor-over-vpn --lab` works from any directory)."""
    import os

    text = str(arg)
    if os.path.exists(text) or "/" in text or text.endswith(".toml") or \
            not CONFIG_NAME.fullmatch(text):
        return text
    dirs = [os.environ.get("NETSTACK_CONFIG_DIR") or ETC_DIR, str(shipped)]
    for d in dirs:
        p = os.path.join(d, f"{text}.toml")
        if os.path.isfile(p):
            return p
    raise ConfigError(repr(text), f"no such file, and no {text}.toml in "
                      f"{' or '.join(dirs)}",
                      f"give the config's path, or put it at {dirs[0]}/{text}.toml")


def read_text(path: str | Path, where: str, fix: str) -> str:
    """A UTF-8 text file of a sane size (a UTF-8 byte order mark is accepted), or a
    ConfigError naming `where`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise ConfigError(where, f"cannot read {path}: {e.strerror}", fix) from None
    if len(data) > MAX_FILE:
        raise ConfigError(where, f"{path} is larger than {MAX_FILE} bytes", fix)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(where, f"{path} is not UTF-8 text (byte {e.start})",
                          "save the file as UTF-8") from None


def private_file_problem(path: str, mode: int, uid: int, is_file: bool) -> tuple[str, str] | None:
    """What is wrong with a secrets file of this mode and owner (None: it is root's
    alone): (problem, fix). Pure, so the rule is tested without root."""
    if not is_file:
        return f"{path} is not a regular file", f"point it at the file itself, e.g. {path}"
    if uid != 0:
        return (f"{path} is owned by uid {uid}, not root",
                f"chown root:root {path} && chmod 600 {path}")
    if mode & 0o077:
        return (f"{path} can be read or written by group or others (mode "
                f"{mode & 0o777:04o})", f"chmod 600 {path}")
    return None


def check_private_file(where: str, path: str) -> None:
    """A file with secrets the config names (Wi-Fi credentials) is root's alone; anything
    else is refused in one line naming the field and the fix, before anything is made."""
    import os
    import stat

    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(where, f"cannot read {path}: {e.strerror}",
                          f"create it (root's alone: chmod 600 {path})") from None
    bad = private_file_problem(path, st.st_mode, st.st_uid, stat.S_ISREG(st.st_mode))
    if bad:
        raise ConfigError(where, *bad)


def load(path: str | Path, kinds: Kinds, firewall: dict[str, list[Any]] | None = None,
         live: bool = False) -> Topology:
    """Read and validate a TOML config file. `firewall`: rule lists that replace the
    config's (`netstack firewall`'s overlay), validated as if they were written there.
    live: for a live change, which moves qubes first and then checks each list against the
    netvm it will really have (validate_live)."""
    text = read_text(path, str(path), "give the path of a TOML config")
    return parse(text, kinds, source=str(path), firewall=firewall, live=live)


def parse(text: str, kinds: Kinds, source: str = "<memory>",
          firewall: dict[str, list[Any]] | None = None, live: bool = False) -> Topology:
    import tomllib

    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"Cannot declare \('qubes', '([^']+)'\) twice", msg)
        if m:
            raise ConfigError(f"qube {m.group(1)}", "duplicate qube name",
                              "give every qube a unique name") from None
        raise ConfigError(source, f"not valid TOML: {msg}") from None
    qubes = data.get("qubes")
    for name, rules in (firewall or {}).items():
        if not isinstance(qubes, dict) or not isinstance(qubes.get(name), dict):
            raise ConfigError(f"qube {name!r} field 'firewall'", "rules were added with "
                              "`netstack firewall` for a qube the config no longer has",
                              f"run `netstack firewall {name} reset`")
        qubes[name]["firewall"] = rules
    return validate(data, kinds, source=source, live=live)


def _check_keys(where: str, got: dict, allowed: set[str]) -> None:
    for key in got:
        if key not in allowed:
            raise ConfigError(where, f"unknown key {key!r}",
                              f"allowed keys: {', '.join(sorted(allowed))}")


def validate(data: dict[str, Any], kinds: Kinds, source: str = "<memory>",
             live: bool = False) -> Topology:
    """Turn parsed TOML into a Topology, or raise ConfigError naming qube and field."""
    _check_keys("top level", data, TOP_KEYS)
    stack = data.get("stack", {})
    if not isinstance(stack, dict):
        raise ConfigError("stack", "must be a table", "write [stack]")
    _check_keys("[stack]", stack, STACK_KEYS)
    ipv6 = stack.get("ipv6", False)
    if not isinstance(ipv6, bool):
        raise ConfigError("[stack] field 'ipv6'", "must be true or false")
    raw = data.get("qubes")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("top level", "no qubes defined", "add tables like [qubes.sys-net]")
    if len(raw) > MAX_QUBES:
        raise ConfigError("qubes", f"{len(raw)} qubes, at most {MAX_QUBES} are supported")

    qubes: list[Qube] = []
    for name, body in raw.items():
        where = f"qube {name!r}"
        if not QUBE_NAME_RE.match(name) or name.endswith("-"):
            raise ConfigError(where, "invalid name",
                              "use 1-31 characters a-z, 0-9 and '-', starting with a letter")
        if not isinstance(body, dict):
            raise ConfigError(where, "must be a table", f"write [qubes.{name}]")
        kind = body.get("kind")
        if kind is None:
            raise ConfigError(f"{where} field 'kind'", "missing",
                              f"add kind = one of {', '.join(kinds)}")
        if kind not in kinds:
            raise ConfigError(f"{where} field 'kind'", f"{kind!r} is not a kind",
                              f"use one of {', '.join(kinds)}")
        _check_keys(where, body, COMMON_KEYS | kinds[kind].config_keys)
        label = body.get("label", "gray")
        if label not in LABELS:
            raise ConfigError(f"{where} field 'label'", f"{label!r} is not a label",
                              f"use one of {', '.join(LABELS)}")
        netvm = body.get("netvm")
        if kinds[kind].traits.owns_uplink:
            if netvm is not None:
                raise ConfigError(f"{where} field 'netvm'", "a net qube owns the uplink",
                                  "remove netvm from the net qube")
        elif netvm is None:
            raise ConfigError(f"{where} field 'netvm'", "missing",
                              "name the qube this one gets network from")
        elif not isinstance(netvm, str):
            raise ConfigError(f"{where} field 'netvm'", f"{netvm!r} must be a qube name",
                              'name the qube this one gets network from, e.g. netvm = '
                              '"sys-firewall"')
        settings = {k: v for k, v in body.items() if k not in COMMON_KEYS}
        rules = None
        if "firewall" in body:  # Qubes' qvm-firewall rules, enforced in the netvm
            from netstack.rules.qubefw import parse as parse_firewall

            rules = parse_firewall(name, body["firewall"])
        tags = ()
        if "tags" in body:
            from netstack.invariants import parse_tags

            tags = parse_tags(name, body["tags"])
        qubes.append(Qube(name, kind, netvm, label, settings, rules, tags))

    by_name = {q.name: q for q in qubes}
    nets = [q.name for q in qubes if kinds[q.kind].traits.owns_uplink]
    if not nets:
        raise ConfigError("qubes", "no qube of kind 'net'", "add one net qube (the uplink)")
    if len(nets) > 1:
        raise ConfigError(f"qube {nets[1]!r} field 'kind'",
                          f"two net qubes ({', '.join(nets)})", "keep exactly one net qube")
    for q in qubes:
        if q.netvm is None:
            continue
        where = f"qube {q.name!r} field 'netvm'"
        if q.netvm not in by_name:
            raise ConfigError(where, f"unknown qube {q.netvm!r}",
                              f"use one of {', '.join(sorted(by_name))}")
        if q.netvm == q.name:
            raise ConfigError(where, "a qube cannot be its own netvm")
        if not kinds[by_name[q.netvm].kind].traits.provides_network:
            raise ConfigError(where, f"{q.netvm!r} is an app qube and provides no network",
                              "use a net, firewall, vpn or tor qube as netvm")
    for q in qubes:  # every chain must end at the net qube, else there is a cycle
        seen = [q.name]
        cur = q
        while cur.netvm is not None:
            cur = by_name[cur.netvm]
            if cur.name in seen:
                cycle = " -> ".join(seen[seen.index(cur.name):] + [cur.name])
                raise ConfigError(f"qube {q.name!r} field 'netvm'", f"cycle {cycle}",
                                  "make the netvm chain end at the net qube")
            seen.append(cur.name)
    for q in qubes:
        kinds[q.kind].validate(q)
        if q.firewall is not None:
            if q.netvm is None:
                raise ConfigError(f"qube {q.name!r} field 'firewall'", "the net qube has no "
                                  "netvm to enforce rules", "remove firewall from it")
            if not live:
                check_client_rules(q.name, q.firewall, by_name[q.netvm], kinds)
        if q.settings.get("onion") and (q.netvm is None or
                                        not kinds[by_name[q.netvm].kind].traits.offers_onions):
            raise ConfigError(f"qube {q.name!r} field 'onion'", "an onion service needs a Tor "
                              "gateway as the qube's netvm (its keys live there)",
                              'set netvm to a qube of kind = "tor"')
    dispvm = stack.get("default_dispvm")
    if dispvm is not None and (not isinstance(dispvm, str) or dispvm not in by_name
                               or not kinds[by_name[dispvm].kind].traits.sandboxed):
        apps = sorted(q.name for q in qubes if kinds[q.kind].traits.sandboxed)
        raise ConfigError("[stack] field 'default_dispvm'", f"{dispvm!r} is not an app qube "
                          "of this config", f"name one of {', '.join(apps) or '(none)'}: "
                          "disposables get its netvm and label")
    updatevm = stack.get("updatevm")
    if updatevm is not None and (not isinstance(updatevm, str) or updatevm not in by_name
                                 or not kinds[by_name[updatevm].kind].traits.provides_network):
        nets = sorted(q.name for q in qubes if kinds[q.kind].traits.provides_network)
        raise ConfigError("[stack] field 'updatevm'", f"{updatevm!r} is not a qube of this "
                          "config that provides network", f"name one of {', '.join(nets)}: "
                          "`netstack template update` goes out through it")
    invariants = ()
    if "invariant" in data:
        from netstack.invariants import parse as parse_invariants

        invariants = parse_invariants(data["invariant"], set(by_name), LABELS, kinds)
    policy = stack.get("policy", "policy.d")
    if not isinstance(policy, str) or not policy:
        raise ConfigError("[stack] field 'policy'", f"{policy!r} is not a directory",
                          'write policy = "DIR" (relative to the config)')
    services = stack.get("services")
    if services is not None and (not isinstance(services, str) or not services):
        raise ConfigError("[stack] field 'services'", f"{services!r} is not a directory",
                          'write services = "DIR" (executables named as services)')
    ask_timeout = stack.get("ask_timeout", 60)
    if isinstance(ask_timeout, bool) or not isinstance(ask_timeout, (int, float)) \
            or not 1 <= ask_timeout <= 3600:
        raise ConfigError("[stack] field 'ask_timeout'", f"{ask_timeout!r}",
                          "give seconds, 1-3600: an unanswered `ask` is denied after it")
    cap = stack.get("call_max_bytes", 64 << 20)
    if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= 1 << 40:
        raise ConfigError("[stack] field 'call_max_bytes'", f"{cap!r}",
                          "give bytes, 1 to 2**40: a call carrying more each way is cut")
    watch = stack.get("watch", False)
    if not isinstance(watch, bool):
        raise ConfigError("[stack] field 'watch'", f"{watch!r}", "write watch = true or false")
    on_leak = stack.get("on_leak", "log")
    if on_leak not in ("log", "cut"):
        raise ConfigError("[stack] field 'on_leak'", f"{on_leak!r}",
                          'write on_leak = "log" (alarm only) or "cut" (set the uplink down)')
    if "on_leak" in stack and not watch:  # a safety option that would silently do nothing
        raise ConfigError("[stack] field 'on_leak'", "set, but no watch runs",
                          "add watch = true to [stack] (on_leak says what the watch does "
                          "on a leak), or remove on_leak")
    return Topology(tuple(qubes), ipv6=ipv6, source=source, default_dispvm=dispvm,
                    kinds=kinds, invariants=invariants, updatevm=updatevm, policy=policy,
                    services=services, ask_timeout=float(ask_timeout), call_max_bytes=cap,
                    watch=watch, on_leak=on_leak)


def check_client_rules(qube: str, rules: tuple[FwRule, ...], netvm: Qube,
                       kinds: Kinds) -> None:
    """The netvm's kind must be able to enforce every rule of the list as written."""
    role = kinds[netvm.kind]
    where = f"qube {qube!r} field 'firewall'"
    if not role.traits.enforces_client_rules:
        raise ConfigError(where, f"its netvm {netvm.name!r} (kind {netvm.kind}) does not "
                          "enforce per-qube rules", "attach the qube to a net, firewall, vpn "
                          "or tor qube")
    for i, r in enumerate(rules):
        why = role.refuse_client_rule(r)
        if why:
            raise ConfigError(f"{where} rule {i + 1}", f"cannot be enforced by {netvm.name!r} "
                              f"(kind {netvm.kind}): {why}", "drop the rule or change the "
                              "qube's netvm")


def validate_live(topo: Topology) -> None:
    """A topology changed live (`netstack attach`): every netvm exists and provides
    network, no chain loops, and every rule list can be enforced by its new netvm."""
    kinds = topo.kinds
    by_name = {q.name: q for q in topo.qubes}
    for q in topo.qubes:
        if q.netvm is None:
            continue
        where = f"qube {q.name!r} netvm"
        if q.netvm not in by_name or q.netvm == q.name or \
                not kinds[by_name[q.netvm].kind].traits.provides_network:
            raise ConfigError(where, f"{q.netvm!r} is not a qube that provides network",
                              "use one of " + ", ".join(sorted(
                                  n for n, x in by_name.items()
                                  if kinds[x.kind].traits.provides_network and n != q.name)))
        seen, cur = [q.name], q
        while cur.netvm is not None:
            cur = by_name[cur.netvm]
            if cur.name in seen:
                raise ConfigError(where, "would make a loop", "pick a netvm nearer sys-net")
            seen.append(cur.name)
        if q.firewall is not None:
            check_client_rules(q.name, q.firewall, by_name[q.netvm], topo.kinds)

