"""The strategy contract: a config, its search space, and how it changes a model.

The parameter kinds and anchors live in `strategies.space`; the registered strategies and
their order in `strategies.registry`.

A strategy never imports Optuna. `suggest` receives anything with Optuna's
`suggest_*` methods, which keeps this package usable without the search layer.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from strategies.inputs import Inputs
from strategies.space import Anchor, Param


class CompressionError(Exception):
    """A strategy cannot apply to this model. The trial fails with this message as reason."""


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d/Linear/Embedding layer: what the strategies prune, quantize and scan, by name.
    (An embedding table is a weight like any other; half of a small encoder's bytes are one.)"""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class StrategyConfig:
    """Frozen config of plain values. Subclasses validate in `validate()`."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden where there is something to check
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """Heavy runtime things a strategy may need. Built once per study by the search layer.

    `finetune_x/finetune_y` is the data distillation trains on; `teacher_logits[i]` is the
    uncompressed teacher's output for `finetune_x[i]`, computed once per study.
    """

    example_inputs: Inputs
    finetune_x: Inputs
    finetune_y: torch.Tensor
    calibration_x: Inputs
    teacher: nn.Module | None = None
    teacher_logits: torch.Tensor | None = None
    seed: int = 0
    batch_size: int = 128
    device: str = "cpu"  # where fine-tuning runs; the compressed model is returned on the CPU
    # What the model outputs: "logits" (distilled by KL at a temperature, plus the labels' CE)
    # or "embeddings" (an embedder, distilled toward the teacher's embeddings by cosine).
    outputs: str = "logits"
    # report(message) logs progress of long steps, e.g. each fine-tune epoch.
    report: Callable[[str], None] = field(default=lambda message: None)
    # Called as after_epoch(model, epoch) after each fine-tune epoch, with the model in eval
    # mode; it may raise to stop the trial (the search's cheap-then-full evaluation).
    after_epoch: Callable[[nn.Module, int], None] = field(default=lambda model, epoch: None)
    # Set before fine-tuning when the trial quantizes (quantization's `before_finetune`):
    # fine-tuning runs inside `with context.fake_quant(model):` so it trains against the
    # quantized weights (straight-through gradients) it will be deployed with.
    fake_quant: Callable[[nn.Module], AbstractContextManager] | None = None
    # Called by the fine-tune as on_step(model, step, total_steps): with step 0 before its first
    # update, then after each update (1..total_steps), inside `fake_quant` (so a weight is
    # parametrized there: change the float Parameter underneath). It may change weights in
    # place (gradual pruning, through `before_finetune`); it returns True when it changed which
    # weights are zero, and the fine-tune then holds the new zeros at zero instead.
    on_step: Callable[[nn.Module, int, int], bool] = field(default=lambda model, step, total_steps: False)
    # Per strategy name, its sensitivity scan when its search space needs one: for each layer
    # and level, how far changing that layer alone moves the model's outputs.
    sensitivity: Mapping[str, Mapping[str, Mapping[float, float]]] = field(default_factory=dict)


# -------------------------------------------------------------------------- strategy

# When in the pipeline a strategy applies: weight removal first, so fine-tuning can recover
# from it, and quantization last, so the deployed codes are exactly the ones measured.
PHASES = ("prune", "finetune", "quantize")


class Strategy(ABC):
    """One compression technique.

    Subclasses set `name`, `phase` (one of PHASES), and `default_space`: a mapping from each
    namespaced Optuna parameter name (``pruning.structured_ratio``) to its widest allowed
    range and the value that turns it off. The YAML `search_space` uses the same names; a
    strategy is on when any of its names appear, and its unlisted parameters keep their
    default range, or the one `unlisted_space` gives them (an option that is off unless the
    search space names it). `anchors` are the settings of this technique alone that every
    new study tries first.
    """

    name: ClassVar[str]
    phase: ClassVar[str]
    default_space: ClassVar[Mapping[str, Param]]
    unlisted_space: ClassVar[Mapping[str, Param]] = {}
    anchors: ClassVar[tuple[Anchor, ...]] = ()

    def __init__(self, space: Mapping[str, Param] | None = None) -> None:
        """`space`: this strategy's listed parameters, already parsed (strategies.registry.parse_space)."""
        space = dict(space or {})
        unknown = sorted(set(space) - set(self.default_space))
        if unknown:
            raise ValueError(f"unknown search_space key {unknown[0]!r}; valid keys are {sorted(self.default_space)}")
        for key, param in space.items():
            if not isinstance(param, type(self.default_space[key])):
                raise TypeError(f"search_space[{key!r}] must be parsed first (registry.parse_space), got {param!r}")
        self.space: dict[str, Param] = {
            key: space[key] if key in space else self.unlisted_space.get(key, default)
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

    def before_finetune(
        self, model: nn.Module, config: StrategyConfig, context: Context
    ) -> tuple[StrategyConfig, Context]:
        """Called on every strategy once pruning is done, before fine-tuning, with the pruned
        `model`: the config to apply later and the context fine-tuning runs with."""
        return config, context

    def _suggest(self, trial: Any, key: str) -> Any:
        return self.space[key].suggest(trial, key)

    def offers(self, key: str) -> bool:
        """Whether the space can turn on `key`, an option that is off unless listed: whether
        it holds a choice other than the off value."""
        param = self.space[key]
        return any(choice != param.off for choice in param.choices)

    def suggest_option(self, trial: Any, key: str) -> Any:
        """An option that is off unless listed: suggested only where the space can turn it on,
        so the trials of other search spaces do not record it; else its off value."""
        return self._suggest(trial, key) if self.offers(key) else self.space[key].off

    def layer_record(self, model: nn.Module, config: StrategyConfig) -> dict[str, str]:
        """What this config (as `pipeline.compress` resolved it) did to each layer of the
        compressed `model`, when that is the trial's own choice (per-layer levels), for the
        trial's record; else nothing."""
        return {}

    def sensitivity(self, model: nn.Module, x: Inputs, batch_size: int) -> dict | None:
        """The per-layer scan this search space needs, once per study (strategies.sensitivity),
        or None."""
        return None
