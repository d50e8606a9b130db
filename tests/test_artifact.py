import json
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from strategies import codebook
from strategies.activations import set_input_quantization_
from strategies.artifact import (
    MAGIC,
    VERSION,
    encode_model,
    load_artifact,
    read_header,
    save_artifact,
    size_breakdown,
)
from strategies.base import weight_layers
from strategies.coding import pack_codes, unpack_codes
from strategies.quantization import WIDTH_BUFFER, qmax, quant_state, quantize_weights_
from strategies.runtime import export_onnx, quantize_onnx_weights_
from tests.helpers import inputs, lenet5_bn, mlp_bn, prune_, quantize, random_model

# channel-reduced sizes stand in for structured pruning; the factory always builds full size
REDUCED = {"c1": 12, "c2": 30, "hidden": 200}
GRID = [(b, a, s) for b in (2, 3, 4, 5, 6, 8, 32) for a in (8, 32) for s in (0, 0.5, 0.9, 0.97)]
STRUCTURED = [(b, a, s) for b in (3, 8, 32) for a in (8, 32) for s in (0, 0.9)]
CASES = {
    "fp32": {},
    "4-bit": {"bits": 4},
    "sparse90": {"sparsity": 0.9},
    "sparse90-4bit": {"sparsity": 0.9, "bits": 4},
    "int8-activations": {"bits": 8, "activations": 8},
    "reduced-sparse-3bit-int8": {"sizes": REDUCED, "sparsity": 0.8, "bits": 3, "activations": 8},
}


def build(case):
    model = random_model(**case.get("sizes", {}))
    if case.get("sparsity"):
        prune_(model, case["sparsity"])
    if case.get("bits", 32) < 32 or case.get("activations", 32) < 32:
        quantize(model, case.get("bits", 32), case.get("activations", 32))
    return model


def sizes(model):
    keys = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")
    return {name: {k: getattr(m, k) for k in keys if hasattr(m, k)} for name, m in model.named_modules()}


def assert_same_model(model, loaded, x):
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    saved, restored = model.state_dict(), loaded.state_dict()
    assert list(saved) == list(restored)
    assert all(torch.equal(saved[k], restored[k]) and saved[k].dtype == restored[k].dtype for k in saved)
    assert sizes(loaded) == sizes(model)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]


def encode_v1(model):
    """The bytes the version-1 writer produced: raw or b-bit packed codes, dense or bitmap + non-zeros."""
    modules, entries, chunks, offset = dict(model.named_modules()), [], [], 0
    for name, tensor in model.state_dict().items():
        layer, _, attr = name.rpartition(".")
        if attr == WIDTH_BUFFER:
            continue
        state = quant_state(modules[layer]) if attr == "weight" else None
        values = (tensor if state is None else state.codes).numpy().ravel()
        encode = (lambda v: v.tobytes()) if state is None else (lambda v, b=state.bits: pack_codes(v, b))
        dense, present = encode(values), values != 0
        sparse = np.packbits(present).tobytes() + encode(values[present])
        layout, data = ("sparse", sparse) if not present.all() and len(sparse) < len(dense) else ("dense", dense)
        entry = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        entry.update({"encoding": "raw"} if state is None else {"encoding": "codes", "bits": state.bits})
        entries.append({**entry, "layout": layout, "offset": offset, "length": len(data)})
        chunks.append(data)
        offset += len(data)
    header = {
        "tensors": entries,
        "identity": [name for name, m in modules.items() if name and isinstance(m, nn.Identity)],
        "conv_groups": {name: m.groups for name, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)},
    }
    packed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return struct.pack("<4sHI", MAGIC, 1, len(packed)) + packed + b"".join(chunks)


def check_roundtrip(tmp_path, model, factory=lenet5_bn):
    path = tmp_path / "weights.acw"
    size = save_artifact(model, path)
    assert size == os.path.getsize(path)
    assert os.listdir(tmp_path) == ["weights.acw"]  # no temporary file left behind
    assert sum(size_breakdown(path).values()) == size
    assert_same_model(model, load_artifact(path, factory), inputs(16))
    # saving the reloaded model gives the same bytes: nothing is lost or invented
    assert save_artifact(load_artifact(path, factory), tmp_path / "again.acw") == size
    assert (tmp_path / "again.acw").read_bytes() == path.read_bytes()
    return path


@pytest.mark.parametrize("bits,activations,sparsity", GRID, ids=[f"w{b}-a{a}-s{s}" for b, a, s in GRID])
def test_every_scheme_reloads_bit_identical_and_size_is_the_file_length(tmp_path, bits, activations, sparsity):
    check_roundtrip(tmp_path, build({"bits": bits, "activations": activations, "sparsity": sparsity}))


@pytest.mark.parametrize("bits,activations,sparsity", STRUCTURED, ids=[f"w{b}-a{a}-s{s}" for b, a, s in STRUCTURED])
def test_structurally_pruned_models_reload_bit_identical(tmp_path, bits, activations, sparsity):
    model = build({"sizes": REDUCED, "bits": bits, "activations": activations, "sparsity": sparsity})
    check_roundtrip(tmp_path, model)


def test_degenerate_tensors_reload_bit_identical(tmp_path):
    """A layer pruned away entirely, one weight value everywhere, a palette of few floats, a single
    code: each is its own corner of the coders."""
    model = quantize(random_model(), 4)
    with torch.no_grad():
        model[0].weight.zero_()  # every code 0
        model[4].weight.copy_(model[4].weight_scale.view(-1, 1, 1, 1).expand_as(model[4].weight))  # every code 1
        model[9].bias.copy_(torch.tensor([0.25, -1.5, 3.0])[torch.randint(0, 3, (500,))])
        model[11].bias.zero_()
    check_roundtrip(tmp_path, model)
    table = {e["name"]: e for e in read_header(tmp_path / "weights.acw")["tensors"]}
    assert table["9.bias"]["encoding"] == "palette"
    assert table["0.weight"]["lengths"][1] == 0 and table["4.weight"]["lengths"][1] == 0  # nothing to say


def test_codebook_layers_reload_bit_identical_and_store_their_indices(tmp_path):
    model = prune_(random_model(), 0.9)
    model.eval()
    from strategies.fold import fold_batchnorm_

    fold_batchnorm_(model)
    codebook.share_weights_(model, lambda _: 4)
    path = check_roundtrip(tmp_path, model)
    table = {e["name"]: e for e in read_header(path)["tensors"]}
    assert {table[f"{name}.weight"]["encoding"] for name, _ in weight_layers(model)} <= {"palette", "zlib"}
    parts = size_breakdown(path)
    nnz = sum(int((layer.weight != 0).sum()) for _, layer in weight_layers(model))
    assert parts["codes"] < nnz * 4 / 8  # below 4 bits per stored weight, not 32
    assert parts["scales"] == 4 * 16 * len(weight_layers(model)) and parts["raw"] > 0  # codebooks; biases


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
def test_tensor_table_records_each_choice_and_sparse_maps_cost_less_than_a_bit(tmp_path, bits):
    dense, sparse = build({"bits": bits}), build({"bits": bits, "sparsity": 0.9})
    for model, is_sparse in ((dense, False), (sparse, True)):
        save_artifact(model, tmp_path / "w.acw")
        header = read_header(tmp_path / "w.acw")
        assert set(header) == {"tensors", "identity", "conv_groups", "module_lists", "crc32"}
        table = {e["name"]: e for e in header["tensors"]}
        for entry in table.values():
            assert entry["layout"] in ("dense", "bitmap", "bernoulli", "gaps")
            assert entry["encoding"] in ("packed", "ans", "zlib", "raw", "palette", "planes")
        for name, layer in weight_layers(model):
            entry, n = table[f"{name}.weight"], layer.weight.numel()
            assert entry["bits"] == bits and entry["encoding"] in ("packed", "ans", "zlib")
            assert (entry["layout"] != "dense") == is_sparse
            if is_sparse:  # the index costs less than v1's bitmap, the values less than packed codes
                assert entry["nnz"] == int((layer.weight != 0).sum())
                assert entry["lengths"][0] < math.ceil(n / 8) and entry["lengths"][1] <= math.ceil(
                    entry["nnz"] * bits / 8
                )
        assert all("bits" not in table[k] for k in table if not k.endswith(".weight"))


def test_fp32_file_is_at_most_its_tensors_plus_a_small_header(tmp_path):
    model = build({})
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = save_artifact(model, tmp_path / "w.acw")
    assert size <= tensor_bytes + 2048


def test_sparse_low_bit_model_is_much_smaller_than_fp32(tmp_path):
    fp32 = save_artifact(build({}), tmp_path / "a.acw")
    small = save_artifact(build({"sparsity": 0.9, "bits": 4}), tmp_path / "b.acw")
    # per weight: under 0.47 bits of index (the entropy of 10 % density) + 10 % × 4 code bits, against 32
    assert small < fp32 / 30


def test_entropy_coded_file_is_smaller_than_version_1_on_a_sparse_quantized_lenet5(tmp_path):
    for case in ({"sparsity": 0.9, "bits": 4}, {"sparsity": 0.95, "bits": 3, "activations": 8}):
        model = build(case)
        old, new = encode_v1(model), encode_model(model)
        assert len(new) < len(old) * 0.75
        (tmp_path / "v1.acw").write_bytes(old)
        (tmp_path / "v2.acw").write_bytes(new)
        v1, v2 = size_breakdown(tmp_path / "v1.acw"), size_breakdown(tmp_path / "v2.acw")
        assert v2["indices"] < v1["indices"] / 2 and v2["codes"] <= v1["codes"]
        # no tensor's bytes grow: every version-1 choice is still a candidate, and tables count
        new_lengths = {e["name"]: sum(e["lengths"]) for e in read_header(tmp_path / "v2.acw")["tensors"]}
        assert all(new_lengths[e["name"]] <= e["length"] for e in read_header(tmp_path / "v1.acw")["tensors"])


@pytest.mark.parametrize("case", ["sparse90-4bit", "reduced-sparse-3bit-int8", "codebook"])
def test_without_entropy_coding_the_file_is_bit_level_and_reloads_bit_identical(tmp_path, case):
    """The benchmark's "entropy coding alone" row compares a trial's file with this one."""
    if case == "codebook":
        from strategies.fold import fold_batchnorm_

        model = prune_(random_model(), 0.9).eval()
        fold_batchnorm_(model)
        codebook.share_weights_(model, lambda _: 4)
    else:
        model = build(CASES[case])
    plain, coded = encode_model(model, entropy_coded=False), encode_model(model)
    assert len(coded) < len(plain)
    (tmp_path / "plain.acw").write_bytes(plain)
    assert_same_model(model, load_artifact(tmp_path / "plain.acw", random_model), inputs(16))
    for entry in read_header(tmp_path / "plain.acw")["tensors"]:
        assert entry["layout"] in ("dense", "bitmap") and entry["encoding"] in ("raw", "packed", "palette")
        if entry["encoding"] == "palette":  # a codebook layer's indices, at most log2(2^b) = 4 bits each
            n, width = entry["palette"], entry["index_bits"]
            assert n <= 16 and width == max(1, math.ceil(math.log2(n)))
            assert entry["lengths"][1] == 4 * n + (entry["nnz"] * width + 7) // 8


@pytest.mark.parametrize("case", list(CASES))
def test_size_breakdown_sums_to_the_file_length_for_both_versions(tmp_path, case):
    model = build(CASES[case])
    save_artifact(model, tmp_path / "v2.acw")
    (tmp_path / "v1.acw").write_bytes(encode_v1(model))
    quantized, sparse = CASES[case].get("bits", 32) < 32, "sparsity" in CASES[case]
    v1, v2 = size_breakdown(tmp_path / "v1.acw"), size_breakdown(tmp_path / "v2.acw")
    for path, parts in ((tmp_path / "v1.acw", v1), (tmp_path / "v2.acw", v2)):
        assert set(parts) == {"codes", "indices", "scales", "raw", "header"}
        assert sum(parts.values()) == os.path.getsize(path) and parts["header"] > 0 and parts["raw"] > 0
        assert (parts["codes"] > 0) == quantized and (parts["scales"] > 0) == quantized
    assert (v1["indices"] > 100) == sparse  # an all-zero counter costs a byte of index
    # a tensor that codes its zeros among its values (dense layout) spends no index bytes on them
    assert v2["indices"] + v2["codes"] <= v1["indices"] + v1["codes"]


@pytest.mark.parametrize("case", list(CASES))
def test_version_1_files_still_load(tmp_path, case):
    model = build(CASES[case])
    (tmp_path / "v1.acw").write_bytes(encode_v1(model))
    assert read_header(tmp_path / "v1.acw")["tensors"][0].keys() >= {"offset", "length", "layout", "encoding"}
    assert_same_model(model, load_artifact(tmp_path / "v1.acw", lenet5_bn), inputs(16))


# Written by the version-1 writer itself, before entropy coding existed: `tiny()` saved.
V1_FILE = bytes.fromhex(
    "414357460100f700000078daadd25f6b83301000f0ef72cf61d4c4caea572943523d35e092909c2b4efceebbd187ea741dd2"
    "bd2577213feecf088436ba10213f8f60f53b420e87972b9aa62510105bed39744e45f626a0a2e1fb0675e73429c979b4a5ab"
    "8c6d38c8078c1cba18e2df94804e0fae27ce544c20675c5d47e4c08173681b6a213f4d62c65e8c8e73f42f32e82b3c704e77"
    "27c916d0adbe2296bac37f04e5f157d158dfafc127bd34b97be906f789c115de194bdb2627f68ac76d51ae57468974dfcabc"
    "3e72e7b3940bf8c7d2a89d3d8d5e870595cd9a9a6c94b81aa27a728a995cd4c6bf197e428686dbb44a673f8a26b8de7393c6"
    "69fa025c602e6a6032582d3723b9daf6000000bfaaaa2abeaaaa2a3e0000003f7bd39b3eb290053e133f233eabaaaa3e0ad7"
    "a33c80000000fee9d5c0fec48a504f351a0000d436e83b1c31243b6c9cb43b"
)


def tiny_factory():
    return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))


def tiny():
    """A 3-bit sparse layer with a quantized input, then an 8-bit one, from fixed numbers."""
    model = tiny_factory()
    with torch.no_grad():
        model[0].weight.copy_(torch.linspace(-1, 1, 24).reshape(4, 6) * (torch.arange(24).reshape(4, 6) % 3 != 0))
        model[0].bias.copy_(torch.linspace(-0.5, 0.5, 4))
        model[2].weight.copy_(torch.linspace(0.9, -0.7, 12).reshape(3, 4))
        model[2].bias.zero_()
    quantize_weights_(model, lambda name: 3 if name == "0" else 8)
    set_input_quantization_(model[0], torch.tensor(0.02), torch.tensor(128))
    return model.eval()


def test_a_file_the_version_1_writer_wrote_still_loads(tmp_path):
    (tmp_path / "old.acw").write_bytes(V1_FILE)
    assert V1_FILE == encode_v1(tiny())  # the writer kept here is the one that wrote it
    assert {e["layout"] for e in read_header(tmp_path / "old.acw")["tensors"]} == {"dense", "sparse"}
    loaded = load_artifact(tmp_path / "old.acw", tiny_factory)
    assert_same_model(tiny(), loaded, torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))
    assert sum(size_breakdown(tmp_path / "old.acw").values()) == len(V1_FILE)
    # on a model this small the entropy coders have nothing to win, and v2's header is a little longer
    assert save_artifact(loaded, tmp_path / "new.acw") <= len(V1_FILE) + 16


def test_negative_zeros_are_stored_as_zeros(tmp_path):
    model = nn.Sequential(nn.Linear(100, 40))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) > 0.9)  # a mask product leaves -0.0 behind
    assert bool(torch.signbit(model[0].weight[model[0].weight == 0]).any())
    size = save_artifact(model, tmp_path / "w.acw")
    loaded = load_artifact(tmp_path / "w.acw", lambda: nn.Sequential(nn.Linear(100, 40)))
    assert read_header(tmp_path / "w.acw")["tensors"][0]["layout"] != "dense"
    assert size < 4000 * 4 * 0.1 + 2000  # about 10 % of the floats plus the index, not ~55 %
    x = torch.randn(8, 100)
    assert torch.equal(loaded(x), model(x))


def test_unfolded_batchnorm_and_its_counter_are_restored(tmp_path):
    model = random_model(mlp_bn)
    model[2].num_batches_tracked.fill_(7)
    save_artifact(model, tmp_path / "w.acw")
    loaded = load_artifact(tmp_path / "w.acw", mlp_bn)
    assert isinstance(loaded[2], nn.BatchNorm1d) and int(loaded[2].num_batches_tracked) == 7


def rewrite_header(data, change):
    """The file with its JSON header changed by `change` and the prefix fixed to match."""
    (length,) = struct.unpack_from("<I", data, 6)
    header = json.loads(zlib.decompress(data[10 : 10 + length]))
    change(header)
    packed = zlib.compress(json.dumps(header).encode())
    return data[:6] + struct.pack("<I", len(packed)) + packed + data[10 + length :]


def entry_of(header, encoding):
    return next(e for e in header["tensors"] if e["encoding"] == encoding)


def damaged(data, damage):
    (length,) = struct.unpack_from("<I", data, 6)
    start = 10 + length  # where the payload begins
    if damage == "ans-stream":  # damage inside an entropy-coded stream, with the checksum made to agree
        header = json.loads(zlib.decompress(data[10:start]))
        offset = sum(sum(e["lengths"]) for e in header["tensors"][: header["tensors"].index(entry_of(header, "ans"))])
        target = start + offset + sum(entry_of(header, "ans")["lengths"]) // 2
        data = data[:target] + bytes([data[target] ^ 0x5A]) + data[target + 1 :]
        return rewrite_header(data, lambda h: h.update(crc32=zlib.crc32(data[start:])))
    return {
        "truncate": lambda: data[:-10],
        "truncate-header": lambda: data[:20],
        "magic": lambda: b"XXXX" + data[4:],
        "version": lambda: MAGIC + (99).to_bytes(2, "little") + data[6:],
        "extra": lambda: data + b"\0",
        "foreign": lambda: b"PK\x03\x04" + bytes(200),
        "payload-bit": lambda: data[:start] + bytes([data[start] ^ 1]) + data[start + 1 :],
        "lengths": lambda: rewrite_header(data, lambda h: h["tensors"][0].update(lengths=[1, 2, 3])),
        "no-crc": lambda: rewrite_header(data, lambda h: h.pop("crc32")),
        "layout": lambda: rewrite_header(data, lambda h: h["tensors"][0].update(layout="zigzag")),
        "encoding": lambda: rewrite_header(data, lambda h: entry_of(h, "ans").update(encoding="bzip3")),
        "table": lambda: rewrite_header(data, lambda h: entry_of(h, "ans").update(table=[0, -1, 2])),
    }[damage]()


DAMAGE = ["truncate", "truncate-header", "magic", "version", "extra", "foreign", "payload-bit", "lengths"]
DAMAGE += ["no-crc", "layout", "encoding", "table", "ans-stream"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_or_foreign_files_are_refused(tmp_path, damage):
    path = tmp_path / "w.acw"
    save_artifact(build({"bits": 3, "sparsity": 0.9}), path)
    assert read_header(path) and VERSION == 2
    path.write_bytes(damaged(path.read_bytes(), damage))
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
    integer = [name for name, state in states.items() if state.input_scale is not None]
    assert integer == ["4", "9", "11"]  # the first conv (one input channel) keeps a float input
    save_artifact(model, tmp_path / "w.acw")
    stored = {name: quant_state(layer) for name, layer in weight_layers(load_artifact(tmp_path / "w.acw", lenet5_bn))}
    onnx_path = export_onnx(model, inputs(1), tmp_path / "m.onnx")
    assert quantize_onnx_weights_(onnx_path, model) == len(integer)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(onnx_path)).graph.initializer}
    for name, state in states.items():
        assert int(state.codes.abs().max()) == qmax(state.bits) == 3
        assert torch.equal(stored[name].codes, state.codes) and stored[name].bits == state.bits
        if name not in integer:
            continue
        codes = inits[f"{name}.weight_codes"].astype(np.int32)
        zero_point = inits[f"{name}.weight_zero_point"].astype(np.int32)
        assert np.array_equal(codes - zero_point.reshape(-1, *[1] * (codes.ndim - 1)), state.codes.numpy())
        assert np.array_equal(inits[f"{name}.weight_scale"], state.scale.numpy())
    assert quant_state(nn.Linear(4, 2)) is None
