"""Which figures each table shows, their short headings and how each is written.

`m` is the study's task metric (accuracy, macro_f1, ...): its figures are named after it
(``val_macro_f1``, ``macro_f1_drop``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from objectives.registry import task_metrics


def metric_columns(m: str = "accuracy") -> tuple[str, ...]:
    return (m, "size_bytes", "latency_ms", "compression_ratio", "speedup", f"{m}_drop")


def final_columns(m: str = "accuracy", rows: Sequence[Mapping[str, Any]] = ()) -> tuple[str, ...]:
    """A finalist's figures: the task metric, size, and latency at each batch size `rows` hold."""
    others = sorted({k.rsplit("_b", 1)[1] for r in rows for k in r if k.startswith("final_latency_ms_b")}, key=int)
    latency = ["final_latency_ms", "final_speedup"] + [
        f"final_{k}_b{b}" for b in others for k in ("latency_ms", "speedup")
    ]
    return (f"val_{m}", f"test_{m}", "size_bytes", "compression_ratio", "onnx_bytes", *latency)


def finish_columns(m: str = "accuracy") -> tuple[str, ...]:
    figures = (f"val_{m}", f"finished_val_{m}", f"test_{m}", f"finished_test_{m}")
    return ("finished_epochs", *figures, "size_bytes", "finished_size_bytes")


HEADERS = {
    "size_bytes": "size",
    "onnx_bytes": "onnx",
    "compression_ratio": "ratio",
    "final_latency_ms": "latency",
    "final_speedup": "speedup",
    "final_latency_p90_ms": "p90",
    "final_latency_spread": "spread",
    "finished_epochs": "epochs",
    "finished_size_bytes": "finished size",
    **{f"size_{part}_bytes": part for part in ("codes", "indices", "scales", "raw", "header")},
}


def header(key: str) -> str:
    """A column's short heading: ``val_accuracy`` → ``val_acc``, ``finished_val_accuracy`` → ``finished val_acc``."""
    if key in HEADERS:
        return HEADERS[key]
    base, _, batch = key.rpartition("_b")
    if batch.isdigit() and base in HEADERS:  # final_latency_ms_b64 → latency_b64
        return f"{HEADERS[base]}_b{batch}"
    short = key.replace("accuracy", "acc")
    return short.replace("finished_", "finished ", 1) if short.startswith("finished_") else short


def is_task_figure(key: str) -> bool:
    return any(m in key for m in task_metrics())


def fmt(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key.endswith("_bytes"):
        return f"{value / 1024:.1f} kB"
    if "latency_ms" in key or "p90_ms" in key:
        return f"{value:.3f} ms"
    if "spread" in key:
        return f"±{100 * value:.0f}%"
    if "speedup" in key or key == "compression_ratio":
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.4f}" if is_task_figure(key) else f"{value:.3g}"
    return str(value)
