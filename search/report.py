"""What a finished search shows a person: the CSV tables, the text table the CLI prints,
the Pareto plots, and the decision report, one self-contained HTML file that says which
model to ship and why (the Pareto plots, the finalists' table, the failures grouped by
reason, the hypervolume history and the recommendation with its rule).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import tempfile
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from search import front, rundir
from search.columns import HEADERS, final_columns, finish_columns, fmt, header, metric_columns
from search.plots import history_plot, write_plot
from search.records import feasible_points, params_of, reason, trial_rows


def param_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Namespaced parameter names (``pruning.structured_ratio``) present in any row."""
    return sorted({k for row in rows for k in params_of(row)})


def write_table(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    columns = ["trial", "state", "pareto", *param_columns(rows)]
    rest = {k for row in rows for k in row} - set(columns) - {"fail_reason", "mlflow_run_id"}
    columns += sorted(rest) + ["fail_reason", "mlflow_run_id"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})
    return path


def format_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = metric_columns(), width: int = 120) -> str:
    """A plain text table: trial, its parameters, then the measured figures. Wider than `width`
    characters, it is cut into blocks of whole columns that fit, each led by the trial number
    (the CSV holds every column in one table)."""
    params = param_columns(rows)
    shown = [m for m in metrics if any(m in r for r in rows)]
    headers = ["trial", *[p.split(".", 1)[1] for p in params], *[header(m) for m in shown]]
    keys = ["trial", *params, *shown]
    body = [[fmt(k, row.get(k)) for k in keys] for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(headers)]
    blocks, block = [], [0]
    for i in range(1, len(keys)):
        if sum(widths[j] + 2 for j in block) + widths[i] > width and len(block) > 1:
            blocks.append(block)
            block = [0]
        block.append(i)
    blocks.append(block)
    lines = []
    for block in blocks:
        lines += [""] if lines else []
        lines.append("  ".join(headers[i].rjust(widths[i]) for i in block))
        lines += ["  ".join(line[i].rjust(widths[i]) for i in block) for line in body]
    return "\n".join(lines)


# ---------------------------------------------------------------- the terminal


def result_text(config: Any, result: Any) -> str:
    """What `autocompress run` prints when a search ends: the baseline, the counts, the
    finalists' table and the recommendation."""
    lines: list[str] = []
    add = lines.append
    baseline = result.prepared.baseline
    m = config.metric
    lat = config.latency
    batches = "/".join(str(b) for b in lat.batch_sizes)
    add("")
    add(
        f"baseline: val {m} {baseline[m]:.4f}  test {m} "
        f"{baseline.get(f'baseline_test_{m}', float('nan')):.4f}  size {baseline['size_bytes'] / 1024:.1f} kB  "
        f"latency {baseline['latency_ms']:.3f} ms ({lat.runtime}, batch {batches}, "
        f"{lat.threads} thread{'s' if lat.threads > 1 else ''})"
    )
    states = [r["state"] for r in result.rows]
    add(
        f"study {config.name!r}: {states.count('COMPLETE')} complete, {states.count('FAIL')} failed, "
        f"{states.count('PRUNED')} stopped early, {len(result.pareto)} Pareto-optimal"
    )
    add("")
    if result.pareto:
        add(f"Pareto-optimal trials, rebuilt from their artifacts and timed again ({lat.final_repeats} runs):")
        add(format_table(result.pareto, final_columns(m, result.pareto)))
    elif result.closest:
        add(f"no trial meets the constraints {config.limits()}; the closest ones:")
        add(format_table(result.closest, (m, f"{m}_drop", "size_bytes", "latency_ms", "violation")))
    else:
        add("no completed trials, so no Pareto front")
    add("")
    if result.recommended is not None:
        row = result.recommended
        add(f"recommended: trial {row['trial']}, {result.rule}")
        add(_indented(_describe(row, m, baseline)))
        if finishing := _finishing(row, m):
            add(_indented(finishing))
        for label, other in result.alternatives.items():
            if other["trial"] != row["trial"]:
                add(_indented(f"or, {label}: trial {other['trial']}, {_describe(other, m, baseline)}"))
        run_dir = result.prepared.run_dir
        add(
            _indented(f"get it: autocompress export --run-dir {run_dir} --trial {row['trial']} --out {run_dir}/package")
        )
        if result.registered_model:
            add(f"  or from the MLflow Model Registry: models:/{result.registered_model}")
        add("")
    return "\n".join(lines)


def _finishing(row: Mapping[str, Any], m: str) -> str:
    """What the finishing stage did to a finalist, in one line ("" when it did not run)."""
    if "finish_reason" in row:
        return f"not finished: {row['finish_reason']}"
    if f"finished_val_{m}" not in row:
        return ""
    shipped = "the finished model" if row[f"finished_val_{m}"] >= row[f"val_{m}"] else "its own model"
    return (
        f"finished with a {row['finished_epochs']}-epoch fine-tune: val {m} {row[f'val_{m}']:.4f} -> "
        f"{row[f'finished_val_{m}']:.4f}, test {row[f'test_{m}']:.4f} -> {row[f'finished_test_{m}']:.4f}, "
        f"{row['finished_size_bytes'] / 1024:.1f} kB; the package holds {shipped} (chosen on val)"
    )


def _describe(row: Mapping[str, Any], m: str, baseline: Mapping[str, float] | None = None) -> str:
    """A finalist in one line: its figures (with what it costs against the baseline in points
    of the task metric, on val and test), then its parameters."""

    def cost(value: float, base: float | None) -> str:
        return "" if base is None else f" ({100 * (value - base):+.2f} pt)"

    baseline = baseline or {}
    figures = [f"val {m} {row[m]:.4f}{cost(row[m], baseline.get(m))}"]
    if f"test_{m}" in row:
        figures.append(f"test {row[f'test_{m}']:.4f}{cost(row[f'test_{m}'], baseline.get(f'baseline_test_{m}'))}")
    if "size_bytes" in row:
        figures.append(f"{row['size_bytes'] / 1024:.1f} kB ({row['compression_ratio']:.1f}x smaller)")
    if "final_latency_ms" in row:
        figures.append(f"{row['final_latency_ms']:.3f} ms ({row['final_speedup']:.2f}x)")
    params = ", ".join(
        f"{k.split('.', 1)[1]}={v if isinstance(v, (bool, str)) else format(v, '.3g')}"
        for k, v in params_of(row).items()
        if isinstance(v, (int, float, str))
    )
    return f"{'; '.join(figures)}\n[{params}]"


def _indented(text: str, indent: str = "  ", width: int = 120) -> str:
    """`text` wrapped to `width` columns, every line indented."""
    return "\n".join(
        textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent + "  ") for line in text.splitlines()
    )


# ------------------------------------------------------------------ the report


def hypervolume_history(
    trials: Sequence[optuna.trial.FrozenTrial], baseline: Mapping[str, float], objectives: Sequence[str]
) -> list[tuple[int, float]]:
    """(finished trials, hypervolume of the feasible front so far), in order of completion."""
    done = sorted((t for t in trials if t.state.is_finished()), key=lambda t: (t.datetime_complete, t.number))
    return [(i + 1, front.hypervolume(feasible_points(done[: i + 1]), baseline, objectives)) for i in range(len(done))]


def failures_by_reason(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[str, list[tuple[int, str]]]:
    """Failed and stopped trials grouped by the kind of reason (the text before its first ':')."""
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
    head = "".join(f"<th>{html.escape(k.split('.', 1)[1] if '.' in k else header(k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(k, r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222}
table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}.pick{background:#eef7ee;border:1px solid #9c9;padding:.6em 1em}img{max-width:100%}"""


def _recommendation_html(summary: Mapping[str, Any], run_dir: Path) -> str:
    """The pick with its cost against the baseline, the usual alternatives, and how to get it."""
    row, m, baseline = summary["recommended"], _metric(summary), summary["baseline"]
    if row is None:
        return f"<p>No recommendation: {html.escape(summary['rule'])}.</p>"
    others = [(label, r) for label, r in summary.get("alternatives", {}).items() if r["trial"] != row["trial"]]
    items = "".join(
        f"<li>{html.escape(label)}: trial {r['trial']}, {html.escape(_describe(r, m, baseline))}</li>"
        for label, r in others
    )
    command = f"autocompress export --run-dir {run_dir} --trial {row['trial']} --out {run_dir}/package"
    return (
        f'<div class="pick"><b>Ship trial {row["trial"]}</b>: {html.escape(summary["rule"])}.<br>'
        f"{html.escape(_describe(row, m, baseline))}<br>"
        f"{_table([row], [k for k in final_columns(m, [row]) if k in row])}<br>"
        + (f"Alternatives:<ul>{items}</ul>" if items else "")
        + f"Get it: <code>{html.escape(command)}</code></div>"
    )


def _metric(summary: Mapping[str, Any]) -> str:
    return summary.get("metric", "accuracy")  # summaries written before task metrics had a name


def _front_html(summary: Mapping[str, Any], plot: str) -> str:
    pareto, closest, m = summary["pareto"], summary["closest"], _metric(summary)
    if pareto:
        keys = ["trial", *param_columns(pareto), f"val_{m}", f"test_{m}", "size_bytes", "compression_ratio"]
        keys += sorted(k for k in pareto[0] if k.startswith(("final_latency", "final_speedup")))
        parts = [k for k in HEADERS if k.startswith("size_") and k in pareto[0]]
        where = "<p>Where the bytes of each packed file go:</p>" + _table(pareto, ["trial", "size_bytes", *parts])
        note = codebook_note(pareto)
        return plot + _table(pareto, keys) + (where if parts else "") + (f"<p>{html.escape(note)}</p>" if note else "")
    if closest:
        keys = ["trial", *param_columns(closest), m, f"{m}_drop", "size_bytes", "latency_ms"]
        return (
            "<p><b>No trial meets the constraints.</b> The closest candidates:</p>"
            + plot
            + _table(closest, [*keys, "violation"])
        )
    return "<p>No trial completed, so there is no front.</p>"


def codebook_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """What a weight-sharing finalist deploys as ("" when there is none)."""
    shared = [str(r["trial"]) for r in rows if r.get("quantization.scheme") == "codebook"]
    if not shared:
        return ""
    return (
        f"{'Trials' if len(shared) > 1 else 'Trial'} {', '.join(shared)} {'share' if len(shared) > 1 else 'shares'} "
        "weights (quantization.scheme codebook): "
        "the packed file stores each weight's index into its layer's codebook, but ONNX Runtime has no kernel "
        "for codebook weights, so model.onnx holds the shared values as float weights and runs as a float model."
    )


def _finishing_html(summary: Mapping[str, Any]) -> str:
    m = _metric(summary)
    rows = [r for r in summary["pareto"] if f"finished_val_{m}" in r or "finish_reason" in r]
    if not rows:
        return ""
    notes = "".join(f"<li>trial {r['trial']}: {html.escape(_finishing(r, m))}</li>" for r in rows)
    return "<h2>Finishing stage</h2>" + _table(rows, ["trial", *finish_columns(m)]) + f"<ul>{notes}</ul>"


def _failures_html(failures: Mapping[str, list[tuple[int, str]]]) -> str:
    """Trials that failed or stopped early, grouped by the kind of reason."""
    if not failures:
        return "<p>No trial failed or stopped early.</p>"
    items = "".join(
        f"<li><b>{html.escape(kind)}</b>: {len(group)} trial{'s' * (len(group) > 1)} "
        f"({', '.join(str(n) for n, _ in group)}). Example: {html.escape(group[0][1])}</li>"
        for kind, group in failures.items()
    )
    return f"<ul>{items}</ul>"


def write_report(run_dir: Path, study: optuna.Study) -> Path:
    """Write ``report.html`` in `run_dir` from its summary and the study's trials."""
    summary = rundir.read_summary(run_dir)
    baseline, objectives, m = summary["baseline"], summary["objectives"], _metric(summary)
    rows = trial_rows(study, baseline)
    history = hypervolume_history(study.trials, baseline, objectives)
    pick = summary["recommended"]["trial"] if summary["recommended"] else None
    plot = _image(write_plot(rows, baseline, run_dir / rundir.PLOT_FILE, m, pick))
    with tempfile.TemporaryDirectory() as tmp:
        curve = _image(history_plot(history, Path(tmp) / "hypervolume.png")) if history else ""
    b = baseline
    constraints = json.dumps(summary["constraints"]) if summary["constraints"] else "none"
    reference = ", ".join(f"{k} {v:g}" for k, v in front.reference_point(objectives).items())
    title = html.escape(summary["study"])
    parts = [
        f"<h1>autocompress: {title}</h1>",
        f"<p>Baseline: val {m} {b[m]:.4f}, "
        f"test {m} {b.get(f'baseline_test_{m}', float('nan')):.4f}, "
        f"{b['size_bytes'] / 1024:.1f} kB, {b['latency_ms']:.3f} ms. "
        f"{len([r for r in rows if r['state'] == 'COMPLETE'])} complete trials of {len(rows)}. "
        f"Constraints: {html.escape(constraints)}.</p>",
        "<h2>Recommendation</h2>",
        _recommendation_html(summary, run_dir),
        "<h2>Pareto front</h2>",
        _front_html(summary, plot),
        _finishing_html(summary),
        "<h2>Failures by reason</h2>",
        _failures_html(failures_by_reason(study.trials)),
        "<h2>Hypervolume</h2>",
        f"<p>Of the feasible front, in baseline units ({m} drop, size and latency ratios), against the "
        f"reference point ({reference}).</p>{curve}",
    ]
    page = f'<!doctype html><html><head><meta charset="utf-8"><title>autocompress {title}</title>'
    page += f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    path = run_dir / rundir.REPORT_FILE
    path.write_text(page)
    return path
