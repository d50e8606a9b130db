"""Results as a CSV table, a Pareto plot and the text table the CLI prints."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

METRIC_COLUMNS = ("accuracy", "size_bytes", "latency_ms", "compression_ratio", "speedup", "accuracy_drop")
FINAL_COLUMNS = (
    "val_accuracy",
    "test_accuracy",
    "size_bytes",
    "compression_ratio",
    "final_latency_ms",
    "final_speedup",
    "final_latency_ms_b64",
    "final_speedup_b64",
)
HEADERS = {
    "val_accuracy": "val_acc",
    "test_accuracy": "test_acc",
    "size_bytes": "size",
    "compression_ratio": "ratio",
    "final_latency_ms": "latency",
    "final_speedup": "speedup",
    "final_latency_ms_b64": "latency_b64",
    "final_speedup_b64": "speedup_b64",
    "accuracy_drop": "acc_drop",
    "final_latency_p90_ms": "p90",
    "final_latency_spread": "spread",
    "final_latency_p90_ms_b64": "p90_b64",
    "final_latency_spread_b64": "spread_b64",
}


def param_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Namespaced parameter names (``pruning.structured_ratio``) present in any row."""
    return sorted({k for row in rows for k in row if "." in k and not k.startswith("mlflow")})


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


def write_plot(rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "COMPLETE"]
    front = [r for r in done if r["pareto"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "size_bytes", "artifact size (kB)"), (axes[1], "latency_ms", "latency (ms)")):
        scale = 1 / 1024 if key == "size_bytes" else 1.0

        def xs(group):
            return [r[key] * scale for r in group if key in r]

        def ys(group):
            return [r["accuracy"] for r in group if key in r]

        feasible = [r for r in done if r.get("feasible", True)]
        infeasible = [r for r in done if not r.get("feasible", True)]
        ax.scatter(xs(feasible), ys(feasible), s=18, c="0.6", label="trials")
        if infeasible:
            ax.scatter(xs(infeasible), ys(infeasible), s=18, facecolors="none", edgecolors="0.6",
                       label="outside the constraints")  # fmt: skip
        ax.scatter(xs(front), ys(front), s=36, c="tab:red", label="Pareto-optimal")
        if key in baseline:
            ax.scatter([baseline[key] * scale], [baseline["accuracy"]], marker="*", s=160, c="k", label="baseline")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("val accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key == "size_bytes":
        return f"{value / 1024:.1f} kB"
    if "latency_ms" in key or "p90_ms" in key:
        return f"{value:.3f} ms"
    if "spread" in key:
        return f"±{100 * value:.0f}%"
    if "speedup" in key or key == "compression_ratio":
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.4f}" if "accuracy" in key else f"{value:.3g}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRIC_COLUMNS) -> str:
    """A plain text table: trial, its parameters, then the measured figures."""
    params = param_columns(rows)
    shown = [m for m in metrics if any(m in r for r in rows)]
    headers = ["trial", *[p.split(".", 1)[1] for p in params], *[HEADERS.get(m, m) for m in shown]]
    keys = ["trial", *params, *shown]
    body = [[_fmt(k, row.get(k)) for k in keys] for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(lines)
