"""A new technique and a new objective are each one class plus one registration.

The toy strategy and the toy objective below are registered from this test module alone,
touching no product file, and a smoke search uses both end to end: the toy parameter is
searched and recorded in Optuna and MLflow, and the toy objective is optimised and on the front.
"""

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from objectives.base import Objective
from objectives.complexity import count_params
from objectives.registry import register_objective, unregister_objective
from search.cli import main
from strategies.base import Strategy, StrategyConfig
from strategies.registry import register_strategy, unregister_strategy
from strategies.space import Anchor, FloatParam
from tests.conftest import needs_fashion_mnist
from tests.helpers import SMOKE, load_study, runs_of


@dataclass(frozen=True)
class LogitShiftConfig(StrategyConfig):
    shift: float = 0.0


class LogitShift(Strategy):
    """Adds a constant to every logit: the predictions, and so the accuracy, stay the same."""

    name = "logit_shift"
    phase = "prune"
    default_space = {"toy.logit_shift": FloatParam(0.0, 2.0, off=0.0)}
    anchors = (Anchor("shift-1", {"toy.logit_shift": 1.0}, rank=10),)

    def suggest(self, trial):
        return LogitShiftConfig(self._suggest(trial, "toy.logit_shift"))

    def is_active(self, config):
        return config.shift > 0

    def apply(self, model, config, context):
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.bias += config.shift
        return model


class WeightCount(Objective):
    """The number of weights left: an objective of its own, minimised."""

    name = "weight_count"
    unit = "weights"
    direction = "minimize"
    reference = 1.0

    def evaluate(self, candidate, context):
        return float(count_params(candidate.model))


@pytest.fixture
def registered():
    register_strategy(LogitShift)
    register_objective(WeightCount)
    yield
    unregister_strategy(LogitShift)
    unregister_objective(WeightCount)


@needs_fashion_mnist
def test_a_registered_strategy_and_objective_run_in_a_search(tmp_path, registered):
    run_dir = tmp_path / "run"
    space = (
        "search_space={pruning.structured_ratio: [0.0, 0.5], quantization.weight_bits: [8, 32], "
        "quantization.activation_bits: [32], toy.logit_shift: [0.0, 2.0]}"
    )
    args = [
        "run",
        SMOKE,
        "--n-trials",
        "6",
        "--run-dir",
        str(run_dir),
        "--set",
        space,
        "--set",
        "search.objectives=[accuracy, weight_count]",
    ]
    assert main(args) == 0
    study = load_study(run_dir)
    assert len(study.directions) == 2 and study.directions[1].name == "MINIMIZE"
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6
    assert all("toy.logit_shift" in t.params for t in complete)
    assert [t.values[1] for t in complete] == [t.user_attrs["weight_count"] for t in complete]
    anchors = {t.user_attrs.get("anchor"): t.params for t in study.trials}
    assert anchors["shift-1"]["toy.logit_shift"] == 1.0 and anchors["structured-50"]["toy.logit_shift"] == 0.0
    # the shift leaves the predictions alone: the shift anchor scores the baseline's accuracy
    summary = json.loads((run_dir / "summary.json").read_text())
    shifted = next(t for t in complete if t.user_attrs.get("anchor") == "shift-1")
    assert shifted.user_attrs["accuracy"] == summary["baseline"]["accuracy"]
    # MLflow: every child run has the toy parameter and the toy objective
    _, children = runs_of(run_dir)
    assert len(children) == 6
    assert all("toy.logit_shift" in r.data.params and "weight_count" in r.data.metrics for r in children)
    # the front is over the toy objective: the smallest-count trial is on it
    front = summary["pareto"]
    assert front and all("weight_count" in row for row in front)
    fewest = min(complete, key=lambda t: (t.values[1], -t.values[0]))
    assert fewest.number in {row["trial"] for row in front}
    assert summary["baseline"]["weight_count"] > fewest.values[1]  # structured pruning removed weights
