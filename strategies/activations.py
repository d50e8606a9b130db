"""Activation quantization: each integer layer's input fake-quantized per tensor to uint8.

The input of a Conv2d/Linear is fake-quantized (affine, min/max calibrated) with
`torch.fake_quantize_per_tensor_affine`, which exports to ONNX QuantizeLinear/DequantizeLinear.
It is a forward pre-hook reading the layer's `input_scale`/`input_zero_point` buffers rather
than a wrapper module: a wrapper would rename every state-dict key and submodule
(`0.weight` → `0.layer.weight`), while a hook keeps names, so the model still matches its
factory; the hook is a module-level function, so deepcopy and pickling keep it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from strategies.base import CompressionError, weight_layers
from strategies.inputs import Inputs

logger = logging.getLogger(__name__)


class QuantizationError(CompressionError):
    pass


def _fake_quant_input(module: nn.Module, args: tuple) -> tuple:
    x = torch.fake_quantize_per_tensor_affine(args[0], module.input_scale, module.input_zero_point, 0, 255)
    return (x,) + args[1:]


def set_input_quantization_(module: nn.Module, scale: float | torch.Tensor, zero_point: int | torch.Tensor) -> None:
    """Fake-quantize the module's input to uint8 with these parameters from now on."""
    hooked = hasattr(module, "input_scale")
    module.register_buffer("input_scale", torch.as_tensor(scale, dtype=torch.float32).reshape(()).clone())
    module.register_buffer("input_zero_point", torch.as_tensor(zero_point, dtype=torch.int32).reshape(()).clone())
    if not hooked:  # re-calibrating updates the buffers; a second hook would quantize twice
        module.register_forward_pre_hook(_fake_quant_input)


def uint8_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Affine uint8 scale and zero point for [lo, hi], widened to hold 0 exactly (ReLU zeros, padding)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    return scale, int(min(255, max(0, round(-lo / scale))))


# Fewer input channels than this and a convolution keeps a float input (weight-only codes).
MIN_INTEGER_CONV_CHANNELS = 4


def runs_faster_in_integer(module: nn.Module) -> bool:
    """Whether the layer's integer kernel beats its float one in ONNX Runtime.

    Not for a convolution on 1-3 input channels, an image's first layer: ORT runs that one
    with a direct NCHW float kernel, while its integer kernel gets too short a dot product
    per output. Measured by `experiments.kernels` (batch 64, one thread, AVX512-VNNI; each
    against float with the next layer's QuantizeLinear, `experiments/results/kernels.json`):
    1.18-1.50x slower in integer for 1→20 5x5, 1→32 3x3, 3→32 3x3 and 3→16 5x5; from 4 input
    channels on the integer kernel wins (0.81x for 4→32 3x3, 0.26-0.63x for 8-20 channels).
    Embeddings' inputs are token ids: nothing to quantize there.
    """
    if isinstance(module, nn.Embedding):
        return False
    return not isinstance(module, nn.Conv2d) or module.in_channels >= MIN_INTEGER_CONV_CHANNELS


def calibrate_inputs_(model: nn.Module, calibration_x: Inputs, batch_size: int) -> None:
    """Observe the input range (min/max, on float activations) of each layer that runs faster
    in integer, then turn fake-quant on there."""
    if len(calibration_x) == 0:
        raise QuantizationError("activation quantization needs calibration data, got none")
    ranges: dict[str, tuple[float, float]] = {}

    def observer(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            lo, hi = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(old[0], lo), max(old[1], hi))

        return hook

    layers = {name: m for name, m in weight_layers(model) if runs_faster_in_integer(m)}
    handles = [m.register_forward_pre_hook(observer(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            for i in range(0, len(calibration_x), batch_size):
                model(calibration_x[i : i + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    for name, module in layers.items():
        if name not in ranges:
            logger.warning("layer %s never ran during calibration; its input stays float", name)
            continue
        lo, hi = ranges[name]
        if not (torch.isfinite(torch.tensor([lo, hi])).all()):
            raise QuantizationError(f"non-finite activations at the input of layer {name}")
        set_input_quantization_(module, *uint8_qparams(lo, hi))


def round_bias_to_accumulator_(model: nn.Module) -> None:
    """Round each integer layer's bias to a multiple of input_scale × weight_scale.

    That is the scale of the int32 accumulator, and ONNX Runtime's fused integer kernels
    (QLinearConv, QGemm) add the bias there, rounded to an integer. Rounding it the same way
    here keeps the simulation the model that runs. The coarser the weights, the coarser that
    step: with 2-3-bit weights a float bias changed 0.1-0.3 % of LeNet-5's validation
    predictions in ONNX Runtime (up to 0.8 % in searches, past the 0.5 % limit); rounded, none.
    """
    for _, module in weight_layers(model):
        if getattr(module, "bias", None) is None or not (
            hasattr(module, "input_scale") and hasattr(module, "weight_scale")
        ):
            continue
        step = module.input_scale * module.weight_scale
        with torch.no_grad():
            module.bias.copy_(torch.round(module.bias / step) * step)
