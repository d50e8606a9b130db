"""Encoder pruning on a tiny random BERT-style classifier: heads, FFN neurons and layers are
removed for real, and the smaller model still runs, exports, agrees with ONNX Runtime and
reloads from its packed file to identical outputs."""

import pytest
import torch

from strategies.artifact import load_artifact
from strategies.quantization import Quantization, QuantizationConfig
from strategies.runtime import ARTIFACT_NAME, check_agreement, materialize
from strategies.transformer import EncoderPruning, EncoderPruningConfig, EncoderPruningError, prune_encoder_
from tests.helpers import random_model, text_context, texts, tiny_bert


@pytest.mark.parametrize(
    "config, heads, ffn, layers",
    [
        (EncoderPruningConfig(head_ratio=0.5, ffn_ratio=0.5), 2, 32, 2),
        (EncoderPruningConfig(head_ratio=0.25), 3, 64, 2),
        (EncoderPruningConfig(ffn_ratio=0.75, layer_ratio=0.5), 4, 16, 1),
    ],
)
def test_heads_ffn_neurons_and_layers_are_removed_for_real(tmp_path, config, heads, ffn, layers):
    x = texts()
    model = EncoderPruning().apply(tiny_bert(), config, text_context(x))
    stack = model.encoder.encoder.layer
    assert len(stack) == layers
    for layer in stack:
        a = layer.attention.self
        assert a.query.out_features == a.key.out_features == a.value.out_features == heads * 8
        assert a.num_attention_heads == heads and layer.attention.output.dense.in_features == heads * 8
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features == ffn
        assert layer.output.dense.out_features == 32  # the hidden width stays
    params = sum(p.numel() for p in model.parameters())
    assert params < sum(p.numel() for p in tiny_bert().parameters())
    deployable = materialize(model, tmp_path, example_inputs=x[:1])
    assert check_agreement(deployable.predict, model, x) == 0.0
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(deployable.predict(x), expected, atol=1e-5)
    reloaded = load_artifact(tmp_path / ARTIFACT_NAME, tiny_bert)
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)


def test_a_pruned_encoder_quantizes_to_integer_kernels_that_agree(tmp_path):
    x = texts()
    model = prune_encoder_(tiny_bert(), EncoderPruningConfig(head_ratio=0.5, ffn_ratio=0.5), x[:1])
    model = Quantization().apply(model, QuantizationConfig(weight_bits=8, activation_bits=8), text_context(x))
    deployable = materialize(model, tmp_path, example_inputs=x[:1])
    assert check_agreement(deployable.predict, model, x) == 0.0
    with torch.no_grad():
        assert torch.equal(load_artifact(tmp_path / ARTIFACT_NAME, tiny_bert)(x), model(x))


def test_encoder_pruning_refuses_models_it_cannot_prune():
    with pytest.raises(EncoderPruningError, match="no BERT-style encoder layers"):
        prune_encoder_(random_model(), EncoderPruningConfig(ffn_ratio=0.5), torch.zeros(1, 1, 28, 28))
    for ratio in (0.9, 0.8):  # 0.8 of 4 heads keeps 0.8, which Torch-Pruning rounds down to none
        with pytest.raises(EncoderPruningError, match="every head"):
            prune_encoder_(tiny_bert(), EncoderPruningConfig(head_ratio=ratio), texts()[:1])
    with pytest.raises(ValueError, match=r"pruning.ffn_ratio must be in \[0, 1\)"):
        EncoderPruningConfig(ffn_ratio=1.0)
