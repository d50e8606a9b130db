"""MLflow logging: one parent run per study, one child run per trial.

We talk to MLflow through `MlflowClient` with explicit run ids rather than the global
active-run stack: nested runs through that stack lose their parent in threads and leave
runs RUNNING when a process dies, and `log_batch` is much cheaper than separate calls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from search.rundir import MLFLOW_ARTIFACTS, MLFLOW_DB

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 6000
# MLflow 3's UI opens an experiment of this kind on its runs, not on its GenAI traces view.
KIND_TAG = "mlflow.experimentKind"
KIND = {KIND_TAG: "custom_model_development"}


# Where MLflow records an artifact location. It records them as absolute URIs.
LOCATIONS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)


def sqlite_uri(run_dir: Path, db: Path | None = None) -> str:
    return f"sqlite:///{Path(db or Path(run_dir) / MLFLOW_DB).resolve()}"


def rebase(run_dir: Path, db: Path | None = None) -> int:
    """Point the artifact locations of a run directory's MLflow store (or of `db`, a copy of
    it) at the directory's own ``mlartifacts``, where a copied or moved run directory keeps
    them. MLflow records locations as absolute URIs; they are rewritten only when they lead
    somewhere else. Returns how many were. Raises sqlite3.OperationalError when the store
    cannot be written (a read-only directory: rebase a copy instead)."""
    here = (Path(run_dir) / MLFLOW_ARTIFACTS).resolve().as_uri()
    with contextlib.closing(sqlite3.connect(db or Path(run_dir) / MLFLOW_DB)) as store:
        stored = [u for (u,) in store.execute("SELECT artifact_location FROM experiments")]
        moved = [u for u in stored if u.endswith(f"/{MLFLOW_ARTIFACTS}") and u != here]
        count = 0
        with store:  # one transaction
            for old in moved:
                for table, column in LOCATIONS:
                    count += store.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                        (here, len(old) + 1, old, len(old) + 1, f"{old}/"),
                    ).rowcount
    return count


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:MAX_PARAM_CHARS]


def flatten(mapping: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Nested config sections as one parameter per key (``config.search.n_trials``), so the
    MLflow UI can compare and filter runs by any of them."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


class Tracker:
    """A study's MLflow experiment. Creating it creates the store once, up front."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_dir: Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            # Without an explicit location, artifacts land in ./mlruns of whatever the cwd is.
            location = artifact_dir.resolve().as_uri() if artifact_dir else None
            self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=location, tags=KIND)
        else:
            self.experiment_id = experiment.experiment_id
            if KIND_TAG not in experiment.tags:  # a study recorded before the tag was set
                self.client.set_experiment_tag(self.experiment_id, KIND_TAG, KIND[KIND_TAG])

    @classmethod
    def for_run_dir(cls, run_dir: Path, experiment_name: str, tracking_uri: str | None = None) -> Tracker:
        """A tracking server or database if given, else the run directory's own store."""
        if tracking_uri:
            return cls(tracking_uri, experiment_name)
        if (Path(run_dir) / MLFLOW_DB).exists() and rebase(run_dir):
            logger.info("the run directory moved: its MLflow artifact locations now point into %s", run_dir)
        return cls(sqlite_uri(run_dir), experiment_name, artifact_dir=Path(run_dir) / MLFLOW_ARTIFACTS)

    # -------------------------------------------------------------------- runs

    def start_parent(self, run_id: str | None, name: str) -> str:
        """Reuse the study's parent run when resuming, else create it."""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        return self.client.create_run(self.experiment_id, run_name=name).info.run_id

    def start_child(self, parent_id: str, name: str, tags: Mapping[str, Any] = ()) -> str:
        tags = {PARENT_TAG: parent_id, **{k: str(v) for k, v in dict(tags).items()}}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def rename(self, run_id: str, name: str) -> None:
        self.client.update_run(run_id, name=name)

    def log(
        self,
        run_id: str,
        params: Mapping[str, Any] = (),
        metrics: Mapping[str, float] = (),
        tags: Mapping[str, Any] = (),
        step: int = 0,
    ) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[
                Metric(k, float(v), now, step) for k, v in dict(metrics).items() if v is not None and math.isfinite(v)
            ],
            params=[Param(k, _param_value(v)) for k, v in dict(params).items()],
            tags=[RunTag(k, str(v)) for k, v in dict(tags).items()],
        )

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def closing(self, run_id: str) -> Iterator[str]:
        """The lifecycle of a parent run around work on it: FINISHED when the work returns,
        KILLED when it is interrupted, FAILED when it raises."""
        try:
            yield run_id
        except BaseException as error:
            self.end(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        self.end(run_id, "FINISHED")

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self.client.set_tag(run_id, key, str(value))

    def log_artifact(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def log_model(self, run_id: str, onnx_path: Path, example: Any, output: Any, name: str = "model") -> str:
        """Log an ONNX file as an MLflow logged model of the run (the UI's Models column; loadable
        with ``mlflow.pyfunc.load_model``), with a signature and an input example. Returns its URI."""
        import mlflow
        import mlflow.onnx
        import onnx

        mlflow.set_tracking_uri(self.tracking_uri)
        signature = mlflow.models.infer_signature(example, output)
        with mlflow.start_run(run_id=run_id):  # the fluent API is the only way to log a model
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)),
                name=name,
                signature=signature,
                input_example=example,
                save_as_external_data=False,
                onnx_execution_providers=["CPUExecutionProvider"],
            )
        return info.model_uri

    def log_datasets(
        self, run_id: str, splits: Mapping[str, tuple[Any, Any]], source: Mapping[str, str], name: str
    ) -> None:
        """The study's train/val/test splits as the run's MLflow dataset inputs (a digest each,
        the UI's Datasets panel). `splits`: context → (features, targets) as numpy arrays;
        `source`: what loaded them (the workload's dataset function and data directory)."""
        import mlflow
        import mlflow.data
        from mlflow.data.code_dataset_source import CodeDatasetSource

        mlflow.set_tracking_uri(self.tracking_uri)
        origin = CodeDatasetSource(dict(source))
        datasets = {
            c: mlflow.data.from_numpy(x, targets=y, source=origin, name=f"{name}-{c}") for c, (x, y) in splits.items()
        }
        with mlflow.start_run(run_id=run_id):
            for context, dataset in datasets.items():
                mlflow.log_input(dataset, context=context)
        self.client.update_run(run_id, status="RUNNING")  # leaving the fluent run ended it

    def register_model(self, name: str, run_id: str, model_uri: str, package: Path, tags: Mapping[str, Any]) -> int:
        """Register the logged model `model_uri` as a new version of `name`, with the whole
        package (packed weights, spec, state dict) logged beside it as the run's ``package``."""
        from mlflow.exceptions import MlflowException

        for version in self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            return int(version.version)  # registered already: a resumed or re-reported study
        self.client.log_artifacts(run_id, str(package), artifact_path="package")
        try:
            self.client.create_registered_model(name, description="Recommended by autocompress")
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        model_id = model_uri.removeprefix("models:/")
        version = self.client.create_model_version(
            name, source=model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, model_id=model_id
        )
        return int(version.version)

    def close_orphans(self, parent_id: str | None, live_trials: set[int]) -> int:
        """End as KILLED every child run still RUNNING whose trial is not running any more
        (its process was killed). Returns how many were closed."""
        if parent_id is None:
            return 0
        closed = 0
        for run in self.children(parent_id):
            if run.info.status == "RUNNING" and int(run.data.tags.get("optuna.trial", -1)) not in live_trials:
                self.log(run.info.run_id, tags={"state": "FAIL", "fail_reason": "interrupted"})
                self.end(run.info.run_id, "KILLED")
                closed += 1
        return closed

    def children(self, parent_id: str) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=50000
        )
