"""The finalists: every Pareto trial rebuilt from its packed file, timed again alone and
longer, scored once on the untouched test split; then the tables, summary, report and registry.

Pareto membership was decided on the search objectives only; nothing here feeds back into the
search.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from objectives.accuracy import top1_accuracy
from search import front, package, records, report, rundir
from search.prepare import Prepared, deploy
from strategies.artifact import load_artifact
from strategies.runtime import ARTIFACT_NAME

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


def _final_figures(p: Prepared, row: dict[str, Any], baseline_test: float) -> dict[str, float]:
    """One finalist rebuilt from its artifact: val and test accuracy, and its noisy figures again."""
    trial_dir = rundir.trial_dir(p.run_dir, row["trial"])
    model = load_artifact(trial_dir / ARTIFACT_NAME, p.workload.factory)
    deployable = deploy(p.config, p.workload, model, trial_dir / "final")
    test = p.workload.test
    figures = {
        "val_accuracy": top1_accuracy(deployable.predict, p.workload.val.x, p.workload.val.y),
        "test_accuracy": top1_accuracy(deployable.predict, test.x, test.y),
    }
    figures["test_accuracy_drop"] = baseline_test - figures["test_accuracy"]
    latency = dataclasses.replace(p.eval_context.latency, repeats=p.config.latency.final_repeats)
    context = dataclasses.replace(p.eval_context, latency=latency)
    for objective in p.reported:
        if objective.final_repeat:
            figures.update({f"final_{k}": v for k, v in objective.measure(deployable, context).items()})
    if figures["val_accuracy"] != row.get("accuracy", figures["val_accuracy"]):
        logger.warning(
            "trial %d rebuilt from its artifact scores %.4f on val, not %.4f",
            row["trial"],
            figures["val_accuracy"],
            row["accuracy"],
        )
    return figures


def finalize(p: Prepared, pareto: list[dict[str, Any]]) -> dict[str, float]:
    """Re-measure every Pareto row (updated in place); returns the baseline's test figures."""
    test = p.workload.test
    baseline = {"baseline_test_accuracy": top1_accuracy(p.baseline_deployable.predict, test.x, test.y)}
    for row in pareto:
        figures = _final_figures(p, row, baseline["baseline_test_accuracy"])
        row.update(figures)
        if row.get("mlflow_run_id"):
            p.tracker.log(row["mlflow_run_id"], metrics=figures)
        logger.info(
            "finalist trial %d: val %.4f, test %.4f, %.3f ms (%.2fx)",
            row["trial"],
            figures["val_accuracy"],
            figures["test_accuracy"],
            figures.get("final_latency_ms", float("nan")),
            figures.get("final_speedup", float("nan")),
        )
    return baseline


def _tag_front(p: Prepared, pareto: list[dict[str, Any]]) -> None:
    on_front = {r["trial"] for r in pareto}
    for t in p.study.trials:
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id and t.state == TrialState.COMPLETE:
            p.tracker.set_tag(run_id, "pareto", str(t.number in on_front).lower())


def summarize(p: Prepared) -> SearchResult:
    """Finalists, tables, recommendation, summary, report and registry, once the trials are done."""
    rows = records.trial_rows(p.study, p.baseline)
    pareto = [r for r in rows if r["pareto"]]
    if pareto:
        final_baseline = finalize(p, pareto)
        p.baseline.update(final_baseline)
        p.tracker.log(p.parent_run_id, metrics=final_baseline)
    _tag_front(p, pareto)
    table = report.write_table(rows, p.run_dir / rundir.RESULTS_FILE)
    if pareto:
        p.tracker.log_artifact(p.parent_run_id, report.write_table(pareto, p.run_dir / rundir.FINALISTS_FILE))
    p.tracker.log_artifact(p.parent_run_id, table)
    objectives = p.config.search.objectives
    recommended, rule = front.recommend(pareto, p.baseline, objectives, p.config.constraints.max_accuracy_drop)
    tags = {"pareto_trials": ",".join(str(r["trial"]) for r in pareto), "recommendation_rule": rule}
    if recommended is not None:
        tags["recommended_trial"] = recommended["trial"]
    n_complete = sum(r["state"] == "COMPLETE" for r in rows)
    p.tracker.log(p.parent_run_id, metrics={"n_complete": n_complete, "n_pareto": len(pareto)}, tags=tags)
    closest = records.closest_infeasible(rows)
    rundir.write_summary(
        p.run_dir,
        {
            "study": p.config.name,
            "objectives": list(objectives),
            "baseline": p.baseline,
            "constraints": p.config.constraints.limits(),
            "pareto": pareto,
            "recommended": recommended,
            "rule": rule,
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
    return SearchResult(p, pareto, rows, table, plot, recommended, rule, closest, registered)
