"""Small shared builders for tests: models with non-trivial BatchNorm stats, contexts,
quantized models. No test module imports another; what several share lives here."""

import os
import shutil

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from torch import nn

from experiments.models import MODELS  # noqa: F401 - re-exported for the tests
from search.tracking import PARENT_TAG, sqlite_uri
from strategies.base import Context, weight_layers
from strategies.quantization import Quantization, QuantizationConfig
from strategies.registry import build_strategies, parse_space
from tests.conftest import ROOT

SMOKE = str(ROOT / "experiments" / "smoke.yaml")


# Bind-mount a directory read-only onto itself, in a mount namespace of the command's own.
_READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'


def read_only(directory, argv):
    """`argv` as a command that finds `directory` read-only. Write bits do not stop root, so as
    root the command gets a private read-only bind mount of it instead."""
    if os.geteuid() != 0:
        for path in [directory, *directory.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return argv
    if not shutil.which("unshare"):
        pytest.skip("a read-only directory for root needs unshare (util-linux)")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", _READ_ONLY, str(directory), *map(str, argv)]


def load_study(run_dir, name="smoke"):
    storage = JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def finished(run_dir):
    """The study's evaluated trials (anchors not reached yet wait in the queue)."""
    return [t for t in load_study(run_dir).trials if t.state.is_finished()]


def runs_of(run_dir):
    client = MlflowClient(sqlite_uri(run_dir))
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    return parents, children


def trained_like(factory, seed=0):
    """A model whose BatchNorm statistics are not the identity, in eval mode."""
    torch.manual_seed(seed)
    model = factory()
    model.train()
    with torch.no_grad():
        model(torch.randn(256, 1, 28, 28) * 2 + 0.5)
    return model.eval()


def context(n=64, seed=0, batch_size=32, **kwargs):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Context(example_inputs=x[:1], finetune_x=x, finetune_y=y, calibration_x=x, batch_size=batch_size, **kwargs)


def strategies_for(raw_space):
    """The strategies a YAML `search_space` mapping turns on, as the search layer builds them."""
    return build_strategies(parse_space(raw_space))


# ------------------------------------------------------------ quantization builders


def lenet5_bn(c1=20, c2=50, hidden=500):
    """LeNet-5 with BatchNorm; smaller sizes stand in for a structurally pruned one."""
    return nn.Sequential(
        nn.Conv2d(1, c1, 5),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def mlp_bn():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def random_model(factory=lenet5_bn, seed=0, **sizes):
    """Random weights and BatchNorm statistics that are far from the identity, in eval mode."""
    torch.manual_seed(seed)
    model = factory(**sizes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.2, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def prune_(model, sparsity):
    """Zero the smallest-|w| fraction of every Conv/Linear weight."""
    with torch.no_grad():
        for _, layer in weight_layers(model):
            w = layer.weight
            k = int(sparsity * w.numel())
            threshold = w.abs().flatten().kthvalue(k).values
            w.mul_(w.abs() > threshold)
    return model


def inputs(n=32, seed=1):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def quantize(model, bits, activations=32):
    return Quantization().apply(model, QuantizationConfig(bits, activations), context(batch_size=16))


def distinct_codes_per_channel(module):
    """How many distinct weight values each output channel holds."""
    return [len(torch.unique(row)) for row in module.weight.detach().flatten(1)]


def tiny_bert(**geometry):
    """A text classifier on a randomly initialised 2-layer BERT-style encoder (hidden 32, four
    heads of 8, FFN 64, MiniLM's vocabulary; `geometry` overrides these BertConfig fields),
    mean-pooled with a linear head."""
    import transformers

    from experiments.text import EncoderClassifier

    torch.manual_seed(0)
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64) | geometry
    config = transformers.BertConfig(vocab_size=30522, **fields)
    return EncoderClassifier(transformers.BertModel(config, add_pooling_layer=False)).eval()


def texts(n=16):
    """`n` tokenized review-like snippets (named inputs), with MiniLM's tokenizer."""
    from experiments.text import tokenize

    snippets = ["a gorgeous, witty film", "dull", "not as good as the book", "fine"]
    return tokenize([snippets[i % len(snippets)] for i in range(n)])


def text_context(x, **kwargs):
    labels = torch.arange(len(x)) % 2
    return Context(example_inputs=x[:1], finetune_x=x, finetune_y=labels, calibration_x=x, **kwargs)


def tiny_bert_embedder():
    """The same encoder as `tiny_bert`, mean-pooled to one embedding per text, no head."""
    from experiments.text import EncoderEmbedder

    return EncoderEmbedder(tiny_bert().encoder).eval()


REVIEW_WORDS = (["great", "witty", "gorgeous", "moving", "fine"], ["dull", "boring", "awful", "tedious", "bad"])


def review_texts(n, seed):
    """`n` made-up snippets of four words, labelled by which list most of their words come from."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        picks = torch.randint(0, 2, (4,), generator=g).tolist()
        words = [REVIEW_WORDS[p][int(torch.randint(0, 5, (1,), generator=g))] for p in picks]
        texts.append(" ".join(words))
        labels.append(int(sum(picks) > 2))  # 1 (negative) needs three negative words of four: imbalanced
    return texts, torch.tensor(labels)


def tiny_reviews(data_dir=None):
    """A workload.dataset of made-up reviews, tokenized by MiniLM's tokenizer at 16 tokens."""
    from experiments.text import preprocessing, tokenize

    splits = []
    for n, seed in ((320, 0), (80, 1)):
        texts, labels = review_texts(n, seed)
        splits.append((tokenize(texts, 16), labels))
    return splits[0], splits[1], preprocessing(16)


# A text search on the tiny BERT and made-up reviews, a few seconds a trial.
TEXT_SMOKE = {
    "name": "text-smoke",
    "workload": {
        "model": "tests.helpers:tiny_bert",
        "dataset": "tests.helpers:tiny_reviews",
        "metric": "macro_f1",
        "val_size": 80,
        "training": {"epochs": 3, "lr": 2.0e-3, "batch_size": 16, "optimizer": "adamw", "weight_decay": 0.01},
    },
    "search_space": {
        "pruning.head_ratio": [0.0, 0.5],
        "pruning.ffn_ratio": [0.0, 0.5],
        "quantization.weight_bits": [8, 32],
        "quantization.activation_bits": [8, 32],
        "distillation.epochs": [0, 1],
        "distillation.optimizer": "adamw",
        "distillation.lr": [1.0e-4, 1.0e-3],
        "distillation.alpha": 0.5,
        "distillation.temperature": 2.0,
    },
    "search": {"n_trials": 4, "finetune_size": 120, "calibration_size": 32, "batch_size": 16},
    "latency": {"batch_sizes": [1], "sequence_length": 16, "warmup": 1, "repeats": 3, "final_repeats": 3},
}
