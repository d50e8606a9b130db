"""The text workload: review snippets read from the installed data file, MiniLM's tokenizer,
and a BERT-style encoder classifier (a tiny random one here) through export and the artifact."""

import bz2

import pytest
import torch

from experiments.text import SEQUENCE_LENGTH, load_rotten_tomatoes, read_snippets, tokenize
from strategies.artifact import load_artifact
from strategies.inputs import NamedInputs
from strategies.quantization import Quantization, QuantizationConfig
from strategies.runtime import ARTIFACT_NAME, check_agreement, materialize
from strategies.unstructured import UnstructuredPruning, UnstructuredPruningConfig
from tests.helpers import text_context, texts, tiny_bert


def test_snippets_drop_plots_and_duplicates_and_refuse_a_malformed_file(tmp_path):
    path = tmp_path / "rt.csv.bz2"
    rows = "category,text\nplot,a synopsis\nfresh,great fun\nrotten,dull\nfresh,great fun\n"
    path.write_bytes(bz2.compress(rows.encode()))
    assert read_snippets(path) == [("great fun", 1), ("dull", 0)]
    bad = tmp_path / "bad.csv.bz2"
    bad.write_bytes(b"not bz2 at all")
    with pytest.raises(ValueError, match="not a readable bz2 CSV"):
        read_snippets(bad)
    empty = tmp_path / "empty.csv.bz2"
    empty.write_bytes(bz2.compress(b"category,text\nplot,only synopses\n"))
    with pytest.raises(ValueError, match="no rows with category fresh or rotten"):
        read_snippets(empty)


def test_the_installed_snippets_split_and_tokenize():
    (train_x, train_y), (test_x, test_y), preprocessing = load_rotten_tomatoes()
    assert len(train_y) + len(test_y) == len(read_snippets()) > 12_000
    assert preprocessing["max_length"] == SEQUENCE_LENGTH and preprocessing["tokenizer"].endswith("tokenizer.json")
    assert len(test_y) == int(0.2 * (len(train_y) + len(test_y)))
    assert train_x["input_ids"].shape == (len(train_y), SEQUENCE_LENGTH)
    assert 0.5 < float(train_y.float().mean()) < 0.65  # about 58 % fresh
    x = tokenize(["a gorgeous, witty film", "dull"])
    assert x["attention_mask"].sum(1).tolist() == [7, 3]  # [CLS] a gorgeous , witty film [SEP]; the rest is padding
    assert (x["input_ids"][x["attention_mask"] == 0] == 0).all()


def test_an_encoder_classifier_exports_agrees_and_reloads_identically(tmp_path):
    model = tiny_bert()
    x = texts()
    ctx = text_context(x)
    model = UnstructuredPruning().apply(model, UnstructuredPruningConfig(sparsity=0.5), ctx)
    model = Quantization().apply(model, QuantizationConfig(weight_bits=4), ctx)
    deployable = materialize(model, tmp_path, example_inputs=x[:1])
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(deployable.predict(x), expected, atol=1e-4)
    assert check_agreement(deployable.predict, model, x) == 0.0
    reloaded = load_artifact(tmp_path / ARTIFACT_NAME, tiny_bert)
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
    assert isinstance(x, NamedInputs)


def test_int8_linear_layers_on_sequences_reach_the_runtime_as_the_trials_codes(tmp_path):
    """Linear layers on a sequence export as MatMul with the weight transposed and unnamed: the
    trial's codes still replace it, so ONNX Runtime runs its integer kernels on exactly those."""
    import onnx
    from onnx import numpy_helper

    from strategies.base import weight_layers
    from strategies.quantization import quant_state

    x = texts()
    ctx = text_context(x)
    model = Quantization().apply(tiny_bert(), QuantizationConfig(weight_bits=8, activation_bits=8), ctx)
    deployable = materialize(model, tmp_path, example_inputs=x[:1])
    assert check_agreement(deployable.predict, model, x) == 0.0
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    stored = [numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_codes") and i.data_type != 6]
    layers = [(n, m) for n, m in weight_layers(model) if isinstance(m, torch.nn.Linear)]
    assert len(stored) == len(layers) == 2 * 6 + 1  # six Linear layers per encoder layer, and the head
    # the embedding tables are quantized too, weight-only: their float values are exactly codes × scale
    embeddings = [m for _, m in weight_layers(model) if isinstance(m, torch.nn.Embedding)]
    assert len(embeddings) == 3 and all(quant_state(m).bits == 8 for m in embeddings)
    for _, module in layers:
        codes = quant_state(module).codes.numpy()
        assert any(s.shape == c.shape and (s == c).all() for s in stored for c in (codes, codes.T))
