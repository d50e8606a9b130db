"""Deployable packages: a trial's ONNX model, its packed weights and what was measured.

A package directory holds

- ``model.onnx``: what ONNX Runtime ran for the trial,
- ``weights.acw``: the packed weights file, exactly the trial's ``size_bytes`` long,
- ``model.json``: the model spec to rebuild from the weights, the trial's parameters and
  its measured figures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from torch import nn

from experiments.workloads import model_factory
from search.config import ConfigError
from search.study import load_run_config, open_study, trial_params
from strategies.artifact import load_artifact
from strategies.runtime import ARTIFACT_NAME, ONNX_NAME

PACKAGE_VERSION = 1
SPEC_NAME = "model.json"


def export_trial(run_dir: Path, trial_number: int, out: Path) -> Path:
    """Write the package of one COMPLETE trial to `out` (which must not hold files yet)."""
    run_dir, out = Path(run_dir), Path(out)
    config = load_run_config(run_dir)
    study = open_study(run_dir, config)
    complete = {t.number: t for t in study.trials if t.state == TrialState.COMPLETE}
    if trial_number not in complete:
        raise ConfigError(
            f"--trial must be a COMPLETE trial of this study, one of {sorted(complete)}; got {trial_number}"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty directory; choose a new one")
    trial = complete[trial_number]
    source = run_dir / "trials" / f"{trial_number:04d}"
    out.mkdir(parents=True, exist_ok=True)
    for name in (ARTIFACT_NAME, ONNX_NAME):
        if (source / name).exists():
            shutil.copy2(source / name, out / name)
    spec = {
        "package_version": PACKAGE_VERSION,
        "study": config.name,
        "trial": trial_number,
        "model": config.workload.model,
        "params": trial_params(trial),
        "metrics": {
            k: v for k, v in trial.user_attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        },
        "finalist": _finalist_figures(run_dir, trial_number),
        "config": config.identity(),
    }
    (out / SPEC_NAME).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return out


def _finalist_figures(run_dir: Path, trial_number: int) -> dict[str, Any]:
    import csv

    path = run_dir / "finalists.csv"
    if not path.exists():
        return {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("trial") == str(trial_number):
                return {k: float(v) for k, v in row.items() if k.startswith(("final_", "test_", "val_")) and v}
    return {}


def load_package(path: Path) -> nn.Module:
    """Rebuild the trial's PyTorch model from a package (its outputs equal the trial's)."""
    path = Path(path)
    spec = json.loads((path / SPEC_NAME).read_text())
    if spec.get("package_version") != PACKAGE_VERSION:
        raise ValueError(
            f"{path} is package version {spec.get('package_version')}, this reader knows {PACKAGE_VERSION}"
        )
    return load_artifact(path / ARTIFACT_NAME, model_factory(spec["model"]))
