"""Experiment config: YAML → validated, frozen dataclasses.

Every error names the offending key and the valid values, and is raised before any work
starts. Defaults live here, so a YAML file only says what differs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from objectives.base import LatencySettings
from objectives.registry import OBJECTIVES, task_metrics
from search.samplers import SAMPLER_NAMES
from search.workload import TrainingRecipe
from strategies.registry import parse_space
from strategies.runtime import RUNTIMES
from strategies.space import Param


class ConfigError(ValueError):
    """Bad user input. The CLI exits with code 2 and this message."""


@dataclass(frozen=True)
class WorkloadSection:
    model: str = "lenet5"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    val_size: int = 5000
    split_seed: int = 0
    train_subset: int | None = None
    val_subset: int | None = None
    test_subset: int | None = None
    checkpoint: str | None = None
    training: TrainingRecipe = field(default_factory=TrainingRecipe)
    # The task metric (objectives.task): what the search maximises and the accuracy limit applies to.
    metric: str = "accuracy"


def default_objectives(metric: str = "accuracy") -> tuple[str, ...]:
    """What a study optimises unless search.objectives says otherwise: the workload's task
    metric, the packed size and the latency."""
    return (metric, "size_bytes", "latency_ms")


@dataclass(frozen=True)
class SearchSection:
    n_trials: int = 30
    objectives: tuple[str, ...] = default_objectives()
    sampler: str = "auto"  # chosen from the trial budget: see search.samplers
    anchors: bool = True  # start a new study with each technique alone (see search/anchors.py)
    finetune_size: int = 10000
    calibration_size: int = 1000
    batch_size: int = 128
    # A trial fails when the runtime's predictions differ from the simulation's on more
    # than this fraction of validation samples: the deployed model would not be the one measured.
    max_runtime_disagreement: float = 0.005
    trial_timeout: float = 0.0  # seconds; a trial that runs longer fails with that reason (0: no limit)
    # Cheap-then-full: a trial that fine-tunes two or more epochs is scored on a val subset
    # after its first. More than early_stop_margin below a feasible trial that is no larger
    # and no slower, it stops there as PRUNED (search.early_stop).
    early_stop: bool = True
    early_stop_margin: float = 0.02
    # The finishing stage (search.finalize): the recommended configuration is built again with
    # a fine-tune of this many epochs before it is scored on test (0: off); with
    # finish_front, every Pareto finalist is.
    finish_epochs: int = 0
    finish_front: bool = False
    # Where training and fine-tuning run: cpu, or cuda (cuda:N) when a GPU is there. Latency is
    # always timed on the deployment runtime (latency.runtime), never on this device.
    device: str = "cpu"


@dataclass(frozen=True)
class ConstraintsSection:
    """Limits a shipped model must meet. Each becomes an Optuna constraint; none is a weight."""

    # The drop of the task metric (accuracy, or workload.metric) below the baseline's, on
    # validation, in points of the fraction: 0.01 is one point.
    max_accuracy_drop: float | None = None
    max_size_bytes: int | None = None
    max_latency_ms: float | None = None


@dataclass(frozen=True)
class LatencySection(LatencySettings):
    """How latency is timed (objectives.base.LatencySettings, which validates it), and where."""

    runtime: str = "onnxruntime"
    final_repeats: int = 300  # finalists are timed again, alone and longer


@dataclass(frozen=True)
class Config:
    name: str
    seed: int = 0
    workload: WorkloadSection = field(default_factory=WorkloadSection)
    # Namespaced parameter name → its parsed range, validated against the strategies' own.
    search_space: Mapping[str, Param] = field(default_factory=dict)
    search: SearchSection = field(default_factory=SearchSection)
    constraints: ConstraintsSection = field(default_factory=ConstraintsSection)
    latency: LatencySection = field(default_factory=LatencySection)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["search"]["objectives"] = list(self.search.objectives)
        data["latency"]["batch_sizes"] = list(self.latency.batch_sizes)
        data["search_space"] = {key: param.to_yaml() for key, param in self.search_space.items()}
        return data

    @property
    def metric(self) -> str:
        """The task metric the study scores by."""
        return self.workload.metric

    def limits(self) -> dict[str, float]:
        """Measured figure → its limit, for the limits that are set."""
        c = self.constraints
        named = {
            f"{self.metric}_drop": c.max_accuracy_drop,
            "size_bytes": c.max_size_bytes,
            "latency_ms": c.max_latency_ms,
        }
        return {key: float(limit) for key, limit in named.items() if limit is not None}

    def identity(self) -> dict[str, Any]:
        """What defines the study: everything but the trial budget."""
        data = self.to_dict()
        data["search"].pop("n_trials")
        return data


# ------------------------------------------------------------------------ parsing


def _type_name(tp: Any) -> str:
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Check one value against a simple type: int, float, str, bool, `X | None`, `tuple[X, ...]`."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType):  # X | None
        return None if value is None else _check_value(key, value, args[0])
    if typing.get_origin(tp) is tuple:  # a YAML list, or one value
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ConfigError(f"{key} must be {_type_name(args[0])} or a non-empty list of them, got {value!r}")
        values = tuple(_check_value(key, item, args[0]) for item in items)
        if len(set(values)) != len(values):
            raise ConfigError(f"{key} lists a value twice: {list(values)}")
        return values
    if value is None:
        raise ConfigError(f"{key} must be {_type_name(tp)}, got null")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


def _section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]}; valid keys are {sorted(names)}")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}"
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _section(hints[name], value, key)
        else:
            values[name] = _check_value(key, value, hints[name])
    try:
        return cls(**values)
    except ValueError as error:  # a section's own validation (LatencySettings', TrainingRecipe's)
        raise ConfigError(str(error)) from None


def _choice(key: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def _positive(key: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def _check_device(device: Any) -> None:
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"search.device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"search.device is {device!r}, but torch finds no CUDA GPU on this machine; use 'cpu'")


def _validate(config: Config) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", config.name):
        raise ConfigError(f"name must be 1-100 letters, digits, '_', '.' or '-', got {config.name!r}")
    w, s = config.workload, config.search
    for key, value in [
        ("workload.val_size", w.val_size),
        ("workload.train_subset", w.train_subset),
        ("workload.val_subset", w.val_subset),
        ("workload.test_subset", w.test_subset),
        ("search.finetune_size", s.finetune_size),
        ("search.calibration_size", s.calibration_size),
        ("search.batch_size", s.batch_size),
        ("latency.final_repeats", config.latency.final_repeats),
    ]:
        _positive(key, value)
    _positive("search.n_trials", s.n_trials, 0)
    _positive("search.finish_epochs", s.finish_epochs, 0)
    if not 0.0 <= s.max_runtime_disagreement <= 1.0:
        raise ConfigError(f"search.max_runtime_disagreement must be in [0, 1], got {s.max_runtime_disagreement}")
    if not 0.0 <= s.early_stop_margin <= 1.0:
        raise ConfigError(f"search.early_stop_margin must be in [0, 1], got {s.early_stop_margin}")
    if not s.trial_timeout >= 0:
        raise ConfigError(f"search.trial_timeout must be >= 0 seconds (0: no limit), got {s.trial_timeout}")
    _choice("search.sampler", s.sampler, SAMPLER_NAMES)
    _check_device(s.device)
    _choice("workload.metric", w.metric, task_metrics())
    if OBJECTIVES[w.metric].outputs != "logits" and w.training.epochs and not w.checkpoint:
        raise ConfigError(
            f"workload.metric {w.metric!r} scores a model's {OBJECTIVES[w.metric].outputs}, which a classifier's "
            f"training cannot produce: set workload.training.epochs to 0 (the pretrained model) or give a checkpoint"
        )
    for name in s.objectives:
        if name not in OBJECTIVES:
            raise ConfigError(f"search.objectives must be drawn from {list(OBJECTIVES)}, got {name!r}")
        if OBJECTIVES[name].task_metric and name != w.metric:
            raise ConfigError(
                f"search.objectives names the task metric {name!r}, but workload.metric is {w.metric!r}: "
                f"list {w.metric!r} instead, or set workload.metric"
            )
    c = config.constraints
    if c.max_accuracy_drop is not None and not 0.0 <= c.max_accuracy_drop < 1.0:
        raise ConfigError(f"constraints.max_accuracy_drop must be in [0, 1), got {c.max_accuracy_drop}")
    _positive("constraints.max_size_bytes", c.max_size_bytes)
    if c.max_latency_ms is not None and not c.max_latency_ms > 0:
        raise ConfigError(f"constraints.max_latency_ms must be > 0, got {c.max_latency_ms}")
    _choice("latency.runtime", config.latency.runtime, RUNTIMES)


def _search_space(raw: Any) -> dict[str, Param]:
    """The search space, validated by the strategies themselves: key, valid range, given value."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"search_space must be a mapping of parameter names to ranges, got {raw!r}")
    try:
        return parse_space(raw or {})
    except ValueError as error:
        raise ConfigError(str(error)) from None


def parse_config(raw: Any, default_name: str = "experiment") -> Config:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a mapping of keys to values, got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; valid top-level keys are {sorted(fields)}")
    workload = _section(WorkloadSection, raw.get("workload"), "workload")
    search = _section(SearchSection, raw.get("search"), "search")
    if "objectives" not in (raw.get("search") or {}):
        search = dataclasses.replace(search, objectives=default_objectives(workload.metric))
    config = Config(
        name=_check_value("name", raw.get("name", default_name), str),
        seed=_check_value("seed", raw.get("seed", 0), int),
        workload=workload,
        search=search,
        constraints=_section(ConstraintsSection, raw.get("constraints"), "constraints"),
        latency=_section(LatencySection, raw.get("latency"), "latency"),
    )
    _validate(config)
    # The space last: its own checks need every strategy, and the sections' errors come first.
    return dataclasses.replace(config, search_space=_search_space(raw.get("search_space")))


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `--set key.path=value` to the raw YAML mapping, in place.

    The value is parsed as YAML (`0.5`, `[2, 4]`, `null`). Under `search_space` the rest of
    the path is one parameter name, since those names contain dots themselves.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    path, _, text = assignment.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {path}: value {text!r} is not valid YAML ({error})") from None
    head, _, rest = path.strip().partition(".")
    keys = [head, rest] if head == "search_space" and rest else path.strip().split(".")
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {path}: {key} is not a mapping")
        node = child
    node[keys[-1]] = value


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    raw = raw if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse_config(raw, default_name=path.stem)
