import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from strategies.artifact import MAGIC, load_artifact, pack_codes, read_header, save_artifact, unpack_codes
from strategies.base import weight_layers
from strategies.quantization import qmax, quant_state
from strategies.runtime import export_onnx, quantize_onnx_weights_
from tests.helpers import inputs, lenet5_bn, mlp_bn, prune_, quantize, random_model

# channel-reduced sizes stand in for structured pruning; the factory always builds full size
REDUCED = {"c1": 12, "c2": 30, "hidden": 200}

CASES = {
    "fp32": {},
    **{f"{b}-bit": {"bits": b} for b in (2, 3, 4, 5, 6, 8)},
    "sparse90": {"sparsity": 0.9},
    "int8-activations": {"bits": 8, "activations": 8},
    "activations-only": {"bits": 32, "activations": 8},
    "reduced": {"sizes": REDUCED},
    "reduced-sparse-3bit-int8": {"sizes": REDUCED, "sparsity": 0.8, "bits": 3, "activations": 8},
}


def build(case):
    model = random_model(**case.get("sizes", {}))
    if case.get("sparsity"):
        prune_(model, case["sparsity"])
    if case.get("bits") or case.get("activations"):
        quantize(model, case.get("bits", 32), case.get("activations", 32))
    return model


def sizes(model):
    keys = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")
    return {name: {k: getattr(m, k) for k in keys if hasattr(m, k)} for name, m in model.named_modules()}


@pytest.mark.parametrize("case", list(CASES))
def test_artifact_reloads_bit_identical_and_size_is_the_file_length(tmp_path, case):
    model = build(CASES[case])
    path = tmp_path / "weights.acw"
    size = save_artifact(model, path)
    assert size == os.path.getsize(path)
    assert os.listdir(tmp_path) == ["weights.acw"]  # no temporary file left behind

    loaded = load_artifact(path, lenet5_bn)
    assert not loaded.training
    x = inputs(32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    saved, restored = model.state_dict(), loaded.state_dict()
    assert list(saved) == list(restored)
    assert all(torch.equal(saved[k], restored[k]) and saved[k].dtype == restored[k].dtype for k in saved)
    assert sizes(loaded) == sizes(model)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    # saving the reloaded model gives the same bytes: nothing is lost or invented
    assert save_artifact(loaded, tmp_path / "again.acw") == size
    assert (tmp_path / "again.acw").read_bytes() == path.read_bytes()


def test_reloaded_quantized_model_exports_to_onnx(tmp_path):
    import onnxruntime as ort

    model = build(CASES["reduced-sparse-3bit-int8"])
    save_artifact(model, tmp_path / "w.acw")
    loaded = load_artifact(tmp_path / "w.acw", lenet5_bn)
    torch.onnx.export(
        loaded,
        (inputs(1),),
        str(tmp_path / "m.onnx"),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    x = inputs(64)
    got = session.run(None, {"input": x.numpy()})[0]
    assert got.shape == (64, 10)
    assert np.array_equal(got.argmax(1), model(x).argmax(1).numpy())


def test_bit_packing_uses_b_bits_per_code():
    for bits in (2, 3, 4, 5, 6, 8):
        q = 2 ** (bits - 1) - 1
        codes = np.random.default_rng(bits).integers(-q, q + 1, size=1001).astype(np.int32)
        codes[:2] = -q, q  # both ends of the range
        data = pack_codes(codes, bits)
        assert len(data) == (1001 * bits + 7) // 8
        assert np.array_equal(unpack_codes(data, 1001, bits), codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_tensor_table_stores_packed_codes_and_sparse_maps_at_their_true_size(tmp_path, bits):
    dense, sparse = build({"bits": bits}), build({"bits": bits, "sparsity": 0.9})
    for model, layout in ((dense, "dense"), (sparse, "sparse")):
        save_artifact(model, tmp_path / "w.acw")
        table = {e["name"]: e for e in read_header(tmp_path / "w.acw")["tensors"]}
        for name, layer in weight_layers(model):
            entry, n = table[f"{name}.weight"], layer.weight.numel()
            assert (entry["encoding"], entry["bits"], entry["layout"]) == ("codes", bits, layout)
            stored = n if layout == "dense" else int((layer.weight != 0).sum())
            bitmap = 0 if layout == "dense" else math.ceil(n / 8)
            assert entry["length"] == bitmap + math.ceil(stored * bits / 8)
        assert all(table[k]["encoding"] == "raw" for k in table if not k.endswith(".weight"))


def test_fp32_file_is_its_tensors_plus_a_small_header(tmp_path):
    model = build({})
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = save_artifact(model, tmp_path / "w.acw")
    assert tensor_bytes <= size <= tensor_bytes + 2048


def test_sparse_low_bit_model_is_much_smaller_than_fp32(tmp_path):
    fp32 = save_artifact(build({}), tmp_path / "a.acw")
    small = save_artifact(build({"sparsity": 0.9, "bits": 4}), tmp_path / "b.acw")
    # per weight: 1 map bit + 10 % × 4 code bits = 1.4 bits against 32, about 23× smaller
    assert small < fp32 / 15


def test_negative_zeros_are_stored_as_zeros(tmp_path):
    model = nn.Sequential(nn.Linear(100, 40))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) > 0.9)  # a mask product leaves -0.0 behind
    assert bool(torch.signbit(model[0].weight[model[0].weight == 0]).any())
    size = save_artifact(model, tmp_path / "w.acw")
    loaded = load_artifact(tmp_path / "w.acw", lambda: nn.Sequential(nn.Linear(100, 40)))
    assert read_header(tmp_path / "w.acw")["tensors"][0]["layout"] == "sparse"
    assert size < 4000 * 4 * 0.2 + 2000  # about 10 % of the floats plus the bitmap, not ~55 %
    x = torch.randn(8, 100)
    assert torch.equal(loaded(x), model(x))


def test_unfolded_batchnorm_and_its_counter_are_restored(tmp_path):
    model = random_model(mlp_bn)
    model[2].num_batches_tracked.fill_(7)
    save_artifact(model, tmp_path / "w.acw")
    loaded = load_artifact(tmp_path / "w.acw", mlp_bn)
    assert isinstance(loaded[2], nn.BatchNorm1d) and int(loaded[2].num_batches_tracked) == 7


@pytest.mark.parametrize("damage", ["truncate", "truncate-header", "magic", "version", "extra", "foreign"])
def test_damaged_or_foreign_files_are_refused(tmp_path, damage):
    path = tmp_path / "w.acw"
    save_artifact(build({"bits": 4}), path)
    data = path.read_bytes()
    data = {
        "truncate": data[:-10],
        "truncate-header": data[:20],
        "magic": b"XXXX" + data[4:],
        "version": MAGIC + (99).to_bytes(2, "little") + data[6:],
        "extra": data + b"\0",
        "foreign": b"PK\x03\x04" + bytes(200),
    }[damage]
    path.write_bytes(data)
    with pytest.raises(ValueError, match=str(path)):
        load_artifact(path, lenet5_bn)


def test_a_factory_that_does_not_fit_is_refused(tmp_path):
    save_artifact(build({}), tmp_path / "w.acw")
    with pytest.raises(ValueError, match="does not fit the factory"):
        load_artifact(tmp_path / "w.acw", mlp_bn)


def depthwise(channels=8):
    return nn.Sequential(nn.Conv2d(1, channels, 3), nn.Conv2d(channels, channels, 3, groups=channels), nn.Flatten())


def test_pruned_grouped_convolutions_get_their_stored_groups(tmp_path):
    model = quantize(random_model(depthwise, channels=4), 4)
    save_artifact(model, tmp_path / "w.acw")
    loaded = load_artifact(tmp_path / "w.acw", depthwise)  # the factory builds 8 channels
    assert (loaded[1].groups, loaded[1].in_channels, loaded[1].out_channels) == (4, 4, 4)
    x = inputs(4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_the_artifact_and_the_onnx_file_store_the_codes_quant_state_gives(tmp_path):
    import onnx
    from onnx import numpy_helper

    model = build(CASES["reduced-sparse-3bit-int8"])
    with torch.no_grad():  # a weight off the grid, which no strategy leaves: both writers clamp it alike
        model[9].weight[0, 0] = model[9].weight_scale[0] * 100
    states = {name: quant_state(layer) for name, layer in weight_layers(model)}
    assert all(state.input_scale is not None for state in states.values())
    save_artifact(model, tmp_path / "w.acw")
    stored = {name: quant_state(layer) for name, layer in weight_layers(load_artifact(tmp_path / "w.acw", lenet5_bn))}
    onnx_path = export_onnx(model, inputs(1), tmp_path / "m.onnx")
    assert quantize_onnx_weights_(onnx_path, model) == len(states)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(onnx_path)).graph.initializer}
    for name, state in states.items():
        assert int(state.codes.abs().max()) == qmax(state.bits) == 3
        assert torch.equal(stored[name].codes, state.codes) and stored[name].bits == state.bits
        assert np.array_equal(inits[f"{name}.weight_codes"].astype(np.int32) - 128, state.codes.numpy())
        assert np.array_equal(inits[f"{name}.weight_scale"], state.scale.numpy())
    assert quant_state(nn.Linear(4, 2)) is None
