"""Per-layer sensitivity: measured once per study, spent per trial.

`scan` measures, for every weight layer (Conv2d, Linear, Embedding) and every level of one
technique (a weight width, a weight density), how far changing that layer alone moves the
uncompressed model's outputs: the mean KL divergence of its output distribution from the
unchanged model's on a batch of training inputs. `allocate` then turns a trial's average level into one level per
layer with as little summed sensitivity as it finds, under the same budget.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from strategies.base import weight_layers
from strategies.inputs import Inputs


def scan(
    model: nn.Module,
    x: Inputs,
    batch_size: int,
    levels: Sequence[float],
    alter: Callable[[torch.Tensor, float], torch.Tensor],
) -> dict[str, dict[float, float]]:
    """For each layer and level: the outputs' mean KL divergence from `model`'s on `x` when
    only that layer's weight is replaced by `alter(weight, level)`."""
    model = copy.deepcopy(model).eval()

    def log_probs() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).log_softmax(1)

    reference = log_probs()
    result: dict[str, dict[float, float]] = {}
    for name, module in weight_layers(model):
        weight = module.weight.data
        result[name] = {}
        for level in levels:
            module.weight.data = alter(weight, level)
            kl = nn.functional.kl_div(log_probs(), reference, reduction="batchmean", log_target=True)
            result[name][level] = max(float(kl), 0.0)
        module.weight.data = weight
    return result


def _at(curve: Mapping[float, float], level: float) -> float:
    """The curve between its measured levels, linearly."""
    points = sorted(curve.items())
    for (lo, a), (hi, b) in zip(points, points[1:], strict=False):
        if lo <= level <= hi:
            return a + (b - a) * (level - lo) / (hi - lo)
    return points[0][1] if level < points[0][0] else points[-1][1]


def allocate(counts: Mapping[str, int], costs: Mapping[str, Mapping[float, float]], average: float) -> dict[str, float]:
    """A level per layer, with `counts` weights each, whose weighted mean is at most
    `average`, and as little summed cost as the search below finds.

    Levels are the measured ones plus `average` (its cost interpolated), so the uniform
    assignment is always a candidate. A Lagrangian split first: each layer takes the level
    minimising cost + lam * count * level, with the smallest lam that fits the budget
    (bisection); what budget is left goes, greedily, to the raise that removes the most cost
    per unit spent. The uniform assignment is kept when this is no better. Layers without
    costs keep `average`.
    """
    layers = [name for name in counts if name in costs]
    if not layers:
        return {name: average for name in counts}
    levels = sorted({*next(iter(costs.values())), average})
    cost = {n: {level: _at(costs[n], level) for level in levels} for n in layers}
    budget = average * sum(counts[n] for n in layers)

    def split(lam: float) -> dict[str, float]:
        return {n: min(levels, key=lambda v: (cost[n][v] + lam * counts[n] * v, v)) for n in layers}

    def used(choice: Mapping[str, float]) -> float:
        return sum(counts[n] * choice[n] for n in layers)

    lo, hi = 0.0, 1.0
    while used(split(hi)) > budget * (1 + 1e-12):
        hi *= 10
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if used(split(mid)) <= budget * (1 + 1e-12) else (mid, hi)
    choice = split(hi)
    while True:
        moves = [
            ((cost[n][choice[n]] - cost[n][v]) / max(counts[n] * (v - choice[n]), 1e-12), n, v)
            for n in layers
            for v in levels
            if v > choice[n] and cost[n][v] < cost[n][choice[n]] and used({**choice, n: v}) <= budget * (1 + 1e-12)
        ]
        if not moves:
            break
        _, name, level = max(moves)
        choice[name] = level
    if sum(cost[n][choice[n]] for n in layers) >= sum(cost[n][average] for n in layers):
        choice = {n: average for n in layers}
    return {name: choice.get(name, average) for name in counts}
