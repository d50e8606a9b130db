"""Weight sharing: a trained k-means codebook per layer (quantization.scheme: codebook)."""

import pytest
import torch
from optuna.trial import FixedTrial

from strategies import pipeline
from strategies.base import weight_layers
from strategies.codebook import CODEBOOK, kmeans
from strategies.distillation import DistillationConfig
from strategies.quantization import QuantizationConfig
from strategies.unstructured import UnstructuredPruningConfig
from tests.helpers import context, mlp_bn, random_model, strategies_for

SPACE = {
    "pruning.unstructured_sparsity": [0.0, 0.9],
    "distillation.epochs": [0, 2],
    "quantization.weight_bits": [2, 3, 4, 8, 32],
    "quantization.scheme": ["uniform", "codebook"],
}


def _compress(bits, sparsity=0.0, epochs=0, seed=0):
    strategies = strategies_for(SPACE)
    configs = {
        "unstructured_pruning": UnstructuredPruningConfig(sparsity),
        "distillation": DistillationConfig(epochs=epochs, lr=0.01),
        "quantization": QuantizationConfig(bits, scheme="codebook"),
    }
    model = random_model(mlp_bn, seed=seed)
    ctx = context(n=64)
    with torch.no_grad():
        ctx.teacher_logits = model(ctx.finetune_x) + 0.5 * torch.randn(64, 10)  # something to learn
    return model, *pipeline.compress(model, strategies, configs, ctx)


def test_kmeans_finds_the_clusters_and_keeps_them_sorted():
    values = torch.cat([torch.full((50,), -1.0), torch.full((30,), 0.25), torch.full((20,), 2.0)])
    centroids = kmeans(values + 0.01 * torch.randn(100), 3)
    assert torch.allclose(centroids, torch.tensor([-1.0, 0.25, 2.0]), atol=0.01)
    assert torch.equal(centroids, torch.sort(centroids).values)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_a_codebook_layer_holds_at_most_2_to_the_b_values_and_keeps_zeros(bits, sparsity):
    _, model, _ = _compress(bits, sparsity)
    for _, layer in weight_layers(model):
        nonzero = layer.weight[layer.weight != 0]
        assert len(torch.unique(nonzero)) <= 2**bits
        assert set(torch.unique(nonzero).tolist()) <= set(getattr(layer, CODEBOOK).tolist())
        assert CODEBOOK in dict(layer.named_buffers())  # final: a buffer, not a parameter
    zeros = sum(int((layer.weight == 0).sum()) for _, layer in weight_layers(model))
    total = sum(layer.weight.numel() for _, layer in weight_layers(model))
    assert zeros >= round(sparsity * total)  # pruning zeroed those; sharing kept them zero


def test_fine_tuning_moves_the_centroids_and_the_weights_stay_shared():
    _, untuned, _ = _compress(3, sparsity=0.5, epochs=0)
    _, tuned, _ = _compress(3, sparsity=0.5, epochs=2)
    for (_, a), (_, b) in zip(weight_layers(untuned), weight_layers(tuned), strict=True):
        assert not torch.equal(getattr(a, CODEBOOK), getattr(b, CODEBOOK))  # the centroids moved
        assert torch.equal(a.weight == 0, b.weight == 0)  # the same weights pruned
        nonzero = b.weight[b.weight != 0]
        assert len(torch.unique(nonzero)) <= 8
        assert set(torch.unique(nonzero).tolist()) <= set(getattr(b, CODEBOOK).tolist())


def test_the_scheme_is_searched_only_where_the_space_lists_it():
    listed = strategies_for({k: v for k, v in SPACE.items() if k.startswith("quantization.")})
    trial = FixedTrial({"quantization.weight_bits": 4, "quantization.scheme": "codebook"})
    config = pipeline.suggest(listed, trial)["quantization"]
    assert config.scheme == "codebook" and config.activation_bits == 32
    assert "quantization.activation_bits" not in trial.params  # codebooks quantize weights only
    unlisted = strategies_for({"quantization.weight_bits": [4], "quantization.activation_bits": [8, 32]})
    trial = FixedTrial({"quantization.weight_bits": 4, "quantization.activation_bits": 8})
    assert pipeline.suggest(unlisted, trial)["quantization"].scheme == "uniform"
    assert "quantization.scheme" not in trial.params


def test_a_codebook_with_quantized_activations_is_refused():
    with pytest.raises(ValueError, match="quantization.scheme codebook"):
        QuantizationConfig(4, 8, scheme="codebook")


@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_a_codebook_model_packs_and_deploys_as_its_own_weights(tmp_path, sparsity):
    import os

    from strategies.artifact import load_artifact, size_breakdown
    from strategies.runtime import check_agreement, materialize

    _, model, _ = _compress(3, sparsity)
    deployed = materialize(model, tmp_path, runtime="onnxruntime", threads=1, example_inputs=torch.zeros(1, 1, 28, 28))
    size = os.path.getsize(deployed.artifact_path)
    assert sum(size_breakdown(deployed.artifact_path).values()) == size
    reloaded = load_artifact(deployed.artifact_path, lambda: random_model(mlp_bn))
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert check_agreement(deployed.predict, model, x) == 0.0  # ONNX Runtime runs the shared float weights
    # far smaller than the same model's float weights: 3-bit indices and a 8-entry codebook per layer
    floats = sum(layer.weight.numel() for _, layer in weight_layers(model)) * 4
    assert size < floats / 6


def test_the_report_says_weight_sharing_finalists_run_as_float_weights():
    from search.report import codebook_note

    rows = [
        {"trial": 3, "quantization.scheme": "codebook"},
        {"trial": 4, "quantization.scheme": "uniform"},
        {"trial": 5},
    ]
    note = codebook_note(rows)
    assert note.startswith("Trial 3 shares weights") and "float weights" in note and "4" not in note.split(":")[0]
    assert codebook_note(rows[1:]) == ""
