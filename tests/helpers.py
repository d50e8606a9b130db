"""Small shared builders for tests: models with non-trivial BatchNorm stats, contexts."""

import torch

from experiments.models import lenet5, lenet300
from strategies.base import Context

MODELS = {"lenet5": lenet5, "lenet300": lenet300}


def trained_like(factory, seed=0):
    """A model whose BatchNorm statistics are not the identity, in eval mode."""
    torch.manual_seed(seed)
    model = factory()
    model.train()
    with torch.no_grad():
        model(torch.randn(256, 1, 28, 28) * 2 + 0.5)
    return model.eval()


def context(n=64, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Context(example_inputs=x[:1], finetune_x=x, finetune_y=y, calibration_x=x, batch_size=32, **kwargs)
