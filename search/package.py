"""Deployable packages, and the recommended one in MLflow's Model Registry.

A package directory holds

- ``model.onnx``: what ONNX Runtime ran for the trial,
- ``weights.acw``: the packed weights file, exactly the trial's ``size_bytes`` long,
- ``model.json``: the model spec to rebuild from the weights, the trial's parameters, its
  measured figures, and the preprocessing that turns raw inputs into the model's,
- ``tokenizer.json``: for a text model, the tokenizer that preprocessing names.

`register` puts the recommended trial's package in the registry, with a state dict as
numpy's .npz (never a pickle).
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from optuna.trial import TrialState
from torch import nn

from search import rundir
from search.columns import final_columns
from search.config import ConfigError
from search.records import numbers_of, trial_params
from search.storage import open_study
from search.workload import model_factory
from strategies.artifact import load_artifact
from strategies.inputs import runtime_feed
from strategies.runtime import ARTIFACT_NAME, ONNX_NAME, example_feed

PACKAGE_VERSION = 1
SPEC_NAME = "model.json"
STATE_DICT_FILE = "state_dict.npz"


def export_trial(run_dir: Path, trial_number: int, out: Path) -> Path:
    """Write the package of one COMPLETE trial to `out` (which must not hold files yet)."""
    run_dir, out = Path(run_dir), Path(out)
    config = rundir.load_run_config(run_dir)
    study = open_study(run_dir, config, create=False)
    complete = {t.number: t for t in study.trials if t.state == TrialState.COMPLETE}
    if trial_number not in complete:
        raise ConfigError(
            f"--trial must be a COMPLETE trial of this study, one of {sorted(complete)}; got {trial_number}"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty directory; choose a new one")
    trial = complete[trial_number]
    finalist = _finalist_figures(run_dir, trial_number)
    source = rundir.trial_dir(run_dir, trial_number)
    if finished_is_better(finalist, config.metric):  # the finishing stage's longer fine-tune, chosen on val
        source = rundir.finished_dir(run_dir, trial_number)
    out.mkdir(parents=True, exist_ok=True)
    for name in (ARTIFACT_NAME, ONNX_NAME):
        if (source / name).exists():
            shutil.copy2(source / name, out / name)
    preprocessing = rundir.read_preprocessing(run_dir)
    if preprocessing.get("tokenizer"):  # the tokenizer the model's inputs come from, beside it
        shutil.copy2(run_dir / preprocessing["tokenizer"], out / rundir.TOKENIZER_FILE)
    spec = {
        "package_version": PACKAGE_VERSION,
        "study": config.name,
        "trial": trial_number,
        "model": config.workload.model,
        "metric": config.metric,
        # How raw inputs become model.onnx's (for text: the tokenizer file in the package, its length).
        "preprocessing": preprocessing,
        "params": trial_params(trial),
        "metrics": numbers_of(trial.user_attrs),
        "finalist": finalist,
        "finished": finished_is_better(finalist, config.metric),
        "config": config.identity(),
    }
    if (out / ONNX_NAME).exists():
        describe_onnx(out / ONNX_NAME, spec)
        spec["onnx_bytes"] = (out / ONNX_NAME).stat().st_size  # what shipping the ONNX file alone costs
    (out / SPEC_NAME).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return out


def describe_onnx(path: Path, spec: dict[str, Any]) -> None:
    """Write what the model is into the ONNX file's own metadata_props: the study and trial, its
    parameters, its task metric, latency and packed size (``autocompress.*`` keys)."""
    import onnx

    model = onnx.load(str(path))
    metrics = spec["metrics"]
    props = {
        "study": spec["study"],
        "trial": spec["trial"],
        "params": json.dumps(spec["params"], sort_keys=True),
        "metric": spec["metric"],
        **{key: metrics[key] for key in (spec["metric"], "latency_ms", "speedup", "size_bytes") if key in metrics},
        **{f"test_{spec['metric']}": v for k, v in spec["finalist"].items() if k == f"test_{spec['metric']}"},
    }
    kept = {p.key: p.value for p in model.metadata_props if not p.key.startswith("autocompress.")}
    onnx.helper.set_model_props(model, {**kept, **{f"autocompress.{k}": str(v) for k, v in props.items()}})
    onnx.save(model, str(path))


def _finalist_figures(run_dir: Path, trial_number: int) -> dict[str, Any]:
    path = run_dir / rundir.FINALISTS_FILE
    if not path.exists():
        return {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("trial") == str(trial_number):
                prefixes = ("final_", "test_", "val_", "finished_")
                return {k: float(v) for k, v in row.items() if k.startswith(prefixes) and v}
    return {}


def finished_is_better(row: dict[str, Any], m: str = "accuracy") -> bool:
    """Whether a finalist's finishing stage gave a model at least as good on val (by the task
    metric `m`) as its own."""
    finished = row.get(f"finished_val_{m}")
    return finished is not None and finished >= row.get(f"val_{m}", float("inf"))


def load_package(path: Path) -> nn.Module:
    """Rebuild the trial's PyTorch model from a package (its outputs equal the trial's)."""
    path = Path(path)
    spec = json.loads((path / SPEC_NAME).read_text())
    if spec.get("package_version") != PACKAGE_VERSION:
        raise ValueError(
            f"{path} is package version {spec.get('package_version')}, this reader knows {PACKAGE_VERSION}"
        )
    return load_artifact(path / ARTIFACT_NAME, model_factory(spec["model"]))


def register(run_dir: Path, tracker: Any, model_name: str) -> int | None:
    """Register the recommended trial's package (ONNX, packed weights, state dict) under
    `model_name`, with its figures as tags. Returns the model version, or None."""
    summary = rundir.read_summary(run_dir)
    row = summary["recommended"]
    if row is None or not row.get("mlflow_run_id"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        package = export_trial(run_dir, int(row["trial"]), Path(tmp) / "model")
        state = {k: v.detach().cpu().numpy() for k, v in load_package(package).state_dict().items()}
        np.savez(package / STATE_DICT_FILE, **state)
        m = summary.get("metric", "accuracy")
        prefix = "finished_" if finished_is_better(row, m) else ""  # the package holds that model
        figures = {k: row[prefix + k] for k in final_columns(m, [row]) if prefix + k in row}
        tags = {"trial": row["trial"], "rule": summary["rule"], "finished": bool(prefix), **figures}
        model_uri = None if prefix else row.get("model_uri")
        if not model_uri:  # the finished model, or a trial recorded before trials logged models
            name = "finished-model" if prefix else "model"
            model_uri = log_onnx_model(tracker, row["mlflow_run_id"], package / ONNX_NAME, name=name)
        return tracker.register_model(model_name, row["mlflow_run_id"], model_uri, package, tags)


def log_onnx_model(
    tracker: Any, run_id: str, path: Path, example: Any = None, output: Any = None, name: str = "model"
) -> str:
    """Log an ONNX file as the run's MLflow logged model, with an input example and the signature
    it gives: the workload's own example and the model's `output` for it, or, without them,
    zeros (token ids of 1) of the file's input shapes run through a session of the file."""
    if example is not None:
        feed = runtime_feed(example)
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = example_feed(session, length=8)
        output = session.run(None, feed)[0]
    example = feed if len(feed) > 1 else next(iter(feed.values()))
    return tracker.log_model(run_id, path, example, output, name)
