"""Benchmark: single techniques against the joint search, next to Deep Compression.

For each model, four studies run on the same workload and budget:

- ``pruning``: structured + unstructured pruning, with a plain fine-tune (alpha 0, no teacher);
- ``quantization``: weight and activation bits, with a plain quantization-aware fine-tune;
- ``distillation``: a smaller student (structured width) trained against the teacher;
- ``joint``: the experiment's whole search space, widened to hold every single technique's
  (alpha from 0, the plain fine-tune). It starts from the single techniques' best finalists
  (the best ratio and speedups within the accuracy limit, re-evaluated as its first trials)
  and then runs its own `n_trials`: the joint front starts where the single ones ended.

Every figure comes from the Pareto finalists, rebuilt and scored once on the test split:
the best compression ratio and the best speedups within a 1.0-point test-accuracy drop.
Studies resume, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from search.anchors import off_params
from search.config import Config, load_config, parse_config
from search.loop import run_search
from search.prepare import prepare
from search.records import params_of

logger = logging.getLogger(__name__)

EXPERIMENTS = {"lenet300": "fmnist_mlp.yaml", "lenet5": "fmnist_cnn.yaml"}
# Deep Compression (Han et al., 2016), storage ratio at no accuracy loss, on MNIST.
DEEP_COMPRESSION = {"lenet300": 40.0, "lenet5": 39.0}
MAX_DROP = 0.01
# The benchmark may fine-tune longer than a default search: up to this many epochs.
FINETUNE_EPOCHS = 4

# Which parameters each single technique searches; fixed values are set alongside.
TECHNIQUES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "pruning": (
        ("pruning.", "distillation.epochs", "distillation.lr"),
        {"distillation.alpha": 0.0, "distillation.temperature": 1.0},
    ),
    "quantization": (
        ("quantization.", "distillation.epochs", "distillation.lr"),
        {"distillation.alpha": 0.0, "distillation.temperature": 1.0},
    ),
    "distillation": (("pruning.structured_ratio", "distillation."), {"distillation.epochs": [1, FINETUNE_EPOCHS]}),
    "joint": (("",), {}),
}


def technique_config(base: Config, model: str, technique: str) -> Config:
    prefixes, fixed = TECHNIQUES[technique]
    space = {k: v.to_yaml() for k, v in base.search_space.items() if k.startswith(prefixes)}
    if "distillation.epochs" in space:
        space["distillation.epochs"] = [0, FINETUNE_EPOCHS]
    space.update(fixed)
    if technique == "joint":  # the union of the single techniques' spaces
        for key, floor in (("distillation.alpha", 0.0), ("distillation.temperature", 1.0)):
            if isinstance(space.get(key), list):
                space[key] = [floor, space[key][1]]
    raw = base.to_dict()
    raw["name"] = f"bench-{model}-{technique}"
    raw["search_space"] = space
    return parse_config(raw)


def best_within(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The finalist with the largest `key` among those within MAX_DROP of the baseline on test."""
    ok = [r for r in rows if r.get("test_accuracy_drop", 1.0) <= MAX_DROP + 1e-12 and key in r]
    if not ok:
        return None
    row = max(ok, key=lambda r: r[key])
    return {
        "trial": row["trial"],
        key: row[key],
        "test_accuracy": row["test_accuracy"],
        "test_accuracy_drop": row["test_accuracy_drop"],
        "size_bytes": row.get("size_bytes"),
    }


def best_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finalists that are best within the accuracy limit on some reported axis."""
    picks = [best_within(rows, key) for key in ("compression_ratio", "final_speedup", "final_speedup_b64")]
    chosen = {p["trial"] for p in picks if p}
    return [r for r in rows if r["trial"] in chosen]


def seed_joint(study: Any, strategies: list, seeds: dict[tuple, str]) -> int:
    """Enqueue the single techniques' best parameters into a new joint study. Returns how many
    trials they take (also when resuming, so the joint study's own budget stays n_trials)."""
    seeded = [t for t in study.trials if "seeded_from" in t.user_attrs]
    if seeded or any(t.state.is_finished() and "anchor" not in t.user_attrs for t in study.trials):
        return len(seeded)
    off = off_params(strategies)
    for params, origin in seeds.items():
        # a technique the single study did not search is off in its seed
        study.enqueue_trial({**off, **dict(params)}, user_attrs={"seeded_from": origin})
    return len(seeds)


def run_bench(
    out: Path,
    models: list[str],
    n_trials: int,
    experiments_dir: Path,
    overrides: list[str] = (),
    progress: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    results: dict[str, Any] = {"max_test_accuracy_drop": MAX_DROP, "n_trials": n_trials, "models": {}}
    for model in models:
        base = load_config(experiments_dir / EXPERIMENTS[model], list(overrides))
        entry: dict[str, Any] = {"deep_compression_ratio": DEEP_COMPRESSION[model], "techniques": {}}
        seeds: dict[tuple, str] = {}  # the single techniques' best parameters → where they came from
        for technique in TECHNIQUES:
            config = technique_config(base, model, technique)
            progress(f"bench {model} / {technique}: {n_trials} trials")
            with prepare(config, out / config.name, progress=progress) as prepared:
                target = n_trials
                if technique == "joint":
                    target += seed_joint(prepared.study, prepared.strategies, seeds)
                result = run_search(prepared, target)
            for row in best_rows(result.pareto):
                params = tuple(sorted(params_of(row).items()))
                seeds.setdefault(params, f"{technique} trial {row['trial']}")
            b = prepared.baseline
            entry["baseline"] = {
                "size_bytes": b["size_bytes"],
                "test_accuracy": b["baseline_test_accuracy"],
                **{k: v for k, v in b.items() if k.startswith("latency_ms")},
            }
            entry["techniques"][technique] = {
                "best_ratio": best_within(result.pareto, "compression_ratio"),
                "best_speedup_b1": best_within(result.pareto, "final_speedup"),
                "best_speedup_b64": best_within(result.pareto, "final_speedup_b64"),
                "n_pareto": len(result.pareto),
            }
        joint = entry["techniques"]["joint"]
        entry["joint_at_least_as_good"] = {
            axis: all(
                (joint[axis] or {}).get(metric, 0) >= (entry["techniques"][t][axis] or {}).get(metric, 0)
                for t in TECHNIQUES
                if t != "joint"
            )
            for axis, metric in (
                ("best_ratio", "compression_ratio"),
                ("best_speedup_b1", "final_speedup"),
                ("best_speedup_b64", "final_speedup_b64"),
            )
        }
        results["models"][model] = entry
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "bench.md").write_text(markdown(results))
    return results


def _cell(best: dict[str, Any] | None, metric: str) -> str:
    if not best:
        return "none within 1 pt"
    return f"{best[metric]:.1f}x (trial {best['trial']}, test acc {-100 * best['test_accuracy_drop']:+.2f} pt)"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Best figures among Pareto finalists within a {100 * MAX_DROP:.1f}-point test-accuracy drop "
        f"({results['n_trials']} trials per study, Fashion-MNIST, ONNX Runtime, 1 thread).",
        "",
        "| model | technique | compression ratio | speedup batch 1 | speedup batch 64 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for model, entry in results["models"].items():
        b = entry["baseline"]
        lines.append(
            f"| {model} | baseline | {b['size_bytes'] / 1024:.1f} kB, test acc {b['test_accuracy']:.4f} | "
            f"{b.get('latency_ms', float('nan')):.3f} ms | {b.get('latency_ms_b64', float('nan')):.3f} ms |"
        )
        for technique, t in entry["techniques"].items():
            lines.append(
                f"| {model} | {technique} | {_cell(t['best_ratio'], 'compression_ratio')} | "
                f"{_cell(t['best_speedup_b1'], 'final_speedup')} | "
                f"{_cell(t['best_speedup_b64'], 'final_speedup_b64')} |"
            )
        lines.append(f"| {model} | Deep Compression (MNIST, published) | {entry['deep_compression_ratio']:.0f}x | | |")
    return "\n".join(lines) + "\n"
