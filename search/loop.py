"""The trial loop: hand out trials under the study's lock, run them, tell Optuna the results.

`run_trials` is what a worker does; `run_search` is what `autocompress run` does: the same
loop, then the finalists and the report.
"""

from __future__ import annotations

import gc
import logging
from typing import Callable

import optuna
from optuna.trial import TrialState

from search import front, storage
from search.early_stop import StoppedEarly
from search.finalize import SearchResult, summarize
from search.prepare import Prepared
from search.records import feasible_points, finished_trials
from search.samplers import is_exhausted
from search.trial import TRIAL_FAILURES, run_trial

logger = logging.getLogger(__name__)

OnTrial = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def _next_trial(p: Prepared, n_trials: int) -> optuna.Trial | None:
    """A new trial, or None once finished and running trials reach the target. Counting and
    asking happen under the study's lock, so concurrent workers never overshoot it."""
    with storage.study_lock(p.study, p.run_dir):
        if storage.database(p.study) is not None:  # fail and retry trials of workers that died since
            storage.recover(p.study, p.tracker, local=False)
        running = len(p.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if finished_trials(p.study) + running >= n_trials:
            return None
        if is_exhausted(p.study.sampler, p.study):
            logger.info("every point of the grid is evaluated or running: no more trials to run")
            return None
        return p.study.ask()


def _log_hypervolume(p: Prepared) -> None:
    """The current front's hypervolume as a step metric on the parent run: the MLflow UI
    charts the search converging. Step = finished trials."""
    trials = p.study.get_trials(deepcopy=False)
    p.tracker.log(
        p.parent_run_id,
        metrics={"hypervolume": front.hypervolume(feasible_points(trials), p.baseline, p.config.search.objectives)},
        step=finished_trials(p.study),
    )


def run_trials(p: Prepared, n_trials: int, on_trial: OnTrial | None = None) -> int:
    """Run trials until the study holds `n_trials` finished or running ones. Returns how many
    this process ran. A trial's own failure is recorded and the loop goes on; an interrupt or
    a bug marks the trial FAIL and propagates."""
    ran = 0
    while (trial := _next_trial(p, n_trials)) is not None:
        try:
            with storage.heartbeat(p.study, trial):
                values = run_trial(p, trial)
        except StoppedEarly:
            p.study.tell(trial, state=TrialState.PRUNED)
        except TRIAL_FAILURES:
            p.study.tell(trial, state=TrialState.FAIL)
        except BaseException:
            p.study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            p.study.tell(trial, values)
        ran += 1
        gc.collect()
        _log_hypervolume(p)
        if on_trial:
            on_trial(p.study, storage.frozen(p.study, trial))
    return ran


def run_search(p: Prepared, n_trials: int, on_trial: OnTrial | None = None) -> SearchResult:
    """Run trials until the study holds `n_trials` finished ones, then mark the front."""
    logger.info("study %r holds %d finished trials; target %d", p.config.name, finished_trials(p.study), n_trials)
    with p.tracker.closing(p.parent_run_id):
        run_trials(p, n_trials, on_trial)
        return summarize(p)
