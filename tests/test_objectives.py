from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from objectives.accuracy import Accuracy, top1_accuracy
from objectives.base import EvalContext, LatencySettings, ObjectiveError
from objectives.complexity import count_macs, count_params
from objectives.latency import LatencyMs, time_interleaved
from objectives.registry import OBJECTIVES, get_objective
from objectives.size import SizeBytes
from tests.helpers import MODELS


@dataclass
class Candidate:
    """The plainest thing objectives can measure (objectives.base.Candidate is a protocol)."""

    artifact_path: Path
    run: Callable
    predict: Callable
    model: torch.nn.Module | None = None


def candidate(tmp_path, predict=None, run=None, content=b"x" * 123):
    path = tmp_path / "w.bin"
    path.write_bytes(content)
    return Candidate(path, run or (lambda b: None), predict or (lambda x: torch.zeros(len(x), 10)))


def eval_context(n=10, **latency):
    x = torch.randn(n, 1, 28, 28)
    y = torch.arange(n) % 10
    return EvalContext(x, y, x[:1], LatencySettings(**latency) if latency else LatencySettings())


def test_accuracy_is_the_exact_fraction_correct(tmp_path):
    ctx = eval_context(10)
    # predicts class 0 for everything: right on exactly the one sample labelled 0
    assert Accuracy().evaluate(candidate(tmp_path), ctx) == pytest.approx(0.1)
    ctx.val_x[:, 0, 0, 0] = ctx.val_y.float()  # the label is written into the input...
    perfect = lambda x: torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()  # noqa: E731
    assert top1_accuracy(perfect, ctx.val_x, ctx.val_y, batch_size=3) == 1.0  # ...across batch edges
    off_by_one = lambda x: torch.nn.functional.one_hot((x[:, 0, 0, 0].long() + 1) % 10, 10).float()  # noqa: E731
    assert top1_accuracy(off_by_one, ctx.val_x, ctx.val_y, batch_size=4) == 0.0


def test_non_finite_logits_are_an_objective_error(tmp_path):
    bad = lambda x: torch.full((len(x), 10), float("nan"))  # noqa: E731
    with pytest.raises(ObjectiveError, match="not finite"):
        Accuracy().evaluate(candidate(tmp_path, predict=bad), eval_context())


def test_size_is_the_file_length(tmp_path):
    assert SizeBytes().evaluate(candidate(tmp_path, content=b"a" * 4321), eval_context()) == 4321.0
    missing = Candidate(tmp_path / "nope", lambda b: None, lambda x: x)
    with pytest.raises(ObjectiveError, match="cannot stat"):
        SizeBytes().evaluate(missing, eval_context())


def test_latency_times_warmup_plus_repeats_calls_on_the_configured_batch(tmp_path):
    shapes = []

    def run(batch):
        shapes.append(batch.shape)
        sum(range(2000))  # some work

    ctx = eval_context(batch_sizes=(8, 2), warmup=3, repeats=11)
    metrics = LatencyMs().measure(candidate(tmp_path, run=run), ctx)
    assert len(shapes) == 28 and shapes.count((8, 1, 28, 28)) == 14 and shapes.count((2, 1, 28, 28)) == 14
    assert metrics["latency_ms"] > 0 and metrics["latency_p90_ms"] >= metrics["latency_ms"]
    assert metrics["latency_spread"] >= 0 and metrics["latency_ms_b2"] > 0
    assert "speedup" not in metrics  # no reference runner, no ratio
    (stats,) = time_interleaved([run], np.zeros((1, 1, 28, 28), np.float32), 0, 9)
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms and stats.repeats == 9


def test_counts_are_exact_on_known_models():
    example = torch.zeros(1, 1, 28, 28)
    assert count_params(MODELS["lenet300"]()) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert count_macs(MODELS["lenet300"](), example) == 784 * 300 + 300 * 100 + 100 * 10
    # LeNet-5: conv1 24x24x20 outputs x 25, conv2 8x8x50 x (20x25), fc 800x500, 500x10
    lenet5_macs = 24 * 24 * 20 * 25 + 8 * 8 * 50 * 20 * 25 + 800 * 500 + 500 * 10
    assert count_macs(MODELS["lenet5"](), example) == lenet5_macs


def test_registry_lists_valid_names():
    assert set(OBJECTIVES) == {"accuracy", "size_bytes", "latency_ms"}
    for cls in OBJECTIVES.values():
        assert cls.direction in ("maximize", "minimize") and cls.unit
    with pytest.raises(ValueError, match=r"valid names are \['accuracy', 'latency_ms', 'size_bytes'\]"):
        get_objective("flops")


def test_reference_is_timed_interleaved_and_gives_a_same_run_speedup(tmp_path):
    calls = []

    def fast(batch):
        calls.append("candidate")

    def slow(batch):
        calls.append("baseline")
        sum(range(20000))

    ctx = eval_context(warmup=2, repeats=6)
    ctx.reference_run = slow
    metrics = LatencyMs().measure(candidate(tmp_path, run=fast), ctx)
    timed = calls[4:]  # after 2 warm-up calls each
    assert sorted(timed[:2]) == ["baseline", "candidate"]  # alternating, call by call
    assert all(timed[i] != timed[i + 1] for i in range(0, len(timed), 2))
    assert metrics["speedup"] == metrics["baseline_latency_ms"] / metrics["latency_ms"]
    assert metrics["speedup"] > 1  # the slow reference does strictly more work


@pytest.mark.parametrize(
    "key, value",
    [("batch_sizes", (0,)), ("batch_sizes", ()), ("threads", -1), ("repeats", 1.5), ("warmup", -1), ("max_spread", 0)],
)
def test_latency_settings_are_validated(key, value):
    with pytest.raises(ValueError, match=f"latency.{key}"):
        LatencySettings(**{key: value})
