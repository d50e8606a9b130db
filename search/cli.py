"""The `autocompress` command. Exit codes: 0 success, 2 usage or config error, 1 anything else.

Each command is one entry of `COMMANDS`: its arguments next to its action. Commands of other
packages (the benchmarks in `experiments/`) join through the entry-point group
``autocompress.commands``, so this package never imports them.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger("autocompress")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad command-line input: the command exits 2 with this message."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    long_running: bool = False  # Ctrl-C and SIGTERM end its running trial cleanly


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


# ------------------------------------------------------------------ run, worker


def _search_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--tracking-uri", help="MLflow tracking server or database (default: the run directory's mlflow.db)")
    p.add_argument("--device", help="where training and fine-tuning run: cpu, cuda, cuda:N (overrides search.device)")


def _load(args: argparse.Namespace) -> tuple[Any, int, Path]:
    from search.config import load_config

    overrides = list(args.set or [])
    if args.data_dir:
        overrides.append(f"workload.data_dir={args.data_dir}")
    if args.device:
        overrides.append(f"search.device={args.device}")
    config = load_config(args.config, overrides)
    n_trials = args.n_trials if args.n_trials is not None else config.search.n_trials
    if n_trials < 0:
        raise UsageError(f"--n-trials must be >= 0, got {n_trials}")
    return config, n_trials, Path(args.run_dir) if args.run_dir else Path("runs") / config.name


def _prepare(args: argparse.Namespace, config: Any, run_dir: Path, n_trials: int, **kwargs: Any) -> Any:
    """`prepare` with the storage and tracking flags that `run` and `worker` share."""
    from search.prepare import prepare

    return prepare(
        config,
        run_dir,
        progress=logger.info,
        storage_url=args.storage,
        tracking_uri=args.tracking_uri,
        n_trials=n_trials,
        **kwargs,
    )


def _spawn_workers(args: argparse.Namespace, run_dir: Path, n_trials: int) -> None:
    """Start `args.workers` worker processes on this study and wait for them.

    Each trains with its share of the cores; Ctrl-C reaches them too (same process group),
    and each marks its own trial interrupted.
    """
    import subprocess

    from search.signals import worker_threads

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


def _run_arguments(p: argparse.ArgumentParser) -> None:
    _search_arguments(p)
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument("--fresh", action="store_true", help="move an existing study in --run-dir aside and start a new one")


def cmd_run(args: argparse.Namespace) -> int:
    from search.finalize import summarize
    from search.loop import run_search
    from search.progress import Progress
    from search.report import result_text

    config, n_trials, run_dir = _load(args)
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    started = time.perf_counter()
    with _prepare(args, config, run_dir, n_trials, fresh=args.fresh) as prepared:
        if args.workers > 1:
            logger.info("starting %d workers on study %r", args.workers, config.name)
            with prepared.tracker.closing(prepared.parent_run_id):
                _spawn_workers(args, run_dir, n_trials)
                # Finalists are timed again here, alone: workers timed their trials side by side.
                result = summarize(prepared)
        else:
            with Progress(prepared, n_trials).showing() as progress:
                result = run_search(prepared, n_trials, on_trial=progress)
    print(result_text(config, result))
    print(f"results: {result.table_path}  plot: {result.plot_path}  ({time.perf_counter() - started:.0f}s)")
    print(f"review in the MLflow UI: autocompress ui --run-dir {run_dir}")
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from search.loop import run_trials
    from search.progress import Progress

    config, n_trials, run_dir = _load(args)
    if threads := os.environ.get("AUTOCOMPRESS_THREADS"):
        import torch

        torch.set_num_threads(int(threads))
    prepared = _prepare(args, config, run_dir, n_trials, driver=False)
    ran = run_trials(prepared, n_trials, on_trial=Progress(prepared, n_trials))
    logger.info("worker %d: ran %d trials; the study has reached its target of %d", os.getpid(), ran, n_trials)
    return EXIT_OK


# ------------------------------------------------------------ finished studies


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True)
    p.add_argument("--trial", type=int, required=True, help="the trial number (see the Pareto table)")
    p.add_argument("--out", required=True, help="a new directory for model.onnx, weights.acw and model.json")


def cmd_export(args: argparse.Namespace) -> int:
    from search.package import export_trial

    out = export_trial(Path(args.run_dir), args.trial, Path(args.out))
    for path in sorted(out.iterdir()):
        print(f"{path}  {path.stat().st_size} bytes")
    return EXIT_OK


def _run_dir_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True)


def cmd_report(args: argparse.Namespace) -> int:
    from search import package, report, rundir
    from search.storage import open_study
    from search.tracking import Tracker

    run_dir = Path(args.run_dir)
    config = rundir.load_run_config(run_dir)
    summary = rundir.read_summary(run_dir)
    study = open_study(run_dir, config, create=False)
    path = report.write_report(run_dir, study)
    tracker = Tracker.for_run_dir(run_dir, config.name)
    if parent := study.user_attrs.get("mlflow_parent_run_id"):
        tracker.log_artifact(parent, path)
    version = package.register(run_dir, tracker, config.name)
    print(f"report: {path}")
    if summary["recommended"] is not None:
        print(f"recommended: trial {summary['recommended']['trial']}, {summary['rule']}")
    if version is not None:
        print(f"registered in the MLflow Model Registry as {config.name!r} version {version}")
    return EXIT_OK


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    _run_dir_argument(p)
    p.add_argument("--repeats", type=int, default=200)


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


def _ui_arguments(p: argparse.ArgumentParser) -> None:
    _run_dir_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; the UI has no authentication)")
    p.add_argument("--port", type=int, default=5000)


def cmd_ui(args: argparse.Namespace) -> int:
    from search.rundir import MLFLOW_DB
    from search.tracking import rebase, sqlite_uri

    run_dir = Path(args.run_dir)
    store = run_dir / MLFLOW_DB
    if not store.exists():
        raise UsageError(f"--run-dir {run_dir} holds no {MLFLOW_DB}; run a search there first")
    if os.access(run_dir, os.W_OK) and os.access(store, os.W_OK):
        rebase(run_dir)  # a copied or moved run directory shows its own artifacts
    else:
        store = Path(tempfile.mkdtemp(prefix="autocompress-ui-")) / MLFLOW_DB
        shutil.copyfile(run_dir / MLFLOW_DB, store)
        rebase(run_dir, store)
        print(f"{run_dir} is read-only: the UI serves a copy of its MLflow store, and keeps no edit", flush=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        sqlite_uri(run_dir, store),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    from mlflow.tracking import MlflowClient

    from search.rundir import load_run_config

    experiment = MlflowClient(sqlite_uri(run_dir, store)).get_experiment_by_name(load_run_config(run_dir).name)
    runs = f"#/experiments/{experiment.experiment_id}/runs" if experiment else ""
    print(f"MLflow UI: http://{args.host}:{args.port}/{runs} (Ctrl-C to stop)", flush=True)
    os.execv(sys.executable, command)
    return EXIT_OK  # pragma: no cover - execv does not return


COMMANDS = (
    Command("run", "run (or resume) a search", _run_arguments, cmd_run, long_running=True),
    Command(
        "worker",
        "join a study started by `autocompress run` and run trials for it",
        _search_arguments,
        cmd_worker,
        long_running=True,
    ),
    Command("export", "write a deployable package of one trial", _export_arguments, cmd_export),
    Command(
        "verify",
        "time every trial's exported ONNX model alone against its recorded speedup",
        _verify_arguments,
        cmd_verify,
    ),
    Command(
        "report", "write a finished study's decision report (HTML) and register its pick", _run_dir_argument, cmd_report
    ),
    Command("ui", "start the MLflow UI on a run directory's store", _ui_arguments, cmd_ui),
)
COMMAND_GROUP = "autocompress.commands"  # entry points whose value is a Command


def all_commands() -> list[Command]:
    """The built-in commands, then those other installed packages register."""
    return [*COMMANDS, *(entry.load() for entry in entry_points(group=COMMAND_GROUP))]


def build_parser(commands: list[Command]) -> argparse.ArgumentParser:
    parser = _Parser(prog="autocompress", description="Search pruning x quantization x distillation strategies.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, including Optuna and MLflow")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in commands:
        p = sub.add_parser(command.name, help=command.help)
        command.arguments(p)
        p.set_defaults(command_of=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(all_commands()).parse_args(argv)
    _setup_logging(args.verbose)
    if args.command_of.long_running:
        from search.signals import handle_termination

        handle_termination()
    from search.config import ConfigError

    try:
        return args.command_of.run(args)
    except (ConfigError, UsageError) as error:
        print(f"autocompress: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("autocompress: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug or an environment failure: say so loudly, with the trace
        traceback.print_exc(file=sys.stderr)
        print(f"autocompress: unexpected error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
