"""Preparing a study: every check and every once-per-study computation before the first trial.

`prepare` checks the inputs, builds the workload (baseline trained or loaded from its cache),
opens the study, builds what every trial reuses (the teacher's logits, the sensitivity scans,
the measured baseline), recovers what an earlier process left open, and starts the MLflow
parent run. The result, `Prepared`, is what the trial loop and the finalists work from.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
import torch

from objectives.base import EvalContext, Objective
from objectives.complexity import count_macs, count_params
from objectives.registry import get_objective, objective_of_limit
from objectives.task import TaskMetric, outputs_of
from search import rundir, signals, storage
from search.anchors import enqueue_anchors
from search.config import Config, ConfigError, default_objectives
from search.samplers import make_sampler
from search.tracking import Tracker, flatten
from search.workload import Split, Workload, build_workload
from strategies.artifact import size_breakdown
from strategies.base import Context, Strategy
from strategies.inputs import Inputs, runtime_numpy
from strategies.registry import build_strategies
from strategies.runtime import Deployable, materialize

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A study ready to run trials, with everything they reuse."""

    config: Config
    run_dir: Path
    workload: Workload
    strategies: list[Strategy]
    objectives: list[Objective]  # what the search optimises, in the config's order
    measured: list[Objective]  # those, and what the constraints need: what every trial measures
    reported: list[Objective]  # those, and the default ones: what the baseline and the finalists measure
    context: Context
    eval_context: EvalContext
    baseline: dict[str, float]
    baseline_deployable: Deployable
    tracker: Tracker
    study: optuna.Study
    parent_run_id: str
    driver: bool = True  # the process that created or resumed the study, not a worker that joined it
    lock: Any = field(default=None, repr=False)  # the driver's lock on the run directory, released by close()
    test_reference: torch.Tensor | None = None  # the baseline's outputs on test, for fidelity (finalize)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------ deploy and measure


def batched(model: torch.nn.Module, x: Inputs, batch_size: int = 1000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def deploy(config: Config, workload: Workload, model: torch.nn.Module, out_dir: Path) -> Deployable:
    """Pack, export and load `model` on the configured runtime."""
    return materialize(
        model,
        out_dir,
        runtime=config.latency.runtime,
        threads=config.latency.threads,
        example_inputs=workload.example_inputs,
    )


def measure(
    deployable: Deployable, objectives: Sequence[Objective], eval_context: EvalContext, example: Inputs
) -> dict[str, float]:
    """Every objective's figures on the deployed model, with its parameter and MAC counts and
    where the bytes of its packed file go (``size_codes_bytes``, ``size_indices_bytes``, ...)."""
    metrics: dict[str, float] = {}
    for objective in objectives:
        metrics.update(objective.measure(deployable, eval_context))
    metrics["params"] = float(count_params(deployable.model))
    metrics["macs"] = float(count_macs(deployable.model, example))
    metrics.update({f"size_{part}_bytes": float(n) for part, n in size_breakdown(deployable.artifact_path).items()})
    if deployable.onnx_path is not None:  # what shipping model.onnx itself costs (float or int8 weights)
        metrics["onnx_bytes"] = float(deployable.onnx_path.stat().st_size)
    return metrics


def task_metric(config: Config) -> TaskMetric:
    return get_objective(config.metric)()


def reference_outputs(config: Config, workload: Workload, split: Split) -> torch.Tensor | None:
    """The baseline's own outputs on `split`, for a task metric scored against them (fidelity)."""
    return batched(workload.model, split.x) if task_metric(config).needs_reference else None


def describe_baseline(baseline: dict[str, float], metric: str = "accuracy") -> str:
    """One line of the baseline's figures, as the log, the terminal and the report show it."""
    parts = [f"{metric} {baseline[metric]:.4f}"]
    if "size_bytes" in baseline:
        parts.append(f"size {baseline['size_bytes'] / 1024:.1f} kB")
    if "latency_ms" in baseline:
        parts.append(f"latency {baseline['latency_ms']:.3f} ms")
    return ", ".join(parts)


def _progress_of_trial(message: str) -> None:
    """Progress of a trial's long steps; also where a swallowed interrupt is noticed."""
    logger.debug(message)
    signals.check_interrupted()


# --------------------------------------------------------------------- the steps


def _objectives(config: Config) -> tuple[list[Objective], list[Objective], list[Objective]]:
    """The searched objectives; those and what the constraints limit (every trial measures
    them); those and the default objectives (the baseline and the finalists measure them, so
    the report can say what a model costs in each, searched or not)."""
    objectives = [get_objective(name)() for name in config.search.objectives]
    needed = {objective_of_limit(key).name for key in config.limits()}
    measured = objectives + [get_objective(n)() for n in sorted(needed - set(config.search.objectives))]
    defaults = [n for n in default_objectives(config.metric) if n not in {o.name for o in measured}]
    return objectives, measured, measured + [get_objective(n)() for n in defaults]


def _workload(config: Config, run_dir: Path, fresh: bool, progress: Callable[[str], None]) -> Workload:
    section = {f.name: getattr(config.workload, f.name) for f in dataclasses.fields(config.workload)}
    del section["metric"]  # how the model is scored, not what defines it
    try:
        return build_workload(
            **section,
            seed=config.seed,
            device=config.search.device,
            progress=progress,
            # Every input error is reported before a refusal of the run directory.
            inputs_checked=(lambda: None) if fresh else (lambda: rundir.check_run_dir(config, run_dir)),
        )
    except ValueError as error:  # bad import paths, checkpoints and the like: the user's input
        raise ConfigError(str(error)) from None


def _open_study(
    config: Config,
    workload: Workload,
    run_dir: Path,
    database: Any,
    driver: bool,
    fresh: bool,
    progress: Callable[[str], None],
) -> tuple[optuna.Study, Any]:
    """Open (a driver: create) the study; only now, with every input checked, is the run
    directory written. Returns the study and the driver's lock on the directory."""
    if not driver:
        study = storage.open_study(run_dir, config, database, create=False)
        storage.check_study_config(study, config)
        run_dir.mkdir(parents=True, exist_ok=True)
        return study, None
    if fresh and run_dir.exists():
        storage.lock_run_dir(run_dir).close()  # refuses while another run drives that study
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(run_dir, aside)
        progress(f"--fresh: moved the earlier study in {run_dir} to {aside}")
    lock = storage.lock_run_dir(run_dir)
    if database is None:
        storage.repair_journal(run_dir)
    rundir.write_run_config(run_dir, config)
    rundir.write_preprocessing(run_dir, workload.preprocessing)
    study = storage.open_study(run_dir, config, database)
    storage.check_study_config(study, config)
    return study, lock


def _contexts(
    config: Config, workload: Workload, strategies: list[Strategy], progress: Callable[[str], None]
) -> tuple[Context, EvalContext]:
    """What every trial's strategies and objectives reuse: computed once per study."""
    s = config.search
    order = torch.randperm(len(workload.train.x), generator=torch.Generator().manual_seed(config.seed))
    finetune_idx, calibration_idx = order[: s.finetune_size], order[: s.calibration_size]
    teacher = workload.model.eval()
    finetune_x = workload.train.x[finetune_idx]
    context = Context(
        example_inputs=workload.example_inputs,
        finetune_x=finetune_x,
        finetune_y=workload.train.y[finetune_idx],
        calibration_x=workload.train.x[calibration_idx],
        teacher=teacher,
        teacher_logits=batched(teacher, finetune_x),  # once per study, reused by every trial
        seed=config.seed,
        batch_size=s.batch_size,
        device=s.device,
        outputs=task_metric(config).outputs,
        report=_progress_of_trial,
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
        latency=config.latency,
        val_reference=reference_outputs(config, workload, workload.val),
    )
    return context, eval_context


def _measure_baseline(
    config: Config, workload: Workload, reported: list[Objective], eval_context: EvalContext, run_dir: Path
) -> tuple[Deployable, dict[str, float]]:
    """The baseline, deployed and measured in this process, so speedups are same-run ratios.
    Every trial is then timed interleaved with it."""
    deployable = deploy(config, workload, copy.deepcopy(workload.model), rundir.baseline_dir(run_dir))
    baseline = measure(deployable, reported, eval_context, workload.example_inputs)
    metric, val = task_metric(config), workload.val
    outputs = outputs_of(metric.name, deployable.predict, val.x)  # a model that ignores its input, for the pick's floor
    baseline[f"trivial_{metric.name}"] = metric.trivial(outputs, val.y, eval_context.val_reference)
    eval_context.reference_run = deployable.run
    return deployable, baseline


def _resume(p: Prepared, storage_url: str | None, n_trials: int | None, progress: Callable[[str], None]) -> None:
    """Recover what killed processes left open, queue the anchors of a new study, seed the sampler."""
    with storage.study_lock(p.study, p.run_dir):
        # A driver of a journal holds the run directory's lock: every RUNNING trial is an orphan.
        retried = storage.recover(p.study, p.tracker, local=p.driver and storage_url is None)
    if retried:
        progress(f"trials {retried} were interrupted; their parameters run again first")
    if p.driver and p.config.search.anchors:
        if enqueued := enqueue_anchors(p.study, p.strategies):
            progress(f"starting with the anchors: {', '.join(enqueued)}")
    # Seeded per process and per study size, so workers and resumed runs do not repeat each other.
    p.study.sampler = make_sampler(
        p.config.search.sampler,
        p.config.seed + len(p.study.trials) + (0 if p.driver else os.getpid()),
        p.config.search.n_trials if n_trials is None else n_trials,
        p.strategies,
    )


def _parent_run(p: Prepared, tracker: Tracker) -> str:
    """The study's MLflow parent run: a driver starts or resumes it, a worker joins it."""
    parent_run_id = p.study.user_attrs.get("mlflow_parent_run_id")
    if not p.driver:
        if parent_run_id is None:
            raise ConfigError(f"study {p.config.name!r} has no MLflow parent run; start it with autocompress run first")
        return parent_run_id
    parent_run_id = tracker.start_parent(parent_run_id, p.config.name)
    p.study.set_user_attr("mlflow_parent_run_id", parent_run_id)
    tracker.log(
        parent_run_id,
        params={
            "config": p.config.to_dict(),
            **flatten(p.config.to_dict(), "config"),
            "workload.fingerprint": p.workload.fingerprint,
        },
        metrics={f"baseline_{k}": v for k, v in p.baseline.items()},
        tags={"study_name": p.config.name, "role": "study"},
    )
    w = p.workload
    splits = {
        name: (runtime_numpy(split.x), split.y.numpy())
        for name, split in (("train", w.train), ("val", w.val), ("test", w.test))
    }
    source = {"workload.dataset": p.config.workload.dataset, "workload.data_dir": p.config.workload.data_dir or ""}
    tracker.log_datasets(parent_run_id, splits, source, p.config.name)
    if p.context.sensitivity:
        path = p.run_dir / rundir.SENSITIVITY_FILE
        path.write_text(json.dumps(p.context.sensitivity, indent=1))
        tracker.log_artifact(parent_run_id, path)
    return parent_run_id


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
    `--workers N`) joins the driver's study and only runs trials. Raises ConfigError for bad
    input, before anything in `run_dir` is written.
    """
    run_dir = Path(run_dir)
    strategies = build_strategies(config.search_space)
    objectives, measured, reported = _objectives(config)
    database = storage.open_storage(run_dir, storage_url) if storage_url else None  # reachable? say so now
    workload = _workload(config, run_dir, fresh, progress)
    study, lock = _open_study(config, workload, run_dir, database, driver, fresh, progress)
    try:
        context, eval_context = _contexts(config, workload, strategies, progress)
        progress("measuring the baseline")
        deployable, baseline = _measure_baseline(config, workload, reported, eval_context, run_dir)
        tracker = Tracker.for_run_dir(run_dir, config.name, tracking_uri)
        p = Prepared(
            config=config,
            run_dir=run_dir,
            workload=workload,
            strategies=strategies,
            objectives=objectives,
            measured=measured,
            reported=reported,
            context=context,
            eval_context=eval_context,
            baseline=baseline,
            baseline_deployable=deployable,
            tracker=tracker,
            study=study,
            parent_run_id="",
            driver=driver,
            lock=lock,
        )
        _resume(p, storage_url, n_trials, progress)
        p.parent_run_id = _parent_run(p, tracker)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    progress(f"baseline: {describe_baseline(baseline, config.metric)}, {int(baseline['params'])} params")
    return p
