"""Models that misbehave on purpose, for the interruption and failure-isolation tests."""

import time

from torch import nn

from experiments.models import lenet300


class SlowToTrain(nn.Module):
    """LeNet-300-100 whose every training step sleeps, so a test can stop a trial mid-way."""

    def __init__(self):
        super().__init__()
        self.net = lenet300()

    def forward(self, x):
        if self.training:
            time.sleep(0.05)
        return self.net(x)


def slow_to_train():
    return SlowToTrain()
