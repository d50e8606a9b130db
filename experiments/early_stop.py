"""Cheap-then-full evaluation, measured: hypervolume per CPU-hour with and without it.

    python -m experiments.early_stop [--model lenet300] [--seeds 3] [--n-trials 30] [--out runs/early-stop]

For each seed, the same study runs twice, with `search.early_stop` off and on: the benchmark's
joint search space (fine-tunes of up to 4 epochs, where stopping after the first has most to
save), started from the anchors. Reported per run: the hypervolume of the feasible front (in
baseline units, as the MLflow `hypervolume` metric), the CPU time of its trials (process time,
one torch thread, so it counts work rather than waiting on a shared machine), their ratio, and
how many trials stopped early. Studies resume, so an interrupted measurement continues.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from search import front
from search.bench import EXPERIMENTS, technique_config
from search.config import load_config, parse_config
from search.study import feasible_points, prepare, run_trials

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent


def measure(model: str, seed: int, early_stop: bool, n_trials: int, out: Path) -> dict:
    raw = technique_config(load_config(HERE / EXPERIMENTS[model]), model, "joint").to_dict()
    raw["name"] = f"early-stop-{model}-{'on' if early_stop else 'off'}-seed{seed}"
    raw["seed"] = seed
    raw["search"]["early_stop"] = early_stop
    config = parse_config(raw)
    with prepare(config, out / config.name) as p:
        run_trials(p, n_trials)
        p.tracker.end(p.parent_run_id, "FINISHED")
        trials = [t for t in p.study.trials if t.state.is_finished()]
        cpu_hours = sum(t.user_attrs.get("cpu_seconds", 0.0) for t in trials) / 3600
        hv = front.hypervolume(feasible_points(trials), p.baseline, config.search.objectives)
    return {
        "seed": seed,
        "early_stop": early_stop,
        "trials": len(trials),
        "stopped_early": sum(t.state.name == "PRUNED" for t in trials),
        "cpu_hours": cpu_hours,
        "hypervolume": hv,
        "hv_per_cpu_hour": hv / cpu_hours,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(EXPERIMENTS), default="lenet300")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-trials", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/early-stop"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = [measure(args.model, seed, on, args.n_trials, args.out) for seed in range(args.seeds) for on in (False, True)]
    lines = ["| seed | early stop | trials (stopped early) | CPU hours | hypervolume | HV per CPU-hour |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in runs:
        lines.append(f"| {r['seed']} | {'on' if r['early_stop'] else 'off'} | {r['trials']} ({r['stopped_early']}) | "
                     f"{r['cpu_hours']:.4f} | {r['hypervolume']:.4f} | {r['hv_per_cpu_hour']:.2f} |")  # fmt: skip
    ratios = [on["hv_per_cpu_hour"] / off["hv_per_cpu_hour"] for off, on in zip(runs[::2], runs[1::2])]
    hv = [on["hypervolume"] / off["hypervolume"] for off, on in zip(runs[::2], runs[1::2])]
    cpu = [on["cpu_hours"] / off["cpu_hours"] for off, on in zip(runs[::2], runs[1::2])]
    lines.append("")
    lines.append(f"on / off, median over {args.seeds} seeds: HV per CPU-hour {np.median(ratios):.2f}x, "
                 f"hypervolume {np.median(hv):.3f}x, CPU time {np.median(cpu):.3f}x")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "early_stop.json").write_text(json.dumps(runs, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
