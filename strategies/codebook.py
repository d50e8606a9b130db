"""Weight sharing: a k-means codebook per layer, as in Deep Compression's trained quantization.

A layer's non-zero weights are clustered into 2^b centroids by k-means in one dimension,
initialised linearly over [min, max] (Han et al. found linear initialisation best, since it
keeps the few large weights that matter most), and every weight becomes its centroid. During
fine-tuning the centroids are the trained parameters: the weights that share a centroid add
their gradients to it (the backward pass of the gather sums them), the assignment stays fixed,
and pruned weights stay zero. The codebook is the layer's `weight_codebook`, a buffer once the
model is final; the weight is exactly codebook[index], so the index of each weight is found
again as its nearest centroid (`codebook_indices`), which the artifact stores at b bits.

BatchNorm is folded before clustering: folding scales each output channel by its own factor,
which would move the weights off the shared values afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from strategies.base import CompressionError, weight_layers

CODEBOOK = "weight_codebook"
KMEANS_ITERATIONS = 30


class CodebookError(CompressionError):
    pass


def _nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The index of each value's nearest centroid (centroids sorted ascending)."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return torch.searchsorted(midpoints, values.contiguous())


def kmeans(values: torch.Tensor, k: int, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """k centroids of one-dimensional `values`, sorted, by Lloyd's iterations from a linear
    initialisation over [min, max]. A centroid that loses all its values keeps its place."""
    values = values.detach().double().flatten()
    if values.numel() == 0:
        return torch.zeros(k)
    centroids = torch.linspace(float(values.min()), float(values.max()), k, dtype=torch.float64)
    for _ in range(iterations):
        index = _nearest(values, centroids)
        counts = torch.bincount(index, minlength=k)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, index, values)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.equal(updated, centroids):
            break
        centroids, _ = torch.sort(updated)
    return centroids.float()


def codebook_indices(weight: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Each weight's index into the layer's codebook (int32, shaped like the weight)."""
    return _nearest(weight.detach().flatten().float(), codebook.float()).view(weight.shape).to(torch.int32)


def shared_weight(codebook: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The weight as codebook[index], zero where pruned; differentiable in the codebook."""
    return torch.where(mask, codebook[index.long()], torch.zeros((), dtype=codebook.dtype))


def cluster_(module: nn.Module, bits: int) -> None:
    """Replace the layer's weights by a 2^bits codebook of its non-zero weights, in place.
    The codebook becomes a trainable Parameter (`weight_codebook`) until `freeze_`."""
    weight = module.weight.detach()
    if not torch.isfinite(weight).all():
        raise CodebookError("non-finite weights cannot be clustered")
    mask = weight != 0
    codebook = kmeans(weight[mask], 2**bits)
    with torch.no_grad():
        module.weight.copy_(shared_weight(codebook, codebook_indices(weight, codebook), mask))
    module.register_parameter(CODEBOOK, nn.Parameter(codebook))


def freeze_(module: nn.Module) -> None:
    """Make the (fine-tuned) codebook final: a buffer, and the weight exactly codebook[index]."""
    codebook = getattr(module, CODEBOOK).detach().clone()
    del module._parameters[CODEBOOK]
    codebook, _ = torch.sort(codebook)  # training may reorder centroids; the nearest rule needs them sorted
    with torch.no_grad():
        index = codebook_indices(module.weight, codebook)
        module.weight.copy_(shared_weight(codebook, index, module.weight != 0))
    module.register_buffer(CODEBOOK, codebook)


def is_clustered(module: nn.Module) -> bool:
    return hasattr(module, CODEBOOK)


class _SharedWeight(nn.Module):
    """The weight as its layer's codebook entries: the gradient of every weight that shares a
    centroid is summed into that centroid; the stored float weight only says which one, and
    whether it is pruned."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.codebook = getattr(module, CODEBOOK)
        self.index = codebook_indices(module.weight, self.codebook.detach()).long()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return shared_weight(self.codebook, self.index, weight != 0)


def training_simulation(model: nn.Module) -> contextlib.AbstractContextManager:
    """A context in which every clustered layer's weight is its codebook entries, so that
    fine-tuning trains the centroids. On exit the weights hold the trained centroids."""
    return _simulate(model)


@contextlib.contextmanager
def _simulate(model: nn.Module) -> Iterator[nn.Module]:
    done = []
    try:
        for _, module in weight_layers(model):
            if is_clustered(module):
                parametrize.register_parametrization(module, "weight", _SharedWeight(module))
                done.append(module)
        yield model
    finally:
        for module in done:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def cluster_model_(model: nn.Module, bits_of: Callable[[str], int]) -> None:
    """Cluster every weight layer not clustered yet to `bits_of(layer name)` bits."""
    for name, module in weight_layers(model):
        if is_clustered(module):
            continue
        try:
            cluster_(module, bits_of(name))
        except CodebookError as error:
            raise CodebookError(f"layer {name}: {error}") from None


def share_weights_(model: nn.Module, bits_of: Callable[[str], int]) -> None:
    """The final codebooks: clustered now if fine-tuning did not, then frozen."""
    cluster_model_(model, bits_of)
    for _, module in weight_layers(model):
        freeze_(module)
