

import pytest
import torch
from torch import nn

from strategies.base import CompressionError
from strategies.fold import fold_batchnorm_
from strategies.quantization import WEIGHT_BITS, Quantization, QuantizationConfig, quantized_layers
from strategies.unstructured import prune_weights_
from tests.helpers import MODELS, context, trained_like


@pytest.mark.parametrize("bits", [b for b in WEIGHT_BITS if b < 32])
def test_b_bit_weights_take_at_most_2_to_the_b_values_per_channel(bits):
    model = Quantization().apply(trained_like(MODELS["lenet5"]), QuantizationConfig(bits, 32), context())
    for name, layer in quantized_layers(model):
        for channel in layer.weight.detach().flatten(1):
            assert len(torch.unique(channel)) <= 2**bits, name
        # the weights are exactly codes * scale with integer codes in range
        codes = layer.weight.detach() / layer.weight_scale.view(-1, *([1] * (layer.weight.dim() - 1)))
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.abs().max() <= 2 ** (bits - 1) - 1 + 1e-4


def test_pruned_zeros_stay_zero_after_quantization():
    model = prune_weights_(trained_like(MODELS["lenet300"]), 0.8)
    zeros = {n: (m.weight == 0).clone() for n, m in quantized_layers(model)}
    Quantization().apply(model, QuantizationConfig(3, 32), context())
    for name, layer in quantized_layers(model):
        assert bool((layer.weight[zeros[name]] == 0).all())


def test_batchnorm_folding_keeps_outputs():
    model = trained_like(MODELS["lenet5"])
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm_(model)
        after = model(x)
    assert folded == ["1", "5"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-4)


def test_int8_activations_are_calibrated_and_fake_quantized():
    ctx = context(n=128)
    model = Quantization().apply(trained_like(MODELS["lenet5"]), QuantizationConfig(8, 8), ctx)
    layers = list(quantized_layers(model))
    assert all(0 < float(m.input_scale) and 0 <= int(m.input_zero_point) <= 255 for _, m in layers)
    # the first layer's input really is on the uint8 grid
    seen = []
    layers[0][1].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(ctx.calibration_x[:4])
    first = layers[0][1]
    steps = (seen[0] / first.input_scale) + first.input_zero_point
    assert torch.allclose(steps, steps.round(), atol=1e-3)


@pytest.mark.parametrize("field, value, valid", [("weight_bits", 7, "[2, 3, 4, 5, 6, 8, 32]"), ("activation_bits", 4, "[8, 32]")])
def test_config_errors_name_the_field(field, value, valid):
    with pytest.raises(ValueError, match=rf"quantization.{field} must be one of \{valid}"):
        QuantizationConfig(**{field: value})


def test_non_finite_weights_are_a_compression_error():
    model = trained_like(MODELS["lenet300"])
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(CompressionError, match="non-finite weights in layer 1"):
        Quantization().apply(model, QuantizationConfig(4, 32), context())


def test_training_simulation_uses_ste_and_restores_float_weights():
    model = trained_like(MODELS["lenet300"])
    original = model[1].weight
    float_weights = original.detach().clone()
    simulate = Quantization.training_simulation(QuantizationConfig(2, 32))
    x = torch.randn(8, 1, 28, 28)
    with simulate(model):
        seen = model[1].weight.detach()
        assert all(len(torch.unique(row)) <= 4 for row in seen)  # forward sees 2-bit weights
        model(x).sum().backward()
    assert model[1].weight is original  # the same Parameter object the optimizer holds
    assert torch.equal(model[1].weight.detach(), float_weights)
    assert original.grad is not None and original.grad.abs().sum() > 0  # straight-through gradient


def test_suggest_is_conditional_on_weight_bits():
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    strategy = Quantization({"quantization.weight_bits": [4, 32]})
    seen = set()
    for _ in range(20):
        trial = study.ask()
        config = strategy.suggest(trial)
        seen.add(config.weight_bits)
        assert ("quantization.activation_bits" in trial.params) == (config.weight_bits < 32)
        study.tell(trial, 0.0)
    assert seen == {4, 32}


def test_nothing_to_do_is_inactive():
    assert not Quantization().is_active(QuantizationConfig(32, 32))
