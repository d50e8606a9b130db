import contextlib

import pytest
import torch
from torch.nn.utils import parametrize

from experiments.data import load_fashion_mnist
from strategies.base import CompressionError, Context
from strategies.distillation import Distillation, DistillationConfig, distill_, distillation_loss
from strategies.quantization import Quantization, QuantizationConfig
from strategies.registry import parse_space
from strategies.unstructured import prunable_weights, prune_weights_
from tests.conftest import needs_fashion_mnist
from tests.helpers import MODELS, context, trained_like


def test_loss_is_finite_at_any_temperature_and_reduces_to_its_parts():
    labels = torch.tensor([0, 1, 2, 3])
    extreme = torch.tensor([[1e4, -1e4, 0, 0]] * 4)
    for t in (1.0, 20.0):
        assert torch.isfinite(distillation_loss(extreme, -extreme, labels, t, 0.5))
    s, teacher = torch.randn(4, 4), torch.randn(4, 4)
    assert torch.allclose(distillation_loss(s, teacher, labels, 4.0, 0.0), torch.nn.functional.cross_entropy(s, labels))
    assert distillation_loss(s, s, labels, 4.0, 1.0).abs() < 1e-6


def real_task(n=1500):
    """A fixed random subset of `n` Fashion-MNIST training images (x and y)."""
    train = load_fashion_mnist()[0]
    idx = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(0))[:n]
    return train.x[idx], train.y[idx]


@needs_fashion_mnist
@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adamw", 1e-3)])
def test_distillation_loss_falls_and_pruned_weights_stay_zero(optimizer, lr):
    x, y = real_task()
    torch.manual_seed(0)
    teacher = MODELS["lenet300"]()
    # a quick teacher: a few hundred steps of plain training
    opt = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for i in range(0, len(x), 100):
            loss = torch.nn.functional.cross_entropy(teacher(x[i : i + 100]), y[i : i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = teacher.eval()(x)
    student = prune_weights_(trained_like(MODELS["lenet300"], seed=1), 0.7)
    zeros = {n: (w == 0).clone() for n, w in prunable_weights(student)}
    history = distill_(student, x, y, logits, DistillationConfig(4, 4.0, 0.7, lr, optimizer), batch_size=64)
    assert len(history) == 4 and history[-1] < history[0] * 0.8
    for name, w in prunable_weights(student):
        assert bool((w[zeros[name]] == 0).all()), name


def test_fake_quant_context_is_entered_when_set():
    entered = []

    @contextlib.contextmanager
    def recorder(model):
        entered.append(model)
        yield model

    ctx = context(fake_quant=recorder)
    ctx.teacher_logits = torch.randn(len(ctx.finetune_x), 10)
    model = trained_like(MODELS["lenet300"])
    Distillation().apply(model, DistillationConfig(1, 2.0, 0.5, 0.01), ctx)
    assert entered == [model]


def test_quantization_aware_fine_tuning_runs_and_leaves_float_weights():
    ctx = context(fake_quant=Quantization.training_simulation(QuantizationConfig(4, 32)))
    ctx.teacher_logits = torch.randn(len(ctx.finetune_x), 10)
    model = Distillation().apply(trained_like(MODELS["lenet5"]), DistillationConfig(1, 2.0, 0.5, 0.01), ctx)
    # after the context, weights are plain float parameters again (not 4-bit, no parametrization)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert len(torch.unique(model[0].weight[0])) > 16


def _pruning_hook(calls, at_step, report):
    """A step hook that zeroes the first layer's first row (its float weights) at `at_step`."""

    def on_step(model, step, total_steps):
        calls.append((step, total_steps, parametrize.is_parametrized(model[1], "weight")))
        if step != at_step:
            return False
        with torch.no_grad():
            prunable_weights(model)[0][1][0].zero_()
        return report

    return on_step


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4-bit-aware"])
def test_the_step_hook_sees_every_update_and_the_zeros_it_reports_stay_zero(quantized):
    calls = []
    simulation = Quantization.training_simulation(QuantizationConfig(4, 32)) if quantized else None
    ctx = context(n=64, batch_size=16, fake_quant=simulation, on_step=_pruning_hook(calls, 3, report=True))
    ctx.teacher_logits = torch.randn(len(ctx.finetune_x), 10)
    model = Distillation().apply(trained_like(MODELS["lenet300"]), DistillationConfig(2, 2.0, 0.5, 0.05), ctx)
    # before the first update, then after each of 2 epochs x 4 updates, inside the simulation
    assert calls == [(step, 8, quantized) for step in range(9)]
    assert bool((model[1].weight[0] == 0).all()) and bool((model[1].weight[1] != 0).all())
    # zeros the hook does not report are not held: the next updates move them again
    ctx.on_step = _pruning_hook([], 3, report=False)
    model = Distillation().apply(trained_like(MODELS["lenet300"]), DistillationConfig(2, 2.0, 0.5, 0.05), ctx)
    assert bool((model[1].weight[0] != 0).any())


def test_divergence_is_a_compression_error():
    ctx = context()
    ctx.teacher_logits = torch.full((len(ctx.finetune_x), 10), float("nan"))
    with pytest.raises(CompressionError, match="diverged"):
        Distillation().apply(trained_like(MODELS["lenet300"]), DistillationConfig(1, 2.0, 0.5, 0.01), ctx)


def test_an_unknown_optimizer_is_refused_by_name():
    with pytest.raises(ValueError, match=r"distillation.optimizer must be one of \['sgd', 'adamw'\], got 'adam'"):
        DistillationConfig(1, optimizer="adam")


def test_other_params_are_conditional_on_epochs():
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    strategy = Distillation(parse_space({"distillation.epochs": [0, 1]}))
    for _ in range(12):
        trial = study.ask()
        config = strategy.suggest(trial)
        assert ("distillation.temperature" in trial.params) == (config.epochs > 0)
        study.tell(trial, 0.0)


def test_context_without_teacher_is_refused():
    ctx = Context(
        example_inputs=torch.zeros(1, 1, 28, 28),
        finetune_x=torch.zeros(4, 1, 28, 28),
        finetune_y=torch.zeros(4, dtype=torch.long),
        calibration_x=torch.zeros(4, 1, 28, 28),
    )
    with pytest.raises(CompressionError, match="teacher"):
        Distillation().apply(MODELS["lenet300"](), DistillationConfig(1), ctx)
