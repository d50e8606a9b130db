"""Every path in a run directory, and which config it belongs to.

A run directory holds one study: ``config.json`` (the config that defines it), the Optuna
journal, the MLflow store (``mlflow.db``, a different file) and its artifacts, the baseline's
and each trial's deployed files (``trials/NNNN/``), and what a finished search writes: the
results and finalists tables, ``summary.json``, the plots and ``report.html``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from search.config import Config, ConfigError, parse_config

CONFIG_FILE = "config.json"
JOURNAL = "optuna.journal"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
SENSITIVITY_FILE = "sensitivity.json"  # the per-layer scans, when the space lists an option that needs one
RESULTS_FILE = "results.csv"
FINALISTS_FILE = "finalists.csv"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
PLOT_FILE = "pareto.png"
# How raw inputs become the model's (the workload's preprocessing), and the tokenizer it names.
PREPROCESSING_FILE = "preprocessing.json"
TOKENIZER_FILE = "tokenizer.json"


def trial_dir(run_dir: Path, number: int) -> Path:
    """Where trial `number` keeps its packed weights and ONNX model."""
    return Path(run_dir) / "trials" / f"{number:04d}"


def finished_dir(run_dir: Path, number: int) -> Path:
    """Where the finishing stage keeps trial `number`'s longer fine-tuned model."""
    return trial_dir(run_dir, number) / "finished"


def baseline_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "baseline"


def differing(stored: dict[str, Any], config: Config) -> list[str]:
    """The top-level config sections in which `stored` differs from `config`'s identity.

    `stored` is read through today's parser first, so a key added since it was written
    counts as its default value, not as a difference."""
    try:
        stored = parse_config(stored).identity()
    except ConfigError:  # a config this version no longer reads: compare it as it is
        pass
    identity = config.identity()
    return sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))


def check_run_dir(config: Config, run_dir: Path) -> None:
    """Refuse a run directory that holds a study of a different config."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return
    if changed := differing(json.loads(path.read_text()), config):
        raise ConfigError(
            f"run directory {run_dir} holds a study of a different config (differs in {changed}); "
            "use another --run-dir, or remove that directory to start fresh"
        )


def write_run_config(run_dir: Path, config: Config) -> None:
    (Path(run_dir) / CONFIG_FILE).write_text(json.dumps(config.identity(), indent=2, sort_keys=True))


def load_run_config(run_dir: Path) -> Config:
    """The config of the study a run directory holds."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"--run-dir {run_dir} holds no study (no {CONFIG_FILE}); run a search there first")
    return parse_config(json.loads(path.read_text()))


def write_preprocessing(run_dir: Path, preprocessing: dict[str, Any]) -> None:
    """Record the workload's preprocessing, with a copy of the tokenizer file it names, so that
    an export (later, in another process) can hand both to a deployment."""
    preprocessing = dict(preprocessing)
    if tokenizer := preprocessing.get("tokenizer"):
        shutil.copyfile(tokenizer, Path(run_dir) / TOKENIZER_FILE)
        preprocessing["tokenizer"] = TOKENIZER_FILE
    (Path(run_dir) / PREPROCESSING_FILE).write_text(json.dumps(preprocessing, indent=1, sort_keys=True))


def read_preprocessing(run_dir: Path) -> dict[str, Any]:
    """The recorded preprocessing ({} for a study recorded before there was any)."""
    path = Path(run_dir) / PREPROCESSING_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def read_summary(run_dir: Path) -> dict[str, Any]:
    """What a finished search wrote: baseline, finalists, recommendation."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.exists():
        raise ConfigError(
            f"--run-dir {run_dir} has no {SUMMARY_FILE}: its search has not finished; rerun its "
            "`autocompress run` command to complete it"
        )
    return json.loads(path.read_text())


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=1, sort_keys=True, default=float))
    return path
