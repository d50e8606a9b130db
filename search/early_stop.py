"""The cheap-then-full evaluation: stop a long fine-tune that is clearly falling short.

Optuna has no early stopping for multi-objective studies, so the search has its own. Only a
trial that fine-tunes two or more epochs has something to save. Fine-tuning changes neither
the model's size nor its latency, so both are measured first on the same candidate built
without fine-tuning (a probe). The feasible completed trials that are no larger and no slower
(within SLACK) are its neighbours; after the first epoch, the candidate's task metric on
VAL_SAMPLES validation samples must come within `search.early_stop_margin` of the best of
them, or the trial stops as PRUNED, with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Callable

import optuna
import torch
from optuna.trial import TrialState

from search.prepare import Prepared, batched, deploy, measure, task_metric
from search.records import feasible
from strategies import pipeline
from strategies.base import StrategyConfig

VAL_SAMPLES = 2000  # validation samples the after-first-epoch check scores
# How much larger or slower than the probe a neighbour may be: a fine-tuned model packs a few
# bytes differently, and two latency measurements differ by their noise.
SLACK = 1.02


class StoppedEarly(optuna.TrialPruned):
    """The first fine-tune epoch showed the candidate falling clearly short: the trial is PRUNED."""


def _neighbours(p: Prepared, trial: optuna.Trial, configs: dict[str, StrategyConfig], others: list) -> list:
    """The feasible complete trials no larger and no slower than this candidate's probe."""
    done = [t for t in p.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and feasible(t)]
    if not done:
        return []
    probe_configs = {**configs, "distillation": dataclasses.replace(configs["distillation"], epochs=0)}
    model, _ = pipeline.compress(copy.deepcopy(p.workload.model), p.strategies, probe_configs, p.context)
    with tempfile.TemporaryDirectory(prefix="probe-", dir=p.run_dir) as tmp:
        deployed = deploy(p.config, p.workload, model, Path(tmp))
        probe = measure(deployed, others, p.eval_context, p.workload.example_inputs)
    for objective in others:
        trial.set_user_attr(f"probe_{objective.name}", probe[objective.name])
    return [t for t in done if all(t.user_attrs[o.name] <= probe[o.name] * SLACK for o in others)]


def early_stop_check(
    p: Prepared, trial: optuna.Trial, configs: dict[str, StrategyConfig]
) -> Callable[[torch.nn.Module, int], None]:
    """The check to run after each fine-tune epoch of this trial (or the plain one)."""
    s = p.config.search
    distill = configs.get("distillation")
    m = p.config.metric
    others = [o for o in p.objectives if o.name != m]
    if not s.early_stop or distill is None or distill.epochs < 2 or len(others) == len(p.objectives):
        return p.context.after_epoch
    neighbours = _neighbours(p, trial, configs, others)
    if not neighbours:
        return p.context.after_epoch
    best = max(neighbours, key=lambda t: t.user_attrs[m])
    n = min(VAL_SAMPLES, len(p.workload.val.x))
    reference = p.eval_context.val_reference
    reference = None if reference is None else reference[:n]

    def check(model: torch.nn.Module, epoch: int) -> None:
        p.context.after_epoch(model, epoch)
        if epoch != 1:
            return
        val = p.workload.val
        figure = task_metric(p.config).on(lambda x: batched(model, x), val.x[:n], val.y[:n], reference)
        trial.set_user_attr(f"early_{m}", figure)
        short = best.user_attrs[m] - figure
        if short > s.early_stop_margin:
            raise StoppedEarly(
                f"stopped early: after fine-tune epoch 1 of {distill.epochs}, {m} {figure:.4f} on {n} "
                f"validation samples is {short:.2%} below trial {best.number} ({best.user_attrs[m]:.4f}), "
                f"which is no larger and no slower (margin {s.early_stop_margin:.2%})"
            )

    return check
