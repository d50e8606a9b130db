"""The one registry of strategies: which exist, their parameters, and their pipeline order.

Config validation, the CLI, the anchors, the grid and the benchmarks all read this list, so a
new technique is its own module plus one `register_strategy`. A strategy's place in the
pipeline is its `phase` (strategies.base.PHASES); strategies of one phase keep the order in
which they were registered.
"""

from __future__ import annotations

from typing import Any, Mapping

from strategies.base import PHASES, Strategy
from strategies.distillation import Distillation
from strategies.quantization import Quantization
from strategies.space import Param, parse_param
from strategies.structured import StructuredPruning
from strategies.transformer import EncoderPruning
from strategies.unstructured import UnstructuredPruning

_REGISTERED: list[type[Strategy]] = []


def _owner(key: str) -> type[Strategy] | None:
    return next((cls for cls in _REGISTERED if key in cls.default_space), None)


def _check(cls: type[Strategy]) -> None:
    if getattr(cls, "phase", None) not in PHASES:
        raise ValueError(f"{cls.__name__}.phase must be one of {list(PHASES)}, got {getattr(cls, 'phase', None)!r}")
    taken = next((other for other in _REGISTERED if other.name == cls.name), None)
    if taken is not None:
        raise ValueError(f"strategy name {cls.name!r} of {cls.__name__} is already registered by {taken.__name__}")
    for key in cls.default_space:
        prefix, dot, rest = key.partition(".")
        if not (prefix and dot and rest) or "." in rest:
            raise ValueError(f"{cls.__name__}'s search_space key {key!r} must be namespaced as 'prefix.name'")
        if (owner := _owner(key)) is not None:
            raise ValueError(f"{cls.__name__}'s search_space key {key!r} is already registered by {owner.__name__}")
    unknown = sorted(set(cls.unlisted_space) - set(cls.default_space))
    if unknown:
        raise ValueError(f"{cls.__name__}.unlisted_space names {unknown[0]!r}, which is not in its default_space")


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Add a strategy to the pipeline at its phase (usable as a class decorator)."""
    _check(cls)
    _REGISTERED.append(cls)
    return cls


def unregister_strategy(cls: type[Strategy]) -> None:
    """Remove a registered strategy (for tests)."""
    _REGISTERED.remove(cls)


def pipeline() -> tuple[type[Strategy], ...]:
    """The registered strategies in the order they apply: by phase, then as registered."""
    return tuple(sorted(_REGISTERED, key=lambda cls: PHASES.index(cls.phase)))


def all_space_keys() -> list[str]:
    return sorted(key for cls in pipeline() for key in cls.default_space)


def parse_space(raw: Mapping[str, Any]) -> dict[str, Param]:
    """Validate a YAML `search_space` mapping; returns its keys as parsed params.

    Each value may narrow its parameter's default range, never leave it (`parse_param`).
    """
    valid = all_space_keys()
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ValueError(f"unknown search_space key {unknown[0]!r}; valid keys are {valid}")
    if not raw:
        raise ValueError(f"search_space is empty; name at least one of {valid}")
    return {
        key: parse_param(key, raw[key], default)
        for cls in pipeline()
        for key, default in cls.default_space.items()
        if key in raw
    }


def build_strategies(space: Mapping[str, Param]) -> list[Strategy]:
    """The strategies `space` (parsed by `parse_space`) turns on, in pipeline order.

    A strategy is on when any of its parameters appear in `space`.
    """
    unknown = sorted(set(space) - set(all_space_keys()))
    if unknown:
        raise ValueError(f"unknown search_space key {unknown[0]!r}; valid keys are {all_space_keys()}")
    return [
        cls({key: param for key, param in space.items() if key in cls.default_space})
        for cls in pipeline()
        if any(key in space for key in cls.default_space)
    ]


for _cls in (StructuredPruning, EncoderPruning, UnstructuredPruning, Distillation, Quantization):
    register_strategy(_cls)
