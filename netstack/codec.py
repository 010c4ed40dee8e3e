"""Typed JSON for our dataclasses, in one place: `dump` turns a dataclass tree into JSON
values, `load(cls, data)` reads it back into the same dataclasses (nested dataclasses,
lists, tuples, dicts, frozensets, optionals and tagged unions), so no reader of the state
file ever indexes dict keys.

`read(path, cls)` and `write(path, obj)` are the one way a typed file of ours (state, plan,
intent log rewrite, supervisor status and pid file, rule names, VPN server state, DHCP
lease, live transaction intent) reaches the disk and comes back: written atomically (the
reader sees the old file or the new one), read into the same dataclass, and a file that
does not fit is one line naming it (errors.DamagedFile, or OtherSchema for a dataclass
with a `schema` field whose number differs).

A field whose JSON key is not a Python name (`from`) says so: field(metadata={"json": ...}).

A tagged union is a base class with a `registry` of subclasses keyed by a class attribute
`tag`: dumped objects carry {"@type": tag}, and `load(Base, ...)` picks the subclass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import types
import typing
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

from netstack.errors import DamagedFile, OtherSchema, StateError

T = TypeVar("T")
TAG = "@type"  # never a field name
MODULE = "@module"  # where a member of a union with `by_module` is defined
_HINTS: dict[type, dict[str, Any]] = {}



def atomic_write(path: str, data: str | bytes, mode: int = 0o600, sync: bool = False) -> None:
    """Write a file whole or not at all (a reader sees the old or the new one), with its
    mode from the start; never through a symlink. The temporary file is in the same
    directory (a rename never crosses a filesystem), named per process and thread (the
    supervisor's watchers write at once), and removed when the write fails. `sync`: the
    data reaches the disk before the rename (nothing of ours lives outside tmpfs /run yet,
    so no caller asks for it today)."""
    import threading

    raw = data if isinstance(data, bytes) else data.encode()
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_native_id()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Tagged:
    """Base of a tagged union. A union's base declares its own `registry = {}`; each
    subclass that sets `tag` is registered there."""

    tag: ClassVar[str] = ""
    registry: ClassVar[dict[str, type]] = {}
    # members are defined in modules the base's module must not import (a kind's info,
    # defined beside the kind, above the model): each dumped object names its module and
    # `load` imports it, only from this package (the files are root's own)
    by_module: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__dict__.get("tag"):
            cls.registry[cls.tag] = cls

    @classmethod
    def load_registry(cls) -> None:
        """Import the modules that define the union's members (when they live elsewhere)."""


def dump(obj: Any) -> Any:
    """JSON-ready values; dataclass fields in declaration order."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {_key(f): dump(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Tagged) and obj.tag:
            out = {TAG: obj.tag, **({MODULE: type(obj).__module__} if obj.by_module else {}),
                   **out}
        return out
    if isinstance(obj, (list, tuple)):
        return [dump(x) for x in obj]
    if isinstance(obj, frozenset | set):
        return sorted(dump(x) for x in obj)
    if isinstance(obj, dict):
        return {k: dump(v) for k, v in obj.items()}
    return obj


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("json", f.name)


def _hints(cls: type) -> dict[str, Any]:
    h = _HINTS.get(cls)
    if h is None:
        # a class whose field types live in a module its own imports lazily names them
        names = getattr(cls, "codec_names", None)
        h = _HINTS[cls] = get_type_hints(cls, localns=names() if names else None)
    return h


def load(tp: Any, data: Any, where: str = "state") -> Any:
    """Read `data` as type `tp`; a shape that does not fit is a StateError naming where."""
    try:
        return _load(tp, data, where)
    except (TypeError, KeyError, ValueError) as e:
        raise StateError(f"{where}: unreadable ({e}); it was written by another version: "
                         "run `netstack down`") from None


def _load(tp: Any, data: Any, where: str) -> Any:
    if tp is Any:
        return data
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if data is None:
            return None
        if len(args) == 1:
            return _load(args[0], data, where)
        for a in args:  # e.g. str | dict: the first that fits the JSON type
            if _fits(a, data):
                return _load(a, data, where)
        raise TypeError(f"{where}: {type(data).__name__} fits none of {args}")
    if origin in (list, typing.List):  # noqa: UP006
        (a,) = get_args(tp) or (Any,)
        return [_load(a, x, where) for x in data]
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_load(args[0], x, where) for x in data)
        return tuple(_load(a, x, where) for a, x in zip(args, data, strict=True))
    if origin in (frozenset, set):
        (a,) = get_args(tp) or (Any,)
        return origin(_load(a, x, where) for x in data)
    if origin is dict:
        k, v = get_args(tp) or (Any, Any)
        return {_load(k, key, where): _load(v, val, where) for key, val in data.items()}
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or issubclass(tp, Tagged)):
        if not isinstance(data, dict):
            raise TypeError(f"{where}: {tp.__name__} expected an object")
        cls = tp
        if issubclass(tp, Tagged) and TAG in data:
            if data[TAG] not in tp.registry:
                mod = data.get(MODULE)
                if tp.by_module and isinstance(mod, str) and mod.startswith("netstack."):
                    importlib.import_module(mod)
                else:
                    tp.load_registry()
            cls = tp.registry.get(data[TAG])
            if cls is None or not issubclass(cls, tp):
                raise TypeError(f"{where}: unknown {tp.__name__} type {data[TAG]!r}")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{where}: {tp.__name__} needs a type tag")
        hints = _hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            key = _key(f)
            if key in data:
                kw[f.name] = _load(hints[f.name], data[key], f"{where}.{key}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KeyError(f"{where}.{key} missing")
        return cls(**kw)
    if tp is float and isinstance(data, int):
        return float(data)
    if isinstance(tp, type) and not isinstance(data, tp):
        raise TypeError(f"{where}: expected {tp.__name__}, got {type(data).__name__}")
    return data


def _fits(tp: Any, data: Any) -> bool:
    origin = get_origin(tp) or tp
    if origin in (list, tuple, frozenset, set):
        return isinstance(data, list)
    if origin is dict or (isinstance(tp, type) and (dataclasses.is_dataclass(tp)
                                                     or issubclass(tp, Tagged))):
        return isinstance(data, dict)
    return isinstance(tp, type) and isinstance(data, tp)


# --- typed files ----------------------------------------------------------------------

def encode(obj: Any) -> str:
    """The text `write` puts in a file (for files written through the Kernel seam)."""
    return json.dumps(dump(obj))


def _schema(cls: Any) -> int | None:
    """The schema number a dataclass declares with a `schema: int = N` field."""
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.name == "schema" and isinstance(f.default, int):
                return f.default
    return None


def decode(cls: type[T] | Any, text: str | bytes, path: str) -> T:
    """`text` (the content of `path`) as `cls`; DamagedFile / OtherSchema naming `path`."""
    try:
        raw = json.loads(text)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DamagedFile(path, f"not JSON: {e}") from None
    want = _schema(cls)
    if want is not None:
        found = raw.get("schema") if isinstance(raw, dict) else None
        if not isinstance(found, int) or isinstance(found, bool):  # no number says so
            raise DamagedFile(path, f"not what this version writes: no schema number in "
                              f"{_shape(raw)}")
        if found != want:
            raise OtherSchema(path, found, want)
    try:
        return _load(cls, raw, os.path.basename(path))
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise DamagedFile(path, f"not what this version writes: {_one_line(e)}") from None


def _shape(raw: Any) -> str:
    """What a JSON value is, in a few words (a message never quotes the file)."""
    if isinstance(raw, dict):
        return "an object with keys " + ", ".join(sorted(str(k) for k in raw)[:5]) \
            if raw else "an empty object"
    return f"a JSON {type(raw).__name__}"


def _one_line(e: BaseException) -> str:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
    text = text.replace("\n", " ")
    return text[:200] + ("..." if len(text) > 200 else "")


def read(path: str, cls: type[T] | Any) -> T:
    """The file at `path` read back as `cls` (a dataclass, or a container of them).
    OSError as open raises it (FileNotFoundError: not written yet); DamagedFile when the
    content does not fit (OtherSchema: another version's)."""
    with open(path, "rb") as f:
        text = f.read()
    return decode(cls, text, path)


def write(path: str, obj: Any, mode: int = 0o600, *, sync: bool = False) -> None:
    """`obj` to `path` atomically: a temporary file in the same directory, made with
    `mode`, then renamed over `path` (a crash leaves the old file or the new one, never a
    part). `sync`: fsync before the rename."""

    atomic_write(path, encode(obj), mode, sync=sync)
