"""Quantization: symmetric per-output-channel weights at 2–8 bits, optional int8 activations.

Weights: codes are integers in [-(2^(b-1)-1), 2^(b-1)-1] with one float32 scale per output
channel and zero-point 0, so zero stays exactly zero (pruned weights stay pruned) and the
codes map one-to-one onto int8 QDQ weights at deployment. The module's float weight becomes
exactly `codes * scale`; the scale and bit-width are registered as buffers, so they travel
with copies and state dicts and the artifact writer can recover the codes exactly.

Activations (optional): the input of every quantized layer is fake-quantized per tensor to
uint8 with a scale and zero-point calibrated on training batches, through a forward
pre-hook that reads the layer's buffers (it exports to ONNX QuantizeLinear/DequantizeLinear).
BatchNorm is folded first, so the quantized weights are the ones that really run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from strategies.base import ChoiceParam, CompressionError, Context, Strategy, StrategyConfig
from strategies.fold import fold_batchnorm_

WEIGHT_BITS = (2, 3, 4, 5, 6, 8, 32)
ACTIVATION_BITS = (8, 32)
LAYERS = (nn.Conv2d, nn.Linear)


class QuantizationError(CompressionError):
    pass


@dataclass(frozen=True)
class QuantizationConfig(StrategyConfig):
    weight_bits: int = 32
    activation_bits: int = 32

    def validate(self) -> None:
        if self.weight_bits not in WEIGHT_BITS or isinstance(self.weight_bits, bool):
            raise ValueError(f"quantization.weight_bits must be one of {list(WEIGHT_BITS)}, got {self.weight_bits!r}")
        if self.activation_bits not in ACTIVATION_BITS or isinstance(self.activation_bits, bool):
            raise ValueError(
                f"quantization.activation_bits must be one of {list(ACTIVATION_BITS)}, got {self.activation_bits!r}"
            )


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def channel_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """max|w| / qmax per output channel; an all-zero channel gets scale 1 (its codes are 0)."""
    amax = weight.detach().abs().flatten(1).amax(dim=1)
    return torch.where(amax > 0, amax / qmax(bits), torch.ones_like(amax)).float()


def _broadcast(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return scale.view((-1,) + (1,) * (weight.dim() - 1))


def weight_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    q = qmax(bits)
    return torch.clamp(torch.round(weight.detach() / _broadcast(scale, weight)), -q, q).to(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The one expression both the strategy and the artifact loader use, so they agree bit for bit."""
    return codes.to(torch.float32) * _broadcast(scale, codes)


def _fake_quant_input(module: nn.Module, args: tuple) -> tuple:
    return (
        torch.fake_quantize_per_tensor_affine(args[0], module.input_scale, module.input_zero_point, 0, 255),
    ) + args[1:]


def set_weight_quantization_(module: nn.Module, codes: torch.Tensor, scale: torch.Tensor, bits: int) -> None:
    """Make `module.weight` exactly codes*scale and record scale and bits as buffers."""
    module.register_buffer("weight_scale", scale.to(torch.float32).clone())
    module.register_buffer("weight_bits", torch.tensor(bits, dtype=torch.int32))
    with torch.no_grad():
        module.weight.data = dequantize(codes, module.weight_scale)


def set_input_quantization_(module: nn.Module, scale: float | torch.Tensor, zero_point: int | torch.Tensor) -> None:
    """Fake-quantize the module's input to uint8 with these parameters from now on."""
    module.register_buffer("input_scale", torch.as_tensor(scale, dtype=torch.float32).reshape(()).clone())
    module.register_buffer("input_zero_point", torch.as_tensor(zero_point, dtype=torch.int32).reshape(()).clone())
    module.register_forward_pre_hook(_fake_quant_input)


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LAYERS))


def _check_finite(name: str, what: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise QuantizationError(f"non-finite {what} in layer {name}")


def quantize_weights_(model: nn.Module, bits: int) -> None:
    for name, module in quantized_layers(model):
        _check_finite(name, "weights", module.weight)
        scale = channel_scales(module.weight, bits)
        _check_finite(name, "weight scales", scale)
        set_weight_quantization_(module, weight_codes(module.weight, scale, bits), scale, bits)


def calibrate_inputs_(model: nn.Module, calibration_x: torch.Tensor, batch_size: int) -> None:
    """Observe each quantized layer's input range on float activations, then turn fake-quant on."""
    ranges: dict[str, list[float]] = {}

    def observer(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            lo, hi = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, [lo, hi])
            ranges[name] = [min(old[0], lo), max(old[1], hi)]

        return hook

    layers = dict(quantized_layers(model))
    handles = [m.register_forward_pre_hook(observer(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            for i in range(0, len(calibration_x), batch_size):
                model(calibration_x[i : i + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    for name, module in layers.items():
        lo, hi = min(ranges[name][0], 0.0), max(ranges[name][1], 0.0)  # the range must hold zero exactly
        if not (torch.isfinite(torch.tensor([lo, hi])).all()):
            raise QuantizationError(f"non-finite activations at the input of layer {name}")
        scale = (hi - lo) / 255 if hi > lo else 1.0
        set_input_quantization_(module, scale, int(min(255, max(0, round(-lo / scale)))))


class _STEWeight(nn.Module):
    """Per-channel symmetric fake quantization with a straight-through gradient."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = channel_scales(weight, self.bits)
        quantized = dequantize(weight_codes(weight, scale, self.bits), scale)
        return weight + (quantized - weight).detach()


class Quantization(Strategy):
    name = "quantization"
    config_cls = QuantizationConfig
    default_space = {
        "quantization.weight_bits": ChoiceParam(WEIGHT_BITS),
        "quantization.activation_bits": ChoiceParam(ACTIVATION_BITS),
    }

    def suggest(self, trial: Any) -> QuantizationConfig:
        bits = self.space["quantization.weight_bits"].suggest(trial, "quantization.weight_bits")
        if bits == 32:  # activations are only quantized together with weights
            return QuantizationConfig(weight_bits=32, activation_bits=32)
        activations = self.space["quantization.activation_bits"].suggest(trial, "quantization.activation_bits")
        return QuantizationConfig(weight_bits=bits, activation_bits=activations)

    def is_active(self, config: QuantizationConfig) -> bool:
        return config.weight_bits < 32 or config.activation_bits < 32

    def apply(self, model: nn.Module, config: QuantizationConfig, context: Context) -> nn.Module:
        model.eval()
        fold_batchnorm_(model)
        if config.weight_bits < 32:
            quantize_weights_(model, config.weight_bits)
        if config.activation_bits < 32:
            calibrate_inputs_(model, context.calibration_x, context.batch_size)
        return model

    @staticmethod
    def training_simulation(config: QuantizationConfig) -> Callable[[nn.Module], contextlib.AbstractContextManager]:
        """f(model) → a context in which Conv/Linear weights are fake-quantized (STE)."""

        @contextlib.contextmanager
        def simulate(model: nn.Module) -> Iterator[nn.Module]:
            layers = [m for _, m in quantized_layers(model)]
            for module in layers:
                parametrize.register_parametrization(module, "weight", _STEWeight(config.weight_bits))
            try:
                yield model
            finally:
                for module in layers:
                    # Keep the float weights that were trained; quantization proper comes later.
                    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)

        return simulate
