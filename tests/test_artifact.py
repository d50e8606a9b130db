import os

import numpy as np
import pytest
import torch

from strategies.artifact import load_artifact, pack_codes, save_artifact, unpack_codes
from strategies.quantization import Quantization, QuantizationConfig
from strategies.structured import StructuredPruning, StructuredPruningConfig
from strategies.unstructured import prune_weights_
from tests.helpers import MODELS, context, trained_like

CASES = {
    "fp32": dict(),
    "int8": dict(bits=8),
    "4-bit": dict(bits=4),
    "2-bit": dict(bits=2),
    "sparse90": dict(sparsity=0.9),
    "int8-activations": dict(bits=8, activations=8),
    "structured": dict(ratio=0.5),
    "all": dict(ratio=0.3, sparsity=0.8, bits=3, activations=8),
}


def build(name, case):
    ctx = context()
    model = trained_like(MODELS[name])
    if case.get("ratio"):
        model = StructuredPruning().apply(model, StructuredPruningConfig(case["ratio"]), ctx)
    if case.get("sparsity"):
        model = prune_weights_(model, case["sparsity"])
    if case.get("bits") or case.get("activations"):
        config = QuantizationConfig(case.get("bits", 32), case.get("activations", 32))
        model = Quantization().apply(model, config, ctx)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_artifact_reloads_to_identical_outputs_and_size_is_file_length(tmp_path, name, case):
    model = build(name, CASES[case])
    path = tmp_path / "weights.acw"
    size = save_artifact(model, path)
    assert size == os.path.getsize(path)
    loaded = load_artifact(path, MODELS[name])
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # saving the reloaded model gives the same bytes: nothing is lost or invented
    assert save_artifact(loaded, tmp_path / "again.acw") == size
    assert (tmp_path / "again.acw").read_bytes() == path.read_bytes()


def test_bit_packing_uses_b_bits_per_code():
    for bits in (2, 3, 4, 5, 6, 8):
        q = 2 ** (bits - 1) - 1
        codes = np.random.default_rng(bits).integers(-q, q + 1, size=1001).astype(np.int32)
        data = pack_codes(codes, bits)
        assert len(data) == (1001 * bits + 7) // 8
        assert np.array_equal(unpack_codes(data, 1001, bits), codes)


def test_sparse_low_bit_models_are_much_smaller(tmp_path):
    dense = save_artifact(build("lenet300", {}), tmp_path / "a.acw")
    small = save_artifact(build("lenet300", dict(sparsity=0.9, bits=4)), tmp_path / "b.acw")
    # 10 % of weights at 4 bits plus a 1-bit map is about 1/0.175 = 23x smaller than fp32
    assert dense / small > 15


@pytest.mark.parametrize("damage", ["truncate", "magic", "extra"])
def test_damaged_files_are_refused(tmp_path, damage):
    path = tmp_path / "w.acw"
    save_artifact(build("lenet300", dict(bits=4)), path)
    data = path.read_bytes()
    data = {"truncate": data[:-10], "magic": b"XXXX" + data[4:], "extra": data + b"\0"}[damage]
    path.write_bytes(data)
    with pytest.raises(ValueError):
        load_artifact(path, MODELS["lenet300"])
