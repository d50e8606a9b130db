"""What keeps a shared study whole: storage, locks, heartbeats and recovery.

One process or many (``--workers N`` on one machine, ``autocompress worker`` on others)
share a study. Three rules make that safe:

- Trials are handed out under a study-wide lock, after counting what is finished or still
  running, so N workers stop at exactly the target number of trials.
- A process killed outright leaves its trial RUNNING. The next start finds it: with a run
  directory's journal, ``run`` holds the directory's lock, so every RUNNING trial it sees is
  an orphan; with a database, workers beat a heartbeat and Optuna fails the stale ones.
  Recovery then closes their MLflow runs and retries each interrupted trial's parameters once.
- Interrupts end the running trial as FAIL "interrupted" (`search.signals`).

Optuna's private storage API (``study._storage``, ``trial._trial_id``) is used here only.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, TextIO

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from objectives.registry import get_objective
from search.config import Config, ConfigError
from search.rundir import JOURNAL, differing
from search.signals import INTERRUPTED

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 20
GRACE_SECONDS = 120  # a database trial with no heartbeat for this long is an orphan


# ------------------------------------------------------------------- storage


def open_storage(run_dir: Path, url: str | None) -> optuna.storages.BaseStorage:
    """The run directory's journal file, or a database shared by several machines."""
    if url is None:
        return JournalStorage(JournalFileBackend(str(run_dir / JOURNAL)))
    if not url.startswith(("postgresql", "mysql")):
        raise ConfigError(f"--storage must be a postgresql:// or mysql:// URL, got {url!r}")
    try:
        return RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
    except Exception as error:  # unreachable server, bad credentials, missing driver
        raise ConfigError(f"--storage {url!r} cannot be opened: {type(error).__name__}: {error}") from None


def repair_journal(run_dir: Path) -> bool:
    """Drop a torn last line (a process killed mid-write) that would stop the journal loading.
    Only the driver calls this, under the run directory's lock. Returns whether it cut anything."""
    path = run_dir / JOURNAL
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as handle:
        handle.truncate(keep)
    logger.warning("dropped a torn last record (%d bytes) from %s", len(data) - keep, path)
    return True


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_run_dir(run_dir: Path) -> TextIO:
    """Held by `autocompress run` while it drives a study: one driver per run directory.
    Released when the returned file is closed (or the process ends, however it ends)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".run.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(
            f"another autocompress run is using {run_dir}; wait for it or use another --run-dir"
        ) from None
    return handle


def database(study: optuna.Study) -> RDBStorage | None:
    """The study's database storage (Optuna wraps it in a cache), or None for a journal."""
    storage = getattr(study._storage, "_backend", study._storage)
    return storage if isinstance(storage, RDBStorage) else None


@contextlib.contextmanager
def study_lock(study: optuna.Study, run_dir: Path) -> Iterator[None]:
    """Serialises "count the trials, then ask for one" across every worker of a study: a file
    lock beside a journal, an advisory lock in a database (workers on other machines)."""
    storage = database(study)
    if storage is None:
        with _flock(run_dir / ".ask.lock"):
            yield
        return
    from sqlalchemy import text

    with storage.engine.connect() as connection:
        if storage.engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(74657)"))
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(74657)"))
        else:  # mysql
            connection.execute(text("SELECT GET_LOCK('autocompress', 600)"))
            try:
                yield
            finally:
                connection.execute(text("SELECT RELEASE_LOCK('autocompress')"))


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Beat the trial's heartbeat while it runs, where the storage keeps heartbeats."""
    storage = database(study)
    interval = storage.get_heartbeat_interval() if storage is not None else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            storage.record_heartbeat(trial._trial_id)
            stop.wait(interval)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------ recovery


def recover(study: optuna.Study, tracker: Any, local: bool) -> list[int]:
    """Close what killed processes left open and queue each interrupted trial's retry.

    `local`: the caller holds the run directory's lock, so every RUNNING trial is an orphan.
    Otherwise only trials whose heartbeat went stale are. Returns the retried trial numbers.
    Call under `study_lock`, so two starting workers do not both queue a retry.
    """
    storage = study._storage
    if local:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            storage.set_trial_user_attr(t._trial_id, "fail_reason", INTERRUPTED)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    elif database(study) is not None:
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    live = {t.number for t in trials if t.state == TrialState.RUNNING}
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = []
    for t in trials:
        if t.state != TrialState.FAIL or t.user_attrs.get("fail_reason", INTERRUPTED) != INTERRUPTED:
            continue
        if "fail_reason" not in t.user_attrs:  # failed by Optuna's stale-heartbeat sweep
            storage.set_trial_user_attr(t._trial_id, "fail_reason", INTERRUPTED)
        if t.number not in retried and "retry_of" not in t.user_attrs:
            attrs = {"retry_of": t.number, **({"anchor": t.user_attrs["anchor"]} if "anchor" in t.user_attrs else {})}
            study.enqueue_trial(t.params, user_attrs=attrs, skip_if_exists=False)
            queued.append(t.number)
    closed = tracker.close_orphans(study.user_attrs.get("mlflow_parent_run_id"), live)
    if queued or closed:
        logger.info(
            "recovered from an interrupted run: %d MLflow runs closed as KILLED, trials %s queued again",
            closed,
            queued,
        )
    return queued


def open_study(
    run_dir: Path, config: Config, storage: optuna.storages.BaseStorage | None = None, create: bool = True
) -> optuna.Study:
    """The study in `storage` (a shared database), or else in the run directory's journal."""
    storage = storage or open_storage(run_dir, None)
    if not create:
        try:
            return optuna.load_study(study_name=config.name, storage=storage)
        except KeyError:
            raise ConfigError(
                f"no study named {config.name!r} in its storage; start it with autocompress run first"
            ) from None
    directions = [get_objective(name).direction for name in config.search.objectives]
    study = optuna.create_study(storage=storage, study_name=config.name, directions=directions, load_if_exists=True)
    if study.metric_names is None:  # optuna-dashboard labels the objectives and the front's axes by these
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(config.search.objectives))
    return study


def check_study_config(study: optuna.Study, config: Config) -> None:
    """A study keeps the config that created it; a process with another one may not join."""
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", config.identity())
    elif changed := differing(stored, config):
        raise ConfigError(f"study {config.name!r} was created by a different config (differs in {changed})")


def frozen(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The stored record of a trial just told, without copying every trial of the study."""
    return study._storage.get_trial(trial._trial_id)
