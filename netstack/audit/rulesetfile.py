"""A ruleset from a file, for `audit --ruleset`: `nft -j list ruleset` JSON as it is, or an
nft script (what people publish and keep in /etc/nftables.conf) loaded into a scratch
network namespace and listed back as JSON, so the audit reads exactly what the kernel
would run. Interfaces the script names with `iif`/`oif` (which must exist to load) are
made (veth pairs) in the scratch namespace. Nothing outside that namespace is touched, and
it is removed whatever happens."""

from __future__ import annotations

import json
import os
import re
import secrets
from typing import Any

from netstack.errors import UsageError
from netstack.kernel import Kernel


def read(path: str, k: Kernel) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--ruleset {path}: cannot read it ({e})") from None
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)  # nft's format (the user's --ruleset), not ours
        except ValueError as e:
            raise UsageError(f"--ruleset {path}: not valid JSON ({e}); give `nft -j list "
                             "ruleset` output or an nft script") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("nftables"), list):
            raise UsageError(f"--ruleset {path}: no \"nftables\" list at the top; give "
                             "`nft -j list ruleset` output")
        return doc
    if os.geteuid() != 0:
        raise UsageError(f"--ruleset {path}: an nft script is read by loading it into a "
                         "scratch namespace, which needs root; run with sudo, or give "
                         "`nft -j list ruleset` JSON")
    return load_script(text, k, path)


_IFACE = re.compile(r'\b(?:iif|oif|device|devices\s*=|fwd to|dup to)\s+(?:!=\s*)?'
                    r'("[^"]{1,15}"|[A-Za-z0-9_.@-]{1,15}|\{[^}]*\})')


def load_script(text: str, k: Kernel, path: str = "-") -> dict[str, Any]:
    ns = f"nsr{secrets.token_hex(3)}"
    k.netns_create(ns)
    try:
        for i, name in enumerate(sorted(interfaces(text) - {"lo"})):
            k.veth(ns, name, ns, f"nsrpeer{i}")  # a dummy module is not everywhere
        err = k.nft_script(ns, text)
        if err:
            lines = err.splitlines()
            raise UsageError(f"--ruleset {path}: nft cannot load it: "
                             f"{lines[0].split('Error:', 1)[-1].strip()}")
        from netstack.pathfacts import list_ruleset

        return list_ruleset(k, ns)  # device chains with their devices (JSON omits them)
    finally:
        k.netns_delete(ns)


def interfaces(text: str) -> set[str]:
    """Names the script matches by index (`iif`/`oif`, also in anonymous sets) or binds
    to (a device chain's `device`/`devices`, `fwd to`, `dup to`), which must exist for it
    to load. ($variables are left to nft.)"""
    out: set[str] = set()
    for m in _IFACE.finditer(text):
        for w in re.split(r"[\s,{}]+", m.group(1)):
            w = w.strip('"')
            if w and not w.startswith("$") and w not in ("vmap", "map") and \
                    re.fullmatch(r"[A-Za-z0-9_.@-]{1,15}", w):
                out.add(w)
    return out
