"""Built-in models, plain nn.Sequential stacks so that pruning, export and state dicts stay simple."""

from torch import nn


def lenet5(num_classes: int = 10) -> nn.Module:
    """Caffe's LeNet-5 (the one Deep Compression reports: 431k parameters), with BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5),
        nn.BatchNorm2d(20),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.BatchNorm2d(50),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(800, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )


def lenet300(num_classes: int = 10) -> nn.Module:
    """LeNet-300-100 (266k parameters)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


MODELS = {"lenet5": lenet5, "lenet300": lenet300}
