"""Typed validation of nested dicts (parsed YAML) into dataclasses.

Unknown keys are rejected with the valid names and a "did you mean"; every problem in the whole document is
collected before anything is raised, so a user fixes a recipe in one pass rather than one error at a time.

Numbers are checked in one way everywhere: a field declared with `ranged(default, gt=0)` (a `Range` in its
metadata) is checked by `build` against its range, every float must be finite, and the TRL pass-through arguments
(recipe/config.py) use the same `Range` and `check_number`. Checks that span several fields stay in the
dataclass's `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def did_you_mean(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_key_problem(path: str, key: str, valid: list[str], listing: str | None = None) -> str:
    where = f"{path}.{key}" if path else key
    listing = listing or f"valid keys: {', '.join(sorted(valid))}"
    return f"unknown key '{where}'{did_you_mean(key, valid)}; {listing}"


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


@dataclass(frozen=True)
class Range:
    """The values a number may take: every bound given holds; `also` lists values allowed besides (max_steps'
    -1); `why` is said in the message."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    also: tuple[float, ...] = ()
    why: str | None = None

    def contains(self, value: float) -> bool:
        return value in self.also or (
            (self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def describe(self) -> str:
        """'> 0', '>= 2', 'in [0, 1)', ..."""
        low, high = self.gt if self.gt is not None else self.ge, self.lt if self.lt is not None else self.le
        if low is not None and high is not None:
            return f"in {'(' if self.gt is not None else '['}{low}, {high}{')' if self.lt is not None else ']'}"
        if low is not None:
            return f"{'>' if self.gt is not None else '>='} {low}"
        return f"{'<' if self.lt is not None else '<='} {high}"


def ranged(default: Any, **bounds: Any) -> Any:
    """A dataclass field whose number `build` checks: `batch_size: int = ranged(8, gt=0)` (see `Range`)."""
    return dataclasses.field(default=default, metadata={"range": Range(**bounds)})


def check_number(path: str, value: Any, allowed: Range | None, problems: list[str]) -> None:
    """Append a problem when `value` (a number; anything else is the type check's business) is not finite or
    lies outside `allowed`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{path} must be a finite number, got {value}")
    elif allowed is not None and not allowed.contains(value):
        why = f" ({allowed.why})" if allowed.why else ""
        problems.append(f"{path} must be {allowed.describe()}{why}, got {value}")


def check_value(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; append problems; return the (possibly converted) value.

    Types we do not understand (TRL's more exotic argument types) are accepted as they are: the trainer's own
    constructor checks them later.
    """
    origin = get_origin(tp)
    if tp is Any or tp is typing.Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            # Optional[X]: report X's own problems (e.g. an unknown key inside a nested section).
            return check_value(value, non_none[0], path, problems)
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            converted = check_value(value, arg, path, trial)
            if not trial:
                return converted
        problems.append(f"'{path}' must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            problems.append(f"'{path}' must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"'{path}' must be a list, got {value!r}")
            return value
        args = get_args(tp)
        if args and origin is list:
            return [check_value(v, args[0], f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"'{path}' must be a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"'{path}' must be a mapping (a YAML section), got {value!r}")
            return value
        return build(tp, value, path, problems)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        valid = [m.value for m in tp]
        if value not in valid and not isinstance(value, tp):
            problems.append(f"'{path}' must be one of {', '.join(map(repr, valid))}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"'{path}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"'{path}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"'{path}' must be a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"'{path}' must be a string, got {value!r}")
        return value
    return value


def build(cls: type[T], data: dict[str, Any], path: str, problems: list[str]) -> T:
    """Build dataclass `cls` from `data`, appending every problem to `problems`.

    Returns an instance even when there were problems (fields that failed keep their defaults), so that the
    rest of the document is still checked.
    """
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            problems.append(unknown_key_problem(path, str(key), list(fields)))
            continue
        where = f"{path}.{key}" if path else key
        trial: list[str] = []
        kwargs[key] = check_value(value, hints[key], where, trial)
        if not trial:  # a value of the right type: now its range (every float: finite)
            check_number(where, kwargs[key], fields[key].metadata.get("range"), trial)
        problems += trial
    missing = [n for n, f in fields.items()
               if n not in kwargs and f.default is _MISSING and f.default_factory is _MISSING]
    for name in missing:
        problems.append(f"missing required key '{path}.{name}'" if path else f"missing required key '{name}'")
    if not missing:
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            # __post_init__ checks that span several fields.
            problems.append(f"{path or cls.__name__}: {e}")
    # A placeholder so the rest of the document is still checked; the problems list is what matters.
    obj = cls.__new__(cls)
    for name, f in fields.items():
        default = f.default_factory() if f.default_factory is not _MISSING else f.default
        object.__setattr__(obj, name, kwargs.get(name, None if default is _MISSING else default))
    return obj
