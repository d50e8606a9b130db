"""Config → study → trials → Pareto front.

`prepare` does every check and every once-per-study computation (baseline training or
cache load, baseline measurement, teacher logits) before the first trial; `run_search`
then runs trials until the study holds the target number of finished ones.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from experiments.workloads import Workload, build_workload
from objectives.accuracy import top1_accuracy
from objectives.base import EvalContext, LatencySettings, Objective, ObjectiveError
from objectives.complexity import count_macs, count_params
from objectives.latency import LatencyMs
from objectives.registry import get_objective
from search.anchors import enqueue_anchors
from search import control, front
from search.config import SAMPLERS, Config, ConfigError, parse_config
from search.tracking import Tracker
from strategies import pipeline
from strategies.artifact import load_artifact, save_artifact
from strategies.base import ChoiceParam, CompressionError, Context, IntParam, Param, Strategy
from strategies.runtime import ARTIFACT_NAME, Deployable, check_agreement, materialize

logger = logging.getLogger(__name__)


class RuntimeMismatch(Exception):
    """The runtime computes something other than the simulated model: the trial fails."""


class OutOfMemory(CompressionError):
    """The candidate needed more memory than the machine has: it fails alone."""


# Failures that belong to one candidate. Anything else is a bug and stops the run.
TRIAL_FAILURES = (CompressionError, ObjectiveError, RuntimeMismatch)


class StoppedEarly(optuna.TrialPruned):
    """The first fine-tune epoch showed the candidate falling clearly short: the trial is PRUNED."""


EARLY_STOP_VAL = 2000  # validation samples the after-first-epoch check scores
# How much larger or slower than the probe a neighbour may be: a fine-tuned model packs a few
# bytes differently, and two latency measurements differ by their noise.
EARLY_STOP_SLACK = 1.02


def _as_trial_failure(error: BaseException) -> BaseException:
    """Out-of-memory errors (MemoryError, or torch's allocator RuntimeError) become OutOfMemory."""
    if isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and ("can't allocate memory" in str(error) or "out of memory" in str(error))
    ):
        return OutOfMemory(f"out of memory: {error}")
    return error


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CONFIG_FILE = "config.json"
SENSITIVITY_FILE = "sensitivity.json"  # the per-layer scans, when the space lists an option that needs one


@dataclass
class Prepared:
    config: Config
    run_dir: Path
    workload: Workload
    strategies: list[Strategy]
    objectives: list[Objective]
    context: Context
    eval_context: EvalContext
    baseline: dict[str, float]
    baseline_deployable: Deployable
    tracker: Tracker
    study: optuna.Study
    parent_run_id: str
    driver: bool = True  # the process that created or resumed the study, not a worker that joined it
    lock: Any = None  # the driver's lock on the run directory, released by close()
    measured: list[Objective] = field(default_factory=list)  # the objectives, and what constraints need

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class SearchResult:
    prepared: Prepared
    pareto: list[dict[str, Any]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    table_path: Path | None = None
    plot_path: Path | None = None
    recommended: dict[str, Any] | None = None
    rule: str = ""
    closest: list[dict[str, Any]] = field(default_factory=list)  # set when nothing is feasible
    report_path: Path | None = None
    registered_model: str | None = None  # "name/version" in the MLflow Model Registry


# ----------------------------------------------------------------------- setup


def _differing(stored: dict[str, Any], config: Config) -> list[str]:
    """The top-level config sections in which `stored` differs from `config`'s identity."""
    identity = config.identity()
    return sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))


def check_run_dir(config: Config, run_dir: Path) -> None:
    """Refuse a run directory that holds a study of a different config."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return
    differing = _differing(json.loads(path.read_text()), config)
    if differing:
        raise ConfigError(
            f"run directory {run_dir} holds a study of a different config (differs in {differing}); "
            "use another --run-dir, or remove that directory to start fresh"
        )


def load_run_config(run_dir: Path) -> Config:
    """The config of the study a run directory holds."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"--run-dir {run_dir} holds no study (no {CONFIG_FILE}); run a search there first")
    return parse_config(json.loads(path.read_text()))


# `auto` resolves by the trial budget to the sampler measured best at that budget with
# `autocompress efficiency` on the shipped table (README, Samplers): TPE, started from the
# anchors, at every budget measured so far (20-100 trials). GPSampler came no closer to the
# exhaustive front there and costs about 0.8 s per trial against TPE's 0.01 s.
AUTO_SAMPLER = ((math.inf, "tpe"),)  # (largest budget, sampler), in increasing budget order


def resolve_sampler(name: str, n_trials: int) -> str:
    if name != "auto":
        return name
    return next(sampler for budget, sampler in AUTO_SAMPLER if n_trials <= budget)


GRID_POINTS = 5  # values per float range under the grid sampler


def make_sampler(name: str, seed: int, n_trials: int, strategies: list[Strategy]) -> optuna.samplers.BaseSampler:
    name = resolve_sampler(name, n_trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # One density per parameter (a conditional one from the trials that have it); the
            # anchors are the start-up trials, and each trial weighs 64 candidates. Measured
            # on the efficiency table against multivariate TPE and other settings: see README.
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, n_ei_candidates=64)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)  # the anchors start it
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "grid":
            space = {key: grid_values(param) for s in strategies for key, param in s.space.items()}
            return GridSearch(space, seed=seed)
    raise ConfigError(f"search.sampler must be one of {list(SAMPLERS)}; got {name!r}")


class GridSearch(optuna.samplers.GridSampler):
    """Optuna's grid, without its `study.stop()` once every point is taken: that call only
    works inside `study.optimize`, and trials here are asked and told. `_next_trial` stops
    asking instead."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def grid_values(param: Param) -> list:
    """A parameter's grid: its choices, every whole number of a short int range, or evenly
    spaced points of a float range (log-spaced where the range is searched on a log scale)."""
    if isinstance(param, ChoiceParam):
        return list(param.choices)
    if isinstance(param, IntParam):
        values = np.unique(np.linspace(param.low, param.high, min(GRID_POINTS * 2, param.high - param.low + 1)).round())
        return [int(v) for v in values]
    space = np.geomspace if param.log else np.linspace
    return sorted({float(v) for v in space(param.low, param.high, GRID_POINTS if param.high > param.low else 1)})


def validate(config: Config) -> tuple[list[Strategy], list[Objective]]:
    """Every check that needs no data. Raises ConfigError."""
    try:
        strategies = pipeline.build_strategies(config.search_space)
        objectives = [get_objective(name)() for name in config.search.objectives]
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return strategies, objectives


def open_study(
    run_dir: Path, config: Config, storage: optuna.storages.BaseStorage | None = None, create: bool = True
) -> optuna.Study:
    """The study in `storage` (a shared database), or else in the run directory's journal."""
    storage = storage or control.open_storage(run_dir, None)
    if not create:
        try:
            return optuna.load_study(study_name=config.name, storage=storage)
        except KeyError:
            raise ConfigError(
                f"no study named {config.name!r} in its storage; start it with autocompress run first"
            ) from None
    directions = [get_objective(name).direction for name in config.search.objectives]
    return optuna.create_study(storage=storage, study_name=config.name, directions=directions, load_if_exists=True)


def _check_study_config(study: optuna.Study, config: Config) -> None:
    """A study keeps the config that created it; a process with another one may not join."""
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", config.identity())
    elif differing := _differing(stored, config):
        raise ConfigError(f"study {config.name!r} was created by a different config (differs in {differing})")


def deploy(config: Config, workload: Workload, model: torch.nn.Module, out_dir: Path) -> Deployable:
    """Pack, export and load `model` on the configured runtime."""
    lat = config.latency
    return materialize(
        model,
        out_dir,
        runtime=lat.runtime,
        threads=lat.threads,
        example_inputs=workload.example_inputs,
        save_artifact=save_artifact,
    )


def _batched(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _measure(
    deployable: Deployable, objectives: list[Objective], eval_context: EvalContext, example: torch.Tensor
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for objective in objectives:
        metrics.update(objective.measure(deployable, eval_context))
    metrics["params"] = float(count_params(deployable.model))
    metrics["macs"] = float(count_macs(deployable.model, example))
    return metrics


def _relative(metrics: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """compression_ratio and accuracy_drop against the baseline (speedup comes from the
    interleaved latency measurement itself)."""
    out = {}
    if "size_bytes" in metrics:
        out["compression_ratio"] = baseline["size_bytes"] / metrics["size_bytes"]
    if "accuracy" in metrics:
        out["accuracy_drop"] = baseline["accuracy"] - metrics["accuracy"]
    return out


def _report(message: str) -> None:
    """Progress of a trial's long steps; also where a swallowed interrupt is noticed."""
    logger.debug(message)
    control.check_interrupted()


def prepare(
    config: Config,
    run_dir: Path,
    progress: Callable[[str], None] = logger.info,
    *,
    storage_url: str | None = None,
    tracking_uri: str | None = None,
    driver: bool = True,
    fresh: bool = False,
    n_trials: int | None = None,
) -> Prepared:
    """Check everything, then set up the study.

    The driver (`autocompress run`) creates or resumes the study, recovers what an earlier
    process left open, and owns the parent run. A worker (`autocompress worker`, or one of
    `--workers N`) joins the driver's study and only runs trials.
    """
    strategies, objectives = validate(config)
    # Constraints may limit figures the search does not optimise: measure those too.
    needed = {"accuracy" if key == "accuracy_drop" else key for key in config.constraints.limits()}
    measured = objectives + [get_objective(n)() for n in sorted(needed - set(config.search.objectives))]
    database = control.open_storage(run_dir, storage_url) if storage_url else None  # reachable? say so now
    w = config.workload
    try:
        section = {f.name: getattr(w, f.name) for f in dataclasses.fields(w)}
        workload = build_workload(
            **section,
            seed=config.seed,
            progress=progress,
            # Every input error is reported before a refusal of the run directory.
            inputs_checked=(lambda: None) if fresh else (lambda: check_run_dir(config, run_dir)),
        )
    except ValueError as error:  # bad import paths, checkpoints and the like: the user's input
        raise ConfigError(str(error)) from None
    if not driver:
        study = open_study(run_dir, config, database, create=False)
        _check_study_config(study, config)
    # Everything is validated and the data is there: now the run directory may be written.
    lock = None
    if driver:
        if fresh and run_dir.exists():
            control.lock_run_dir(run_dir).close()  # refuses while another run drives that study
            aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(run_dir, aside)
            progress(f"--fresh: moved the earlier study in {run_dir} to {aside}")
        lock = control.lock_run_dir(run_dir)
        if storage_url is None:
            control.repair_journal(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if driver:
        (run_dir / CONFIG_FILE).write_text(json.dumps(config.identity(), indent=2, sort_keys=True))
        study = open_study(run_dir, config, database)
        _check_study_config(study, config)

    s = config.search
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(workload.train.x), generator=generator)
    finetune_idx = order[: s.finetune_size]
    calibration_idx = order[: s.calibration_size]
    teacher = workload.model.eval()
    finetune_x = workload.train.x[finetune_idx]
    context = Context(
        example_inputs=workload.example_inputs,
        finetune_x=finetune_x,
        finetune_y=workload.train.y[finetune_idx],
        calibration_x=workload.train.x[calibration_idx],
        teacher=teacher,
        teacher_logits=_batched(teacher, finetune_x, 1000),  # once per study, reused by every trial
        seed=config.seed,
        batch_size=s.batch_size,
        report=_report,
    )
    for strategy in strategies:  # deterministic, so every process of a study computes the same scans
        scan = strategy.sensitivity(teacher, context.calibration_x, s.batch_size)
        if scan is not None:
            progress(f"sensitivity scan for {strategy.name}: {len(scan)} layers, each alone")
            context.sensitivity[strategy.name] = scan
    eval_context = EvalContext(
        val_x=workload.val.x,
        val_y=workload.val.y,
        example_inputs=workload.example_inputs,
        latency=LatencySettings(
            **{f.name: getattr(config.latency, f.name) for f in dataclasses.fields(LatencySettings)}
        ),
    )

    # The baseline is measured in this process, so speedups are same-run ratios.
    progress("measuring the baseline")
    deployable = deploy(config, workload, copy.deepcopy(teacher), run_dir / "baseline")
    all_objectives = [get_objective(name)() for name in ("accuracy", "size_bytes", "latency_ms")]
    baseline = _measure(deployable, all_objectives, eval_context, workload.example_inputs)
    eval_context.reference_run = deployable.run  # every trial is timed interleaved with it

    tracker = Tracker.for_run_dir(run_dir, config.name, tracking_uri)
    with control.study_lock(study, run_dir):
        # A driver of a journal holds the run directory's lock: every RUNNING trial is an orphan.
        retried = control.recover(study, tracker, local=driver and storage_url is None)
    if retried:
        progress(f"trials {retried} were interrupted; their parameters run again first")
    if driver and config.search.anchors:
        enqueued = enqueue_anchors(study, strategies)
        if enqueued:
            progress(f"starting with the anchors: {', '.join(enqueued)}")
    # Seeded per process and per study size, so workers and resumed runs do not repeat each other.
    study.sampler = make_sampler(
        config.search.sampler,
        config.seed + len(study.trials) + (0 if driver else os.getpid()),
        config.search.n_trials if n_trials is None else n_trials,
        strategies,
    )
    parent_run_id = study.user_attrs.get("mlflow_parent_run_id")
    if driver:
        parent_run_id = tracker.start_parent(parent_run_id, config.name)
        study.set_user_attr("mlflow_parent_run_id", parent_run_id)
        tracker.log(
            parent_run_id,
            params={"config": config.to_dict(), "workload.fingerprint": workload.fingerprint},
            metrics={f"baseline_{k}": v for k, v in baseline.items()},
            tags={"study_name": config.name, "role": "study"},
        )
        if context.sensitivity:
            path = run_dir / SENSITIVITY_FILE
            path.write_text(json.dumps(context.sensitivity, indent=1))
            tracker.log_artifact(parent_run_id, path)
    elif parent_run_id is None:
        raise ConfigError(f"study {config.name!r} has no MLflow parent run; start it with autocompress run first")
    progress(
        f"baseline: accuracy {baseline['accuracy']:.4f}, size {baseline['size_bytes'] / 1024:.1f} kB, "
        f"latency {baseline['latency_ms']:.3f} ms, {int(baseline['params'])} params"
    )
    return Prepared(
        config,
        run_dir,
        workload,
        strategies,
        objectives,
        context,
        eval_context,
        baseline,
        deployable,
        tracker,
        study,
        parent_run_id,
        driver,
        lock,
        measured,
    )


# ---------------------------------------------------------------------- trials


def _objective(p: Prepared) -> Callable[[optuna.Trial], tuple[float, ...]]:

    def run_trial(trial: optuna.Trial) -> tuple[float, ...]:
        started, started_cpu = time.perf_counter(), time.process_time()
        configs = pipeline.suggest(p.strategies, trial)
        tags = {"optuna.trial": trial.number, **({"anchor": a} if (a := trial.user_attrs.get("anchor")) else {})}
        run_id = p.tracker.start_child(p.parent_run_id, f"trial-{trial.number}", tags)
        trial.set_user_attr("mlflow_run_id", run_id)
        p.tracker.log(run_id, params=trial.params)
        try:
            with control.time_limit(p.config.search.trial_timeout):
                context = dataclasses.replace(p.context, after_epoch=early_stop_check(p, trial, configs))
                torch.manual_seed(p.config.seed + trial.number)
                model = pipeline.compress(copy.deepcopy(p.workload.model), p.strategies, configs, context)
                for strategy in p.strategies:  # per-layer levels the trial chose (mixed precision, ...)
                    for key, value in strategy.layer_record(model, configs[strategy.name]).items():
                        trial.set_user_attr(key, value)
                        p.tracker.log(run_id, params={key: value})
                deployable = deploy(p.config, p.workload, model, p.run_dir / "trials" / f"{trial.number:04d}")
                disagreement = 0.0
                if deployable.onnx_path is not None:
                    disagreement = check_agreement(
                        deployable.predict, lambda x: _batched(model, x, 1000), p.workload.val.x
                    )
                    limit = p.config.search.max_runtime_disagreement
                    if disagreement > limit:
                        raise RuntimeMismatch(
                            f"ONNX Runtime and the simulated model disagree on {disagreement:.2%} of validation "
                            f"samples (limit {limit:.2%})"
                        )
                metrics = _measure(deployable, p.measured, p.eval_context, p.workload.example_inputs)
                metrics.update(_relative(metrics, p.baseline))
                metrics["runtime_disagreement"] = disagreement
                bad = [o.name for o in p.objectives if not math.isfinite(metrics[o.name])]
                if bad:  # never hand Optuna a NaN or an infinity
                    raise ObjectiveError(f"objective {bad[0]} is not finite: {metrics[bad[0]]}")
                control.check_interrupted()
            for key, limit in p.config.constraints.limits().items():  # <= 0 is feasible
                trial.set_constraint(key, metrics[key] - limit)
        except StoppedEarly as stop:
            trial.set_user_attr("stop_reason", str(stop))
            trial.set_user_attr("cpu_seconds", time.process_time() - started_cpu)
            p.tracker.log(run_id, tags={"state": "PRUNED", "stop_reason": str(stop)},
                          metrics={k: trial.user_attrs[k] for k in ("early_accuracy", "cpu_seconds")})  # fmt: skip
            p.tracker.end(run_id, "FINISHED")
            raise
        except BaseException as error:
            error = _as_trial_failure(error)
            interrupted = isinstance(error, KeyboardInterrupt)
            if interrupted:
                reason = control.INTERRUPTED
            elif isinstance(error, TRIAL_FAILURES):
                reason = f"{type(error).__name__}: {error}"
            else:
                reason = f"error: {type(error).__name__}: {error}"
            trial.set_user_attr("fail_reason", reason)
            p.tracker.log(run_id, tags={"state": "FAIL", "fail_reason": reason, "optuna.trial": trial.number})
            p.tracker.end(run_id, "KILLED" if interrupted else "FAILED")
            raise error
        metrics["trial_seconds"] = time.perf_counter() - started
        metrics["cpu_seconds"] = time.process_time() - started_cpu  # this process, all its threads
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        tags = {"state": "COMPLETE"}
        if _noisy(metrics, p.eval_context.latency.max_spread):
            tags["latency_noisy"] = "true"
            trial.set_user_attr("latency_noisy", True)
        p.tracker.log(run_id, metrics=metrics, tags=tags)
        p.tracker.end(run_id, "FINISHED")
        return tuple(metrics[o.name] for o in p.objectives)

    return run_trial


def early_stop_check(p: Prepared, trial: optuna.Trial, configs: dict) -> Callable[[torch.nn.Module, int], None]:
    """The cheap-then-full evaluation: a check to run after each fine-tune epoch.

    Only a trial that fine-tunes two or more epochs has something to save. Fine-tuning changes
    neither the model's size nor its latency, so both are measured first on the same candidate
    built without fine-tuning (a probe). The feasible completed trials that are no larger and
    no slower (within EARLY_STOP_SLACK) are its neighbours; after the first epoch, the
    candidate's accuracy on EARLY_STOP_VAL validation samples must come within
    `early_stop_margin` of the best of them, or the trial stops as PRUNED, with the reason.
    """
    s = p.config.search
    distill = configs.get("distillation")
    others = [o for o in p.objectives if o.name != "accuracy"]
    if not s.early_stop or distill is None or distill.epochs < 2 or len(others) == len(p.objectives):
        return p.context.after_epoch
    done = [t for t in p.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and feasible(t)]
    if not done:
        return p.context.after_epoch
    probe_configs = {**configs, "distillation": dataclasses.replace(distill, epochs=0)}
    model = pipeline.compress(copy.deepcopy(p.workload.model), p.strategies, probe_configs, p.context)
    with tempfile.TemporaryDirectory(prefix="probe-", dir=p.run_dir) as tmp:
        deployed = deploy(p.config, p.workload, model, Path(tmp))
        probe = _measure(deployed, others, p.eval_context, p.workload.example_inputs)
    for objective in others:
        trial.set_user_attr(f"probe_{objective.name}", probe[objective.name])
    neighbours = [t for t in done if all(t.user_attrs[o.name] <= probe[o.name] * EARLY_STOP_SLACK for o in others)]
    if not neighbours:
        return p.context.after_epoch
    best = max(neighbours, key=lambda t: t.user_attrs["accuracy"])
    n = min(EARLY_STOP_VAL, len(p.workload.val.x))

    def check(model: torch.nn.Module, epoch: int) -> None:
        p.context.after_epoch(model, epoch)
        if epoch != 1:
            return
        accuracy = top1_accuracy(lambda x: _batched(model, x, 1000), p.workload.val.x[:n], p.workload.val.y[:n])
        trial.set_user_attr("early_accuracy", accuracy)
        short = best.user_attrs["accuracy"] - accuracy
        if short > s.early_stop_margin:
            raise StoppedEarly(
                f"stopped early: after fine-tune epoch 1 of {distill.epochs}, accuracy {accuracy:.4f} on {n} "
                f"validation samples is {short:.2%} below trial {best.number} ({best.user_attrs['accuracy']:.4f}), "
                f"which is no larger and no slower (margin {s.early_stop_margin:.2%})"
            )

    return check


def _noisy(metrics: dict[str, float], max_spread: float) -> bool:
    return any(v > max_spread for k, v in metrics.items() if k.startswith("latency_spread"))


def finished_trials(study: optuna.Study) -> int:
    """Trials that count toward the study's target: every evaluated candidate, failed ones
    included (a candidate that cannot be built is a result), but not interrupted ones."""
    return sum(
        t.state in FINISHED or (t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") != control.INTERRUPTED)
        for t in study.get_trials(deepcopy=False)
    )


def _next_trial(p: Prepared, n_trials: int) -> optuna.Trial | None:
    """A new trial, or None once finished and running trials reach the target. Counting and
    asking happen under the study's lock, so concurrent workers never overshoot it."""
    with control.study_lock(p.study, p.run_dir):
        if control.database(p.study) is not None:  # fail and retry trials of workers that died since
            control.recover(p.study, p.tracker, local=False)
        running = len(p.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if finished_trials(p.study) + running >= n_trials:
            return None
        if isinstance(p.study.sampler, GridSearch) and p.study.sampler.is_exhausted(p.study):
            logger.info("every point of the grid is evaluated or running: no more trials to run")
            return None
        return p.study.ask()


def run_trials(
    p: Prepared, n_trials: int, on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None
) -> int:
    """Run trials until the study holds `n_trials` finished or running ones. Returns how many
    this process ran. A trial's own failure is recorded and the loop goes on; an interrupt or
    a bug marks the trial FAIL and propagates."""
    objective = _objective(p)
    ran = 0
    while (trial := _next_trial(p, n_trials)) is not None:
        try:
            with control.heartbeat(p.study, trial):
                values = objective(trial)
        except StoppedEarly:
            p.study.tell(trial, state=TrialState.PRUNED)
        except TRIAL_FAILURES:
            p.study.tell(trial, state=TrialState.FAIL)
        except BaseException:
            p.study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            p.study.tell(trial, values)
        ran += 1
        gc.collect()
        _log_hypervolume(p)
        if on_trial:
            on_trial(p.study, p.study._storage.get_trial(trial._trial_id))
    return ran


def _log_hypervolume(p: Prepared) -> None:
    """The current front's hypervolume as a step metric on the parent run: the MLflow UI
    charts the search converging. Step = finished trials."""
    trials = p.study.get_trials(deepcopy=False)
    p.tracker.log(
        p.parent_run_id,
        metrics={"hypervolume": front.hypervolume(feasible_points(trials), p.baseline, p.config.search.objectives)},
        step=finished_trials(p.study),
    )


def reason(attrs: dict[str, Any]) -> str:
    """Why a trial failed or stopped early ("" for a complete one)."""
    return attrs.get("fail_reason") or attrs.get("stop_reason", "")


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def feasible_points(trials: list[optuna.trial.FrozenTrial]) -> list[dict[str, float]]:
    """The measured figures of every COMPLETE trial that meets every constraint."""
    return [t.user_attrs for t in trials if t.state == TrialState.COMPLETE and feasible(t)]


def run_search(
    p: Prepared, n_trials: int, on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None
) -> SearchResult:
    """Run trials until the study holds `n_trials` finished ones, then mark the front."""
    logger.info("study %r holds %d finished trials; target %d", p.config.name, finished_trials(p.study), n_trials)
    try:
        run_trials(p, n_trials, on_trial)
    except BaseException as error:
        p.tracker.end(p.parent_run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    result = summarize(p)
    p.tracker.end(p.parent_run_id, "FINISHED")
    return result


# -------------------------------------------------------------------- summary


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Pareto-optimal COMPLETE trials; values are always finite because failures raise."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    return sorted(study.best_trials, key=lambda t: t.number)


def trial_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The trial's parameters, with the per-layer levels it chose (``quantization.layer_bits``)."""
    return {**trial.params, **{k: v for k, v in trial.user_attrs.items() if "." in k and isinstance(v, str)}}


def trial_rows(study: optuna.Study, baseline: dict[str, float]) -> list[dict[str, Any]]:
    on_front = {t.number for t in pareto_trials(study)}
    rows = []
    for t in study.trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name, "pareto": t.number in on_front}
        row.update(trial_params(t))
        row.update({k: v for k, v in t.user_attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        row["anchor"] = t.user_attrs.get("anchor", "")
        if t.constraints:
            row["feasible"] = feasible(t)
            row["violation"] = front.violation(t.constraints, baseline)
        row["fail_reason"] = reason(t.user_attrs)
        row["mlflow_run_id"] = t.user_attrs.get("mlflow_run_id", "")
        rows.append(row)
    return rows


def finalize(p: Prepared, pareto: list[dict[str, Any]]) -> dict[str, float]:
    """Rebuild every Pareto trial from its stored artifact, time it again alone and longer
    (interleaved with the baseline), and score it once on the untouched test split.

    Updates the rows in place and returns the baseline's test figures. Pareto membership was
    decided on the search objectives only; nothing here feeds back into the search.
    """
    test = p.workload.test
    settings = dataclasses.replace(p.eval_context.latency, repeats=p.config.latency.final_repeats)
    context = dataclasses.replace(p.eval_context, latency=settings)
    baseline = {"baseline_test_accuracy": top1_accuracy(p.baseline_deployable.predict, test.x, test.y)}
    for row in pareto:
        trial_dir = p.run_dir / "trials" / f"{row['trial']:04d}"
        model = load_artifact(trial_dir / ARTIFACT_NAME, p.workload.factory)
        deployable = deploy(p.config, p.workload, model, trial_dir / "final")
        figures = {
            "val_accuracy": top1_accuracy(deployable.predict, p.workload.val.x, p.workload.val.y),
            "test_accuracy": top1_accuracy(deployable.predict, test.x, test.y),
        }
        figures["test_accuracy_drop"] = baseline["baseline_test_accuracy"] - figures["test_accuracy"]
        figures.update({f"final_{k}": v for k, v in LatencyMs().measure(deployable, context).items()})
        if figures["val_accuracy"] != row.get("accuracy", figures["val_accuracy"]):
            logger.warning("trial %d rebuilt from its artifact scores %.4f on val, not %.4f",
                           row["trial"], figures["val_accuracy"], row["accuracy"])  # fmt: skip
        row.update(figures)
        if row.get("mlflow_run_id"):
            p.tracker.log(row["mlflow_run_id"], metrics=figures)
        logger.info(
            "finalist trial %d: val %.4f, test %.4f, %.3f ms (%.2fx)",
            row["trial"], figures["val_accuracy"], figures["test_accuracy"],
            figures["final_latency_ms"], figures["final_speedup"],
        )  # fmt: skip
    return baseline


def summarize(p: Prepared) -> SearchResult:
    from search import decision
    from search.report import write_table

    rows = trial_rows(p.study, p.baseline)
    pareto = [r for r in rows if r["pareto"]]
    if pareto:
        final_baseline = finalize(p, pareto)
        p.baseline.update(final_baseline)
        p.tracker.log(p.parent_run_id, metrics=final_baseline)
    for t in p.study.trials:
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id and t.state == TrialState.COMPLETE:
            p.tracker.set_tag(run_id, "pareto", str(any(r["trial"] == t.number for r in pareto)).lower())
    table = write_table(rows, p.run_dir / "results.csv")
    if pareto:
        p.tracker.log_artifact(p.parent_run_id, write_table(pareto, p.run_dir / "finalists.csv"))
    p.tracker.log_artifact(p.parent_run_id, table)
    recommended, rule = front.recommend(pareto, p.baseline, p.config.search.objectives,
                                        p.config.constraints.max_accuracy_drop)  # fmt: skip
    tags = {"pareto_trials": ",".join(str(r["trial"]) for r in pareto), "recommendation_rule": rule}
    if recommended is not None:
        tags["recommended_trial"] = recommended["trial"]
    p.tracker.log(
        p.parent_run_id,
        metrics={"n_complete": sum(r["state"] == "COMPLETE" for r in rows), "n_pareto": len(pareto)},
        tags=tags,
    )
    closest = closest_infeasible(rows)
    decision.write_summary(p.run_dir, {
        "study": p.config.name, "objectives": list(p.config.search.objectives), "baseline": p.baseline,
        "constraints": p.config.constraints.limits(), "pareto": pareto, "recommended": recommended,
        "rule": rule, "closest": closest,
    })  # fmt: skip
    report = decision.write_report(p.run_dir, p.study)  # draws the Pareto plot too
    plot = p.run_dir / decision.PLOT_FILE
    for path in (plot, report):
        p.tracker.log_artifact(p.parent_run_id, path)
    version = decision.register(p.run_dir, p.tracker, p.config.name)
    registered = f"{p.config.name}/{version}" if version is not None else None
    if registered:
        p.tracker.set_tag(p.parent_run_id, "registered_model", registered)
    return SearchResult(p, pareto, rows, table, plot, recommended, rule, closest, report, registered)


def closest_infeasible(rows: list[dict[str, Any]], n: int = 5) -> list[dict[str, Any]]:
    """When no trial meets the constraints: the completed ones nearest to doing so."""
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if not done or any(r.get("feasible", True) for r in done):
        return []
    return sorted(done, key=lambda r: r["violation"])[:n]
