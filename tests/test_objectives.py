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
from objectives.registry import OBJECTIVES, get_objective, task_metrics
from objectives.size import SizeBytes
from objectives.task import EmbeddingFidelity, MacroF1
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


def one_hot(classes, n=3):
    return torch.nn.functional.one_hot(torch.tensor(classes), n).float()


def test_macro_f1_is_the_mean_of_each_class_f1_on_a_hand_made_example():
    """Labels 0 0 0 0 1 1 2 2, predictions 0 0 0 1 1 2 2 2. Class 0: tp 3, fp 0, fn 1 → 6/7;
    class 1: tp 1, fp 1, fn 1 → 1/2; class 2: tp 2, fp 1, fn 0 → 4/5."""
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    outputs = one_hot([0, 0, 0, 1, 1, 2, 2, 2])
    assert MacroF1().score(outputs, y, None) == pytest.approx((6 / 7 + 1 / 2 + 4 / 5) / 3)
    assert Accuracy().score(outputs, y, None) == pytest.approx(6 / 8)
    # Imbalance: predicting the majority class everywhere is 80 % accurate but F1 (1.6/1.8 + 0) / 2.
    y = torch.tensor([0, 0, 0, 0, 1])
    assert Accuracy().score(one_hot([0] * 5), y, None) == pytest.approx(0.8)
    assert MacroF1().score(one_hot([0] * 5), y, None) == pytest.approx((8 / 9) / 2)
    # A class only predicted, never labelled, counts with F1 0 (as scikit-learn's macro average).
    assert MacroF1().score(one_hot([0, 2]), torch.tensor([0, 0]), None) == pytest.approx((2 / 3 + 0) / 2)


def test_embedding_fidelity_is_the_mean_cosine_to_the_baseline_embeddings(tmp_path):
    reference = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    # the same directions at other lengths: cosine 1; orthogonal: 0; opposite: -1
    assert EmbeddingFidelity().score(reference * 5, None, reference) == pytest.approx(1.0)
    rotated = torch.tensor([[0.0, 1.0], [0.0, 2.0], [-3.0, -4.0]])
    assert EmbeddingFidelity().score(rotated, None, reference) == pytest.approx((0 + 1 - 1) / 3)
    ctx = eval_context(3)
    ctx.val_reference = reference
    got = EmbeddingFidelity().evaluate(candidate(tmp_path, predict=lambda x: reference[: len(x)] * 2), ctx)
    assert got == pytest.approx(1.0)
    with pytest.raises(ObjectiveError, match="differ"):
        EmbeddingFidelity().score(reference[:, :1], None, reference)
    ctx.val_reference = None
    with pytest.raises(ObjectiveError, match="baseline's outputs"):
        EmbeddingFidelity().evaluate(candidate(tmp_path, predict=lambda x: reference[: len(x)]), ctx)


def test_a_task_metric_s_limit_is_its_drop_in_points():
    metrics, baseline = {"macro_f1": 0.70}, {"macro_f1": 0.75}
    assert MacroF1.limit() == "macro_f1_drop" and Accuracy.limit() == "accuracy_drop"
    assert MacroF1().derived(metrics, baseline) == {"macro_f1_drop": pytest.approx(0.05)}


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
    assert set(OBJECTIVES) == {"accuracy", "macro_f1", "embedding_fidelity", "size_bytes", "latency_ms"}
    assert task_metrics() == ["accuracy", "embedding_fidelity", "macro_f1"]
    for cls in OBJECTIVES.values():
        assert cls.direction in ("maximize", "minimize") and cls.unit
    valid = r"\['accuracy', 'embedding_fidelity', 'latency_ms', 'macro_f1', 'size_bytes'\]"
    with pytest.raises(ValueError, match=f"valid names are {valid}"):
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
