"""The strategy contract: a config, its search space, and how it changes a model.

A strategy never imports Optuna. `suggest` receives anything with Optuna's
`suggest_*` methods, which keeps this package usable without the search layer.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn


class CompressionError(Exception):
    """A strategy cannot apply to this model. The trial fails with this message as reason."""


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d/Linear layer: what the strategies prune, quantize and scan, by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class StrategyConfig:
    """Frozen config of plain values. Subclasses validate in `validate()`."""

    schema_version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden where there is something to check
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StrategyConfig":
        data = dict(data)
        version = data.pop("schema_version", cls.schema_version)
        if version != cls.schema_version:
            raise ValueError(f"{cls.__name__} schema_version must be {cls.schema_version}, got {version!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys for {cls.__name__}: {unknown}; valid keys are {sorted(known)}")
        return cls(**data)


# ---------------------------------------------------------------------- search space


@dataclass(frozen=True)
class FloatParam:
    """A float searched in [low, high]. YAML: `[low, high]`, or a number to fix it."""

    low: float
    high: float
    log: bool = False

    # A fixed value is still suggested, so every trial records every parameter it used.
    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def values(self) -> tuple[float, float]:
        return (self.low, self.high)


@dataclass(frozen=True)
class IntParam:
    """An int searched in [low, high]. YAML: `[low, high]`, or a number to fix it."""

    low: int
    high: int

    def suggest(self, trial: Any, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high)

    def values(self) -> tuple[int, int]:
        return (self.low, self.high)


@dataclass(frozen=True)
class ChoiceParam:
    """One of a set of ordered numbers (kept as numbers, not category indexes). YAML: a list."""

    choices: tuple

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))

    def values(self) -> tuple:
        return self.choices


Param = FloatParam | IntParam | ChoiceParam


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_param(key: str, raw: Any, default: Param) -> Param:
    """Turn a YAML value into a param of the same kind as `default`, validating eagerly.

    `default` also fixes the allowed range: a user may narrow it, never leave it.
    """
    if isinstance(default, ChoiceParam):
        values = tuple(raw) if isinstance(raw, (list, tuple)) else (raw,)
        if not values:
            raise ValueError(f"{key} must list at least one of {list(default.choices)}, got []")
        bad = [
            v for v in values if v not in default.choices or isinstance(v, bool) != isinstance(default.choices[0], bool)
        ]
        if bad:
            raise ValueError(f"{key} must be chosen from {list(default.choices)}, got {bad[0]!r}")
        return ChoiceParam(tuple(sorted(set(values), key=list(default.choices).index)))

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
        return IntParam(int(low), int(high))
    return FloatParam(float(low), float(high), log=default.log and low > 0)


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """Heavy runtime things a strategy may need. Built once per study by the search layer.

    `finetune_x/finetune_y` is the data distillation trains on; `teacher_logits[i]` is the
    uncompressed teacher's output for `finetune_x[i]`, computed once per study.
    """

    example_inputs: torch.Tensor
    finetune_x: torch.Tensor
    finetune_y: torch.Tensor
    calibration_x: torch.Tensor
    teacher: nn.Module | None = None
    teacher_logits: torch.Tensor | None = None
    seed: int = 0
    batch_size: int = 128
    # report(message) logs progress of long steps, e.g. each fine-tune epoch.
    report: Callable[[str], None] = field(default=lambda message: None)
    # Called as after_epoch(model, epoch) after each fine-tune epoch, with the model in eval
    # mode; it may raise to stop the trial (the search's cheap-then-full evaluation).
    after_epoch: Callable[[nn.Module, int], None] = field(default=lambda model, epoch: None)
    # Set by the pipeline when the trial quantizes: fine-tuning runs inside
    # `with context.fake_quant(model):` so it trains against the quantized weights
    # (straight-through gradients) it will be deployed with.
    fake_quant: Callable[[nn.Module], AbstractContextManager] | None = None
    # Per strategy name, its sensitivity scan when its search space needs one: for each layer
    # and level, how far changing that layer alone moves the model's outputs.
    sensitivity: Mapping[str, Mapping[str, Mapping[float, float]]] = field(default_factory=dict)


# -------------------------------------------------------------------------- strategy


class Strategy(ABC):
    """One compression technique.

    Subclasses set `name`, `config_cls`, and `default_space`: a mapping from each namespaced
    Optuna parameter name (``pruning.structured_ratio``) to its widest allowed range. The
    YAML `search_space` uses the same names; a strategy is on when any of its names appear,
    and its unlisted parameters keep their default range, or the one `unlisted_space` gives
    them (an option that is off unless the search space names it).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[StrategyConfig]]
    default_space: ClassVar[Mapping[str, Param]]
    unlisted_space: ClassVar[Mapping[str, Param]] = {}

    def __init__(self, space: Mapping[str, Any] | None = None) -> None:
        space = dict(space or {})
        unknown = sorted(set(space) - set(self.default_space))
        if unknown:
            raise ValueError(f"unknown search_space key {unknown[0]!r}; valid keys are {sorted(self.default_space)}")
        self.space: dict[str, Param] = {
            key: parse_param(key, space[key], default) if key in space else self.unlisted_space.get(key, default)
            for key, default in self.default_space.items()
        }

    @abstractmethod
    def suggest(self, trial: Any) -> StrategyConfig:
        """The only place that calls `trial.suggest_*`."""

    @abstractmethod
    def apply(self, model: nn.Module, config: StrategyConfig, context: Context) -> nn.Module:
        """Return the compressed model. May modify `model` in place; callers pass a copy."""

    def is_active(self, config: StrategyConfig) -> bool:
        """False when this config leaves the model unchanged (e.g. ratio 0)."""
        return True

    def offers(self, key: str) -> bool:
        """Whether the space can turn on `key`, an option that is off unless listed."""
        return True in self.space[key].choices

    def suggest_option(self, trial: Any, key: str) -> bool:
        """An option that is off unless listed: suggested only where the space can turn it on,
        so the trials of other search spaces do not record it."""
        return self.space[key].suggest(trial, key) if self.offers(key) else False

    def layer_record(self, model: nn.Module, config: StrategyConfig) -> dict[str, str]:
        """What this config did to each layer of the compressed `model`, when that is the
        trial's own choice (per-layer levels), for the trial's record; else nothing."""
        return {}

    def sensitivity(self, model: nn.Module, x: torch.Tensor, batch_size: int) -> dict | None:
        """The per-layer scan this search space needs, once per study (strategies.sensitivity),
        or None."""
        return None

    def describe(self) -> dict[str, Sequence]:
        return {name: list(param.values()) for name, param in self.space.items()}
