"""`autocompress bench` and `autocompress efficiency`: measurements of the tool itself.

They live here, outside the product package, and join the `autocompress` command through
the entry-point group ``autocompress.commands`` (pyproject.toml). Imports are lazy, so
`autocompress --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from search.cli import EXIT_OK, Command, UsageError

logger = logging.getLogger("autocompress")
HERE = Path(__file__).resolve().parent


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["lenet300", "lenet5"], help="lenet300, lenet5, minilm")
    p.add_argument("--n-trials", type=int, default=16, help="trials per study (5 studies per model)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--experiments-dir", default=str(HERE))
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override the base experiments' config")


def _bench(args: argparse.Namespace) -> int:
    from experiments.bench import MODELS, run_bench

    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise UsageError(f"--models must be drawn from {sorted(MODELS)}, got {unknown[0]!r}")
    if args.n_trials < 1:
        raise UsageError(f"--n-trials must be >= 1, got {args.n_trials}")
    started = time.perf_counter()
    out = Path(args.out)
    run_bench(out, args.models, args.n_trials, Path(args.experiments_dir), args.set or [])
    print((out / "bench.md").read_text())
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'} ({time.perf_counter() - started:.0f}s)")
    return EXIT_OK


def _efficiency_arguments(p: argparse.ArgumentParser) -> None:
    from search.samplers import SAMPLER_NAMES

    p.add_argument("--table", default=str(HERE / "efficiency_lenet300.json"))
    p.add_argument(
        "--samplers",
        nargs="+",
        default=["auto", "tpe", "nsga2", "random", "random-plain"],
        choices=[*SAMPLER_NAMES, "random-plain"],
    )
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--budgets", type=int, nargs="+", default=[20, 50, 100])
    p.add_argument(
        "--reference",
        nargs="+",
        default=["nadir", "box"],
        choices=["nadir", "box"],
        help="hypervolume reference points: the table's worst values, the search's own box",
    )
    p.add_argument("--out", default="runs/efficiency")


def _efficiency(args: argparse.Namespace) -> int:
    from experiments.efficiency import markdown, run_efficiency

    table = Path(args.table)
    if not table.is_file():
        raise UsageError(f"--table {table} does not exist; the shipped table is experiments/efficiency_lenet300.json")
    if args.seeds < 2 or not args.budgets or min(args.budgets) < 1:
        raise UsageError(f"--seeds must be >= 2 and --budgets whole numbers >= 1; got {args.seeds} and {args.budgets}")
    started = time.perf_counter()
    results = run_efficiency(
        table, args.samplers, args.seeds, sorted(args.budgets), references=args.reference, progress=logger.info
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "efficiency.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (out / "efficiency.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / 'efficiency.json'} and {out / 'efficiency.md'} ({time.perf_counter() - started:.0f}s)")
    return EXIT_OK


BENCH = Command(
    "bench", "single techniques against the joint search, per model", _bench_arguments, _bench, long_running=True
)
EFFICIENCY = Command(
    "efficiency", "replay samplers against the exhaustively evaluated table", _efficiency_arguments, _efficiency
)
