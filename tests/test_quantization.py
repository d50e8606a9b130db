import copy

import pytest
import torch
from torch import nn

from strategies.activations import runs_faster_in_integer, set_input_quantization_
from strategies.base import CompressionError, weight_layers
from strategies.fold import fold_batchnorm_
from strategies.quantization import (
    FLOAT_BITS,
    WEIGHT_BITS,
    Quantization,
    QuantizationConfig,
    QuantizationError,
)
from strategies.registry import parse_space
from tests.helpers import context, distinct_codes_per_channel, inputs, lenet5_bn, mlp_bn, prune_, quantize, random_model

LOW_BITS = [b for b in WEIGHT_BITS if b < FLOAT_BITS]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value, valid",
    [
        ("weight_bits", 7, "[2, 3, 4, 5, 6, 8, 32]"),
        ("weight_bits", True, "[2, 3, 4, 5, 6, 8, 32]"),
        ("weight_bits", 4.0, "[2, 3, 4, 5, 6, 8, 32]"),
        ("activation_bits", 4, "[8, 32]"),
    ],
)
def test_config_errors_name_the_field_and_choices(field, value, valid):
    with pytest.raises(ValueError, match=rf"quantization.{field} must be one of \{valid}, got {value!r}"):
        QuantizationConfig(**{field: value})


def test_config_is_plain_values_and_says_what_it_quantizes():
    config = QuantizationConfig(4, 8)
    assert config.to_dict() == {
        "weight_bits": 4,
        "activation_bits": 8,
        "mixed_precision": False,
        "layer_bits": (),
        "scheme": "uniform",
    }
    assert config.quantizes_weights and config.quantizes_activations
    assert not QuantizationConfig().quantizes_weights and not QuantizationConfig(4).quantizes_activations


class FakeTrial:
    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def suggest_categorical(self, name, choices):
        assert self.answers[name] in choices
        self.asked.append(name)
        return self.answers[name]


@pytest.mark.parametrize("bits, asks_activations", [(32, False), (4, True)])
def test_activation_bits_are_only_suggested_with_quantized_weights(bits, asks_activations):
    trial = FakeTrial({"quantization.weight_bits": bits, "quantization.activation_bits": 8})
    config = Quantization().suggest(trial)
    assert ("quantization.activation_bits" in trial.asked) == asks_activations
    assert config == QuantizationConfig(bits, 8 if asks_activations else 32)


def test_is_active_unless_everything_is_32_bit():
    q = Quantization()
    assert not q.is_active(QuantizationConfig(32, 32))
    assert q.is_active(QuantizationConfig(4, 32)) and q.is_active(QuantizationConfig(32, 8))


# -------------------------------------------------------------------------- folding


@pytest.mark.parametrize("factory, expected", [(lenet5_bn, ["1", "5"]), (mlp_bn, ["2"])])
def test_batchnorm_folding_keeps_outputs_and_names(factory, expected):
    model = random_model(factory)
    x = inputs()
    kept = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm_(model)
        after = model(x)
    assert folded == expected
    assert type(model) is nn.Sequential
    assert all(isinstance(model.get_submodule(n), nn.Identity) for n in folded)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))] == kept
    assert before.abs().max() > 0.1  # the comparison below is not between near-zeros
    assert torch.allclose(before, after, rtol=0, atol=1e-5)


class Branchy(nn.Module):
    """A conv feeding two consumers and a BN after a ReLU: nothing may be folded."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu, self.bn2 = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.relu(y))


def test_batchnorm_without_a_sole_conv_producer_is_not_folded():
    model = random_model(Branchy)
    x = inputs(4)
    before = model(x)
    assert fold_batchnorm_(model) == []
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.BatchNorm2d)
    assert torch.equal(before, model(x))


class DataDependent(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.fc, self.norm = nn.Linear(784, 10), norm

    def forward(self, x):
        x = self.fc(x.flatten(1))
        return self.norm(x) if x.sum() > 0 else x


def test_untraceable_models_fold_only_when_they_have_batchnorm():
    # no BatchNorm: nothing to trace for, quantization goes ahead
    model = quantize(random_model(DataDependent, norm=nn.Identity()), 4)
    assert max(distinct_codes_per_channel(model.fc)) <= 16
    with pytest.raises(CompressionError, match="cannot trace the model to fold BatchNorm"):
        fold_batchnorm_(random_model(DataDependent, norm=nn.BatchNorm1d(10)))


# ---------------------------------------------------------------------------- weights


@pytest.mark.parametrize("bits", LOW_BITS)
def test_b_bit_weights_are_integer_codes_times_a_channel_scale(bits):
    model = quantize(random_model(), bits)
    q = 2 ** (bits - 1) - 1
    for name, layer in weight_layers(model):
        assert max(distinct_codes_per_channel(layer)) <= 2**bits, name
        scale = layer.weight_scale.view(-1, *([1] * (layer.weight.dim() - 1)))
        codes = torch.round(layer.weight.detach() / scale)
        assert torch.equal(codes * scale, layer.weight.detach())  # exactly codes * scale
        assert int(codes.abs().max()) == q  # the largest weight of a channel maps to qmax
        assert int(layer.weight_bits) == bits and layer.weight.dtype == torch.float32


@pytest.mark.parametrize("bits", LOW_BITS)
def test_pruned_zeros_stay_zero_and_zero_channels_are_safe(bits):
    model = prune_(random_model(mlp_bn), 0.8)
    with torch.no_grad():
        model[4].weight[3] = 0  # an all-zero output channel
    zeros = {name: (layer.weight == 0).clone() for name, layer in weight_layers(model)}
    quantize(model, bits)
    for name, layer in weight_layers(model):
        assert bool((layer.weight[zeros[name]] == 0).all()), name
        assert torch.isfinite(layer.weight_scale).all()
    assert bool((model[4].weight[3] == 0).all())


def test_non_finite_weights_are_a_compression_error():
    model = random_model(mlp_bn)
    with torch.no_grad():
        model[4].weight[0, 0] = float("inf")
    with pytest.raises(QuantizationError, match="non-finite weights in layer 4"):
        quantize(model, 4)
    assert issubclass(QuantizationError, CompressionError)


def test_quantization_survives_deepcopy_and_state_dict_round_trip():
    model = quantize(random_model(), 3, 8)
    x = inputs()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
        reloaded = quantize(random_model(seed=5), 3, 8)  # same structure, other values
        reloaded.load_state_dict(model.state_dict())
        assert torch.equal(reloaded(x), model(x))


# ------------------------------------------------------------------------ activations


def test_int8_activations_are_calibrated_and_fake_quantized():
    ctx = context(n=96, batch_size=16)
    model = Quantization().apply(random_model(), QuantizationConfig(8, 8), ctx)
    layers = dict(weight_layers(model))
    # the first conv has one input channel: ORT's float kernel is the faster one there
    assert [name for name, layer in layers.items() if hasattr(layer, "input_scale")] == ["4", "9", "11"]
    seen = {}
    for name, layer in layers.items():
        layer.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0]))
    with torch.no_grad():
        model(ctx.calibration_x[:8])
    for name in ("4", "9", "11"):
        layer = layers[name]
        scale, zero = float(layer.input_scale), int(layer.input_zero_point)
        assert scale > 0 and 0 <= zero <= 255
        steps = seen[name] / scale + zero  # what the layer receives lies on the uint8 grid
        assert torch.allclose(steps, steps.round(), atol=1e-3), name
        assert float(steps.min()) >= -1e-3 and float(steps.max()) <= 255 + 1e-3
    assert int(layers["9"].input_zero_point) == 0  # after ReLU the range starts at zero
    # the network input has negative values, and they are representable
    mlp = Quantization().apply(random_model(mlp_bn), QuantizationConfig(8, 8), ctx)
    first = next(layer for _, layer in weight_layers(mlp))
    assert 0 < int(first.input_zero_point) < 255


@pytest.mark.parametrize("in_channels, integer", [(1, False), (3, False), (4, True), (16, True)])
def test_convs_on_few_input_channels_keep_a_float_input(in_channels, integer):
    conv, linear = nn.Conv2d(in_channels, 8, 3), nn.Linear(in_channels, 8)
    assert runs_faster_in_integer(conv) is integer
    assert runs_faster_in_integer(linear) and not runs_faster_in_integer(nn.Embedding(10, 4))


def test_recalibrating_does_not_stack_fake_quant_hooks():
    layer = nn.Linear(4, 2)
    set_input_quantization_(layer, 0.1, 3)
    set_input_quantization_(layer, 0.2, 5)
    assert len(layer._forward_pre_hooks) == 1 and float(layer.input_scale) == pytest.approx(0.2)


def test_activation_quantization_needs_calibration_data():
    ctx = context(batch_size=16)
    ctx.calibration_x = ctx.calibration_x[:0]
    with pytest.raises(QuantizationError, match="calibration data"):
        Quantization().apply(random_model(), QuantizationConfig(8, 8), ctx)


# ---------------------------------------------------------------------------- export


@pytest.mark.parametrize("bits, activations", [(4, 32), (8, 8), (3, 8), (2, 8)])
def test_quantized_model_exports_to_onnx_and_runs_the_same(tmp_path, bits, activations):
    import onnx
    import onnxruntime as ort

    model = quantize(random_model(), bits, activations)
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model,
        (inputs(1),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    # one per integer layer's input: all but the first conv (one input channel)
    assert ops.count("QuantizeLinear") == (3 if activations == 8 else 0)
    # Graph optimisations off: this checks the exported graph computes what torch computes.
    # Optimised, ORT would re-quantize the float weights behind quantized inputs with codes
    # of its own; the runtime writes the trial's codes into the graph for that.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = inputs(256, seed=2)
    expected = model(x).detach()
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert got.shape == expected.shape
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(got, expected, rtol=0, atol=1e-2 * float(expected.abs().max()))


# --------------------------------------------------------------------------- training


def test_training_simulation_uses_ste_gradients_and_restores_float_weights():
    model = prune_(random_model(mlp_bn), 0.5)
    originals = {name: layer.weight for name, layer in weight_layers(model)}
    floats = {name: w.detach().clone() for name, w in originals.items()}
    x = inputs(16)
    with Quantization.training_simulation(QuantizationConfig(2, 32))(model):
        for name, layer in weight_layers(model):
            seen = layer.weight.detach()
            assert max(distinct_codes_per_channel(layer)) <= 4  # the forward sees 2-bit weights
            assert bool((seen[floats[name] == 0] == 0).all())  # pruned stay pruned under q
        model(x).square().mean().backward()

    # the reference: the same forward with the quantized weights as ordinary leaves
    reference = copy.deepcopy(model)
    with Quantization.training_simulation(QuantizationConfig(2, 32))(reference):
        fixed = {name: layer.weight.detach().clone() for name, layer in weight_layers(reference)}
    for name, layer in weight_layers(reference):
        layer.weight = nn.Parameter(fixed[name])
    reference(x).square().mean().backward()

    for name, layer in weight_layers(model):
        assert layer.weight is originals[name]  # the Parameter the optimizer holds
        assert torch.equal(layer.weight.detach(), floats[name])  # float weights, not quantized
        assert not hasattr(layer, "parametrizations")
        ref_grad = reference.get_submodule(name).weight.grad
        assert layer.weight.grad.abs().sum() > 0
        assert torch.allclose(layer.weight.grad, ref_grad, atol=1e-6)  # straight through q


def test_training_simulation_at_32_bits_changes_nothing():
    model = random_model(mlp_bn)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with Quantization.training_simulation(QuantizationConfig(32, 32))(model):
        assert not any(hasattr(layer, "parametrizations") for _, layer in weight_layers(model))
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------- mixed precision


def test_allocation_spends_the_budget_where_the_sensitivity_is():
    from strategies.sensitivity import _at, allocate

    counts = {"big": 1000, "small": 10}
    costs = {"big": {2: 0.5, 3: 0.1, 4: 0.05, 8: 0.0}, "small": {2: 5.0, 3: 1.0, 4: 0.5, 8: 0.0}}
    assert allocate(counts, costs, 4) == {"big": 3, "small": 8}
    assert allocate(counts, costs, 2) == {"big": 2, "small": 2}  # nothing is lower
    assert allocate({**counts, "unscanned": 50}, costs, 4)["unscanned"] == 4
    # a level between the measured ones: its cost is interpolated, and the budget still holds
    between = allocate(counts, costs, 0.35 * 2 + 0.65 * 3)
    assert sum(counts[k] * between[k] for k in counts) <= 2.65 * sum(counts.values()) + 1e-9

    rng = torch.Generator().manual_seed(0)
    levels = (2, 3, 4, 5, 6, 8)
    for _ in range(200):
        n = int(torch.randint(1, 6, (1,), generator=rng))
        counts = {str(i): int(c) for i, c in enumerate(torch.randint(1, 10_000, (n,), generator=rng))}
        costs = {}
        for name in counts:  # decreasing with the level, as measured
            steps = torch.rand(len(levels), generator=rng).sort(descending=True).values.cumsum(0).flip(0)
            costs[name] = dict(zip(levels, steps.tolist(), strict=True))
        average = float(torch.empty(1).uniform_(2, 8, generator=rng))
        chosen = allocate(counts, costs, average)
        assert sum(counts[k] * chosen[k] for k in counts) <= average * sum(counts.values()) * (1 + 1e-9)
        assert sum(_at(costs[k], chosen[k]) for k in counts) <= sum(_at(costs[k], average) for k in counts) + 1e-9


def test_mixed_precision_is_searched_only_where_the_space_lists_it():
    from optuna.trial import FixedTrial

    params = {"quantization.weight_bits": 4, "quantization.activation_bits": 8}
    assert Quantization().suggest(FixedTrial(params)) == QuantizationConfig(4, 8)
    listed = Quantization(parse_space({"quantization.mixed_precision": [False, True]}))
    assert Quantization().sensitivity(random_model(), inputs(), 16) is None
    mixed = {**params, "quantization.mixed_precision": True}
    assert listed.suggest(FixedTrial(mixed)) == QuantizationConfig(4, 8, mixed_precision=True)
    with pytest.raises(ValueError, match=r"quantization.mixed_precision must be chosen from \[False, True\]"):
        parse_space({"quantization.mixed_precision": [1]})
    with pytest.raises(ValueError, match="quantization.layer_bits"):
        QuantizationConfig(4, 32, mixed_precision=True, layer_bits=(("0", 32),))
