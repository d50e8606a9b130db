"""Workloads: a trained baseline with its data splits.

A workload names its model and dataset: a built-in name (``lenet5``, ``fashion-mnist``,
which stand for import paths into `experiments/`) or an import path
``package.module:function`` of the user's. The baseline is trained once and cached on disk
under a hash of everything that defines its weights, so a second run (or a resumed one)
loads it instead of retraining.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from strategies.inputs import Inputs, as_inputs, fingerprint_bytes

logger = logging.getLogger(__name__)

# Built-in names → the import paths they stand for (resolved like a user's, at run time).
BUILTIN_MODELS = {
    "lenet5": "experiments.models:lenet5",
    "lenet300": "experiments.models:lenet300",
    "minilm": "experiments.text:minilm_classifier",
    "minilm-embedder": "experiments.text:minilm_embedder",
}
BUILTIN_DATASETS = {
    "fashion-mnist": "experiments.data:load_fashion_mnist",
    "rotten-tomatoes": "experiments.text:load_rotten_tomatoes",
}


@dataclass
class Split:
    x: Inputs  # one float tensor, or named tensors (token ids, masks) sharing the batch axis
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def split_train_val(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Hold out `val_size` random training samples, deterministically for a given seed."""
    if not 0 < val_size < len(train):
        raise ValueError(f"workload.val_size must be between 1 and {len(train) - 1}, got {val_size}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    return Split(train.x[train_idx], train.y[train_idx]), Split(train.x[val_idx], train.y[val_idx])


def subset(split: Split, n: int | None, seed: int) -> Split:
    """A deterministic random subset of `n` samples; None keeps the whole split."""
    if n is None or n >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return Split(split.x[idx], split.y[idx])


# How the baseline trains: SGD with momentum for the small CNNs and MLPs, AdamW for the
# fine-tune of a pretrained transformer (the usual recipe for BERT-style encoders).
OPTIMIZERS = ("sgd", "adamw")
PROGRESS_SECONDS = 60.0  # an epoch that runs longer reports its progress this often


@dataclass(frozen=True)
class TrainingRecipe:
    epochs: int = 8
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"workload.training.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.epochs < 0:
            raise ValueError(
                f"workload.training.epochs must be >= 0 (0: the model as built, pretrained), got {self.epochs}"
            )
        if self.batch_size < 1:
            raise ValueError(f"workload.training.batch_size must be >= 1, got {self.batch_size}")
        for key in ("lr", "momentum", "weight_decay"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
                raise ValueError(
                    f"workload.training.{key} must be a finite number {'> 0' if key == 'lr' else '>= 0'}, got {value}"
                )


@dataclass
class Workload:
    name: str
    model: nn.Module  # the trained baseline, in eval mode
    factory: Callable[[], nn.Module]  # the untrained architecture, to rebuild models from stored weights
    train: Split
    val: Split
    test: Split
    example_inputs: torch.Tensor  # a batch of one
    fingerprint: str
    # How raw inputs become the model's, as the dataset says: normalisation for images, the
    # tokenizer (a tokenizer.json path) and its length for text. Packages record it.
    preprocessing: dict[str, Any] = dataclasses.field(default_factory=dict)


def resolve_callable(spec: str, what: str) -> Callable:
    """Resolve ``package.module:function``; errors name the config key `what`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} must be a built-in name or an import path 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what}: cannot import module {module_name!r} from {spec!r} ({error})") from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{what}: {spec!r} is not callable")
    return target


def _builtin_or_path(value: str, builtins: dict[str, str], what: str) -> Callable:
    if value in builtins:
        return resolve_callable(builtins[value], what)
    if ":" not in value:
        raise ValueError(
            f"{what} must be one of {sorted(builtins)} or an import path 'package.module:function', got {value!r}"
        )
    return resolve_callable(value, what)


def model_factory(model: str) -> Callable[[], nn.Module]:
    return _builtin_or_path(model, BUILTIN_MODELS, "workload.model")


def _as_split(value: Any, what: str) -> Split:
    """A split from `.x/.y` or an (x, y) pair; x is a float tensor or a mapping of named tensors."""
    if hasattr(value, "x") and hasattr(value, "y"):
        x, y = value.x, value.y
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        x, y = value
    else:
        raise ValueError(f"{what} must return (train, test) splits, each with .x/.y or an (x, y) pair")
    split = Split(as_inputs(x, what), torch.as_tensor(y, dtype=torch.int64))
    if len(split.x) != len(split.y):
        raise ValueError(f"{what}: a split has {len(split.x)} inputs but {len(split.y)} labels")
    return split


def _preprocessing(value: Any) -> dict[str, Any]:
    """A dataset's preprocessing record: a JSON mapping; a tokenizer it names must be a file."""
    try:
        value = json.loads(json.dumps(value))
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise ValueError("workload.dataset: the third value it returns (preprocessing) must be a JSON mapping")
    tokenizer = value.get("tokenizer")
    if tokenizer is not None and not (isinstance(tokenizer, str) and Path(tokenizer).is_file()):
        raise ValueError(f"workload.dataset: preprocessing names tokenizer {tokenizer!r}, which is not a file")
    return value


def _load_dataset(dataset: str, data_dir: str | None) -> tuple[Split, Split, str, dict[str, Any]]:
    """(train, test, identity, preprocessing): identity says what data this was, for the
    fingerprint. A dataset returns (train, test), or (train, test, preprocessing)."""
    result = _builtin_or_path(dataset, BUILTIN_DATASETS, "workload.dataset")(data_dir)
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise ValueError("workload.dataset must return a (train, test) pair, or (train, test, preprocessing)")
    train, test = (_as_split(s, "workload.dataset") for s in result[:2])
    identity = hashlib.sha256(fingerprint_bytes(train.x) + train.y.numpy().tobytes()).hexdigest()
    return train, test, identity, _preprocessing(result[2] if len(result) == 3 else {})


def evaluate_accuracy(model: nn.Module, split: Split, batch_size: int = 1000, device: str = "cpu") -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(split), batch_size):
            predicted = model(split.x[i : i + batch_size].to(device)).argmax(1).cpu()
            correct += (predicted == split.y[i : i + batch_size]).sum().item()
    return correct / max(1, len(split))


def train_baseline(
    model: nn.Module,
    train: Split,
    val: Split,
    recipe: TrainingRecipe,
    seed: int,
    progress: Callable[[str], None],
    device: str = "cpu",
) -> nn.Module:
    """SGD with momentum (or AdamW) and a cosine schedule: a plain, reproducible recipe, on
    `device`; the model comes back on the CPU."""
    torch.manual_seed(seed)
    model.to(device)
    generator = torch.Generator().manual_seed(seed)
    if recipe.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
    steps = recipe.epochs * math.ceil(len(train) / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    last_report = time.monotonic()
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for i in range(0, len(train), recipe.batch_size):
            if time.monotonic() - last_report >= PROGRESS_SECONDS:  # a long epoch says how far it is
                last_report = time.monotonic()
                progress(f"baseline epoch {epoch + 1}/{recipe.epochs}: {i}/{len(train)} samples, loss {total / i:.4f}")
            idx = order[i : i + recipe.batch_size]
            loss = F.cross_entropy(model(train.x[idx].to(device)), train.y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        accuracy = evaluate_accuracy(model, val, device=device)
        progress(
            f"baseline epoch {epoch + 1}/{recipe.epochs}: loss {total / len(train):.4f}, val accuracy {accuracy:.4f}"
        )
    return model.to("cpu").eval()


def cache_dir_default() -> Path:
    return Path(os.environ.get("AUTOCOMPRESS_CACHE") or Path.home() / ".cache" / "autocompress")


def _save_atomically(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_state_dict(path: str | Path, model: nn.Module, what: str) -> None:
    """Load a plain state dict with weights_only=True; refuse pickles and mismatches by name."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file {str(path)!r}") from None
    except Exception as error:  # weights_only refuses arbitrary pickles with an UnpicklingError
        raise ValueError(f"{what}: {path} is not a loadable state dict ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: {path} does not hold a state dict of tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{what}: {path} does not match the model architecture: {error}") from None


def _cached_or_trained_(
    net: nn.Module,
    fingerprint: str,
    cache_dir: Path,
    model: str,
    data: tuple[Split, Split],
    recipe: TrainingRecipe,
    seed: int,
    progress: Callable[[str], None],
    device: str = "cpu",
) -> None:
    """Load the baseline's cached weights into `net`, or train it (on `device`) and cache them."""
    path = cache_dir / "baselines" / f"{fingerprint}.pt"
    if path.exists():
        progress(f"baseline {model}: loading cached weights {path}")
        load_state_dict(path, net, "cached baseline")
        return
    progress(f"baseline {model}: training {recipe.epochs} epochs on {len(data[0])} samples (cached afterwards)")
    train_baseline(net, *data, recipe, seed, progress, device)
    _save_atomically(net.state_dict(), path)


def _fingerprint(net: nn.Module, checkpoint: str | None, **definition: Any) -> str:
    """A hash of everything that defines the baseline's weights: its cache key."""
    definition.update(
        architecture=repr(net),
        shapes={k: list(v.shape) for k, v in net.state_dict().items()},
        torch=torch.__version__.split("+")[0],
    )
    if checkpoint:
        definition["checkpoint"] = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


def build_workload(
    model: str,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    val_size: int = 5000,
    split_seed: int = 0,
    train_subset: int | None = None,
    val_subset: int | None = None,
    test_subset: int | None = None,
    training: TrainingRecipe | dict | None = None,
    checkpoint: str | None = None,
    cache_dir: Path | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    inputs_checked: Callable[[], None] | None = None,
    device: str = "cpu",
) -> Workload:
    """The dataset splits and the trained baseline (trained once, then cached by fingerprint).

    `inputs_checked` is called once the model, data and checkpoint have been checked and
    before any training, so a caller can refuse to go on without wasting the training.
    """
    progress = progress or logger.info
    recipe = training if isinstance(training, TrainingRecipe) else TrainingRecipe(**(training or {}))
    factory = model_factory(model)
    torch.manual_seed(seed)  # the initial weights, so that a baseline trained afresh is the same one
    net = factory()
    if not isinstance(net, nn.Module):
        raise ValueError(f"workload.model: {model!r} returned {type(net).__name__}, not a torch.nn.Module")

    full_train, test, data_identity, preprocessing = _load_dataset(dataset, data_dir)
    train, val = split_train_val(full_train, val_size, split_seed)
    train, val, test = (
        subset(s, n, split_seed) for s, n in ((train, train_subset), (val, val_subset), (test, test_subset))
    )
    example_inputs = train.x[:1].clone()

    if checkpoint:
        load_state_dict(checkpoint, net, "workload.checkpoint")
    if inputs_checked:
        inputs_checked()
    fingerprint = _fingerprint(
        net,
        checkpoint,
        model=model,
        dataset=dataset,
        data=data_identity,
        val_size=val_size,
        split_seed=split_seed,
        train_subset=train_subset,
        recipe=dataclasses.asdict(recipe),
        seed=seed,
    )
    if not checkpoint and recipe.epochs > 0:  # 0 epochs: the model as its factory built it (pretrained)
        _cached_or_trained_(
            net, fingerprint, cache_dir or cache_dir_default(), model, (train, val), recipe, seed, progress, device
        )
    net.eval()
    name = model.rsplit(":", 1)[-1]
    return Workload(name, net, factory, train, val, test, example_inputs, fingerprint, preprocessing)
