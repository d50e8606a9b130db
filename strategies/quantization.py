"""Quantization: symmetric per-output-channel weights at 2–8 bits, optional uint8 activations.

Weights: codes are integers in [-(2^(b-1)-1), 2^(b-1)-1] with one float32 scale per output
channel and zero-point 0, so zero stays exactly zero (pruned weights stay pruned) and the
codes map one-to-one onto int8 QDQ weights at deployment. The module's float weight becomes
exactly `codes * scale`. The scale (`weight_scale`) and bit-width (`weight_bits`) are
registered buffers, so they travel with copies and state dicts, and the codes are recovered
exactly as round(weight / scale) by `quant_state`, which the artifact and ONNX writers share.

Activations (optional): the input of each Conv2d/Linear is fake-quantized per tensor to
uint8 (`strategies.activations`), except where the runtime's float kernel is the faster one.
BatchNorm is folded first, so the quantized weights are the ones that really run.

Mixed precision (searched when the search space lists `quantization.mixed_precision`):
`weight_bits` is then the average width over the weights, and each layer gets its own width,
spent after pruning where a once-per-study sensitivity scan (`strategies.sensitivity`) says it
buys the most back. The widths travel in the resolved config (`layer_bits`, which
`pipeline.compress` returns) and, once applied, as each layer's `weight_bits` buffer.

Weight sharing (`quantization.scheme: codebook`): 2^b trained centroids per layer, weights only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from strategies import codebook, sensitivity
from strategies.activations import QuantizationError, calibrate_inputs_, round_bias_to_accumulator_
from strategies.base import Context, Strategy, StrategyConfig, weight_layers
from strategies.fold import fold_batchnorm_
from strategies.inputs import Inputs
from strategies.space import Anchor, ChoiceParam

logger = logging.getLogger(__name__)

FLOAT_BITS = 32  # the width that means "not quantized", for weights and activations alike
WEIGHT_BITS = (2, 3, 4, 5, 6, 8, FLOAT_BITS)
ACTIVATION_BITS = (8, FLOAT_BITS)
SCHEMES = ("uniform", "codebook")  # a uniform grid of codes, or a trained codebook per layer
_INTEGER_BITS = tuple(b for b in WEIGHT_BITS if b != FLOAT_BITS)  # what a layer of mixed precision gets
# The buffers of a quantized layer: its weights' scale and width, and its input's qparams.
WIDTH_BUFFER = "weight_bits"
QUANT_BUFFERS = ("weight_scale", WIDTH_BUFFER, "input_scale", "input_zero_point")


def _check_choice(field: str, value: Any, choices: tuple[int, ...]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value not in choices:
        raise ValueError(f"quantization.{field} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class QuantizationConfig(StrategyConfig):
    """`weight_bits` and `activation_bits` at FLOAT_BITS (32) mean "not quantized".

    With `mixed_precision`, `weight_bits` is the average width, and `layer_bits` holds the
    width of each layer once the pipeline has allotted them (empty: `weight_bits` everywhere).
    """

    weight_bits: int = FLOAT_BITS
    activation_bits: int = FLOAT_BITS
    mixed_precision: bool = False
    layer_bits: tuple[tuple[str, int], ...] = ()
    scheme: str = "uniform"

    def validate(self) -> None:
        _check_choice("weight_bits", self.weight_bits, WEIGHT_BITS)
        _check_choice("activation_bits", self.activation_bits, ACTIVATION_BITS)
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization.scheme must be one of {list(SCHEMES)}, got {self.scheme!r}")
        if self.scheme == "codebook" and self.quantizes_activations:
            raise ValueError("quantization.scheme codebook quantizes weights only: activation_bits must be 32")
        if not isinstance(self.mixed_precision, bool):
            raise ValueError(f"quantization.mixed_precision must be one of [False, True], got {self.mixed_precision!r}")
        for layer, bits in self.layer_bits:
            _check_choice(f"layer_bits[{layer!r}]", bits, _INTEGER_BITS)

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_bits != FLOAT_BITS

    @property
    def quantizes_activations(self) -> bool:
        return self.activation_bits != FLOAT_BITS

    def bits_of(self, layer: str) -> int:
        return dict(self.layer_bits).get(layer, self.weight_bits)


# ------------------------------------------------------------------- weight codes


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _broadcast(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return scale.view((-1,) + (1,) * (weight.dim() - 1))


def channel_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """max|w| / qmax per output channel; an all-zero channel gets scale 1 (its codes are 0)."""
    amax = weight.detach().abs().flatten(1).amax(dim=1).float()
    return torch.where(amax > 0, amax / qmax(bits), torch.ones_like(amax))


def weight_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    q = qmax(bits)
    return torch.clamp(torch.round(weight.detach() / _broadcast(scale, weight)), -q, q).to(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The one expression both the strategy and the artifact loader use, so they agree bit for bit."""
    return codes.to(torch.float32) * _broadcast(scale.to(torch.float32), codes)


def set_weight_quantization_(module: nn.Module, codes: torch.Tensor, scale: torch.Tensor, bits: int) -> None:
    """Make `module.weight` exactly codes*scale and record scale and bits as buffers."""
    module.register_buffer("weight_scale", scale.detach().to(torch.float32).clone())
    module.register_buffer(WIDTH_BUFFER, torch.tensor(int(bits), dtype=torch.int32))
    with torch.no_grad():
        module.weight.data = dequantize(codes, module.weight_scale)


class QuantState(NamedTuple):
    """A quantized layer as the writers of its deployed forms need it."""

    codes: torch.Tensor  # int32 in [-qmax(bits), qmax(bits)], shaped like the weight
    scale: torch.Tensor  # float32, one per output channel: the weight is codes × scale
    bits: int
    input_scale: torch.Tensor | None  # the input's uint8 qparams, when it is quantized too
    input_zero_point: torch.Tensor | None


def quant_state(module: nn.Module) -> QuantState | None:
    """The layer's quantized state, or None when its weights are float.

    The artifact and the ONNX writer both take the codes from here, so they store the same
    integers, computed once by the same expression as the strategy's.
    """
    if not hasattr(module, WIDTH_BUFFER):
        return None
    scale, bits = module.weight_scale.detach(), int(getattr(module, WIDTH_BUFFER))
    quantized_input = hasattr(module, "input_scale")
    return QuantState(
        codes=weight_codes(module.weight, scale, bits),
        scale=scale,
        bits=bits,
        input_scale=module.input_scale.detach() if quantized_input else None,
        input_zero_point=module.input_zero_point.detach() if quantized_input else None,
    )


def _check_finite(name: str, what: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise QuantizationError(f"non-finite {what} in layer {name}")


def quantize_weights_(model: nn.Module, bits_of: Callable[[str], int]) -> None:
    """Quantize every layer's weights to `bits_of(layer name)` bits."""
    for name, module in weight_layers(model):
        _check_finite(name, "weights", module.weight)
        bits = bits_of(name)
        scale = channel_scales(module.weight, bits)
        # A scale that underflowed to 0 would turn zeros into 0/0 = NaN codes.
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise QuantizationError(f"weight scales of layer {name} are not finite and positive")
        set_weight_quantization_(module, weight_codes(module.weight, scale, bits), scale, bits)


# ---------------------------------------------------------------- mixed precision


def _quantized(weight: torch.Tensor, bits: int) -> torch.Tensor:
    scale = channel_scales(weight, bits)
    return dequantize(weight_codes(weight, scale, bits), scale)


def resolve_layer_bits(model: nn.Module, config: QuantizationConfig, scan: Mapping | None) -> QuantizationConfig:
    """The config with each layer's width allotted, for the model as pruned (non-zero weights)."""
    if not config.mixed_precision or not config.quantizes_weights:
        return config
    if not scan:
        raise QuantizationError("mixed precision needs the sensitivity scan, and the study has none")
    counts = {name: int(torch.count_nonzero(m.weight)) for name, m in weight_layers(model)}
    widths = sensitivity.allocate(counts, scan, config.weight_bits)
    return dataclasses.replace(config, layer_bits=tuple((name, int(bits)) for name, bits in widths.items()))


# ---------------------------------------------------------------------- training


class _STEWeight(nn.Module):
    """Per-channel symmetric fake quantization with a straight-through gradient."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = channel_scales(weight, self.bits)
        quantized = dequantize(weight_codes(weight, scale, self.bits), scale)
        return weight + (quantized - weight).detach()


# ---------------------------------------------------------------------- strategy


class Quantization(Strategy):
    name = "quantization"
    phase = "quantize"
    default_space = {
        "quantization.weight_bits": ChoiceParam(WEIGHT_BITS, off=FLOAT_BITS),
        "quantization.activation_bits": ChoiceParam(ACTIVATION_BITS, off=FLOAT_BITS),
        "quantization.mixed_precision": ChoiceParam((False, True), off=False),
        "quantization.scheme": ChoiceParam(SCHEMES, off="uniform"),
    }
    unlisted_space = {
        "quantization.mixed_precision": ChoiceParam((False,), off=False),
        "quantization.scheme": ChoiceParam(("uniform",), off="uniform"),
    }
    anchors = (
        Anchor("int8", {"quantization.weight_bits": 8, "quantization.activation_bits": 8}, rank=1),
        Anchor("4-bit", {"quantization.weight_bits": 4, "quantization.activation_bits": FLOAT_BITS}, rank=2),
    )

    def suggest(self, trial: Any) -> QuantizationConfig:
        bits = self._suggest(trial, "quantization.weight_bits")
        if bits == FLOAT_BITS:  # activations are only searched together with weights
            return QuantizationConfig(weight_bits=FLOAT_BITS, activation_bits=FLOAT_BITS)
        scheme = self.suggest_option(trial, "quantization.scheme")
        activations = FLOAT_BITS if scheme == "codebook" else self._suggest(trial, "quantization.activation_bits")
        mixed = self.suggest_option(trial, "quantization.mixed_precision")
        return QuantizationConfig(bits, activations, mixed_precision=mixed, scheme=scheme)

    def before_finetune(
        self, model: nn.Module, config: QuantizationConfig, context: Context
    ) -> tuple[QuantizationConfig, Context]:
        """Allot the mixed-precision widths to the weights pruning left, and have fine-tuning
        train against the weights it will be deployed with."""
        config = resolve_layer_bits(model, config, context.sensitivity.get(self.name))
        if config.quantizes_weights and config.scheme == "codebook":
            fold_batchnorm_(model.eval())  # folding after clustering would move weights off the codebook
            codebook.cluster_model_(model, config.bits_of)
            context = dataclasses.replace(context, fake_quant=codebook.training_simulation)
        elif config.quantizes_weights:
            context = dataclasses.replace(context, fake_quant=self.training_simulation(config))
        return config, context

    def layer_record(self, model: nn.Module, config: QuantizationConfig) -> dict[str, str]:
        if not config.mixed_precision:
            return {}
        widths, layers = dict(config.layer_bits), [name for name, _ in weight_layers(model)]
        if any(name not in widths for name in layers):
            raise ValueError("quantization.layer_bits lacks layers: pass the config as pipeline.compress resolved it")
        return {"quantization.layer_bits": " ".join(f"{name}:{widths[name]}" for name in layers)}

    def sensitivity(self, model: nn.Module, x: Inputs, batch_size: int) -> dict | None:
        """Each layer's sensitivity at each weight width of the space, BatchNorm folded as
        deployed; None unless mixed precision is searched."""
        if not self.offers("quantization.mixed_precision"):
            return None
        model = copy.deepcopy(model).eval()
        fold_batchnorm_(model)
        widths = [b for b in self.space["quantization.weight_bits"].choices if b != FLOAT_BITS]
        return sensitivity.scan(model, x, batch_size, widths, _quantized)

    def is_active(self, config: QuantizationConfig) -> bool:
        return config.quantizes_weights or config.quantizes_activations

    def apply(self, model: nn.Module, config: QuantizationConfig, context: Context) -> nn.Module:
        model.eval()
        fold_batchnorm_(model)
        if config.quantizes_weights:
            share = config.scheme == "codebook"
            (codebook.share_weights_ if share else quantize_weights_)(model, config.bits_of)
        if config.quantizes_activations:
            calibrate_inputs_(model, context.calibration_x, context.batch_size)
            round_bias_to_accumulator_(model)
        return model

    @staticmethod
    def training_simulation(config: QuantizationConfig) -> Callable[[nn.Module], contextlib.AbstractContextManager]:
        """f(model) → a context in which layer weights are fake-quantized (STE).

        The Parameters the optimizer holds stay the float ones: on exit they are left as
        trained, and the final quantization happens in `apply`.
        """

        @contextlib.contextmanager
        def simulate(model: nn.Module) -> Iterator[nn.Module]:
            if not config.quantizes_weights:
                yield model
                return
            layers = list(weight_layers(model))
            done = []
            try:
                for name, module in layers:
                    parametrize.register_parametrization(module, "weight", _STEWeight(config.bits_of(name)))
                    done.append(module)
                yield model
            finally:
                for module in done:
                    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)

        return simulate
