"""A strategy's search space: its parameters, how YAML narrows them, and its anchors.

Each parameter kind knows how to ask a trial for a value (`suggest`), whether a value lies
inside it (`admits`), how to write itself back as the plain YAML values it was parsed from
(`to_yaml`), and which value turns its technique or option off (`off`). That is what the
search layer needs to derive anchors, grids and single-technique studies from the
strategies alone, without a list of its own.

No Optuna here: `suggest` receives anything with Optuna's `suggest_*` methods.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

# ------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class FloatParam:
    """A float searched in [low, high]. YAML: `[low, high]`, or a number to fix it."""

    low: float
    high: float
    log: bool = False
    # The value that turns the technique off (None: the parameter has none).
    off: Any = None

    # A fixed value is still suggested, so every trial records every parameter it used.
    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def values(self) -> tuple[float, float]:
        return (self.low, self.high)

    def admits(self, value: Any) -> bool:
        return _is_number(value) and self.low <= value <= self.high

    def to_yaml(self) -> float | list[float]:
        return self.low if self.low == self.high else [self.low, self.high]


@dataclass(frozen=True)
class IntParam:
    """An int searched in [low, high]. YAML: `[low, high]`, or a number to fix it."""

    low: int
    high: int
    off: Any = None

    def suggest(self, trial: Any, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high)

    def values(self) -> tuple[int, int]:
        return (self.low, self.high)

    def admits(self, value: Any) -> bool:
        return _is_number(value) and self.low <= value <= self.high

    def to_yaml(self) -> int | list[int]:
        return self.low if self.low == self.high else [self.low, self.high]


@dataclass(frozen=True)
class ChoiceParam:
    """One of a set of ordered numbers (kept as numbers, not category indexes). YAML: a list."""

    choices: tuple
    off: Any = None

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))

    def values(self) -> tuple:
        return self.choices

    def admits(self, value: Any) -> bool:
        # True == 1 in Python: a switch and a width must not stand in for each other.
        return value in self.choices and isinstance(value, bool) == isinstance(self.choices[0], bool)

    def to_yaml(self) -> list:
        return list(self.choices)


Param = FloatParam | IntParam | ChoiceParam


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_param(key: str, raw: Any, default: Param) -> Param:
    """Turn a YAML value into a param of the same kind as `default`, validating eagerly.

    `default` also fixes the allowed range: a user may narrow it, never leave it. The
    narrowed param keeps the default's `off` value, even where the range no longer holds it.
    """
    if isinstance(default, ChoiceParam):
        values = tuple(raw) if isinstance(raw, (list, tuple)) else (raw,)
        if not values:
            raise ValueError(f"{key} must list at least one of {list(default.choices)}, got []")
        bad = [v for v in values if not default.admits(v)]
        if bad:
            raise ValueError(f"{key} must be chosen from {list(default.choices)}, got {bad[0]!r}")
        return dataclasses.replace(default, choices=tuple(sorted(set(values), key=list(default.choices).index)))

    values = list(raw) if isinstance(raw, (list, tuple)) else [raw, raw]
    if len(values) != 2 or not all(_is_number(v) for v in values):
        raise ValueError(f"{key} must be a number or a [low, high] pair within {list(default.values())}, got {raw!r}")
    low, high = values
    if isinstance(default, IntParam) and not all(float(v).is_integer() for v in values):
        raise ValueError(f"{key} must be whole numbers within {list(default.values())}, got {raw!r}")
    if low > high:
        raise ValueError(f"{key} needs low <= high, got {raw!r}")
    lo, hi = default.values()
    if low < lo or high > hi:
        raise ValueError(f"{key} must lie within [{lo}, {hi}], got {raw!r}")
    if isinstance(default, IntParam):
        return dataclasses.replace(default, low=int(low), high=int(high))
    return dataclasses.replace(default, low=float(low), high=float(high), log=default.log and low > 0)


# --------------------------------------------------------------------------- anchors


class _Top:
    def __repr__(self) -> str:
        return "TOP"


# An anchor value meaning "the top of the configured range" (e.g. the most epochs allowed).
TOP: Any = _Top()


@dataclass(frozen=True)
class Anchor:
    """A setting of one technique alone worth trying first in every new study.

    `params` are the namespaced parameters that define it (TOP: the top of the configured
    range); the search layer sets every other parameter to its `off` value. `rank` orders
    anchors across strategies, lower first.
    """

    name: str
    params: Mapping[str, Any]
    rank: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
