"""Search efficiency: samplers replayed against an exhaustively evaluated search space.

`build_table` evaluates every configuration of a small grid over LeNet-300-100's space with
the real pipeline (quick fine-tuning), and stores the measured figures as a JSON file that
ships with the repository. `replay` then runs each sampler against that table: a trial's
parameters are snapped to the nearest grid value and its figures are looked up, so a sampler
comparison over many seeds takes minutes instead of days.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import optuna

from objectives.registry import get_objective
from search import front
from search.anchors import enqueue_anchors
from search.config import Config, load_config, parse_config
from search.loop import run_trials
from search.prepare import prepare
from search.samplers import make_sampler, resolve_sampler
from strategies import pipeline
from strategies.registry import build_strategies

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
TABLE_PATH = HERE / "efficiency_lenet300.json"

# The grid: every valid combination is evaluated once. Distillation settings other than the
# epochs are fixed, so a fine-tuned point differs from an untuned one only in that choice.
GRID: dict[str, list[Any]] = {
    "pruning.structured_ratio": [0.0, 0.25, 0.5, 0.75],
    "pruning.unstructured_sparsity": [0.0, 0.5, 0.8, 0.9, 0.95],
    "quantization.weight_bits": [2, 3, 4, 8, 32],
    "quantization.activation_bits": [8, 32],
    "distillation.epochs": [0, 1],
    "distillation.temperature": [4.0],
    "distillation.alpha": [0.7],
    "distillation.lr": [3e-3],
}


def grid_configs(strategies: list | None = None) -> list[dict[str, Any]]:
    """Every distinct point of GRID as the strategies ask for it: each product of values is
    offered to their `suggest`, and a conditional parameter appears only where it was asked."""
    strategies = strategies or build_strategies(table_config(HERE).search_space)
    configs: list[dict[str, Any]] = []
    for values in itertools.product(*GRID.values()):
        trial = optuna.trial.FixedTrial(dict(zip(GRID, values, strict=False)))
        pipeline.suggest(strategies, trial)
        if trial.params not in configs:
            configs.append(trial.params)
    return configs


def table_config(experiments_dir: Path, experiment: str = "fmnist_mlp") -> Config:
    """An experiment (the MLP by default) over the grid's span, with quick fine-tuning and no anchors."""
    raw = load_config(experiments_dir / f"{experiment}.yaml").to_dict()
    raw["name"] = f"efficiency-{raw['workload']['model']}"
    choices = ("quantization.weight_bits", "quantization.activation_bits")
    raw["search_space"] = {
        key: values if key in choices else values[0] if len(values) == 1 else [min(values), max(values)]
        for key, values in GRID.items()
    }
    raw["search"].update(anchors=False, finetune_size=10000)
    raw["latency"].update(batch_sizes=[1], repeats=200)  # reference data: time it longer than a search
    return parse_config(raw)


def build_table(
    run_dir: Path,
    out: Path,
    experiments_dir: Path,
    experiment: str = "fmnist_mlp",
    progress: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Evaluate every grid point (resumable: the study lives in `run_dir`) and write the table."""
    config = table_config(experiments_dir, experiment)
    configs = grid_configs()
    with prepare(config, run_dir, progress=progress) as prepared, prepared.tracker.closing(prepared.parent_run_id):
        study = prepared.study
        if not study.trials:
            for params in configs:
                study.enqueue_trial(params)
        progress(f"evaluating {len(configs)} configurations")

        def on_trial(study, trial) -> None:
            progress(
                f"[{trial.number + 1}/{len(configs)}] {trial.state.name} {trial.user_attrs.get('fail_reason', '')}"
            )

        run_trials(prepared, len(configs), on_trial)
        rows = []
        for t in study.trials:
            row = {"params": t.params, "state": t.state.name}
            if t.state.name == "COMPLETE":
                row.update({k: t.user_attrs[k] for k in ("accuracy", "size_bytes", "latency_ms")})
            else:
                row["fail_reason"] = t.user_attrs.get("fail_reason", "")
            rows.append(row)
        b = prepared.baseline
        table = {
            "description": f"{config.workload.model} on Fashion-MNIST, every grid point evaluated once: 10k-sample "
            "fine-tune of at most 1 epoch, val accuracy, packed artifact bytes, ONNX Runtime batch-1 latency "
            "(median of 200 runs, 1 thread)",
            "grid": GRID,
            "baseline": {k: b[k] for k in ("accuracy", "size_bytes", "latency_ms")},
            "rows": rows,
        }
    out.write_text(json.dumps(table, indent=1, sort_keys=True))
    progress(f"wrote {out}: {sum(r['state'] == 'COMPLETE' for r in rows)} of {len(rows)} configurations complete")
    return table


# ---------------------------------------------------------------------- replay


class Table:
    """The shipped table: look a configuration up after snapping it to the grid.

    Hypervolumes are measured against the `reference` point: ``box`` is the search's own
    (front.reference_point: at most 10 points less accurate, smaller than the baseline, at most 1.5x
    its latency); ``nadir`` is the worst value of each objective over every evaluated
    configuration, so that every configuration adds to the volume.
    """

    def __init__(self, data: dict[str, Any], reference: str = "box") -> None:
        self.grid = data["grid"]
        self.baseline = data["baseline"]
        self.rows = data["rows"]
        self.index = {self.key(row["params"]): i for i, row in enumerate(self.rows)}
        self.complete = [i for i, row in enumerate(self.rows) if row["state"] == "COMPLETE"]
        self.complete_set = set(self.complete)
        points = np.stack([self.point(i) for i in self.complete])
        if reference not in ("box", "nadir"):
            raise ValueError(f"reference must be 'box' or 'nadir', got {reference!r}")
        self.reference = None if reference == "box" else points.max(axis=0)
        dominated = [bool(np.any(np.all(points <= p, axis=1) & np.any(points < p, axis=1))) for p in points]
        self.front = {i for i, d in zip(self.complete, dominated, strict=False) if not d}
        self.exhaustive_hv = self.hypervolume(self.complete)

    @classmethod
    def load(cls, path: Path, reference: str = "box") -> Table:
        return cls(json.loads(Path(path).read_text()), reference)

    def key(self, params: dict[str, Any]) -> tuple:
        snapped = []
        for name, value in sorted(params.items()):
            values = self.grid[name]
            snapped.append((name, min(values, key=lambda v: abs(v - value))))
        return tuple(snapped)

    def point(self, i: int) -> np.ndarray:
        return front.relative(self.rows[i], self.baseline, OBJECTIVES)

    def hypervolume(self, indices: Iterable[int]) -> float:
        rows = [self.rows[i] for i in set(indices) & self.complete_set]
        return front.hypervolume(rows, self.baseline, OBJECTIVES, self.reference)


OBJECTIVES = ("accuracy", "size_bytes", "latency_ms")


def replay(table: Table, sampler: str, seed: int, n_trials: int, anchors: bool = True) -> list[int]:
    """Run one study of `sampler` against the table; the table rows it evaluated, in order."""
    strategies = build_strategies(table_config(HERE).search_space)
    directions = [get_objective(name).direction for name in OBJECTIVES]
    study = optuna.create_study(directions=directions, sampler=make_sampler(sampler, seed, n_trials, strategies))
    if anchors:
        enqueue_anchors(study, strategies)
    visited = []
    for _ in range(n_trials):
        trial = study.ask()
        pipeline.suggest(strategies, trial)
        i = table.index[table.key(trial.params)]
        visited.append(i)
        row = table.rows[i]
        if row["state"] == "COMPLETE":
            study.tell(trial, [row[name] for name in OBJECTIVES])
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return visited


def _replay_job(job: tuple) -> tuple[tuple, list[int]]:
    import warnings

    import torch

    torch.set_num_threads(1)  # one process per core
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    table_path, sampler, seed, n_trials, anchors = job
    return job, replay(Table.load(table_path), sampler, seed, n_trials, anchors)


REFERENCES = ("nadir", "box")


def _sampler(name: str, n_trials: int) -> str:
    """The sampler an entry runs at a budget: ``auto`` resolves by it; ``random-plain`` is random."""
    return resolve_sampler(name.replace("-plain", ""), n_trials)


TARGET = {"budget": 50, "hv_ratio": 0.99, "p": 0.05}  # the default sampler's, against random search


def run_efficiency(
    table_path: Path,
    samplers: Sequence[str],
    seeds: int,
    budgets: Sequence[int],
    processes: int = 2,
    references: Sequence[str] = REFERENCES,
    progress: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Replay every sampler over `seeds` seeds; figures at each budget, against each reference point.

    Every sampler starts from the anchors, as a real search does; ``random-plain`` is random
    search without them, the usual baseline. A sampler does not know its budget, so one run
    of the largest budget gives every smaller budget as its prefix (``auto`` resolves per budget).
    """
    import multiprocessing

    tables = {ref: Table.load(table_path, ref) for ref in references}  # raises on an unknown reference
    table = next(iter(tables.values()))
    entries = [(s, s != "random-plain") for s in samplers]
    jobs = {}
    for name, anchors in entries:
        for n in budgets:
            for seed in range(seeds):
                key = (str(table_path), _sampler(name, n), seed, anchors)
                jobs[key] = max(jobs.get(key, 0), n)
    progress(
        f"replaying {len(jobs)} studies on {len(table.rows)} configurations ({len(table.front)} on the true front)"
    )
    # spawned, not forked: a fork of a process that already runs other threads (ONNX Runtime's,
    # MLflow's) can inherit a held lock and hang its worker
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        done = dict(
            ((path, sampler, seed, anchors), visited)
            for (path, sampler, seed, _, anchors), visited in pool.imap_unordered(
                _replay_job, [(*key[:3], n, key[3]) for key, n in jobs.items()]
            )
        )
    runs = {
        name: {
            n: [done[(str(table_path), _sampler(name, n), seed, anchors)][:n] for seed in range(seeds)] for n in budgets
        }
        for name, anchors in entries
    }
    return {
        "table": str(table_path.name),
        "configurations": len(table.rows),
        "true_front": len(table.front),
        "seeds": seeds,
        "references": {ref: _figures(t, runs, budgets) for ref, t in tables.items()},
    }


def _figures(table: Table, runs: dict[str, dict[int, list[list[int]]]], budgets: Sequence[int]) -> dict[str, Any]:
    """Each sampler's hypervolume ratios and Pareto shares against one table's reference point."""
    from scipy.stats import mannwhitneyu

    samplers: dict[str, Any] = {}
    for name, per_n in runs.items():
        samplers[name] = {}
        for n in budgets:
            ratios = [table.hypervolume(r) / table.exhaustive_hv for r in per_n[n]]
            shares = [len(set(r) & table.front) / len(table.front) for r in per_n[n]]
            samplers[name][str(n)] = {
                "sampler": _sampler(name, n),
                "hv_ratio": ratios,
                "pareto_share": shares,
                "hv_ratio_median": float(np.median(ratios)),
                "pareto_share_median": float(np.median(shares)),
            }
    default = samplers.get("auto", {})
    for n, figures in default.items():
        for other in ("random", "random-plain"):
            if other in samplers:
                test = mannwhitneyu(figures["hv_ratio"], samplers[other][n]["hv_ratio"], alternative="greater")
                figures[f"p_vs_{other}"] = float(test.pvalue)
    return {"exhaustive_hypervolume": table.exhaustive_hv, "samplers": samplers}


def target_met(results: dict[str, Any], reference: str) -> tuple[bool, str] | None:
    """Whether the default sampler meets TARGET against `reference`, and the figures that decide it."""
    figures = results["references"][reference]["samplers"].get("auto", {}).get(str(TARGET["budget"]))
    if figures is None or "p_vs_random-plain" not in figures:
        return None
    ratio, p = figures["hv_ratio_median"], figures["p_vs_random-plain"]
    met = ratio >= TARGET["hv_ratio"] and p < TARGET["p"]
    return met, f"median {ratio:.4f}, p = {p:.2g} against random search"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Hypervolume as a fraction of the exhaustive front's, and share of the {results['true_front']} true "
        f"Pareto points found; median over {results['seeds']} seeds ({results['configurations']} configurations, "
        f"{results['table']}). Reference point: nadir = the table's worst value of each objective; box = the "
        "search's own (at most 10 points less accurate, smaller than the baseline, at most 1.5x its latency).",
    ]
    for reference, per_ref in results["references"].items():
        samplers = per_ref["samplers"]
        budgets = list(next(iter(samplers.values())))
        lines += [
            "",
            f"Reference point: {reference}",
            "",
            "| sampler | " + " | ".join(f"N={n} HV | N={n} front" for n in budgets) + " |",
            "| --- |" + " --- | --- |" * len(budgets),
        ]
        for name, per_budget in samplers.items():
            cells = [
                f"{per_budget[n]['hv_ratio_median']:.4f} | {per_budget[n]['pareto_share_median']:.0%}" for n in budgets
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        for n, figures in samplers.get("auto", {}).items():
            tests = ", ".join(f"p = {v:.2g} against {k[5:]}" for k, v in figures.items() if k.startswith("p_vs_"))
            lines.append(f"- N={n}: auto runs {figures['sampler']}; one-sided Mann-Whitney: {tests}")
        verdict = target_met(results, reference)
        if verdict is not None:
            lines.append(
                f"- Target (auto >= {TARGET['hv_ratio']} of the exhaustive hypervolume at N={TARGET['budget']}, "
                f"p < {TARGET['p']} against random search): {'met' if verdict[0] else 'NOT met'} ({verdict[1]})"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # python -m experiments.efficiency [RUN_DIR [EXPERIMENT OUT]]: rebuild the shipped table
    # (~4 min), or build one for another experiment of experiments/ over the same grid.
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/efficiency-lenet300")
    experiment, out = (sys.argv[2], Path(sys.argv[3])) if len(sys.argv) > 3 else ("fmnist_mlp", TABLE_PATH)
    build_table(run_dir, out, TABLE_PATH.parent, experiment)
