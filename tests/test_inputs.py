"""Models whose inputs are named tensors (token ids and an attention mask), end to end.

A bag-of-embeddings classifier on a synthetic token task stands in for a text model: it takes
one mapping of named tensors, as a Hugging Face encoder does, and a search over every
strategy runs on it, exports it to ONNX with named inputs and dynamic batch and sequence
axes, and packages it.
"""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from objectives.latency import latency_batch
from search.cli import main
from strategies.artifact import load_artifact
from strategies.inputs import NamedInputs, as_inputs, runtime_feed
from strategies.runtime import ARTIFACT_NAME, ONNX_NAME, materialize
from tests.helpers import SMOKE, finished, load_study, runs_of

VOCAB, LENGTH = 40, 12


class BagOfEmbeddings(nn.Module):
    """Mean of the unmasked tokens' embeddings, then an MLP: one mapping argument."""

    def __init__(self, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.hidden = nn.Linear(width, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, inputs):
        mask = inputs["attention_mask"].unsqueeze(-1).to(torch.float32)
        pooled = (self.embed(inputs["input_ids"]) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(torch.relu(self.hidden(pooled)))


def bag_of_embeddings() -> nn.Module:
    return BagOfEmbeddings()


def _tokens(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Padded token sequences of random length; the label says whether token 1 outnumbers token 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
    marks = torch.randint(0, 3, (n, LENGTH), generator=g)  # plant some 1s and 2s
    ids = torch.where(marks == 1, 1, torch.where(marks == 2, torch.randint(1, 3, (n, LENGTH), generator=g), ids))
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).to(torch.int64)
    ids = ids * mask  # 0 is padding
    y = (((ids == 1) * mask).sum(1) > ((ids == 2) * mask).sum(1)).to(torch.int64)
    return {"input_ids": ids, "attention_mask": mask}, y


def token_dataset(data_dir=None):
    return _tokens(3000, seed=0), _tokens(600, seed=1)


def test_named_inputs_index_count_and_read_like_one_batch():
    x = NamedInputs({"input_ids": torch.arange(12).reshape(4, 3), "attention_mask": torch.ones(4, 3)})
    assert len(x) == 4 and len(x[1:3]) == 2 and len(x[torch.tensor([0, 0, 2])]) == 3
    assert len(x[0]) == 1  # an integer keeps the batch axis, as x[i:i+1] would
    assert torch.equal(x[2:]["input_ids"], torch.tensor([[6, 7, 8], [9, 10, 11]]))
    assert dict(**x).keys() == {"input_ids", "attention_mask"}
    assert set(runtime_feed(x)) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="share their first"):
        NamedInputs({"input_ids": torch.zeros(4, 3), "attention_mask": torch.zeros(5, 3)})
    with pytest.raises(ValueError, match="workload.dataset: input names must be identifiers"):
        as_inputs({"input ids": torch.zeros(2, 3)}, "workload.dataset")
    with pytest.raises(ValueError, match="non-empty mapping"):
        NamedInputs({})
    batch = latency_batch(x, 5)  # the example repeated: random ids would not be valid tokens
    assert batch["input_ids"].shape == (5, 3) and (batch["input_ids"] == [0, 1, 2]).all()


def test_a_named_input_model_exports_runs_and_reloads_identically(tmp_path):
    model = BagOfEmbeddings().eval()
    (x, _), _ = token_dataset()
    x = NamedInputs(x)
    deployable = materialize(model, tmp_path, example_inputs=x[:1])
    with torch.no_grad():
        expected = model(x[:64])
    assert torch.allclose(deployable.predict(x[:64]), expected, atol=1e-5)
    # the ONNX graph takes the names, with any batch size and sequence length
    session = ort.InferenceSession(str(tmp_path / ONNX_NAME), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    shorter = x[:3]["input_ids"][:, :5].numpy(), x[:3]["attention_mask"][:, :5].numpy()
    (logits,) = session.run(None, dict(zip(["input_ids", "attention_mask"], shorter, strict=True)))
    with torch.no_grad():
        reference = model({"input_ids": torch.from_numpy(shorter[0]), "attention_mask": torch.from_numpy(shorter[1])})
    assert np.allclose(logits, reference.numpy(), atol=1e-5)
    reloaded = load_artifact(tmp_path / ARTIFACT_NAME, bag_of_embeddings)
    with torch.no_grad():
        assert torch.equal(reloaded(x[:64]), expected)


def test_a_search_over_every_strategy_runs_on_named_inputs(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "run",
        SMOKE,
        "--n-trials",
        "6",
        "--run-dir",
        str(run_dir),
        "--set",
        f"workload.model={__name__}:bag_of_embeddings",
        "--set",
        f"workload.dataset={__name__}:token_dataset",
        "--set",
        "workload.training={epochs: 3, lr: 0.1, batch_size: 64}",
        "--set",
        "latency.batch_sizes=[1, 8]",
    ]
    assert main(args) == 0
    complete = [t for t in load_study(run_dir).trials if t.state.name == "COMPLETE"]
    failed = {t.number: t.user_attrs.get("fail_reason") for t in load_study(run_dir).trials if t.state.name == "FAIL"}
    assert len(complete) == 6, failed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["baseline"]["accuracy"] > 0.7  # the synthetic task was learned
    params = [t.params for t in complete]
    assert any(p.get("pruning.structured_ratio", 0) > 0 for p in params)  # the anchors run structured pruning
    assert any(p.get("quantization.weight_bits", 32) < 32 for p in params)
    assert any(p.get("distillation.epochs", 0) > 0 for p in params)
    assert all("latency_ms_b8" in t.user_attrs for t in complete)
    _, children = runs_of(run_dir)
    assert len(children) == len(finished(run_dir))
    # the package of the pick runs in a plain ONNX Runtime session fed by name
    trial = summary["pareto"][0]["trial"]
    out = tmp_path / "package"
    assert main(["export", "--run-dir", str(run_dir), "--trial", str(trial), "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out / ONNX_NAME), providers=["CPUExecutionProvider"])
    (x, _), _ = token_dataset()
    (logits,) = session.run(None, {k: v[:7].numpy() for k, v in x.items()})
    assert logits.shape == (7, 2)
