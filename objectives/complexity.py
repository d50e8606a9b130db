"""Parameter and MAC counts: logged next to the objectives, not optimised."""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Elements of all nn.Parameters (quantization scales are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one sample."""
    total = 0

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output[:1].numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += output[:1].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example_inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
    return total
