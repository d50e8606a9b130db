import dataclasses

import numpy as np
import pytest
import torch

from strategies import pipeline
from strategies.artifact import save_artifact
from strategies.base import CompressionError, weight_layers
from strategies.distillation import Distillation, DistillationConfig
from strategies.quantization import Quantization, QuantizationConfig
from strategies.registry import parse_space
from strategies.runtime import check_agreement, materialize
from strategies.structured import StructuredPruning, StructuredPruningConfig
from tests.helpers import MODELS, context, strategies_for, trained_like


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_materialized_runtime_matches_the_model(tmp_path, runtime):
    ctx = context()
    model = StructuredPruning().apply(trained_like(MODELS["lenet5"]), StructuredPruningConfig(0.5), ctx)
    before = torch.get_num_threads()
    d = materialize(model, tmp_path, runtime=runtime, threads=1, example_inputs=ctx.example_inputs)
    assert d.artifact_path == tmp_path / "weights.acw" and d.artifact_path.stat().st_size > 0
    for n in (1, 7):  # dynamic batch
        x = torch.randn(n, 1, 28, 28)
        with torch.no_grad():
            assert torch.allclose(d.predict(x), model(x), atol=1e-4)
        d.run(x.numpy())
    assert torch.get_num_threads() == before
    if runtime == "onnxruntime":
        assert d.onnx_path.exists()


def test_weight_quantized_model_runs_the_same_in_onnxruntime(tmp_path):
    ctx = context()
    model = Quantization().apply(trained_like(MODELS["lenet5"]), QuantizationConfig(4, 32), ctx)
    d = materialize(model, tmp_path, example_inputs=ctx.example_inputs)
    x = torch.randn(64, 1, 28, 28)
    assert check_agreement(d.predict, lambda b: model(b).detach(), x) == 0.0


def test_unknown_runtime_and_export_failure(tmp_path):
    ctx = context()
    with pytest.raises(ValueError, match=r"latency.runtime must be one of \['onnxruntime', 'torch'\]"):
        materialize(MODELS["lenet300"](), tmp_path, runtime="tvm", example_inputs=ctx.example_inputs)

    class NotExportable(torch.nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real.flatten(1)[:, :10]

    with pytest.raises(CompressionError, match="ONNX export failed"):
        materialize(NotExportable(), tmp_path, example_inputs=ctx.example_inputs)


def test_onnx_file_carries_the_trials_integer_codes_and_scales(tmp_path):
    import onnx
    from onnx import numpy_helper

    ctx = context()
    model = Quantization().apply(trained_like(MODELS["lenet300"]), QuantizationConfig(3, 8), ctx)
    d = materialize(model, tmp_path, example_inputs=ctx.example_inputs)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(d.onnx_path)).graph.initializer}
    for name in ("1", "3", "5"):
        layer = model.get_submodule(name)
        # 3-bit codes run as signed int8 on every CPU (only 8-bit ones could saturate without VNNI)
        assert inits[f"{name}.weight_codes"].dtype.name == "int8"
        assert np.all(inits[f"{name}.weight_zero_point"] == 0)
        codes = inits[f"{name}.weight_codes"].astype(np.int16)
        assert np.abs(codes).max() <= 3  # 3-bit codes in [-3, 3]
        assert np.array_equal(inits[f"{name}.weight_scale"], layer.weight_scale.numpy())
        assert np.array_equal(codes * layer.weight_scale.numpy()[:, None], layer.weight.detach().numpy())
        # the codes as this writer derived them before it read quant_state: the same integers
        unclamped = torch.round(layer.weight.detach() / layer.weight_scale.view(-1, 1)).to(torch.int16)
        assert np.array_equal(codes, unclamped.numpy())
        assert f"{name}.weight" not in inits  # no float copy left for the runtime to requantize
        # the bias in the accumulator's own steps, as the simulation rounds it
        step = (layer.input_scale * layer.weight_scale).numpy()
        assert inits[f"{name}.bias_codes"].dtype.name == "int32"
        assert np.allclose(inits[f"{name}.bias_codes"] * step, layer.bias.detach().numpy(), atol=1e-6)
    x = torch.randn(256, 1, 28, 28)
    assert check_agreement(d.predict, lambda b: model(b).detach(), x) <= 0.01


def test_weight_only_quantization_exports_exact_float_weights(tmp_path):
    import onnx
    from onnx import numpy_helper

    ctx = context()
    model = Quantization().apply(trained_like(MODELS["lenet300"]), QuantizationConfig(4, 32), ctx)
    d = materialize(model, tmp_path, example_inputs=ctx.example_inputs)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(d.onnx_path)).graph.initializer}
    assert np.array_equal(inits["1.weight"], model[1].weight.detach().numpy())
    assert not any(name.endswith("weight_codes") for name in inits)


def test_int8_cnn_runs_each_layer_on_its_faster_kernel(tmp_path):
    """ORT must fuse each quantized layer into QLinearConv/QGemm; a float conv left behind
    (for instance behind a Flatten that blocks QDQ propagation) would run the "int8" model in
    float. The first conv (one input channel) stays float, and so does the pool after it: the
    QuantizeLinear comes after that pool, not before it (a uint8 pool there runs on a slow
    generic kernel)."""
    import onnx
    import onnxruntime as ort

    ctx = context()
    model = Quantization().apply(trained_like(MODELS["lenet5"]), QuantizationConfig(8, 8), ctx)
    assert not hasattr(model[0], "input_scale") and all(hasattr(model[i], "input_scale") for i in (4, 9, 11))
    d = materialize(model, tmp_path, example_inputs=ctx.example_inputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(d.onnx_path), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("QLinearConv") == 1 and ops.count("QGemm") == 2, ops
    assert [op for op in ops if op in ("Conv", "FusedConv")] == ["Conv"], ops
    producer = {out: n for n in nodes for out in n.output}
    first_quantize = next(n for n in nodes if n.op_type == "QuantizeLinear")
    assert producer[first_quantize.input[0]].op_type == "MaxPool", ops  # a float pool, then quantize
    assert "NhwcMaxPool" in ops, ops  # the integer conv's pool runs on uint8, in NHWC
    x = torch.randn(256, 1, 28, 28)
    assert check_agreement(d.predict, lambda b: model(b).detach(), x) <= 0.01


@pytest.mark.parametrize("signed_bits", [7, 8])
def test_eight_bit_codes_are_signed_only_where_the_cpu_cannot_saturate(tmp_path, signed_bits):
    """Without VNNI (7), 8-bit codes go in as uint8 with zero-point 128: the same integers."""
    import onnx
    from onnx import numpy_helper

    from strategies.runtime import export_onnx, quantize_onnx_weights_

    ctx = context()
    model = Quantization().apply(trained_like(MODELS["lenet300"]), QuantizationConfig(8, 8), ctx)
    path = export_onnx(model, ctx.example_inputs, tmp_path / "model.onnx")
    assert quantize_onnx_weights_(path, model, max_signed_bits=signed_bits) == 3
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    codes, zero_point = inits["1.weight_codes"], inits["1.weight_zero_point"]
    assert codes.dtype.name == ("int8" if signed_bits == 8 else "uint8")
    integers = codes.astype(np.int16) - zero_point.astype(np.int16)[:, None]
    assert np.array_equal(integers * model[1].weight_scale.numpy()[:, None], model[1].weight.detach().numpy())


@pytest.mark.parametrize("model_name", ["lenet5", "lenet300"])
def test_low_bit_integer_layers_predict_as_the_simulation(tmp_path, model_name):
    """ORT adds the bias in the int32 accumulator (step input_scale × weight_scale); the
    simulation rounds it there too, so even 3-bit layers pick the same class on every input
    (with a float bias, 0.2-0.6 % of these inputs changed class)."""
    ctx = context(n=256)
    model = Quantization().apply(trained_like(MODELS[model_name]), QuantizationConfig(3, 8), ctx)
    integer = [layer for _, layer in weight_layers(model) if hasattr(layer, "input_scale")]
    assert len(integer) == 3  # all but LeNet-5's first conv, whose float kernel is faster
    for layer in integer:
        steps = layer.bias.detach() / (layer.input_scale * layer.weight_scale)
        assert torch.allclose(steps, steps.round(), atol=1e-3)
    d = materialize(model, tmp_path, example_inputs=ctx.example_inputs)
    x = torch.randn(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert check_agreement(d.predict, lambda b: model(b).detach(), x) == 0.0


def test_mixed_precision_gives_each_layer_its_width_and_runs_the_same(tmp_path):
    model = trained_like(MODELS["lenet5"])
    layers = [name for name, _ in weight_layers(model)]
    # as measured on the trained LeNet-5: the convolutions and the classifier are the sensitive
    # ones, and the 400k-weight hidden layer holds most of the bits
    scan = dict(
        zip(
            layers,
            [
                {2: 0.12, 3: 0.014, 4: 0.0073, 8: 1e-5},
                {2: 0.34, 3: 0.0084, 4: 0.0027, 8: 1e-5},
                {2: 0.10, 3: 0.0030, 4: 0.0004, 8: 0.0},
                {2: 0.17, 3: 0.0032, 4: 0.0007, 8: 0.0},
            ],
            strict=True,
        )
    )
    ctx = context(n=256, sensitivity={"quantization": scan})
    strategies = strategies_for({"quantization.mixed_precision": [True]})
    built, resolved = {}, {}
    for mixed in (False, True):
        config = QuantizationConfig(4, 8, mixed_precision=mixed)
        built[mixed], resolved[mixed] = pipeline.compress(
            trained_like(MODELS["lenet5"]), strategies, {"quantization": config}, ctx
        )
    widths = {name: int(m.weight_bits) for name, m in weight_layers(built[True])}
    assert widths == dict(zip(layers, [8, 8, 3, 8], strict=True))
    assert {int(m.weight_bits) for _, m in weight_layers(built[False])} == {4}
    sizes = {mixed: save_artifact(m, tmp_path / f"{mixed}.acw") for mixed, m in built.items()}
    assert sizes[True] < sizes[False]  # at most 4 bits on average: here fewer
    d = materialize(built[True], tmp_path / "onnx", example_inputs=ctx.example_inputs)
    assert d.artifact_path.stat().st_size == sizes[True]
    x = torch.randn(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert check_agreement(d.predict, lambda b: built[True](b).detach(), x) == 0.0

    space = {"quantization.weight_bits": [2, 4, 8, 32], "quantization.mixed_precision": [False, True]}
    measured = Quantization(parse_space(space)).sensitivity(model, ctx.calibration_x, 32)
    assert list(measured) == layers and all(set(v) == {2, 4, 8} for v in measured.values())
    assert all(v[2] > v[8] >= 0 for v in measured.values())  # narrower weights move the outputs more
    with pytest.raises(CompressionError, match="sensitivity scan"):
        pipeline.compress(
            model, strategies, {"quantization": QuantizationConfig(4, 32, mixed_precision=True)}, context()
        )


def test_compress_returns_the_widths_it_allotted_and_the_record_reads_them():
    layers = [name for name, _ in weight_layers(MODELS["lenet5"]())]
    scan = {name: {2: cost, 4: cost / 10, 8: 0.0} for name, cost in zip(layers, (1.0, 1.0, 0.01, 1.0), strict=True)}
    strategies = strategies_for({"quantization.mixed_precision": [True]})
    config = QuantizationConfig(4, 32, mixed_precision=True)
    model, resolved = pipeline.compress(
        trained_like(MODELS["lenet5"]),
        strategies,
        {"quantization": config},
        context(sensitivity={"quantization": scan}),
    )
    applied = tuple((name, int(m.weight_bits)) for name, m in weight_layers(model))
    assert resolved["quantization"] == dataclasses.replace(config, layer_bits=applied)
    assert len({bits for _, bits in applied}) > 1  # the widths differ from layer to layer
    record = strategies[0].layer_record(model, resolved["quantization"])
    assert record == {"quantization.layer_bits": " ".join(f"{name}:{bits}" for name, bits in applied)}
    with pytest.raises(ValueError, match="as pipeline.compress resolved it"):
        strategies[0].layer_record(model, config)  # the config before the widths were allotted
    # without mixed precision the config comes back as it went in
    plain = QuantizationConfig(4, 8)
    assert pipeline.compress(trained_like(MODELS["lenet5"]), strategies, {"quantization": plain}, context())[1] == {
        "quantization": plain
    }


class _Recorded:
    """Mixed into a strategy: records the pipeline's calls on it, and what it was given."""

    def before_finetune(self, model, config, context):
        self.calls.append(("before_finetune", self.name, weight_layers(model)[0][1].out_channels))
        return super().before_finetune(model, config, context)

    def apply(self, model, config, context):
        self.calls.append(("apply", self.name, context.fake_quant is not None))
        return super().apply(model, config, context)


def test_compress_prunes_then_calls_every_hook_once_then_fine_tunes_and_quantizes():
    calls = []
    classes = (StructuredPruning, Distillation, Quantization)
    strategies = [type(cls.__name__, (_Recorded, cls), {"calls": calls})() for cls in classes]
    configs = {
        "structured_pruning": StructuredPruningConfig(0.5),
        "distillation": DistillationConfig(1, 2.0, 0.5, 0.01),
        "quantization": QuantizationConfig(4, 32),
    }
    ctx = context()
    ctx.teacher_logits = torch.randn(len(ctx.finetune_x), 10)
    model, resolved = pipeline.compress(trained_like(MODELS["lenet5"]), strategies, configs, ctx)
    assert calls == [
        ("apply", "structured_pruning", False),
        *[("before_finetune", name, 10) for name in configs],  # on the pruned model (20 channels → 10)
        ("apply", "distillation", True),  # trains against the 4-bit weights
        ("apply", "quantization", True),
    ]
    assert resolved == configs and not model.training
    assert ctx.fake_quant is None  # the caller's context is not changed
