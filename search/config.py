"""Experiment config: YAML → validated, frozen dataclasses.

Every error names the offending key and the valid values, and is raised before any work
starts. Defaults live here, so a YAML file only says what differs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from experiments.workloads import TrainingRecipe

OBJECTIVE_NAMES = ("accuracy", "size_bytes", "latency_ms")
SAMPLERS = ("auto", "tpe", "gp", "nsga2", "random", "grid")
RUNTIMES = ("onnxruntime", "torch")


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


@dataclass(frozen=True)
class SearchSection:
    n_trials: int = 30
    objectives: tuple[str, ...] = OBJECTIVE_NAMES
    sampler: str = "auto"  # chosen from the trial budget: see search.study.make_sampler
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
    # and no slower, it stops there as PRUNED (search.study.early_stop_check).
    early_stop: bool = True
    early_stop_margin: float = 0.02


@dataclass(frozen=True)
class ConstraintsSection:
    """Limits a shipped model must meet. Each becomes an Optuna constraint; none is a weight."""

    max_accuracy_drop: float | None = None  # fraction of the baseline's validation accuracy, e.g. 0.01
    max_size_bytes: int | None = None
    max_latency_ms: float | None = None

    def limits(self) -> dict[str, float]:
        """Measured figure → its limit, for the limits that are set."""
        named = {"accuracy_drop": self.max_accuracy_drop, "size_bytes": self.max_size_bytes,
                 "latency_ms": self.max_latency_ms}  # fmt: skip
        return {key: float(limit) for key, limit in named.items() if limit is not None}


@dataclass(frozen=True)
class LatencySection:
    runtime: str = "onnxruntime"
    batch_sizes: tuple[int, ...] = (1,)  # the first is the searched objective
    threads: int = 1
    warmup: int = 10
    repeats: int = 50
    final_repeats: int = 300  # finalists are timed again, alone and longer
    max_spread: float = 0.15  # a wider ± is tagged latency_noisy


@dataclass(frozen=True)
class Config:
    name: str
    seed: int = 0
    workload: WorkloadSection = field(default_factory=WorkloadSection)
    # Namespaced parameter name → raw YAML value; validated by the strategies themselves.
    search_space: Mapping[str, Any] = field(default_factory=dict)
    search: SearchSection = field(default_factory=SearchSection)
    constraints: ConstraintsSection = field(default_factory=ConstraintsSection)
    latency: LatencySection = field(default_factory=LatencySection)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["search"]["objectives"] = list(self.search.objectives)
        data["latency"]["batch_sizes"] = list(self.latency.batch_sizes)
        data["search_space"] = dict(self.search_space)
        return data

    def identity(self) -> dict[str, Any]:
        """What defines the study: everything but the trial budget."""
        data = self.to_dict()
        data["search"].pop("n_trials")
        return data


# ------------------------------------------------------------------------ parsing


def _type_name(tp: Any) -> str:
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Check one scalar against a simple annotation: int, float, str, or `X | None`."""
    optional = isinstance(tp, str) and tp.endswith("| None")
    base = {"int": int, "float": float, "str": str, "bool": bool}.get(str(tp).split("|")[0].strip(), tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must be {_type_name(base)}, got null")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {_type_name(base)}, got {value!r}")
    if base is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


def _section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix} must be a mapping of keys to values, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]}; valid keys are {sorted(fields)}")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}"
        f = fields[name]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            values[name] = _section(f.default_factory, value, key)
        elif name == "objectives":
            values[name] = _objectives(key, value)
        elif name == "batch_sizes":
            values[name] = _int_list(key, value)
        else:
            values[name] = _check_value(key, value, f.type)
    try:
        return cls(**values)
    except ValueError as error:  # a section's own validation (e.g. TrainingRecipe's)
        raise ConfigError(str(error)) from None


def _objectives(key: str, value: Any) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{key} must be a non-empty list drawn from {list(OBJECTIVE_NAMES)}, got {value!r}")
    for name in names:
        if name not in OBJECTIVE_NAMES:
            raise ConfigError(f"{key} must be drawn from {list(OBJECTIVE_NAMES)}, got {name!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} lists an objective twice: {names}")
    return tuple(names)


def _int_list(key: str, value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items):
        raise ConfigError(f"{key} must be a whole number >= 1 or a non-empty list of them, got {value!r}")
    if len(set(items)) != len(items):
        raise ConfigError(f"{key} lists a value twice: {items}")
    return tuple(items)


def _positive(key: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def _validate(config: Config) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", config.name):
        raise ConfigError(f"name must be 1-100 letters, digits, '_', '.' or '-', got {config.name!r}")
    w, s, lat = config.workload, config.search, config.latency
    for key, value in [
        ("workload.val_size", w.val_size),
        ("workload.train_subset", w.train_subset),
        ("workload.val_subset", w.val_subset),
        ("workload.test_subset", w.test_subset),
        ("search.finetune_size", s.finetune_size),
        ("search.calibration_size", s.calibration_size),
        ("search.batch_size", s.batch_size),
        ("latency.final_repeats", lat.final_repeats),
        ("latency.threads", lat.threads),
        ("latency.repeats", lat.repeats),
    ]:
        _positive(key, value)
    _positive("search.n_trials", s.n_trials, 0)
    _positive("latency.warmup", lat.warmup, 0)
    if not lat.max_spread > 0:
        raise ConfigError(f"latency.max_spread must be > 0, got {lat.max_spread}")
    if not 0.0 <= s.max_runtime_disagreement <= 1.0:
        raise ConfigError(f"search.max_runtime_disagreement must be in [0, 1], got {s.max_runtime_disagreement}")
    if not 0.0 <= s.early_stop_margin <= 1.0:
        raise ConfigError(f"search.early_stop_margin must be in [0, 1], got {s.early_stop_margin}")
    if not s.trial_timeout >= 0:
        raise ConfigError(f"search.trial_timeout must be >= 0 seconds (0: no limit), got {s.trial_timeout}")
    if s.sampler not in SAMPLERS:
        raise ConfigError(f"search.sampler must be one of {list(SAMPLERS)}, got {s.sampler!r}")
    c = config.constraints
    if c.max_accuracy_drop is not None and not 0.0 <= c.max_accuracy_drop < 1.0:
        raise ConfigError(f"constraints.max_accuracy_drop must be in [0, 1), got {c.max_accuracy_drop}")
    _positive("constraints.max_size_bytes", c.max_size_bytes)
    if c.max_latency_ms is not None and not c.max_latency_ms > 0:
        raise ConfigError(f"constraints.max_latency_ms must be > 0, got {c.max_latency_ms}")
    if lat.runtime not in RUNTIMES:
        raise ConfigError(f"latency.runtime must be one of {list(RUNTIMES)}, got {lat.runtime!r}")


def parse_config(raw: Any, default_name: str = "experiment") -> Config:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a mapping of keys to values, got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; valid top-level keys are {sorted(fields)}")
    space = raw.get("search_space") or {}
    if not isinstance(space, Mapping):
        raise ConfigError(f"search_space must be a mapping of parameter names to ranges, got {space!r}")
    config = Config(
        name=_check_value("name", raw.get("name", default_name), str),
        seed=_check_value("seed", raw.get("seed", 0), int),
        workload=_section(WorkloadSection, raw.get("workload"), "workload"),
        search_space=dict(space),
        search=_section(SearchSection, raw.get("search"), "search"),
        constraints=_section(ConstraintsSection, raw.get("constraints"), "constraints"),
        latency=_section(LatencySection, raw.get("latency"), "latency"),
    )
    _validate(config)
    return config


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
