"""Knowledge-distillation fine-tuning of the compressed student against the uncompressed teacher.

The teacher's logits on the fine-tune data are computed once per study and passed in, so a
trial only pays for the student. Weights that pruning zeroed stay exactly zero (also those a
step hook, `Context.on_step`, prunes during the fine-tune), and when the trial quantizes,
training runs against the quantized weights (straight-through gradients).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from strategies.base import CompressionError, Context, Strategy, StrategyConfig, weight_layers
from strategies.inputs import Inputs
from strategies.space import TOP, Anchor, ChoiceParam, FloatParam, IntParam

logger = logging.getLogger(__name__)


class DistillationError(CompressionError):
    pass


class DistillationDiverged(DistillationError):
    pass


OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class DistillationConfig(StrategyConfig):
    epochs: int = 0
    temperature: float = 4.0
    alpha: float = 0.7
    lr: float = 1e-3
    optimizer: str = "sgd"  # or "adamw", the usual one for a pretrained transformer

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"distillation.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"distillation.epochs must be a whole number >= 0, got {self.epochs!r}")
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValueError(f"distillation.temperature must be > 0, got {self.temperature!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"distillation.alpha must be in [0, 1], got {self.alpha!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"distillation.lr must be > 0, got {self.lr!r}")


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """alpha·T²·KL(teacher‖student) at temperature T + (1−alpha)·CE(labels).

    Both sides go through log_softmax, which stays finite at any temperature; T² keeps the
    soft-target gradients on the same scale as the hard ones (Hinton et al., 2015).
    """
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 − the mean cosine similarity to the teacher's embeddings: what embedding fidelity scores."""
    return 1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1).mean()


def _loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, config, outputs: str) -> torch.Tensor:
    if outputs == "embeddings":
        return embedding_loss(student, teacher)
    return distillation_loss(student, teacher, labels, config.temperature, config.alpha)


def _zero_masks(weights: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(w, w.detach() != 0) for w in weights if not bool((w.detach() != 0).all())]


def _optimizer(model: nn.Module, config: DistillationConfig, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and its cosine schedule over `steps` updates."""
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))


def distill_(
    model: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    teacher_logits: torch.Tensor,
    config: DistillationConfig,
    *,
    batch_size: int = 128,
    seed: int = 0,
    fake_quant: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
    report: Callable[[str], None] = lambda message: None,
    after_epoch: Callable[[nn.Module, int], None] = lambda model, epoch: None,
    on_step: Callable[[nn.Module, int, int], bool] = lambda model, step, total_steps: False,
    device: str = "cpu",
    outputs: str = "logits",
) -> list[float]:
    """Fine-tune `model` in place on `device` (back on the CPU after); returns each epoch's mean
    loss. `on_step`, `outputs`: as Context's."""
    if len(teacher_logits) != len(x):
        raise ValueError(f"teacher_logits has {len(teacher_logits)} rows for {len(x)} samples")
    model.to(device)
    # The weight Parameters themselves: inside `fake_quant`, `module.weight` is computed from them.
    weights = [m.weight for _, m in weight_layers(model)]
    masks = _zero_masks(weights)  # pruned weights must stay pruned
    steps = config.epochs * math.ceil(len(x) / batch_size)
    optimizer, schedule = _optimizer(model, config, steps)
    generator = torch.Generator().manual_seed(seed)
    history, step = [], 0
    with fake_quant(model) if fake_quant else contextlib.nullcontext():
        if on_step(model, step, steps):
            masks = _zero_masks(weights)
        for epoch in range(config.epochs):
            model.train()
            order = torch.randperm(len(x), generator=generator)
            total = 0.0
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                loss = _loss(
                    model(x[idx].to(device)), teacher_logits[idx].to(device), y[idx].to(device), config, outputs
                )
                if not torch.isfinite(loss):
                    raise DistillationDiverged(f"distillation diverged in epoch {epoch + 1}: loss {loss.item()}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    for weight, mask in masks:
                        weight.masked_fill_(~mask, 0.0)
                step += 1
                if on_step(model, step, steps):
                    masks = _zero_masks(weights)
                total += loss.item() * len(idx)
            history.append(total / len(x))
            report(f"distillation epoch {epoch + 1}/{config.epochs}: loss {history[-1]:.4f}")
            model.eval()
            after_epoch(model, epoch + 1)
    _check_finite(model.to("cpu").eval())
    return history


def _check_finite(model: nn.Module) -> None:
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise DistillationDiverged("distillation left non-finite weights")


# A distillation fine-tune that works on every workload we measured.
_FINETUNE = {
    "distillation.epochs": TOP,
    "distillation.temperature": 4.0,
    "distillation.alpha": 0.7,
    "distillation.lr": 3e-3,
}


class Distillation(Strategy):
    name = "distillation"
    phase = "finetune"
    default_space = {
        "distillation.epochs": IntParam(0, 20, off=0),
        # Conditional on epochs > 0, so they have no off value of their own.
        "distillation.temperature": FloatParam(1.0, 20.0),
        "distillation.alpha": FloatParam(0.0, 1.0),
        "distillation.lr": FloatParam(1e-5, 1e-1, log=True),
        "distillation.optimizer": ChoiceParam(OPTIMIZERS, off="sgd"),
    }
    unlisted_space = {"distillation.optimizer": ChoiceParam(("sgd",), off="sgd")}
    anchors = (
        Anchor("student-half", {"pruning.structured_ratio": 0.5, **_FINETUNE}, rank=5),
        # The narrowest student the space allows: the fastest, smallest end of structured
        # pruning, which a sampler's density reaches last (measured: README, Samplers).
        Anchor("student-smallest", {"pruning.structured_ratio": TOP, **_FINETUNE}, rank=6),
        # Deep Compression's pruning of the LeNets (92 % of the weights), reached gradually with
        # per-layer sparsities and recovered at the rate measured best for that (README): only
        # where the space lists both options. Its alpha and temperature are the sampler's.
        Anchor(
            "pruned-92-recovered",
            {
                "pruning.unstructured_sparsity": 0.92,
                "pruning.per_layer_sparsity": True,
                "pruning.gradual": True,
                "distillation.epochs": TOP,
                "distillation.lr": 0.03,
            },
            rank=7,
        ),
        # DistilBERT's student: half an encoder's layers, distilled from the whole model with the
        # longest fine-tune the space allows; rate, alpha and temperature are the sampler's.
        Anchor("student-half-depth", {"pruning.layer_ratio": 0.5, "distillation.epochs": TOP}, rank=8),
        # A narrower and shallower int8 encoder (7 of 12 heads, three quarters of the FFN, one
        # layer less of six), recovered at a rate that restored int8 and 4-bit MiniLM fully in
        # probes: there, 3.56x faster than the baseline at 0.6 validation points (in 20-trial
        # searches, 3.9x at 1.1-2.0 points: outside a 1-point limit, a speed end for the sampler).
        Anchor(
            "student-narrow-int8",
            {
                "pruning.head_ratio": 0.375,
                "pruning.ffn_ratio": 0.25,
                "pruning.layer_ratio": 0.17,
                "quantization.weight_bits": 8,
                "quantization.activation_bits": 8,
                "distillation.epochs": TOP,
                "distillation.lr": 2e-4,
            },
            rank=9,
        ),
        # An encoder's full-width int8-activation model at 4-bit weights (the embedding table
        # included: 8.4x smaller in a probe), recovered at the same rate. It names the head ratio
        # (off) so that only encoder spaces express it: the LeNets' fine-tunes use other rates.
        Anchor(
            "4-bit-recovered",
            {
                "pruning.head_ratio": 0.0,
                "quantization.weight_bits": 4,
                "quantization.activation_bits": 8,
                "distillation.epochs": TOP,
                "distillation.lr": 2e-4,
            },
            rank=10,
        ),
    )

    def suggest(self, trial: Any) -> DistillationConfig:
        epochs = self._suggest(trial, "distillation.epochs")
        if epochs == 0:  # the rest only matters when fine-tuning happens
            return DistillationConfig(epochs=0)
        keys = ("distillation.temperature", "distillation.alpha", "distillation.lr")
        values = {key.split(".")[1]: self._suggest(trial, key) for key in keys}
        return DistillationConfig(
            epochs=epochs, optimizer=self.suggest_option(trial, "distillation.optimizer"), **values
        )

    def is_active(self, config: DistillationConfig) -> bool:
        return config.epochs > 0

    def apply(self, model: nn.Module, config: DistillationConfig, context: Context) -> nn.Module:
        logits = context.teacher_logits
        if logits is None:
            if context.teacher is None:
                raise DistillationError("distillation needs a teacher or precomputed teacher logits")
            with torch.no_grad():
                logits = context.teacher.eval()(context.finetune_x)
        distill_(
            model,
            context.finetune_x,
            context.finetune_y,
            logits,
            config,
            batch_size=context.batch_size,
            seed=context.seed,
            fake_quant=context.fake_quant,
            report=context.report,
            after_epoch=context.after_epoch,
            on_step=context.on_step,
            device=context.device,
            outputs=context.outputs,
        )
        return model
