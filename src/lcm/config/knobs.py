"""The machinery of the run-config tree (docs/design.md §10): a *knob* is a dataclass field that carries its
default, its range or choices, its help text and whether a resumed run may change it. Everything else is derived
from the knobs: validation (one line naming the flag), the command line's flags (:mod:`lcm.cli.flags`), JSON in and
out, dotted overrides (``"method.num_solver_steps": 10``) and the comparison a resume makes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "Knob",
    "differences",
    "flag_of",
    "from_dict",
    "knob",
    "knobs",
    "leaves",
    "override",
    "to_dict",
    "validate",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Knob:
    help: str
    lo: float | None = None  # inclusive unless open_lo
    hi: float | None = None  # inclusive unless open_hi
    open_lo: bool = False
    open_hi: bool = False
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # the command-line flag (default: --field-name)
    may_change: bool = False  # a resumed run may change it: it steers how long and how often, not what is computed
    default_text: str | None = None  # how --help states a default that is derived (the field's default is None)
    repeat: bool = False  # a list given on the command line by repeating the flag (else: comma-separated)


def knob(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field that is a knob (see :class:`Knob` for the keywords)."""
    return field(default=default, metadata={"knob": Knob(help, **kw)})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def knobs(cls: type) -> Iterator[tuple[dataclasses.Field, Knob, Any]]:
    """``(field, knob, type)`` of every knob of the dataclass ``cls`` (fields without a knob are internal)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if "knob" in f.metadata:
            yield f, f.metadata["knob"], hints[f.name]


def sections(cls: type) -> Iterator[tuple[str, type]]:
    """``(name, class)`` of the nested config sections of ``cls``."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        kind = _unwrap(hints[f.name])[0]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            yield f.name, kind


def flag_of(f: dataclasses.Field) -> str:
    k = f.metadata["knob"]
    return k.flag or "--" + f.name.replace("_", "-")


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of an annotation such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else args), True
    return tp, False


def _kind(tp: Any) -> str:
    base, _ = _unwrap(tp)
    if base is bool:
        return "true or false"
    if base is int:
        return "an integer"
    if base is float:
        return "a number"
    if isinstance(base, type) and issubclass(base, Enum):
        return "one of " + ", ".join(json.dumps(m.value) for m in base)
    if typing.get_origin(base) is tuple:
        return "a list of strings"
    return "a string"


def _convert(tp: Any, value: Any, k: Knob) -> Any:
    """``value`` (from JSON or the command line) as the field's type; ``None`` when it is not of that kind."""
    base, optional = _unwrap(tp)
    if value is None:
        return None
    if base is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if base is int:
        return value if isinstance(value, int) else None
    if base is float:
        return float(value) if isinstance(value, int | float) else None
    if isinstance(base, type) and issubclass(base, Enum):
        try:
            return base(value.value if isinstance(value, Enum) else value)
        except ValueError:
            return None
    if typing.get_origin(base) is tuple:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        return None
    if base is Path:
        return Path(value) if isinstance(value, str | Path) else None
    if isinstance(value, str) and (k.choices is None or value in k.choices):
        return value
    return None


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e15) else f"{x:g}"


def _check_range(name: str, value: Any, k: Knob) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    low_ok = k.lo is None or (value > k.lo if k.open_lo else value >= k.lo)
    high_ok = k.hi is None or (value < k.hi if k.open_hi else value <= k.hi)
    if low_ok and high_ok:
        return
    shown = _num(value) if isinstance(value, int) else f"{value:g}"
    if k.lo is not None and k.hi is not None and not (k.open_lo or k.open_hi):
        raise ValueError(f"{name} must be between {_num(k.lo)} and {_num(k.hi)}, got {shown}")
    parts = []
    if k.lo is not None:
        parts.append(f"{'>' if k.open_lo else '>='} {_num(k.lo)}")
    if k.hi is not None:
        parts.append(f"{'<' if k.open_hi else '<='} {_num(k.hi)}")
    raise ValueError(f"{name} must be {' and '.join(parts)}, got {shown}")


def validate(obj: Any) -> None:
    """Check every knob of the section ``obj`` against its type, choices and range; raise a one-line ``ValueError``
    naming the flag. Called by each section's ``__post_init__`` (values are converted in place: an int for a
    float, a list for a tuple, a string for an enum)."""
    for f, k, tp in knobs(type(obj)):
        value = getattr(obj, f.name)
        converted = _convert(tp, value, k)
        if converted is None and value is not None:
            raise ValueError(f"{flag_of(f)} must be {_describe(tp, k)}, got {_show(value)}")
        if converted is None and not _unwrap(tp)[1]:
            raise ValueError(f"{flag_of(f)} must be {_describe(tp, k)}, got null")
        if converted is not value:
            object.__setattr__(obj, f.name, converted)
        _check_range(flag_of(f), converted, k)


def _describe(tp: Any, k: Knob) -> str:
    if k.choices is not None:
        return "one of " + ", ".join(k.choices)
    return _kind(tp)


def _show(value: Any) -> str:
    if isinstance(value, Enum):
        value = value.value
    try:
        return json.dumps(value)[:80]
    except TypeError:
        return repr(value)[:80]


def to_dict(obj: Any) -> Any:
    """JSON-ready form of a config tree: sections as dicts, enums as values, paths and tuples as strings and lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """The section ``cls`` from a dict (as :func:`to_dict` wrote it); an unknown key or a bad value is a one-line
    ``ValueError`` naming ``where`` (the file it came from)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {_show(data)}")
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(data) - names):
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    nested, hints = dict(sections(cls)), _hints(cls)
    values = {}
    for k, v in data.items():
        if k in nested:
            v = from_dict(nested[k], v, f"{where} {k}")
        elif isinstance(v, list) and typing.get_origin(_unwrap(hints[k])[0]) is tuple:
            v = tuple(v)  # JSON has no tuples: internal fields come back as they were written
        elif isinstance(v, str) and _unwrap(hints[k])[0] is Path:
            v = Path(v)
        values[k] = v
    try:
        return cls(**values)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """``(dotted path, field, value)`` of every knob in the tree ``obj``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from leaves(value, path + ".")
        elif "knob" in f.metadata:
            yield path, f, value


def override(obj: T, changes: Mapping[str, Any]) -> T:
    """A copy of the tree ``obj`` with dotted ``changes`` (``{"method.num_solver_steps": 10}``) applied; every
    section is validated again."""
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for path, value in changes.items():
        head, _, rest = path.partition(".")
        if not hasattr(obj, head):
            raise ValueError(f"unknown setting {path!r}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = override(getattr(obj, head), sub)
    return dataclasses.replace(obj, **direct)


def differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """``"path: saved → current"`` for every knob in which two trees (or their :func:`to_dict` forms) differ,
    knobs a resume may change left out."""
    a = saved if isinstance(saved, dict) else to_dict(saved)
    b = current if isinstance(current, dict) else to_dict(current)
    cls = None if isinstance(current, dict) else type(current)
    may_change = {f.name for f, k, _ in knobs(cls) if k.may_change} if cls is not None else set()
    out = []
    for key in sorted(set(a) | set(b)):
        if key in may_change:
            continue
        path = prefix + key
        inner = getattr(current, key, None) if cls is not None else None
        if dataclasses.is_dataclass(inner) and isinstance(a.get(key), dict):
            out += differences(a[key], inner, path + ".")
        elif a.get(key) != b.get(key):
            out.append(f"{path}: {_show(a.get(key))} → {_show(b.get(key))}")
    return out
