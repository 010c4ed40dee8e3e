"""The call layer's policy: which qube may ask which other qube for which service (Qubes'
qrexec policy, /etc/qubes/policy.d/, in a documented subset; docs/calls.md).

Pure: text in, rules out; a request in, a verdict out. A policy is the `*.policy` files of
one directory read in the order of their names, each line

    SERVICE  +ARGUMENT  SOURCE  TARGET  ACTION  [PARAM=VALUE ...]

and the FIRST line that matches a call decides it, across all files (as Qubes does); a
call no line matches is denied. Everything that is not understood is refused with the
file, the line and the fix, so a policy that would mean something other than it says
never comes into force (`up` refuses it and changes nothing).

Tokens (Qubes' names): a qube's name, `@anyvm` (every qube), `@tag:NAME` (qubes whose
config says `tags = ["NAME"]`), `@type:AppVM` / `@type:DispVM`, and as targets also
`@default` (the caller named none), `@dispvm` (a new disposable of the caller's
default_dispvm), `@dispvm:QUBE`, `@dispvm:@tag:NAME`. Actions: `allow` (params `target=`,
`user=`, `notify=`, `autostart=`), `deny` (`notify=`), `ask` (`target=`,
`default_target=`, `user=`). `@adminvm` (dom0) does not exist here: the host is not a qube
a call reaches."""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field

from netstack.errors import ConfigError

ACTIONS = ("allow", "deny", "ask")
PARAMS = {"allow": {"target", "user", "notify", "autostart"}, "deny": {"notify"},
          "ask": {"target", "default_target", "user", "notify", "autostart"}}
# Qubes' RPCNAME_ALLOWED_CHARSET, and its file-name rule for policy.d
NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-._")
ARG_CHARS = NAME_CHARS | {"+"}
FILE_RE = re.compile(r"^[0-9a-z_.-]+$")
MAX_NAME = 64  # a service's name, and an argument after its '+', at most (Qubes: 64 in all)
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
QUBE_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")  # config.QUBE_NAME_RE
TYPES = ("AppVM", "DispVM")
SUFFIX = ".policy"
MAX_FILE = 1 << 20


@dataclass(frozen=True)
class Rule:
    service: str | None  # None: `*`
    argument: str | None  # None: `*`; else what follows '+' ("" for a bare `+`)
    source: str
    target: str
    action: str
    params: tuple[tuple[str, str], ...]
    where: str  # FILE:LINE, as the user reads it

    def param(self, key: str) -> str | None:
        return dict(self.params).get(key)

    def text(self) -> str:
        arg = "*" if self.argument is None else f"+{self.argument}"
        return " ".join([self.service or "*", arg, self.source, self.target, self.action,
                         *(f"{k}={v}" for k, v in self.params)])


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = ()  # read, in order
    directory: str = ""


@dataclass(frozen=True)
class QubeFacts:
    """What a token can ask of a qube: its tags, its type, its default disposable."""

    tags: frozenset[str] = frozenset()
    type: str = "AppVM"
    default_dispvm: str | None = None


@dataclass(frozen=True)
class Verdict:
    action: str  # allow | deny | ask
    target: str  # where the service runs (after `target=`); the asked one when denied
    user: str | None = None
    rule: str | None = None  # FILE:LINE of the deciding line; None: no line matched
    reason: str = ""
    default_target: str | None = None  # ask: what the prompt offers first
    extra: dict[str, str] = field(default_factory=dict)
    # Qubes' defaults: a denied call is told (notify=yes), an allowed one not; a call may
    # start what it needs (a new disposable) unless its line says autostart=no
    notify: bool = False
    autostart: bool = True


# --- names a caller may use ------------------------------------------------------------

def name_problem(service: str, argument: str | None) -> str | None:
    """Why a service name and argument (what a caller sends, untrusted) cannot be called,
    or None. Stricter than Qubes (which rewrites bad characters to '_'): a name is refused,
    never rewritten, and an argument may not start with '.', so `..`, `.` and dot-files
    never reach a service that uses it as a file name."""
    if not service or len(service) > MAX_NAME:
        return f"a service name is 1-{MAX_NAME} characters"
    if not set(service) <= NAME_CHARS:
        return "a service name has only letters, digits, '-', '.' and '_'"
    if service.startswith("."):
        return "a service name may not start with '.'"
    if argument is None or argument == "":
        return None
    if len(argument) > MAX_NAME:
        return f"an argument is at most {MAX_NAME} characters"
    if not set(argument) <= ARG_CHARS:
        return "an argument has only letters, digits, '-', '.', '_' and '+' (no '/', no NUL)"
    if argument.startswith("."):
        return "an argument may not start with '.' ('..', '.', dot-files)"
    return None


def split_call(word: str) -> tuple[str, str]:
    """SERVICE[+ARG] as a caller writes it: (service, argument; "" for none)."""
    service, _, arg = word.partition("+")
    return service, arg


# --- parsing ---------------------------------------------------------------------------

def _token(tok: str, where: str, as_target: bool) -> str:
    col = "target" if as_target else "source"
    if tok.startswith("$"):
        raise ConfigError(where, f"{tok!r} is the old policy format",
                          f"write {'@' + tok[1:]!r} (the '@' tokens of Qubes 4.1+)")
    if tok == "@adminvm" or tok == "dom0":
        raise ConfigError(where, f"{tok!r}: netstack has no admin qube; the host is not a "
                          "qube a call reaches", "drop the line")
    if tok == "@anyvm":
        return tok
    if tok in ("@default", "@dispvm"):
        if not as_target:
            raise ConfigError(where, f"{tok} is a target token, not a source",
                              "use a qube name, @anyvm, @tag:NAME or @type:TYPE as source")
        return tok
    for prefix in ("@dispvm:@tag:", "@tag:", "@type:", "@dispvm:"):
        if tok.startswith(prefix):
            value = tok[len(prefix):]
            if prefix == "@type:":
                if value not in TYPES:
                    raise ConfigError(where, f"{tok!r}: no such type",
                                      f"use {', '.join('@type:' + t for t in TYPES)}")
            elif prefix == "@dispvm:" and not QUBE_RE.match(value):
                raise ConfigError(where, f"{tok!r}: {value!r} is not a qube name",
                                  "write @dispvm:QUBE or @dispvm:@tag:NAME")
            elif not value or not set(value) <= NAME_CHARS:
                raise ConfigError(where, f"{tok!r}: a tag is letters, digits, '-', '.', '_'",
                                  "write @tag:NAME")
            return tok
    if tok.startswith("@"):
        raise ConfigError(where, f"unknown {col} token {tok!r}",
                          "use a qube name, @anyvm, @tag:NAME, @type:TYPE"
                          + (", @default, @dispvm or @dispvm:QUBE" if as_target else ""))
    if not QUBE_RE.match(tok):
        raise ConfigError(where, f"{tok!r} is not a qube name",
                          "qube names are a-z, 0-9 and '-', starting with a letter")
    return tok


def _redirect(value: str, where: str, key: str) -> str:
    if value == "@dispvm" or (value.startswith("@dispvm:") and QUBE_RE.match(value[8:])) \
            or QUBE_RE.match(value):
        return value
    raise ConfigError(where, f"{key}={value!r} is not a qube, @dispvm or @dispvm:QUBE",
                      f"write {key}=QUBE")


def parse_line(line: str, where: str) -> Rule | None:
    """One line of a policy file: a Rule, None for a blank line or a comment."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    if line.startswith("!"):
        raise ConfigError(where, f"{line.split()[0]}: includes are not part of netstack's "
                          "subset", "put the lines in a file of the policy directory")
    words = line.split()
    if len(words) < 5:
        raise ConfigError(where, f"{len(words)} fields, a line has at least 5",
                          "write SERVICE +ARGUMENT SOURCE TARGET ACTION [PARAM=VALUE]")
    service, argument, source, target, action, *rest = words
    if service == "*":
        svc = None
    else:
        why = name_problem(service, None)
        if why:
            raise ConfigError(where, f"service {service!r}: {why}", "fix the name, or *")
        svc = service
    if argument == "*":
        arg = None
    else:
        if not argument.startswith("+"):
            raise ConfigError(where, f"argument {argument!r} does not start with '+'",
                              "write +ARGUMENT, a bare + (no argument) or *")
        arg = argument[1:]
        why = name_problem(service if svc else "x", arg)
        if why:
            raise ConfigError(where, f"argument {argument!r}: {why}", "fix the argument")
        if svc is None:
            raise ConfigError(where, "a * service takes only the * argument",
                              "name the service, or write * as argument")
    src = _token(source, where, as_target=False)
    dst = _token(target, where, as_target=True)
    if action not in ACTIONS:
        raise ConfigError(where, f"unknown action {action!r}", "use allow, deny or ask")
    params: list[tuple[str, str]] = []
    for p in ",".join(rest).split(","):
        if not p:
            continue
        key, eq, value = p.partition("=")
        if not eq or key not in PARAMS[action]:
            allowed = ", ".join(f"{k}=" for k in sorted(PARAMS[action]))
            raise ConfigError(where, f"{p!r} is not a parameter of {action}",
                              f"{action} takes {allowed}")
        if any(k == key for k, _ in params):
            raise ConfigError(where, f"{key}= given twice", "keep one")
        if key in ("target", "default_target"):
            value = _redirect(value, where, key)
        elif key == "user" and not USER_RE.match(value):
            raise ConfigError(where, f"user={value!r} is not a user name",
                              "write user=NAME (a host account; never root)")
        elif key == "user" and value == "root":
            raise ConfigError(where, "user=root: a qube never runs as host root",
                              "drop user= or name an unprivileged account")
        elif key in ("notify", "autostart") and value not in ("yes", "no"):
            raise ConfigError(where, f"{key}={value!r}", f"write {key}=yes or {key}=no")
        params.append((key, value))
    return Rule(svc, arg, src, dst, action, tuple(params), where)


def parse_text(text: str, name: str) -> list[Rule]:
    """Every rule of one file's text; `name` is how errors name the file."""
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        r = parse_line(line, f"{name}:{n}")
        if r is not None:
            out.append(r)
    return out


def load(directory: str, shown: str | None = None) -> Policy:
    """The policy of a directory: its `*.policy` files in the order of their names (other
    files are left alone, as in Qubes). `shown`: how errors name the directory (as the
    config wrote it). A directory that does not exist is an empty policy: every call is
    denied."""
    label = shown or directory
    if not os.path.exists(directory):
        return Policy((), (), directory)
    if not os.path.isdir(directory):
        raise ConfigError(label, "is not a directory", "point [stack] policy at a directory "
                          "of *.policy files")
    rules: list[Rule] = []
    files = []
    for fn in sorted(os.listdir(directory)):
        path = os.path.join(directory, fn)
        if not fn.endswith(SUFFIX) or fn.startswith(".") or not os.path.isfile(path):
            continue
        where = os.path.join(label, fn)
        if not FILE_RE.match(fn):
            raise ConfigError(where, "a policy file's name is lower-case letters, digits, "
                              "'_', '.' and '-'", "rename it, e.g. 30-user.policy")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except OSError as e:
            raise ConfigError(where, f"cannot read: {e.strerror}") from None
        if len(data) > MAX_FILE:
            raise ConfigError(where, f"larger than {MAX_FILE} bytes", "split it")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(where, f"not UTF-8 text (byte {e.start})",
                              "save it as UTF-8") from None
        rules += parse_text(text, where)
        files.append(where)
    return Policy(tuple(rules), tuple(files), directory)


def check_names(policy: Policy, qubes: Mapping[str, QubeFacts]) -> None:
    """Every qube a line names is an app qube of the config (a name that matches nothing
    is a typo that silently denies, or a service qube a call never reaches)."""
    for r in policy.rules:
        toks = [r.source, r.target, *(v for k, v in r.params
                                      if k in ("target", "default_target"))]
        for t in toks:
            name = t[len("@dispvm:"):] if t.startswith("@dispvm:") and \
                not t.startswith("@dispvm:@") else (t if not t.startswith("@") else None)
            if name is not None and name not in qubes:
                raise ConfigError(r.where, f"no app qube {name!r} in the config",
                                  "use one of " + ", ".join(sorted(qubes)) if qubes
                                  else "add an app qube, or drop the line")


# --- evaluation ------------------------------------------------------------------------

def _facts(qubes: Mapping[str, QubeFacts], name: str) -> QubeFacts | None:
    return qubes.get(name)


def _match_source(tok: str, source: str, qubes: Mapping[str, QubeFacts]) -> bool:
    f = _facts(qubes, source)
    if f is None:
        return False
    if tok == "@anyvm":
        return True
    if tok.startswith("@tag:"):
        return tok[5:] in f.tags
    if tok.startswith("@type:"):
        return tok[6:] == f.type
    if tok.startswith("@dispvm:"):
        return False  # a disposable's template is not recorded: such a line never matches
    return tok == source


def _match_target(tok: str, target: str, source: str, qubes: Mapping[str, QubeFacts]
                  ) -> bool:
    """Qubes' Target.match: `@anyvm` matches every intended target (@default and @dispvm
    too); `@dispvm:...` lines match a call for a new disposable."""
    if tok == "@anyvm":
        return True
    if target in ("@default", "@dispvm") or target.startswith("@dispvm:"):
        if tok == target:
            return True
        want = target[8:] if target.startswith("@dispvm:") else (
            (_facts(qubes, source) or QubeFacts()).default_dispvm
            if target == "@dispvm" else None)
        if want is None:
            return False
        if tok == f"@dispvm:{want}":
            return True
        if tok.startswith("@dispvm:@tag:"):
            f = _facts(qubes, want)
            return f is not None and tok[13:] in f.tags
        return False
    f = _facts(qubes, target)
    if f is None:
        return False
    if tok.startswith("@tag:"):
        return tok[5:] in f.tags
    if tok.startswith("@type:"):
        return tok[6:] == f.type
    return tok == target


def matches(r: Rule, service: str, argument: str, source: str, target: str,
            qubes: Mapping[str, QubeFacts]) -> bool:
    return ((r.service is None or r.service == service)
            and (r.argument is None or r.argument == argument)
            and _match_source(r.source, source, qubes)
            and _match_target(r.target, target, source, qubes))


def evaluate(policy: Policy, source: str, target: str, service: str, argument: str,
             qubes: Mapping[str, QubeFacts]) -> Verdict:
    """The verdict on `source` asking `target` (a qube, `@default`, `@dispvm`) for
    SERVICE+ARGUMENT: the first matching line decides; none: deny. A name that could not
    be called is denied before any line is read."""
    why = name_problem(service, argument)
    if why:
        return Verdict("deny", target, reason=why)
    if not (target in ("@default", "@dispvm") or QUBE_RE.match(target)
            or (target.startswith("@dispvm:") and QUBE_RE.match(target[8:]))):
        return Verdict("deny", target, reason="the target is not a qube, @default, @dispvm "
                       "or @dispvm:QUBE")
    if source not in qubes:
        return Verdict("deny", target, reason=f"{source!r} is not an app qube")
    for r in policy.rules:
        if not matches(r, service, argument, source, target, qubes):
            continue
        if r.action == "deny":
            return Verdict("deny", target, rule=r.where, reason=f"denied by {r.where}",
                           notify=r.param("notify") != "no")
        to = r.param("target") or target
        default = r.param("default_target")
        if to == "@default" and r.action == "ask" and default:
            to = default
        if to == "@default":
            return Verdict("deny", target, rule=r.where,
                           reason=f"{r.where}: {r.action} for @default names no target=")
        if not to.startswith("@") and to not in qubes:
            return Verdict("deny", to, rule=r.where, reason=f"no app qube {to!r}")
        if to == source:
            return Verdict("deny", to, rule=r.where, reason="a qube does not call itself")
        return Verdict(r.action, to, r.param("user"), r.where,
                       f"{r.action} by {r.where}", default,
                       notify=r.param("notify") == "yes",
                       autostart=r.param("autostart") != "no")
    return Verdict("deny", target, reason="no policy line matches (default deny)",
                   notify=True)


# --- what the policy lets through (for the audit of the user's invariants) --------------

def call_edges(policy: Policy, qubes: Mapping[str, QubeFacts]
               ) -> list[tuple[str, str, str, str]]:
    """(source, target, service, FILE:LINE) for every call some service could make under
    the policy: a line that allows (or asks: a click away) a source to reach a target,
    unless an earlier `deny` line takes every such call first (first match wins). A new
    disposable counts as the qube it is made like (@dispvm: the source's default one).
    An over-approximation where lines only partly overlap: an invariant proven over these
    holds for every call the policy can allow."""
    out: list[tuple[str, str, str, str]] = []
    names = sorted(qubes)
    for i, r in enumerate(policy.rules):
        if r.action not in ("allow", "ask"):
            continue
        for s in names:
            if not _match_source(r.source, s, qubes):
                continue
            for t in [*names, "@dispvm", *(f"@dispvm:{n}" for n in names)]:
                if t == s or not _match_target(r.target, t, s, qubes):
                    continue
                if any(_shadows(d, r, s, t, qubes) for d in policy.rules[:i]):
                    continue
                to = r.param("target") or (r.param("default_target")
                                           if r.action == "ask" else None) or t
                if to == "@dispvm":
                    to = (qubes[s].default_dispvm or "") if s in qubes else ""
                elif to.startswith("@dispvm:"):
                    to = to[8:]
                if to and to != s and not to.startswith("@"):
                    out.append((s, to, r.service or "*", r.where))
    return sorted(set(out))


def _shadows(d: Rule, r: Rule, source: str, target: str,
             qubes: Mapping[str, QubeFacts]) -> bool:
    """An earlier `deny` line `d` that takes every call line `r` would allow from source
    to target (its service and argument as wide or wider)."""
    return (d.action == "deny" and (d.service is None or d.service == r.service)
            and (d.argument is None or d.argument == r.argument)
            and _match_source(d.source, source, qubes)
            and _match_target(d.target, target, source, qubes))
