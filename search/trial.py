"""One trial: suggest → compress → deploy → check the runtime → measure → record.

A trial's own failure (a strategy that cannot apply, a diverging fine-tune, a runtime that
computes something else, a non-finite figure, running out of memory, its time limit) is
recorded with its reason on the Optuna trial and its MLflow run, and the study goes on.
Anything else is a bug in autocompress and stops the run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import optuna
import torch

from objectives.base import ObjectiveError
from search import signals
from search.anchors import off_params
from search.early_stop import StoppedEarly, early_stop_check
from search.package import log_onnx_model
from search.prepare import Prepared, batched, deploy, measure
from search.records import run_name
from search.rundir import trial_dir
from strategies import pipeline
from strategies.base import CompressionError, StrategyConfig
from strategies.runtime import Deployable, check_agreement


class RuntimeMismatch(Exception):
    """The runtime computes something other than the simulated model: the trial fails."""


class OutOfMemory(CompressionError):
    """The candidate needed more memory than the machine has: it fails alone."""


# Failures that belong to one candidate. Anything else is a bug and stops the run.
TRIAL_FAILURES = (CompressionError, ObjectiveError, RuntimeMismatch)


def _as_trial_failure(error: BaseException) -> BaseException:
    """Out-of-memory errors (MemoryError, or torch's allocator RuntimeError) become OutOfMemory."""
    if isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and ("can't allocate memory" in str(error) or "out of memory" in str(error))
    ):
        return OutOfMemory(f"out of memory: {error}")
    return error


def _failure_reason(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return signals.INTERRUPTED
    if isinstance(error, TRIAL_FAILURES):
        return f"{type(error).__name__}: {error}"
    return f"error: {type(error).__name__}: {error}"


def _build(
    p: Prepared, trial: optuna.Trial, configs: dict[str, StrategyConfig], run_id: str
) -> tuple[torch.nn.Module, Deployable]:
    """The compressed model and its deployed form, with the per-layer levels it chose recorded."""
    context = dataclasses.replace(p.context, after_epoch=early_stop_check(p, trial, configs))
    torch.manual_seed(p.config.seed + trial.number)
    model, resolved = pipeline.compress(copy.deepcopy(p.workload.model), p.strategies, configs, context)
    for strategy in p.strategies:  # per-layer levels the trial chose (mixed precision, ...)
        for key, value in strategy.layer_record(model, resolved[strategy.name]).items():
            trial.set_user_attr(key, value)
            p.tracker.log(run_id, params={key: value})
    return model, deploy(p.config, p.workload, model, trial_dir(p.run_dir, trial.number))


def runtime_disagreement(p: Prepared, model: torch.nn.Module, deployable: Deployable) -> float:
    """The share of validation samples on which the runtime and the simulation disagree;
    RuntimeMismatch past the configured limit."""
    if deployable.onnx_path is None:
        return 0.0
    outputs = p.context.outputs
    disagreement = check_agreement(deployable.predict, lambda x: batched(model, x), p.workload.val.x, outputs=outputs)
    limit = p.config.search.max_runtime_disagreement
    if disagreement > limit:
        raise RuntimeMismatch(
            f"ONNX Runtime and the simulated model disagree on {disagreement:.2%} of validation "
            f"samples (limit {limit:.2%})"
        )
    return disagreement


def _evaluate(p: Prepared, trial: optuna.Trial, run_id: str) -> tuple[dict[str, float], Deployable]:
    """Build, deploy, check and measure the trial's candidate: its metrics."""
    configs = pipeline.suggest(p.strategies, trial)
    p.tracker.log(run_id, params=trial.params)
    p.tracker.rename(run_id, run_name(trial.number, trial.params, off_params(p.strategies)))
    with signals.time_limit(p.config.search.trial_timeout):
        model, deployable = _build(p, trial, configs, run_id)
        disagreement = runtime_disagreement(p, model, deployable)
        metrics = measure(deployable, p.measured, p.eval_context, p.workload.example_inputs)
        for objective in p.measured:
            metrics.update(objective.derived(metrics, p.baseline))
        metrics["runtime_disagreement"] = disagreement
        bad = [o.name for o in p.objectives if not math.isfinite(metrics[o.name])]
        if bad:  # never hand Optuna a NaN or an infinity
            raise ObjectiveError(f"objective {bad[0]} is not finite: {metrics[bad[0]]}")
        signals.check_interrupted()
    for key, limit in p.config.limits().items():  # <= 0 is feasible
        trial.set_constraint(key, metrics[key] - limit)
    return metrics, deployable


def _noisy(metrics: dict[str, float], max_spread: float) -> bool:
    return any(v > max_spread for k, v in metrics.items() if k.startswith("latency_spread"))


def run_trial(p: Prepared, trial: optuna.Trial) -> tuple[float, ...]:
    """Evaluate one trial and record it; returns its objective values, or raises
    StoppedEarly, a trial failure, an interrupt or a bug (each recorded first)."""
    started, started_cpu = time.perf_counter(), time.process_time()
    tags: dict[str, Any] = {"optuna.trial": trial.number}
    if anchor := trial.user_attrs.get("anchor"):
        tags["anchor"] = anchor
    run_id = p.tracker.start_child(p.parent_run_id, f"trial-{trial.number}", tags)
    trial.set_user_attr("mlflow_run_id", run_id)
    try:
        metrics, deployable = _evaluate(p, trial, run_id)
    except StoppedEarly as stop:
        trial.set_user_attr("stop_reason", str(stop))
        trial.set_user_attr("cpu_seconds", time.process_time() - started_cpu)
        p.tracker.log(
            run_id,
            tags={"state": "PRUNED", "stop_reason": str(stop)},
            metrics={k: trial.user_attrs[k] for k in (f"early_{p.config.metric}", "cpu_seconds")},
        )
        p.tracker.end(run_id, "FINISHED")  # the MLflow run finished; the Optuna trial was stopped
        raise
    except BaseException as error:
        error = _as_trial_failure(error)
        reason = _failure_reason(error)
        trial.set_user_attr("fail_reason", reason)
        p.tracker.log(run_id, tags={"state": "FAIL", "fail_reason": reason, "optuna.trial": trial.number})
        p.tracker.end(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
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
    if deployable.onnx_path is not None:  # the deployable as an MLflow logged model: the UI's Models column
        example = p.workload.example_inputs
        output = deployable.predict(example).numpy()  # its own runtime session, not a second one
        trial.set_user_attr("model_uri", log_onnx_model(p.tracker, run_id, deployable.onnx_path, example, output))
    p.tracker.end(run_id, "FINISHED")
    return tuple(metrics[o.name] for o in p.objectives)
