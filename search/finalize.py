"""The finalists: every Pareto trial rebuilt from its packed file, timed again alone and
longer, scored once on the untouched test split; then the tables, summary, report and registry.

The finishing stage (`search.finish_epochs`): the recommended configuration (with
`search.finish_front`, every finalist) is built again from the baseline with a longer
fine-tune, and scored the same way; its figures carry the prefix ``finished_``. It replaces the
trial's own model in the package and the registry when its validation accuracy is at least as
high. Pareto membership and the pick were decided on the search objectives only; nothing here
feeds back into the search, and nothing is decided on test.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from optuna.trial import FixedTrial, TrialState

from search import front, package, records, report, rundir
from search.prepare import Prepared, deploy, reference_outputs, task_metric
from search.trial import TRIAL_FAILURES, runtime_disagreement
from strategies import pipeline
from strategies.artifact import load_artifact
from strategies.runtime import ARTIFACT_NAME, Deployable

logger = logging.getLogger(__name__)


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
    registered_model: str | None = None  # "name/version" in the MLflow Model Registry
    alternatives: dict[str, dict[str, Any]] = field(default_factory=dict)  # the smallest, the fastest within 1 pt


def _on_split(p: Prepared, predict: Any, split: str) -> float:
    """The study's task metric of `predict` on the val or the test split."""
    data = getattr(p.workload, split)
    reference = p.eval_context.val_reference if split == "val" else p.test_reference
    return task_metric(p.config).on(predict, data.x, data.y, reference)


def _scored(p: Prepared, deployable: Deployable, baseline_test: float) -> dict[str, float]:
    """A deployed finalist's task metric on val and test, and its noisy figures measured again, longer."""
    m = p.config.metric
    figures = {
        f"val_{m}": _on_split(p, deployable.predict, "val"),
        f"test_{m}": _on_split(p, deployable.predict, "test"),
    }
    figures[f"test_{m}_drop"] = baseline_test - figures[f"test_{m}"]
    latency = dataclasses.replace(p.eval_context.latency, repeats=p.config.latency.final_repeats)
    context = dataclasses.replace(p.eval_context, latency=latency)
    for objective in p.reported:
        if objective.final_repeat:
            figures.update({f"final_{k}": v for k, v in objective.measure(deployable, context).items()})
    return figures


def _final_figures(p: Prepared, row: dict[str, Any], baseline_test: float) -> dict[str, float]:
    """One finalist rebuilt from its artifact and scored."""
    trial_dir = rundir.trial_dir(p.run_dir, row["trial"])
    model = load_artifact(trial_dir / ARTIFACT_NAME, p.workload.factory)
    figures = _scored(p, deploy(p.config, p.workload, model, trial_dir / "final"), baseline_test)
    m = p.config.metric
    if figures[f"val_{m}"] != row.get(m, figures[f"val_{m}"]):
        logger.warning(
            "trial %d rebuilt from its artifact scores %s %.4f on val, not %.4f",
            row["trial"],
            m,
            figures[f"val_{m}"],
            row[m],
        )
    return figures


def finished_figures(p: Prepared, row: dict[str, Any], baseline_test: float) -> dict[str, Any]:
    """The finishing stage for one finalist: its configuration built again from the baseline
    with a fine-tune of `search.finish_epochs` epochs, deployed, checked and scored."""
    epochs = p.config.search.finish_epochs
    trial = next(t for t in p.study.trials if t.number == row["trial"])
    configs = pipeline.suggest(p.strategies, FixedTrial(trial.params))
    if "distillation" not in configs:
        return {"finish_reason": "the search space has no distillation fine-tune to lengthen"}
    configs["distillation"] = dataclasses.replace(configs["distillation"], epochs=epochs)
    torch.manual_seed(p.config.seed + trial.number)
    try:
        model, _ = pipeline.compress(copy.deepcopy(p.workload.model), p.strategies, configs, p.context)
        deployable = deploy(p.config, p.workload, model, rundir.finished_dir(p.run_dir, trial.number))
        runtime_disagreement(p, model, deployable)
    except TRIAL_FAILURES as error:  # the finalist keeps its own model and figures
        return {"finish_reason": f"{type(error).__name__}: {error}"}
    figures = _scored(p, deployable, baseline_test)
    figures["size_bytes"] = float(os.path.getsize(deployable.artifact_path))
    if "size_bytes" in p.baseline:
        figures["compression_ratio"] = p.baseline["size_bytes"] / figures["size_bytes"]
    return {"finished_epochs": epochs, **{f"finished_{k}": v for k, v in figures.items()}}


def finalize(p: Prepared, pareto: list[dict[str, Any]], finish: set[int] = frozenset()) -> dict[str, float]:
    """Re-measure every Pareto row (updated in place), and put the rows of `finish` through the
    finishing stage; returns the baseline's test figures."""
    m = p.config.metric
    p.test_reference = reference_outputs(p.config, p.workload, p.workload.test)
    baseline = {f"baseline_test_{m}": _on_split(p, p.baseline_deployable.predict, "test")}
    for row in pareto:
        figures = _final_figures(p, row, baseline[f"baseline_test_{m}"])
        if row["trial"] in finish:
            figures.update(finished_figures(p, row, baseline[f"baseline_test_{m}"]))
        row.update(figures)
        if row.get("mlflow_run_id"):
            p.tracker.log(row["mlflow_run_id"], metrics=records.numbers_of(figures))
        logger.info(
            "finalist trial %d: val %s %.4f, test %.4f, %.3f ms (%.2fx)%s",
            row["trial"],
            m,
            figures[f"val_{m}"],
            figures[f"test_{m}"],
            figures.get("final_latency_ms", float("nan")),
            figures.get("final_speedup", float("nan")),
            _finish_note(figures, m),
        )
    return baseline


def _finish_note(figures: dict[str, Any], m: str) -> str:
    if f"finished_val_{m}" in figures:
        return (
            f"; finished with {figures['finished_epochs']} epochs: val {figures[f'finished_val_{m}']:.4f}, "
            f"test {figures[f'finished_test_{m}']:.4f}"
        )
    return f"; not finished: {figures['finish_reason']}" if "finish_reason" in figures else ""


def _tag_front(p: Prepared, pareto: list[dict[str, Any]]) -> None:
    on_front = {r["trial"] for r in pareto}
    for t in p.study.trials:
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id and t.state == TrialState.COMPLETE:
            p.tracker.set_tag(run_id, "pareto", str(t.number in on_front).lower())


def _to_finish(p: Prepared, pareto: list[dict[str, Any]], recommended: dict[str, Any] | None) -> set[int]:
    """The trials the finishing stage lengthens: none, the pick, or the whole front."""
    if not p.config.search.finish_epochs:
        return set()
    if p.config.search.finish_front:
        return {r["trial"] for r in pareto}
    return {recommended["trial"]} if recommended is not None else set()


def summarize(p: Prepared) -> SearchResult:
    """Finalists, tables, recommendation, summary, report and registry, once the trials are done."""
    rows = records.trial_rows(p.study, p.baseline)
    pareto = [r for r in rows if r["pareto"]]
    objectives = p.config.search.objectives
    recommended, rule = front.recommend(
        pareto, p.baseline, objectives, p.config.constraints.max_accuracy_drop, p.config.metric
    )
    if pareto:
        final_baseline = finalize(p, pareto, _to_finish(p, pareto, recommended))
        p.baseline.update(final_baseline)
        p.tracker.log(p.parent_run_id, metrics=final_baseline)
    _tag_front(p, pareto)
    table = report.write_table(rows, p.run_dir / rundir.RESULTS_FILE)
    if pareto:
        p.tracker.log_artifact(p.parent_run_id, report.write_table(pareto, p.run_dir / rundir.FINALISTS_FILE))
    p.tracker.log_artifact(p.parent_run_id, table)
    tags = {"pareto_trials": ",".join(str(r["trial"]) for r in pareto), "recommendation_rule": rule}
    if recommended is not None:
        tags["recommended_trial"] = recommended["trial"]
    n_complete = sum(r["state"] == "COMPLETE" for r in rows)
    p.tracker.log(p.parent_run_id, metrics={"n_complete": n_complete, "n_pareto": len(pareto)}, tags=tags)
    closest = records.closest_infeasible(rows)
    alternatives = front.alternatives(pareto, p.baseline, p.config.metric)
    rundir.write_summary(
        p.run_dir,
        {
            "study": p.config.name,
            "objectives": list(objectives),
            "metric": p.config.metric,
            "baseline": p.baseline,
            "constraints": p.config.limits(),
            "pareto": pareto,
            "recommended": recommended,
            "rule": rule,
            "alternatives": alternatives,
            "closest": closest,
        },
    )
    html = report.write_report(p.run_dir, p.study)  # draws the Pareto plot too
    plot = p.run_dir / rundir.PLOT_FILE
    for path in (plot, html):
        p.tracker.log_artifact(p.parent_run_id, path)
    version = package.register(p.run_dir, p.tracker, p.config.name)
    registered = f"{p.config.name}/{version}" if version is not None else None
    if registered:
        p.tracker.set_tag(p.parent_run_id, "registered_model", registered)
    return SearchResult(p, pareto, rows, table, plot, recommended, rule, closest, registered, alternatives)
