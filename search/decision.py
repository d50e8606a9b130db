"""The decision report: one self-contained HTML file that says which model to ship and why.

`summarize` writes ``summary.json`` when a search ends (baseline, finalists, recommendation).
`write_report` turns it and the study's trials into ``report.html``: the Pareto plots, the
finalists' table, the failures grouped by reason, the hypervolume history and the
recommendation with its rule. `register` puts the recommended model in MLflow's Model
Registry as ONNX plus a state dict (numpy's .npz, never a pickle).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import optuna
from optuna.trial import TrialState

from search import front
from search.report import FINAL_COLUMNS, HEADERS, _fmt, param_columns, write_plot

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
PLOT_FILE = "pareto.png"
STATE_DICT_FILE = "state_dict.npz"


def hypervolume_history(
    trials: Sequence[optuna.trial.FrozenTrial], baseline: Mapping[str, float], objectives: Sequence[str]
) -> list[tuple[int, float]]:
    """(finished trials, hypervolume of the feasible front so far), in order of completion."""
    from search.study import feasible_points

    done = sorted((t for t in trials if t.state.is_finished()), key=lambda t: (t.datetime_complete, t.number))
    return [(i + 1, front.hypervolume(feasible_points(done[: i + 1]), baseline, objectives)) for i in range(len(done))]


def failures_by_reason(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[str, list[tuple[int, str]]]:
    """Failed and stopped trials grouped by the kind of reason (the text before its first ':')."""
    from search.study import reason

    groups: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for t in trials:
        if t.state in (TrialState.FAIL, TrialState.PRUNED):
            why = reason(t.user_attrs) or "no reason recorded"
            groups[why.split(":", 1)[0]].append((t.number, why))
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


# ------------------------------------------------------------------------- html


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(HEADERS.get(k, k.split('.', 1)[-1]))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(k, r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _history_plot(history: list[tuple[int, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([n for n, _ in history], [hv for _, hv in history], drawstyle="steps-post")
    ax.set_xlabel("finished trials")
    ax.set_ylabel("hypervolume")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}.pick{background:#eef7ee;border:1px solid #9c9;padding:.6em 1em}img{max-width:100%}"""


def write_report(run_dir: Path, study: optuna.Study) -> Path:
    """Write ``report.html`` in `run_dir` from its summary and the study's trials."""
    from search.study import trial_rows

    summary = load_summary(run_dir)
    baseline, objectives = summary["baseline"], summary["objectives"]
    pareto, recommended = summary["pareto"], summary["recommended"]
    rows = trial_rows(study, baseline)
    history = hypervolume_history(study.trials, baseline, objectives)
    failures = failures_by_reason(study.trials)
    plot = _image(write_plot(rows, baseline, run_dir / PLOT_FILE))
    with tempfile.TemporaryDirectory() as tmp:
        curve = _image(_history_plot(history, Path(tmp) / "hypervolume.png")) if history else ""

    parts = [f"<h1>autocompress: {html.escape(summary['study'])}</h1>"]
    b = baseline
    parts.append(
        f"<p>Baseline: val accuracy {b['accuracy']:.4f}, "
        f"test accuracy {b.get('baseline_test_accuracy', float('nan')):.4f}, "
        f"{b['size_bytes'] / 1024:.1f} kB, {b['latency_ms']:.3f} ms. "
        f"{len([r for r in rows if r['state'] == 'COMPLETE'])} complete trials of {len(rows)}. "
        f"Constraints: {html.escape(json.dumps(summary['constraints']) if summary['constraints'] else 'none')}.</p>"
    )
    parts.append("<h2>Recommendation</h2>")
    if recommended is not None:
        params = {k: v for k, v in recommended.items() if "." in k and not k.startswith("mlflow")}
        parts.append(
            f'<div class="pick"><b>Ship trial {recommended["trial"]}</b>: {html.escape(summary["rule"])}.<br>'
            f"{_table([recommended], [k for k in FINAL_COLUMNS if k in recommended])}<br>"
            f"Configuration: <code>{html.escape(json.dumps(params, sort_keys=True))}</code></div>"
        )
    else:
        parts.append(f"<p>No recommendation: {html.escape(summary['rule'])}.</p>")
    parts.append("<h2>Pareto front</h2>")
    if pareto:
        keys = ["trial", *param_columns(pareto), "val_accuracy", "test_accuracy", "size_bytes", "compression_ratio"]
        keys += sorted(k for k in pareto[0] if k.startswith(("final_latency", "final_speedup")))
        parts.append(plot + _table(pareto, keys))
    elif summary["closest"]:
        parts.append("<p><b>No trial meets the constraints.</b> The closest candidates:</p>")
        keys = ["trial", *param_columns(summary["closest"]), "accuracy", "accuracy_drop", "size_bytes", "latency_ms"]
        parts.append(plot + _table(summary["closest"], [*keys, "violation"]))
    else:
        parts.append("<p>No trial completed, so there is no front.</p>")
    parts.append("<h2>Failures by reason</h2>")  # trials stopped early are listed here too
    if failures:
        items = "".join(
            f"<li><b>{html.escape(kind)}</b>: {len(group)} trial{'s' * (len(group) > 1)} "
            f"({', '.join(str(n) for n, _ in group)}). Example: {html.escape(group[0][1])}</li>"
            for kind, group in failures.items()
        )
        parts.append(f"<ul>{items}</ul>")
    else:
        parts.append("<p>No trial failed or stopped early.</p>")
    parts.append("<h2>Hypervolume</h2>")
    reference = ", ".join(f"{k} {v:g}" for k, v in front.REFERENCE.items() if k in objectives)
    parts.append(
        f"<p>Of the feasible front, in baseline units (accuracy drop, size and latency ratios), against the "
        f"reference point ({reference}).</p>{curve}"
    )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>autocompress {html.escape(summary["study"])}</title>'
    )
    page += f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    path = run_dir / REPORT_FILE
    path.write_text(page)
    return path


# ------------------------------------------------------------------------ files


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    path = run_dir / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=1, sort_keys=True, default=float))
    return path


def load_summary(run_dir: Path) -> dict[str, Any]:
    from search.config import ConfigError

    path = run_dir / SUMMARY_FILE
    if not path.exists():
        raise ConfigError(
            f"--run-dir {run_dir} has no {SUMMARY_FILE}: its search has not finished; rerun its "
            "`autocompress run` command to complete it"
        )
    return json.loads(path.read_text())


def register(run_dir: Path, tracker: Any, model_name: str) -> int | None:
    """Register the recommended trial's package (ONNX, packed weights, state dict) under
    `model_name`, with its figures as tags. Returns the model version, or None."""
    from search.export import export_trial, load_package

    summary = load_summary(run_dir)
    row = summary["recommended"]
    if row is None or not row.get("mlflow_run_id"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        package = export_trial(run_dir, int(row["trial"]), Path(tmp) / "model")
        state = {k: v.detach().cpu().numpy() for k, v in load_package(package).state_dict().items()}
        np.savez(package / STATE_DICT_FILE, **state)
        figures = {k: row[k] for k in ("val_accuracy", "test_accuracy", "size_bytes", "compression_ratio",
                                       "final_latency_ms", "final_speedup") if k in row}  # fmt: skip
        return tracker.register_model(model_name, row["mlflow_run_id"], package, {
            "trial": row["trial"], "rule": summary["rule"], **figures})  # fmt: skip
