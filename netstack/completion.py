"""Shell completion (argcomplete) and manual pages, both from the one parser (cli.parser).

Completion of qube and stack names reads only what any user may read, since a shell
completes as the user before `sudo` runs: the namespace names under /run/netns
(`nst-STACK-QUBE`, netstack.names), never the root-only state. `netstack completion
bash|zsh` prints the shell's hook; man pages (`netstack completion man DIR`) are made from
the same parser, one page per command (`man netstack-firewall`), so they never disagree
with `--help`.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

NETNS_DIR = "/run/netns"
QUBE_DESTS = ("qube", "netvm", "like", "dest")  # arguments that take a qube's name


def running(netns_dir: str = NETNS_DIR) -> list[tuple[str, str]]:
    """(stack, qube) of every qube namespace on the host (`nst-STACK-QUBE`)."""
    try:
        names = os.listdir(netns_dir)
    except OSError:
        return []
    out = []
    for n in names:
        m = re.fullmatch(r"nst-([a-z0-9]{1,8})-([a-z0-9-]+)", n)
        if m:
            out.append((m.group(1), m.group(2)))
    return sorted(out)


def qube_completer(netns_dir: str = NETNS_DIR) -> Callable[..., list[str]]:
    def complete(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
        stack = getattr(parsed_args, "stack", None) or "main"
        return [q for s, q in running(netns_dir) if s == stack and q.startswith(prefix)]
    return complete


def stack_completer(netns_dir: str = NETNS_DIR) -> Callable[..., list[str]]:
    def complete(prefix: str, **_: Any) -> list[str]:
        return sorted({s for s, _q in running(netns_dir) if s.startswith(prefix)})
    return complete


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def attach_completers(p: argparse.ArgumentParser, netns_dir: str = NETNS_DIR) -> None:
    """Qube and stack names for the arguments that take them, on every subcommand."""
    for a in p._actions:
        if a.dest == "stack":
            a.completer = stack_completer(netns_dir)  # type: ignore[attr-defined]
    for sp in _subparsers(p).values():
        for a in sp._actions:
            if a.dest in QUBE_DESTS:
                a.completer = qube_completer(netns_dir)  # type: ignore[attr-defined]
        for inner in _subparsers(sp).values():
            attach_completers(inner, netns_dir)


def complete(p: argparse.ArgumentParser, **kw: Any) -> None:
    """Answer the shell's completion request (argcomplete; exits unless told otherwise)."""
    import argcomplete

    attach_completers(p, kw.pop("netns_dir", NETNS_DIR))
    # options after a "-" only: an empty word completes to what the command needs next
    argcomplete.autocomplete(p, always_complete_options=False, **kw)


def shell_hook(shell: str) -> str:
    import argcomplete

    return argcomplete.shellcode(["netstack"], shell=shell)


# --- manual pages ----------------------------------------------------------------------

def _roff(text: str) -> str:
    """Plain text for roff: backslashes doubled, a leading dot or quote made literal."""
    text = text.replace("\\", "\\e")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def _options(p: argparse.ArgumentParser) -> Iterable[str]:
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if a.option_strings:
            flags = ", ".join(f"\\fB{_roff(o)}\\fR" for o in a.option_strings)
            if a.nargs != 0:
                flags += f" \\fI{_roff(a.metavar or a.dest.upper())}\\fR"
        else:
            flags = f"\\fI{_roff(str(a.metavar or a.dest).upper())}\\fR"
        text = a.help or ""
        if a.choices and not a.option_strings:
            text = (text + " " if text else "") + f"One of: {', '.join(map(str, a.choices))}."
        yield f".TP\n{flags}\n{_roff(text)}"


def man_pages(p: argparse.ArgumentParser, version: str, date: str) -> dict[str, str]:
    """netstack.1 and netstack-COMMAND.1, in roff, from the parser (pure)."""
    pages: dict[str, str] = {}
    subs = _subparsers(p)
    helps = {}
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help or "" for c in a._choices_actions}
    head = f'.TH {{}} 1 "{date}" "netstack {version}" "netstack manual"\n'
    body = [head.format("NETSTACK"), ".SH NAME", "netstack \\- " + _roff(p.description or ""),
            ".SH SYNOPSIS", "\\fBnetstack\\fR [\\fB\\-\\-stack\\fR \\fISTACK\\fR] "
            "\\fICOMMAND\\fR ...", ".SH OPTIONS", *_options(p), ".SH COMMANDS"]
    for name in subs:
        body += [".TP", f"\\fB{name}\\fR", f"{_roff(helps.get(name, ''))} "
                 f"(\\fBnetstack\\-{name}\\fR(1))"]
    if p.epilog:
        body += [".SH EXAMPLES", ".nf", _roff(p.epilog), ".fi"]
    body += [".SH SEE ALSO", ", ".join(f"\\fBnetstack\\-{n}\\fR(1)" for n in subs)]
    pages["netstack.1"] = "\n".join(body) + "\n"
    for name, sp in subs.items():
        b = [head.format(f"NETSTACK\\-{name.upper()}"), ".SH NAME",
             f"netstack\\-{name} \\- {_roff(helps.get(name, ''))}", ".SH SYNOPSIS",
             _roff(sp.format_usage().replace("usage: ", "").strip()),
             ".SH OPTIONS", *_options(sp)]
        inner = _subparsers(sp)
        if inner:
            b += [".SH COMMANDS", *(f".TP\n\\fB{n}\\fR\n{_roff(ip.description or '')}"
                                    for n, ip in inner.items())]
        if sp.epilog:
            b += [".SH EXAMPLES", ".nf", _roff(sp.epilog), ".fi"]
        b += [".SH SEE ALSO", "\\fBnetstack\\fR(1)"]
        pages[f"netstack-{name}.1"] = "\n".join(b) + "\n"
    return pages
