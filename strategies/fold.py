"""Fold BatchNorm into the Conv/Linear before it, so quantized weights are what really runs."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

_FOLDABLE = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def fold_batchnorm_(model: nn.Module) -> list[str]:
    """Fold every BatchNorm that directly follows a Conv2d/Linear, in place.

    The BN is replaced by nn.Identity under the same name, so the model keeps its class and
    module names (a stored state dict can be matched to a fresh factory model). Returns the
    folded BN names. Uses running statistics: eval-mode semantics.
    """
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _NORMS):
            continue
        source = node.args[0] if node.args else None
        if not (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), _FOLDABLE)
            and len(source.users) == 1
        ):
            continue
        layer, bn = modules[source.target], modules[node.target]
        with torch.no_grad():
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
            factor = gamma / torch.sqrt(bn.running_var + bn.eps)
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
            layer.weight.mul_(factor.view(shape))
            layer.bias = nn.Parameter((bias - bn.running_mean) * factor + beta)
        _set_module(model, node.target, nn.Identity())
        folded.append(node.target)
    return folded
