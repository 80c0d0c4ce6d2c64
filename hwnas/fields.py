"""Type checks for the dataclasses a user fills from YAML (config sections, splits, spaces).

YAML hands over whatever the user wrote: ``lr: 1e-3`` arrives as the *string* "1e-3" (YAML
1.1 wants a dot: ``1.0e-3``), ``epochs: ten`` as a string, ``mean: 0.5`` as a float where a
list belongs. Without a check these surface later as a ``TypeError`` deep in training. Here
each value is checked against its field's annotation before the dataclass is built, and a
wrong one is a :class:`HwnasError` that names the key, what it must be and what was given.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

from hwnas.errors import HwnasError

# what YAML 1.1 (PyYAML) leaves as text but every reader means as a number: 1e-3, 5E+2
_EXP_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class _Mismatch(Exception):
    pass


class _NotFinite(_Mismatch):
    """A number field given NaN or an infinity (YAML ``.nan``, ``.inf``, ``1e400``)."""


def _describe(tp) -> str:
    if tp is Any:
        return "anything"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list ({_describe(args[0])} each)" if args else "a list"
    if origin in (list, dict):
        tp = origin
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text",
            dict: "a mapping (key: value)", list: "a list", type(None): "null"}.get(tp, str(tp))


def _check(value, tp):
    """``value`` as the field type ``tp``, or raise. Only what was unusable changes: YAML's
    exponent text (``1e-3``) becomes a float, a whole float (``10.0``) an int where an int
    belongs, a list a tuple where a tuple belongs."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        finite = False
        for a in args:
            try:
                return _check(value, a)
            except _NotFinite:
                finite = True
            except _Mismatch:
                pass
        raise _NotFinite if finite else _Mismatch
    if tp in (type(None), bool, str):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an integer beyond any float (a 400-digit number)
                finite = False
            if not finite:  # .nan, .inf, or text like 1e400
                raise _NotFinite
            return value  # an int stays one: a run's step keys hash the config as written
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if args and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0]) for v in value)
        return tuple(value)
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise _Mismatch
    if tp is dict or origin is dict:
        # null: a YAML section whose keys are all commented out — its defaults, as before
        if value is None or isinstance(value, dict):
            return value
        raise _Mismatch
    return value  # a type this checker does not know: the dataclass's own checks decide


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def checked_fields(cls, d: dict, where: str, error: type[HwnasError] = HwnasError) -> dict:
    """``d`` with every value checked against ``cls``'s field annotations (see ``_check``).

    Unknown keys are errors too: a typo never silently falls back to a default."""
    if not isinstance(d, dict):
        raise error(f"config {'section ' + repr(where) if where else 'file'} must be a mapping (key: value), "
                         f"got {type(d).__name__} {d!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - fields)
    if bad:
        raise error(f"config{' ' + where if where else ''}: unknown keys {bad}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in d.items():
        tp = hints.get(k, Any)
        try:
            out[k] = _check(v, tp)
        except _NotFinite:
            raise error(f"config {where + '.' if where else ''}{k} must be a finite number, got {v!r}") from None
        except _Mismatch:
            hint = ""
            if isinstance(v, str) and _is_number(v) and "number" in _describe(tp).split(" (")[0]:
                n = float(v)
                hint = (f" (write {int(n)}: a whole number, without quotes)"
                        if "whole number" in _describe(tp) and n.is_integer() else
                        " (write the number without quotes)")
            elif isinstance(v, (int, float)) and typing.get_origin(tp) is tuple:
                hint = f" (e.g. [{v}])"
            raise error(f"config {where + '.' if where else ''}{k} must be {_describe(tp)}, got "
                             f"{type(v).__name__} {v!r}{hint}") from None
    return out
