import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from experiments.data import DatasetMissingError, load_fashion_mnist, read_idx
from experiments.models import MODELS
from search import workload as workloads
from search.workload import Split, build_workload, resolve_callable, split_train_val
from tests.conftest import needs_fashion_mnist


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def test_idx_files_parse_plain_and_gzip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(idx_bytes(array))
    assert np.array_equal(read_idx(tmp_path / "a"), array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "bad").write_bytes(idx_bytes(array)[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "bad")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + idx_bytes(array)[2:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "magic")


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


@needs_fashion_mnist
def test_fashion_mnist_loads_and_splits_deterministically():
    train, test, preprocessing = load_fashion_mnist()
    assert preprocessing["mean"] == 0.2860 and len(preprocessing["class_names"]) == 10
    assert train.x.shape == (60000, 1, 28, 28) and train.x.dtype == torch.float32
    assert test.y.shape == (10000,) and test.y.dtype == torch.int64 and set(test.y.tolist()) == set(range(10))
    assert abs(float(train.x.mean())) < 0.01  # normalised
    small = Split(train.x[:1000], torch.arange(1000))  # labels = original index, to check disjointness
    a_train, a_val = split_train_val(small, 100, seed=3)
    b_train, b_val = split_train_val(small, 100, seed=3)
    assert torch.equal(a_val.y, b_val.y) and len(a_train) == 900
    assert not set(a_train.y.tolist()) & set(a_val.y.tolist())
    assert not torch.equal(split_train_val(small, 100, seed=4)[1].y, a_val.y)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_output_ten_logits(name):
    assert MODELS[name]()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_import_paths_resolve_or_name_the_key():
    assert resolve_callable("experiments.models:lenet300", "workload.model") is MODELS["lenet300"]
    with pytest.raises(ValueError, match="workload.model: cannot import module 'no_such_pkg.mod'"):
        resolve_callable("no_such_pkg.mod:fn", "workload.model")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        resolve_callable("experiments.models:nope", "workload.model")
    with pytest.raises(ValueError, match="workload.model must be one of"):
        build_workload(model="resnet9000")


def tiny_dataset(data_dir):
    """An import-path dataset: 600 synthetic samples whose label is readable from the image."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (600,), generator=g)
    x = torch.randn(600, 1, 28, 28, generator=g) * 0.1
    x[torch.arange(600), 0, y, :] += 1.0  # row y lights up
    return (x[:500], y[:500]), (x[500:], y[500:])


def test_baseline_is_cached_and_not_retrained(tmp_path, monkeypatch):
    kwargs = dict(
        model="lenet300",
        dataset="tests.test_experiments:tiny_dataset",
        val_size=100,
        training={"epochs": 3, "lr": 0.05, "batch_size": 32},
        cache_dir=tmp_path,
    )
    first = build_workload(**kwargs)
    cached = list((tmp_path / "baselines").glob("*.pt"))
    assert len(cached) == 1 and cached[0].stem == first.fingerprint
    calls = []
    monkeypatch.setattr(workloads, "train_baseline", lambda *a, **k: calls.append(1))
    second = build_workload(**kwargs)
    assert calls == []
    pairs = zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert workloads.evaluate_accuracy(first.model, first.val) > 0.5  # it learned the planted signal
    # anything that defines the weights changes the key
    third = build_workload(**{**kwargs, "training": {"epochs": 1, "lr": 0.05, "batch_size": 32}})
    assert third.fingerprint != first.fingerprint and calls == [1]


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_load_weights_only(tmp_path):
    kwargs = dict(model="lenet300", dataset="tests.test_experiments:tiny_dataset", val_size=100, cache_dir=tmp_path)
    good = tmp_path / "good.pt"
    torch.save(MODELS["lenet300"]().state_dict(), good)
    assert build_workload(checkpoint=str(good), **kwargs).model is not None
    pickled = tmp_path / "evil.pt"
    pickled.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(ValueError, match="workload.checkpoint: .* is not a loadable state dict"):
        build_workload(checkpoint=str(pickled), **kwargs)
    wrong = tmp_path / "wrong.pt"
    torch.save(MODELS["lenet5"]().state_dict(), wrong)
    with pytest.raises(ValueError, match="does not match the model architecture"):
        build_workload(checkpoint=str(wrong), **kwargs)
