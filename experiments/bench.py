"""Benchmark: single techniques against the joint search, next to Deep Compression.

For each model (LeNet-300-100 and LeNet-5 on Fashion-MNIST, MiniLM on Rotten Tomatoes), five
studies run on the same workload and budget:

- ``pruning``: structured + unstructured pruning (one-shot or gradual, global or per-layer),
  with a plain fine-tune (alpha 0, no teacher);
- ``quantization``: uniform weight and activation bits, with a plain quantization-aware fine-tune;
- ``weight sharing``: a k-means codebook of 2^b values per layer, centroids fine-tuned;
- ``distillation``: a smaller student trained against the teacher (structured width for the
  LeNets; heads, FFN neurons and depth for MiniLM);
- ``joint``: the experiment's whole search space and these options, widened to hold every
  single technique's (alpha from 0, the plain fine-tune). It starts from the single
  techniques' best finalists within 2 validation points and from their stacks (the pruning
  study's smallest model with the quantization or weight sharing study's widths; the fastest
  pruned model and the fastest student with the quantization study's fastest widths), evaluated
  as its first trials, then runs its own `n_trials`: its front starts where theirs ended.

Every figure comes from the Pareto finalists, rebuilt and scored once on the test split:
the best compression ratio and the best speedups (batch 1, and the largest timed batch) within
a 1.0-point test-accuracy drop. Three rows isolate the new parts on the joint study's own
trials: ``joint, finished`` (the finishing stage alone: the best finalists per axis within 2
validation points, fine-tuned again; not for MiniLM, whose epoch takes minutes),
``joint, bit-packed`` (entropy coding alone: the best-ratio trial written with bit-level
layouts only) and, for the LeNets, ONNX Runtime's ``quantize_static`` beside the int8 anchor
(`experiments.ort_reference`). Studies resume, so an interrupted benchmark continues.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from experiments import ort_reference
from search import rundir
from search.anchors import off_params
from search.config import Config, load_config, parse_config
from search.finalize import finished_figures
from search.loop import run_search
from search.package import finished_is_better
from search.prepare import Prepared, prepare
from search.progress import Progress
from search.records import params_of
from strategies.artifact import encode_model, load_artifact
from strategies.runtime import ARTIFACT_NAME

logger = logging.getLogger(__name__)

MAX_DROP = 0.01
FINISH_WITHIN = 0.02  # finish, and seed the joint study with, finalists this close on validation
FINISH_PER_AXIS = 2  # how many of them per axis the finishing stage lengthens
# The options the pruning study and the joint study also search where the space prunes
# unstructured weights (off in the default experiments).
OPTIONS = {"pruning.gradual": [False, True], "pruning.per_layer_sparsity": [False, True]}
PLAIN = {"distillation.alpha": 0.0, "distillation.temperature": 1.0}  # a fine-tune on the labels only


@dataclasses.dataclass(frozen=True)
class BenchModel:
    experiment: str  # in experiments/
    student: tuple[str, ...]  # what shapes a distillation student
    finetune_epochs: int  # the longest fine-tune a study searches (a default search: fewer)
    finish_epochs: int | None  # the finishing stage's fine-tune; None: no finishing row
    deep_compression_ratio: float | None  # Deep Compression (Han et al., 2016) at no loss, MNIST
    ort_reference: bool  # time ONNX Runtime's own quantize_static beside the int8 anchor


MODELS = {
    "lenet300": BenchModel("fmnist_mlp.yaml", ("pruning.structured_ratio",), 4, 12, 40.0, True),
    "lenet5": BenchModel("fmnist_cnn.yaml", ("pruning.structured_ratio",), 4, 12, 39.0, True),
    # A fine-tune epoch of MiniLM takes minutes here: the experiment's one epoch, no finishing.
    "minilm": BenchModel(
        "rt_minilm.yaml", ("pruning.head_ratio", "pruning.ffn_ratio", "pruning.layer_ratio"), 1, None, None, False
    ),
}

# Which parameters each single technique searches; fixed values are set alongside.
# ("student" stands for the model's BenchModel.student parameters.)
TECHNIQUES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "pruning": (("pruning.", "distillation.epochs", "distillation.lr"), PLAIN),
    "quantization": (
        ("quantization.weight_bits", "quantization.activation_bits", "distillation.epochs", "distillation.lr"),
        PLAIN,
    ),
    "weight sharing": (
        ("distillation.epochs", "distillation.lr"),
        {**PLAIN, "quantization.weight_bits": [2, 3, 4, 5, 6, 8], "quantization.scheme": "codebook"},
    ),
    "distillation": (("student", "distillation."), {}),
    "joint": (("",), {"quantization.scheme": ["uniform", "codebook"]}),
}


def axes(config: Config) -> dict[str, str]:
    """The reported axes → the finalist figure each is read from: the compression ratio, and
    the speedup at batch 1 and at the largest configured batch."""
    large = max(config.latency.batch_sizes)
    return {"best_ratio": "compression_ratio", "best_speedup_b1": "final_speedup"} | (
        {f"best_speedup_b{large}": f"final_speedup_b{large}"} if large > 1 else {}
    )


def technique_config(base: Config, model: str, technique: str) -> Config:
    spec = MODELS[model]
    prefixes, fixed = TECHNIQUES[technique]
    prefixes = tuple(q for p in prefixes for q in (spec.student if p == "student" else (p,)))
    space = {k: v.to_yaml() for k, v in base.search_space.items()}
    if "pruning.unstructured_sparsity" in space:
        space |= OPTIONS
    space = {k: v for k, v in space.items() if k.startswith(prefixes)}
    if "distillation.epochs" in space:
        space["distillation.epochs"] = [0, spec.finetune_epochs]
    space.update(fixed)
    if technique == "distillation":
        space["distillation.epochs"] = [1, spec.finetune_epochs] if spec.finetune_epochs > 1 else 1
    if technique == "joint":  # the union of the single techniques' spaces
        for key, floor in (("distillation.alpha", 0.0), ("distillation.temperature", 1.0)):
            if isinstance(space.get(key), list):
                space[key] = [floor, space[key][1]]
    raw = base.to_dict()
    raw["name"] = f"bench-{model}-{technique.replace(' ', '-')}"
    # the whole front, so the finishing stage can bring near misses within the limit on test
    raw["constraints"]["max_accuracy_drop"] = None
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


def best_rows(rows: list[dict[str, Any]], baseline_val: float, axes: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The finalists that are best on each reported axis among those within FINISH_WITHIN of the
    baseline on validation: what the joint study starts from. Test accuracy stays out of the search."""
    near = [r for r in rows if baseline_val - r["val_accuracy"] <= FINISH_WITHIN + 1e-12]
    return {axis: max(near, key=lambda r, k=key: r.get(k, 0)) for axis, key in axes.items() if near}


def summary(rows: list[dict[str, Any]], axes: dict[str, str]) -> dict[str, Any]:
    return {**{axis: best_within(rows, key) for axis, key in axes.items()}, "n_pareto": len(rows)}


def stacked(bests: dict[str, dict[str, dict[str, Any]]], fast: str) -> list[tuple[dict[str, Any], str]]:
    """The single techniques' best finalists stacked, as Deep Compression stacks its stages: the
    pruning study's smallest model with the quantization or weight sharing study's widths, and
    the fastest pruned model and the fastest student (on axis `fast`) with the quantization
    study's fastest widths."""

    def part(technique: str, axis: str, prefix: str) -> dict[str, Any] | None:
        row = bests.get(technique, {}).get(axis)
        if row is None:
            return None
        fixed = {k: v for k, v in TECHNIQUES[technique][1].items() if not isinstance(v, list)}
        return {k: v for k, v in {**params_of(row), **fixed}.items() if k.startswith(prefix)}

    stacks = []
    for base, widths, axis in (
        (("pruning", "best_ratio"), ("quantization", "best_ratio"), "best_ratio"),
        (("pruning", "best_ratio"), ("weight sharing", "best_ratio"), "best_ratio"),
        (("pruning", fast), ("quantization", fast), fast),
        (("distillation", fast), ("quantization", fast), fast),
    ):
        first, second = part(*base, ""), part(widths[0], axis, "quantization.")
        if first is not None and second is not None:
            stacks.append(({**first, **second}, f"{base[0]} {base[1]} + {widths[0]} {axis}"))
    return stacks


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


def finished_rows(
    p: Prepared, rows: list[dict[str, Any]], baseline_test: float, axes: dict[str, str], epochs: int
) -> list[dict[str, Any]]:
    """The finishing stage alone: the FINISH_PER_AXIS best finalists per axis within FINISH_WITHIN
    validation points fine-tuned again for `epochs`; each takes its finished figures where validation says so."""
    near = [r for r in rows if p.baseline["accuracy"] - r["val_accuracy"] <= FINISH_WITHIN + 1e-12]
    chosen = {
        r["trial"] for key in axes.values() for r in sorted(near, key=lambda r, k=key: -r.get(k, 0))[:FINISH_PER_AXIS]
    }
    search = dataclasses.replace(p.config.search, finish_epochs=epochs)
    p = dataclasses.replace(p, config=dataclasses.replace(p.config, search=search), lock=None)
    out = []
    for row in rows:
        row = dict(row)
        if row["trial"] in chosen:
            row.update(finished_figures(p, row, baseline_test))
            logger.info(
                "bench: trial %d finished: %s",
                row["trial"],
                row.get("finished_test_accuracy", row.get("finish_reason")),
            )
        if finished_is_better(row):
            row.update({k.removeprefix("finished_"): v for k, v in row.items() if k.startswith("finished_")})
            row["finished"] = True
        out.append(row)
    return out


def bit_packed(p: Prepared, best: dict[str, Any] | None) -> dict[str, Any] | None:
    """Entropy coding alone: the best-ratio trial's model written with bit-level layouts only."""
    if best is None:
        return None
    model = load_artifact(rundir.trial_dir(p.run_dir, best["trial"]) / ARTIFACT_NAME, p.workload.factory)
    size = len(encode_model(model, entropy_coded=False))
    return {**best, "size_bytes": size, "compression_ratio": p.baseline["size_bytes"] / size, "coded": best}


def _study(out: Path, model: str, config: Config, technique: str, n_trials: int, seeds: dict[tuple, str]) -> dict:
    """One technique's study: its best figures, and its best finalists' rows."""
    spec, axis = MODELS[model], axes(config)
    logger.info("bench %s: %d trials", config.name, n_trials)
    with prepare(config, out / config.name, progress=logger.info) as prepared:
        target = n_trials + (seed_joint(prepared.study, prepared.strategies, seeds) if technique == "joint" else 0)
        with Progress(prepared, target).showing() as shown:
            pareto = run_search(prepared, target, on_trial=shown).pareto
        b = prepared.baseline
        found = {
            "baseline": {
                "size_bytes": b["size_bytes"],
                "test_accuracy": b["baseline_test_accuracy"],
                **{k: v for k, v in b.items() if k.startswith("latency_ms")},
            },
            "rows": {technique: summary(pareto, axis)},
            "bests": best_rows(pareto, b["accuracy"], axis),
        }
        if technique == "quantization" and spec.ort_reference:
            found["ort_reference"] = ort_reference.compare(prepared, out / f"{config.name}-ort-reference")
        if technique == "joint":
            if spec.finish_epochs:
                finished = finished_rows(prepared, pareto, b["baseline_test_accuracy"], axis, spec.finish_epochs)
                found["rows"]["joint, finished"] = summary(finished, axis)
            found["rows"]["joint, bit-packed"] = {
                "best_ratio": bit_packed(prepared, found["rows"]["joint"]["best_ratio"])
            }
    return found


def run_bench(
    out: Path, models: list[str], n_trials: int, experiments_dir: Path, overrides: list[str] = ()
) -> dict[str, Any]:
    results: dict[str, Any] = {"max_test_accuracy_drop": MAX_DROP, "n_trials": n_trials, "models": {}}
    for model in models:
        spec = MODELS[model]
        base = load_config(experiments_dir / spec.experiment, list(overrides))
        entry: dict[str, Any] = {"techniques": {}, "axes": axes(base)}
        if spec.deep_compression_ratio:
            entry["deep_compression_ratio"] = spec.deep_compression_ratio
        seeds: dict[tuple, str] = {}  # parameters the joint study starts from → where they came from
        bests: dict[str, dict[str, dict[str, Any]]] = {}
        for technique in TECHNIQUES:
            if technique == "joint":
                for params, origin in stacked(bests, list(entry["axes"])[-1]):
                    seeds.setdefault(tuple(sorted(params.items())), origin)
            found = _study(out, model, technique_config(base, model, technique), technique, n_trials, seeds)
            bests[technique] = found["bests"]
            for axis, row in found["bests"].items():
                seeds.setdefault(tuple(sorted(params_of(row).items())), f"{technique} trial {row['trial']} ({axis})")
            entry["baseline"] = found["baseline"]
            entry["techniques"].update(found["rows"])
            if "ort_reference" in found:
                entry["ort_reference"] = found["ort_reference"]
        entry["joint_at_least_as_good"] = {
            axis: all(
                (entry["techniques"]["joint"][axis] or {}).get(metric, 0) >= (t[axis] or {}).get(metric, 0)
                for name, t in entry["techniques"].items()
                if name in TECHNIQUES and name != "joint"
            )
            for axis, metric in entry["axes"].items()
        }
        results["models"][model] = entry
        _write(out, results)
    return results


def _write(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "bench.md").write_text(markdown(results))


def _cell(best: dict[str, Any] | None, metric: str) -> str:
    if not best:
        return "none within 1 pt"
    return f"{best[metric]:.1f}x (trial {best['trial']}, test acc {-100 * best['test_accuracy_drop']:+.2f} pt)"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Best figures among Pareto finalists within a {100 * MAX_DROP:.1f}-point test-accuracy drop "
        f"({results['n_trials']} trials per study, ONNX Runtime, 1 thread): the LeNets on Fashion-MNIST, "
        "MiniLM on Rotten Tomatoes. Compression ratios are against the baseline's own packed file; "
        "the last column is the speedup at each model's largest timed batch.",
        "",
        "| model | technique | compression ratio | speedup batch 1 | speedup large batch |",
        "| --- | --- | --- | --- | --- |",
    ]
    for model, entry in results["models"].items():
        b, axis = entry["baseline"], entry["axes"]
        large = list(axis)[-1].removeprefix("best_speedup_b")
        lines.append(
            f"| {model} | baseline | {b['size_bytes'] / 1024:.1f} kB, test acc {b['test_accuracy']:.4f} | "
            f"{b.get('latency_ms', float('nan')):.3f} ms | "
            f"{b.get(f'latency_ms_b{large}', float('nan')):.3f} ms (batch {large}) |"
        )
        for technique, t in entry["techniques"].items():
            cells = [_cell(t.get(a), metric) if a in t else "" for a, metric in axis.items()]
            lines.append(f"| {model} | {technique} | {' | '.join(cells)} |")
        if "deep_compression_ratio" in entry:
            lines.append(
                f"| {model} | Deep Compression (MNIST, published) | {entry['deep_compression_ratio']:.0f}x | | |"
            )
        if "ort_reference" in entry:
            for name, row in entry["ort_reference"]["rows"].items():
                speeds = [f"{row[k]:.2f}x" for k in sorted((k for k in row if k.startswith("speedup_b")), key=len)]
                name = f"{name} (ORT reference, test acc {row['test_accuracy']:.4f})"
                lines.append(f"| {model} | {name} | | {' | '.join(speeds)} |")
    return "\n".join(lines) + "\n"
