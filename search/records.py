"""Queries over a study's trials: what each one tried, measured and why it ended.

Every reader of a study (the trial loop, the finalists, the report, the export) goes
through these, so a trial means the same thing everywhere.
"""

from __future__ import annotations

from typing import Any, Mapping

import optuna
from optuna.trial import TrialState

from search import front
from search.signals import INTERRUPTED

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # evaluated: complete, or stopped early


def params_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters in a row or attribute dict: their names are namespaced with a dot
    (``pruning.structured_ratio``, ``quantization.layer_bits``); nothing else is."""
    return {k: v for k, v in row.items() if "." in k}


def run_name(number: int, params: Mapping[str, Any], off: Mapping[str, Any]) -> str:
    """A trial's MLflow run name: its number and each technique setting it turned on (the
    parameters that differ from their "off" value), e.g. ``trial-7 head_ratio=0.38 weight_bits=8``."""

    def short(value: Any) -> str:
        return f"{value:.2g}" if isinstance(value, float) else str(value)

    on = [f"{key.split('.', 1)[1]}={short(v)}" for key, v in params.items() if key in off and v != off[key]]
    return " ".join([f"trial-{number}", *on])


def numbers_of(attrs: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries (not booleans) of an attribute dict: the measured figures."""
    return {k: v for k, v in attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def reason(attrs: Mapping[str, Any]) -> str:
    """Why a trial failed or stopped early ("" for a complete one)."""
    return attrs.get("fail_reason") or attrs.get("stop_reason", "")


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def feasible_points(trials: list[optuna.trial.FrozenTrial]) -> list[dict[str, float]]:
    """The measured figures of every COMPLETE trial that meets every constraint."""
    return [t.user_attrs for t in trials if t.state == TrialState.COMPLETE and feasible(t)]


def finished_trials(study: optuna.Study) -> int:
    """Trials that count toward the study's target: every evaluated candidate, failed ones
    included (a candidate that cannot be built is a result), but not interrupted ones."""
    return sum(
        t.state in FINISHED or (t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") != INTERRUPTED)
        for t in study.get_trials(deepcopy=False)
    )


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Pareto-optimal COMPLETE trials; values are always finite because failures raise."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    return sorted(study.best_trials, key=lambda t: t.number)


def trial_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The trial's parameters, with the per-layer levels it chose (``quantization.layer_bits``)."""
    return {**trial.params, **{k: v for k, v in params_of(trial.user_attrs).items() if isinstance(v, str)}}


def trial_rows(study: optuna.Study, baseline: Mapping[str, float]) -> list[dict[str, Any]]:
    """One row per trial: state, Pareto membership, parameters, figures, feasibility, reason."""
    on_front = {t.number for t in pareto_trials(study)}
    rows = []
    for t in study.trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name, "pareto": t.number in on_front}
        row.update(trial_params(t))
        row.update(numbers_of(t.user_attrs))
        row["anchor"] = t.user_attrs.get("anchor", "")
        if t.constraints:
            row["feasible"] = feasible(t)
            row["violation"] = front.violation(t.constraints, baseline)
        row["fail_reason"] = reason(t.user_attrs)
        row["mlflow_run_id"] = t.user_attrs.get("mlflow_run_id", "")
        row["model_uri"] = t.user_attrs.get("model_uri", "")  # its MLflow logged model
        rows.append(row)
    return rows


def closest_infeasible(rows: list[dict[str, Any]], n: int = 5) -> list[dict[str, Any]]:
    """When no trial meets the constraints: the completed ones nearest to doing so."""
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if not done or any(r.get("feasible", True) for r in done):
        return []
    return sorted(done, key=lambda r: r["violation"])[:n]
