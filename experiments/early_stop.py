"""Cheap-then-full evaluation, measured: hypervolume per CPU-hour with and without it.

    python -m experiments.early_stop [--model lenet300] [--seeds 3] [--n-trials 30] [--out runs/early-stop]

For each seed, a study with `search.early_stop` off searches the benchmark's joint space
(fine-tunes of up to 4 epochs, where stopping after the first has most to save), started from
the anchors. A second study with it on then evaluates the same candidates in the same order:
two sampler-driven studies would part ways after a few trials on latency noise alone, and
their difference would measure that, not the check. Reported per study: the hypervolume of
the feasible front (in baseline units, as the MLflow `hypervolume` metric), the CPU time of
its trials (process time, one torch thread, so it counts work rather than waiting on a shared
machine), their ratio, and how many trials stopped early. Studies resume, so an interrupted
measurement continues.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from experiments.bench import MODELS, technique_config
from search import front
from search.config import load_config, parse_config
from search.loop import run_trials
from search.prepare import prepare
from search.records import feasible_points

HERE = Path(__file__).resolve().parent


def measure(model: str, seed: int, n_trials: int, out: Path, candidates: list[dict] | None = None) -> dict:
    """One study: sampler-driven with the check off, or evaluating `candidates` with it on."""
    early_stop = candidates is not None
    raw = technique_config(load_config(HERE / MODELS[model].experiment), model, "joint").to_dict()
    raw["name"] = f"early-stop-{model}-{'on' if early_stop else 'off'}-seed{seed}"
    raw["seed"] = seed
    raw["search"].update(early_stop=early_stop, anchors=not early_stop)
    config = parse_config(raw)
    with prepare(config, out / config.name) as p, p.tracker.closing(p.parent_run_id):
        if early_stop and not p.study.trials:
            for params in candidates:
                p.study.enqueue_trial(params)
        run_trials(p, n_trials)
        trials = [t for t in p.study.trials if t.state.is_finished()]
        cpu_hours = sum(t.user_attrs.get("cpu_seconds", 0.0) for t in trials) / 3600
        hv = front.hypervolume(feasible_points(trials), p.baseline, config.search.objectives)
    return {
        "candidates": [t.params for t in trials],
        "seed": seed,
        "early_stop": early_stop,
        "trials": len(trials),
        "stopped_early": sum(t.state.name == "PRUNED" for t in trials),
        # work done in the deterministic unit: a stopped trial ran one epoch
        "finetune_epochs": sum(
            1 if t.state.name == "PRUNED" else t.params.get("distillation.epochs", 0) for t in trials
        ),
        "cpu_hours": cpu_hours,
        "hypervolume": hv,
        "hv_per_cpu_hour": hv / cpu_hours,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-trials", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/early-stop"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = []
    for seed in range(args.seeds):
        off = measure(args.model, seed, args.n_trials, args.out)
        runs += [off, measure(args.model, seed, args.n_trials, args.out, off["candidates"])]
    lines = [
        "| seed | early stop | trials (stopped early) | fine-tune epochs | CPU hours | hypervolume | HV per CPU-hour |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        lines.append(
            f"| {r['seed']} | {'on' if r['early_stop'] else 'off'} | {r['trials']} ({r['stopped_early']}) | "
            f"{r['finetune_epochs']} | {r['cpu_hours']:.4f} | {r['hypervolume']:.4f} | "
            f"{r['hv_per_cpu_hour']:.2f} |"
        )

    def on_over_off(key: str) -> float:
        return float(np.median([on[key] / off[key] for off, on in zip(runs[::2], runs[1::2], strict=False)]))

    lines.append("")
    lines.append(
        f"on / off on the same candidates, median over {args.seeds} seeds: "
        f"HV per CPU-hour {on_over_off('hv_per_cpu_hour'):.2f}x, "
        f"hypervolume {on_over_off('hypervolume'):.3f}x, CPU time {on_over_off('cpu_hours'):.3f}x, "
        f"fine-tune epochs {on_over_off('finetune_epochs'):.3f}x"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "early_stop.json").write_text(json.dumps(runs, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
