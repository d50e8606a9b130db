"""The `autocompress` command. Exit codes: 0 success, 2 usage or config error, 1 anything else."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

logger = logging.getLogger("autocompress")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep our own wording
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"autocompress: error: {message}\n")


def _setup_logging(verbose: bool) -> None:
    import mlflow  # noqa: F401  - mlflow configures its loggers on import; set ours after that

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    quiet = logging.DEBUG if verbose else logging.WARNING
    for name in ("optuna", "mlflow", "alembic", "torch", "torch_pruning", "onnxruntime", "matplotlib"):
        logging.getLogger(name).setLevel(quiet)
    for name in ("search", "strategies", "objectives", "experiments", "autocompress"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    import optuna

    # ERROR, not WARNING: a failed trial is already reported on one line with its reason.
    optuna.logging.set_verbosity(optuna.logging.DEBUG if verbose else optuna.logging.ERROR)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    if not verbose:
        warnings.filterwarnings("ignore")


def _default_run_dir(config_name: str) -> Path:
    return Path("runs") / config_name


def _load(args: argparse.Namespace):
    from search.config import load_config

    overrides = list(args.set or [])
    if args.data_dir:
        overrides.append(f"workload.data_dir={args.data_dir}")
    config = load_config(args.config, overrides)
    n_trials = args.n_trials if args.n_trials is not None else config.search.n_trials
    if n_trials < 0:
        raise _usage(f"--n-trials must be >= 0, got {n_trials}")
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(config.name)
    return config, n_trials, run_dir


def _prepare(args: argparse.Namespace, config, run_dir: Path, n_trials: int, **kwargs):
    """`prepare` with the storage and tracking flags that `run` and `worker` share."""
    from search.study import prepare

    return prepare(config, run_dir, progress=logger.info, storage_url=args.storage,
                   tracking_uri=args.tracking_uri, n_trials=n_trials, **kwargs)  # fmt: skip


def _trial_reporter(n_trials: int):
    from search.study import finished_trials, reason

    def on_trial(study, trial) -> None:
        attrs = trial.user_attrs
        done = f"[{finished_trials(study)}/{n_trials}] trial {trial.number}"
        if trial.state.name == "COMPLETE":
            logger.info(
                "%s COMPLETE  acc %.4f  size %.1f kB (%.1fx)  latency %.3f ms (%.2fx)  %.1fs",
                done,
                attrs.get("accuracy", float("nan")),
                attrs.get("size_bytes", float("nan")) / 1024,
                attrs.get("compression_ratio", float("nan")),
                attrs.get("latency_ms", float("nan")),
                attrs.get("speedup", float("nan")),
                attrs.get("trial_seconds", float("nan")),
            )
        else:
            logger.info("%s %s  %s", done, trial.state.name, reason(attrs))

    return on_trial


def _spawn_workers(args: argparse.Namespace, run_dir: Path, n_trials: int) -> None:
    """Start `args.workers` worker processes on this study and wait for them.

    Each trains with its share of the cores; Ctrl-C reaches them too (same process group),
    and each marks its own trial interrupted.
    """
    import subprocess

    from search.control import worker_threads

    command = [sys.executable, "-m", "search.cli", "worker", args.config, "--run-dir", str(run_dir)]
    command += ["--n-trials", str(n_trials)]
    for flag in ("storage", "tracking_uri", "data_dir"):
        if getattr(args, flag, None):
            command += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    for item in args.set or []:
        command += ["--set", item]
    env = {**os.environ, "AUTOCOMPRESS_THREADS": str(worker_threads(args.workers))}
    procs = [subprocess.Popen(command, env=env) for _ in range(args.workers)]
    try:
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        for proc in procs:
            proc.send_signal(2)
        for proc in procs:
            proc.wait()
        raise
    if any(codes):
        raise RuntimeError(f"workers exited with codes {codes}; rerun the same command to resume the study")


def cmd_run(args: argparse.Namespace) -> int:
    from search.report import FINAL_COLUMNS, format_table
    from search.study import run_search, summarize

    config, n_trials, run_dir = _load(args)
    if args.workers < 1:
        raise _usage(f"--workers must be >= 1, got {args.workers}")
    started = time.perf_counter()
    with _prepare(args, config, run_dir, n_trials, fresh=args.fresh) as prepared:
        baseline = prepared.baseline
        if args.workers > 1:
            logger.info("starting %d workers on study %r", args.workers, config.name)
            try:
                _spawn_workers(args, run_dir, n_trials)
            except BaseException as error:
                prepared.tracker.end(
                    prepared.parent_run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
                )
                raise
            # Finalists are timed again here, alone: workers timed their trials side by side.
            result = summarize(prepared)
            prepared.tracker.end(prepared.parent_run_id, "FINISHED")
        else:
            result = run_search(prepared, n_trials, on_trial=_trial_reporter(n_trials))
    print()
    batches = "/".join(str(b) for b in config.latency.batch_sizes)
    print(
        f"baseline: val accuracy {baseline['accuracy']:.4f}  test accuracy "
        f"{baseline.get('baseline_test_accuracy', float('nan')):.4f}  size {baseline['size_bytes'] / 1024:.1f} kB  "
        f"latency {baseline['latency_ms']:.3f} ms ({config.latency.runtime}, batch {batches}, "
        f"{config.latency.threads} thread{'s' if config.latency.threads > 1 else ''})"
    )
    states = [r["state"] for r in result.rows]
    print(
        f"study {config.name!r}: {states.count('COMPLETE')} complete, {states.count('FAIL')} failed, "
        f"{states.count('PRUNED')} stopped early, {len(result.pareto)} Pareto-optimal"
    )
    print()
    if result.pareto:
        repeats = config.latency.final_repeats
        print(f"Pareto-optimal trials, rebuilt from their artifacts and timed again ({repeats} runs):")
        print(format_table(result.pareto, FINAL_COLUMNS))
    elif result.closest:
        print(f"no trial meets the constraints {config.constraints.limits()}; the closest ones:")
        print(format_table(result.closest, ("accuracy", "accuracy_drop", "size_bytes", "latency_ms", "violation")))
    else:
        print("no completed trials, so no Pareto front")
    print()
    if result.recommended is not None:
        r = result.recommended
        print(f"recommended: trial {r['trial']}, {result.rule}")
        print(f"  {_describe(r)}")
        if result.registered_model:
            print(f"  registered in the MLflow Model Registry as {result.registered_model}")
        print()
    print(f"results: {result.table_path}  plot: {result.plot_path}  ({time.perf_counter() - started:.0f}s)")
    print(f"review in the MLflow UI: autocompress ui --run-dir {run_dir}")
    return EXIT_OK


def _describe(row) -> str:
    figures = [f"val {row['accuracy']:.4f}"]
    if "test_accuracy" in row:
        figures.append(f"test {row['test_accuracy']:.4f}")
    if "size_bytes" in row:
        figures.append(f"{row['size_bytes'] / 1024:.1f} kB ({row['compression_ratio']:.1f}x smaller)")
    if "final_latency_ms" in row:
        figures.append(f"{row['final_latency_ms']:.3f} ms ({row['final_speedup']:.2f}x)")
    params = ", ".join(
        f"{k.split('.', 1)[1]}={v if isinstance(v, (bool, str)) else format(v, 'g')}"
        for k, v in row.items() if "." in k and isinstance(v, (int, float, str))
    )  # fmt: skip
    return f"{'; '.join(figures)}  [{params}]"


def cmd_worker(args: argparse.Namespace) -> int:
    from search.study import run_trials

    config, n_trials, run_dir = _load(args)
    threads = os.environ.get("AUTOCOMPRESS_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    prepared = _prepare(args, config, run_dir, n_trials, driver=False)
    ran = run_trials(prepared, n_trials, on_trial=_trial_reporter(n_trials))
    logger.info("worker %d: ran %d trials; the study has reached its target of %d", os.getpid(), ran, n_trials)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from search.export import export_trial

    out = export_trial(Path(args.run_dir), args.trial, Path(args.out))
    for path in sorted(out.iterdir()):
        print(f"{path}  {path.stat().st_size} bytes")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from search import decision
    from search.study import load_run_config, open_study
    from search.tracking import Tracker

    run_dir = Path(args.run_dir)
    config = load_run_config(run_dir)
    summary = decision.load_summary(run_dir)
    study = open_study(run_dir, config, create=False)
    path = decision.write_report(run_dir, study)
    tracker = Tracker.for_run_dir(run_dir, config.name)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent:
        tracker.log_artifact(parent, path)
    version = decision.register(run_dir, tracker, config.name)
    print(f"report: {path}")
    if summary["recommended"] is not None:
        print(f"recommended: trial {summary['recommended']['trial']}, {summary['rule']}")
    if version is not None:
        print(f"registered in the MLflow Model Registry as {config.name!r} version {version}")
    return EXIT_OK


def cmd_efficiency(args: argparse.Namespace) -> int:
    import json

    from search.efficiency import markdown, run_efficiency

    table = Path(args.table)
    if not table.is_file():
        raise UsageError(f"--table {table} does not exist; the shipped table is experiments/efficiency_lenet300.json")
    if args.seeds < 2 or not args.budgets or min(args.budgets) < 1:
        raise UsageError(f"--seeds must be >= 2 and --budgets whole numbers >= 1; got {args.seeds} and {args.budgets}")
    started = time.perf_counter()
    results = run_efficiency(table, args.samplers, args.seeds, sorted(args.budgets), references=args.reference,
                             progress=logger.info)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "efficiency.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (out / "efficiency.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / 'efficiency.json'} and {out / 'efficiency.md'} ({time.perf_counter() - started:.0f}s)")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from search.bench import EXPERIMENTS, run_bench

    unknown = [m for m in args.models if m not in EXPERIMENTS]
    if unknown:
        raise _usage(f"--models must be drawn from {sorted(EXPERIMENTS)}, got {unknown[0]!r}")
    if args.n_trials < 1:
        raise _usage(f"--n-trials must be >= 1, got {args.n_trials}")
    started = time.perf_counter()
    out = Path(args.out)
    run_bench(out, args.models, args.n_trials, Path(args.experiments_dir), args.set or [], progress=logger.info)
    print((out / "bench.md").read_text())
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'} ({time.perf_counter() - started:.0f}s)")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from search.verify import verify_speedups

    rows = verify_speedups(Path(args.run_dir), repeats=args.repeats)
    print(f"{'trial':>5}  {'batch':>5}  {'recorded':>9}  {'alone':>9}  reproduced")
    for r in rows:
        print(
            f"{r['trial']:>5}  {r['batch_size']:>5}  {r['recorded_speedup']:>8.2f}x  "
            f"{r['standalone_speedup']:>8.2f}x  {'yes' if r['reproduced'] else 'NO'}"
        )
    failed = [r for r in rows if not r["reproduced"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} recorded speedups reproduced by the exported models alone")
    return EXIT_ERROR if failed else EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    from search.tracking import sqlite_uri

    run_dir = Path(args.run_dir)
    if not (run_dir / "mlflow.db").exists():
        raise _usage(f"--run-dir {run_dir} holds no mlflow.db; run a search there first")
    command = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", sqlite_uri(run_dir),
        "--host", args.host, "--port", str(args.port),
    ]  # fmt: skip
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    os.execv(sys.executable, command)
    return EXIT_OK  # pragma: no cover - execv does not return


class UsageError(Exception):
    pass


def _usage(message: str) -> UsageError:
    return UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autocompress", description="Search pruning x quantization x distillation strategies.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, including Optuna and MLflow")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run (or resume) a search")
    worker = sub.add_parser("worker", help="join a study started by `autocompress run` and run trials for it")
    for p in (run, worker):
        p.add_argument("config", help="experiment YAML, e.g. experiments/fmnist_cnn.yaml")
        p.add_argument("--n-trials", type=int, help="target number of finished trials for the whole study")
        p.add_argument("--run-dir", help="where the study, the MLflow store and artifacts live (default runs/<name>)")
        p.add_argument("--data-dir", help="directory with the dataset files (overrides workload.data_dir)")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. search.sampler=random"
        )
        p.add_argument(
            "--storage",
            help="Optuna database shared by several machines (postgresql://... or mysql://...); "
            "default: the run directory's journal file",
        )
        p.add_argument(
            "--tracking-uri", help="MLflow tracking server or database (default: the run directory's mlflow.db)"
        )
    run.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    run.add_argument(
        "--fresh", action="store_true", help="move an existing study in --run-dir aside and start a new one"
    )
    run.set_defaults(func=cmd_run)
    worker.set_defaults(func=cmd_worker)

    export = sub.add_parser("export", help="write a deployable package of one trial")
    export.add_argument("--run-dir", required=True)
    export.add_argument("--trial", type=int, required=True, help="the trial number (see the Pareto table)")
    export.add_argument("--out", required=True, help="a new directory for model.onnx, weights.acw and model.json")
    export.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="single techniques against the joint search, per model")
    bench.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    bench.add_argument("--n-trials", type=int, default=30, help="trials per study (4 studies per model)")
    bench.add_argument("--out", default="runs/bench")
    bench.add_argument("--experiments-dir", default=str(Path(__file__).resolve().parent.parent / "experiments"))
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="override the base experiments' config")
    bench.set_defaults(func=cmd_bench)

    verify = sub.add_parser("verify", help="time every trial's exported ONNX model alone against its recorded speedup")
    verify.add_argument("--run-dir", required=True)
    verify.add_argument("--repeats", type=int, default=200)
    verify.set_defaults(func=cmd_verify)

    eff = sub.add_parser("efficiency", help="replay samplers against the exhaustively evaluated table")
    eff.add_argument(
        "--table", default=str(Path(__file__).resolve().parent.parent / "experiments" / "efficiency_lenet300.json")
    )
    eff.add_argument("--samplers", nargs="+", default=["auto", "tpe", "nsga2", "random", "random-plain"],
                     choices=["auto", "tpe", "gp", "nsga2", "random", "random-plain", "grid"])  # fmt: skip
    eff.add_argument("--seeds", type=int, default=10)
    eff.add_argument("--budgets", type=int, nargs="+", default=[20, 50, 100])
    eff.add_argument("--reference", nargs="+", default=["nadir", "box"], choices=["nadir", "box"],
                     help="hypervolume reference points: the table's worst values, the search's own box")  # fmt: skip
    eff.add_argument("--out", default="runs/efficiency")
    eff.set_defaults(func=cmd_efficiency)

    report = sub.add_parser("report", help="write a finished study's decision report (HTML) and register its pick")
    report.add_argument("--run-dir", required=True)
    report.set_defaults(func=cmd_report)

    ui = sub.add_parser("ui", help="start the MLflow UI on a run directory's store")
    ui.add_argument("--run-dir", required=True)
    ui.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; the UI has no authentication)"
    )
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.command in ("run", "worker", "bench"):
        from search.control import handle_termination

        handle_termination()
    from experiments.data import DatasetMissingError
    from search.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, UsageError, DatasetMissingError) as error:
        print(f"autocompress: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("autocompress: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug or an environment failure: say so loudly, with the trace
        traceback.print_exc(file=sys.stderr)
        print(f"autocompress: unexpected error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
