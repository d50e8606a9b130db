"""Model inputs: one tensor, or named tensors (token ids, attention masks) that share a batch axis.

`NamedInputs` behaves like one batch tensor where the code handles batches (``len(x)``,
``x[i:j]``, ``x[index]``, ``x.clone()``, ``x.numpy()``) and like a mapping where a model reads
it (``inputs["input_ids"]``, ``model(**inputs)``). A model with named inputs takes that one
mapping as its only argument, so every caller runs it as ``model(x)``, as for a tensor.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Union

import numpy as np
import torch

# The single input of an image model, in the runtime's feed and the exported ONNX graph.
TENSOR_INPUT_NAME = "input"


class NamedInputs:
    """A batch of named tensors with the same first (batch) dimension."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        if not isinstance(tensors, Mapping) or not tensors:
            raise ValueError(
                f"named inputs must be a non-empty mapping of name to tensor, got {type(tensors).__name__}"
            )
        converted = {}
        for name, value in tensors.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"input names must be identifiers, got {name!r}")
            tensor = torch.as_tensor(value)
            if tensor.dim() == 0:
                raise ValueError(f"input {name!r} has no batch dimension (a scalar)")
            converted[name] = tensor
        lengths = {name: len(t) for name, t in converted.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"named inputs must share their first (batch) dimension, got lengths {lengths}")
        self.tensors: dict[str, torch.Tensor] = converted

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: Any) -> Any:
        """A name gives its tensor; anything else indexes the batch axis of every tensor."""
        if isinstance(index, str):
            return self.tensors[index]
        if isinstance(index, int):  # keep the batch axis, as x[i:i+1] would
            index = slice(index, index + 1 if index != -1 else None)
        return NamedInputs({name: t[index] for name, t in self.tensors.items()})

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}: {tuple(t.shape)} {t.dtype}" for name, t in self.tensors.items())
        return f"NamedInputs({shapes})"

    def keys(self):
        return self.tensors.keys()

    def items(self):
        return self.tensors.items()

    def clone(self) -> NamedInputs:
        return NamedInputs({name: t.clone() for name, t in self.tensors.items()})

    def to(self, device: str | torch.device) -> NamedInputs:
        return NamedInputs({name: t.to(device) for name, t in self.tensors.items()})

    def numpy(self) -> dict[str, np.ndarray]:
        return {name: t.detach().cpu().numpy() for name, t in self.tensors.items()}


Inputs = Union[torch.Tensor, NamedInputs]


def as_inputs(value: Any, what: str) -> Inputs:
    """A dataset's inputs: a mapping of named tensors, or one float tensor. `what` names the source."""
    if isinstance(value, NamedInputs):
        return value
    if isinstance(value, Mapping):
        try:
            return NamedInputs(value)
        except (ValueError, TypeError, RuntimeError) as error:
            raise ValueError(f"{what}: {error}") from None
    return torch.as_tensor(value, dtype=torch.float32)


def forward(model: torch.nn.Module, x: Inputs) -> torch.Tensor:
    """Run `model` on its one argument, a tensor or named inputs (Torch-Pruning's `forward_fn`:
    left to itself, it would unpack named inputs into keyword arguments)."""
    return model(x)


def input_names(example: Inputs) -> list[str]:
    return list(example.keys()) if isinstance(example, NamedInputs) else [TENSOR_INPUT_NAME]


def runtime_feed(x: Inputs | np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What ONNX Runtime's `session.run` takes: numpy arrays by input name."""
    if isinstance(x, NamedInputs):
        return x.numpy()
    if isinstance(x, Mapping):
        return dict(x)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return {TENSOR_INPUT_NAME: x.astype(np.float32, copy=False)}


def runtime_numpy(x: Inputs) -> np.ndarray | dict[str, np.ndarray]:
    """The inputs as numpy: one array, or arrays by name."""
    feed = runtime_feed(x)
    return feed if isinstance(x, NamedInputs) else next(iter(feed.values()))


def from_runtime_feed(batch: np.ndarray | Mapping[str, np.ndarray]) -> Inputs:
    """The model's inputs for a runner's numpy batch (the inverse of `runtime_feed`)."""
    if isinstance(batch, Mapping):
        return NamedInputs({name: torch.from_numpy(np.asarray(a)) for name, a in batch.items()})
    return torch.from_numpy(batch)


def fingerprint_bytes(x: Inputs, limit: int = 1 << 20) -> bytes:
    """Bytes that identify a dataset's inputs (the first `limit` of each tensor), for cache keys."""
    if isinstance(x, NamedInputs):
        return b"".join(name.encode() + t.numpy().tobytes()[:limit] for name, t in x.items())
    return x.numpy().tobytes()[:limit]
