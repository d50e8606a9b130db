"""Materialising a compressed model in its deployable form: the packed file and the runtime.

Accuracy is computed on the runtime's outputs and latency times the runtime, so both
measure what would be deployed rather than the PyTorch simulation.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from strategies.artifact import save_artifact
from strategies.base import CompressionError, weight_layers
from strategies.quantization import quant_state

logger = logging.getLogger(__name__)

ARTIFACT_NAME = "weights.acw"
ONNX_NAME = "model.onnx"


class ExportError(CompressionError):
    pass


@dataclass
class Deployable:
    """Has the attributes of objectives.base.Candidate, so objectives can measure it."""

    artifact_path: Path
    onnx_path: Path | None
    run: Callable[[np.ndarray], object]
    predict: Callable[[torch.Tensor], torch.Tensor]
    model: nn.Module


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Pin torch's intra-op threads (timing) and restore the old count (training uses all cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: Path) -> Path:
    # The TorchScript-based exporter: ~0.3 s per model here, against ~6 s for the dynamo one.
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example_inputs,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as error:
        raise ExportError(f"ONNX export failed: {type(error).__name__}: {error}") from error
    return path


def quantize_onnx_weights_(path: Path, model: nn.Module) -> int:
    """Give ONNX Runtime the trial's integer weights wherever it will run integer kernels.

    For layers whose input is quantized, the weight goes into the ONNX file as the trial's
    codes behind a DequantizeLinear, so ORT fuses QLinearConv/QGemm on exactly those integers
    and scales (left as float, ORT would quantize the weights itself, differently). The codes
    are stored as uint8 with zero-point 128, which is the same values: ORT's u8×s8 kernels on
    CPUs without VNNI saturate 16-bit pair sums (measured here: 2.5 % of predictions changed
    at 8 bits), its u8×u8 ones do not and ran faster. Weight-only quantized layers keep float
    weights (exactly codes × scale): a deployment dequantizes them once at load time, so
    the runtime should not pay a DequantizeLinear on every call. Returns the layers rewritten.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = []
    for name, module in weight_layers(model):
        state = quant_state(module)
        if state is None or state.input_scale is None:
            continue
        if f"{name}.weight" not in initializers:
            raise ExportError(f"the ONNX export has no initializer for {name}.weight to quantize")
        graph.initializer.remove(initializers[f"{name}.weight"])
        graph.initializer.extend(
            [
                numpy_helper.from_array((state.codes + 128).to(torch.uint8).cpu().numpy(), f"{name}.weight_codes"),
                numpy_helper.from_array(state.scale.cpu().numpy(), f"{name}.weight_scale"),
                numpy_helper.from_array(np.full(len(state.scale), 128, dtype=np.uint8), f"{name}.weight_zero_point"),
            ]
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{name}.weight_codes", f"{name}.weight_scale", f"{name}.weight_zero_point"],
                [f"{name}.weight"],
                axis=0,
                name=f"{name}.weight_dequantize",
            )
        )
    if nodes:
        for node in reversed(nodes):
            graph.node.insert(0, node)
        _flatten_as_reshape(graph)
        onnx.save(graph_model, str(path))
    return len(nodes)


def _flatten_as_reshape(graph) -> None:
    """Write Flatten(axis=1) as the equivalent Reshape(0, -1).

    ORT moves a QuantizeLinear back through Reshape and MaxPool but not through Flatten, so
    with a Flatten between them the last conv of a CNN never reaches its QuantizeLinear and
    runs in float (measured here on LeNet-5 int8 at batch 64: 1.04x the float model with
    Flatten, 1.40x with Reshape). The two ops compute the same thing.
    """
    from onnx import helper, numpy_helper

    for index, node in enumerate(list(graph.node)):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if node.op_type != "Flatten" or axis != 1:
            continue
        shape = f"{node.name or node.output[0]}.shape"
        graph.initializer.append(numpy_helper.from_array(np.array([0, -1], dtype=np.int64), shape))
        graph.node.remove(node)
        graph.node.insert(index, helper.make_node("Reshape", [node.input[0], shape], list(node.output), name=shape))


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"ONNX Runtime cannot load the exported model: {error}") from error


def check_finite(model: nn.Module) -> None:
    """Nothing NaN or infinite gets packed or exported: the integer codes would hide it."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CompressionError(f"non-finite values in {name} ({bad} of {tensor.numel()})")


def _torch_eager(model: nn.Module, out_dir: Path, threads: int, example_inputs: torch.Tensor) -> Deployable:
    def run(batch: np.ndarray) -> torch.Tensor:
        with torch.no_grad(), torch_threads(threads):
            return model(torch.from_numpy(batch))

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch_threads(threads):
            return model(x)

    return Deployable(out_dir / ARTIFACT_NAME, None, run, predict, model)


def _onnxruntime(model: nn.Module, out_dir: Path, threads: int, example_inputs: torch.Tensor) -> Deployable:
    onnx_path = export_onnx(model, example_inputs, out_dir / ONNX_NAME)
    quantize_onnx_weights_(onnx_path, model)
    session = ort_session(onnx_path, threads)

    def run(batch: np.ndarray) -> object:
        return session.run(None, {"input": batch})

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.detach().numpy().astype(np.float32, copy=False)})[0])

    return Deployable(out_dir / ARTIFACT_NAME, onnx_path, run, predict, model)


# The runtimes a model can be deployed on (YAML `latency.runtime`): each builds the runner
# for a model whose artifact is already written to `out_dir`.
RUNTIMES: dict[str, Callable[[nn.Module, Path, int, torch.Tensor], Deployable]] = {
    "onnxruntime": _onnxruntime,
    "torch": _torch_eager,
}


def materialize(
    model: nn.Module,
    out_dir: Path,
    *,
    runtime: str = "onnxruntime",
    threads: int = 1,
    example_inputs: torch.Tensor,
) -> Deployable:
    """Write `model`'s artifact to `out_dir` and load it on `runtime` with `threads` threads.

    Raises ValueError for an unknown runtime, CompressionError when the model holds
    non-finite values or cannot be exported or loaded.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"latency.runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    model.eval()
    check_finite(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_artifact(model, out_dir / ARTIFACT_NAME)
    return RUNTIMES[runtime](model, out_dir, threads, example_inputs)


def check_agreement(
    predict_a: Callable[[torch.Tensor], torch.Tensor],
    predict_b: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_size: int = 1000,
) -> float:
    """Fraction of rows whose argmax differs between two predict functions."""
    differ = 0
    for i in range(0, len(x), batch_size):
        batch = x[i : i + batch_size]
        differ += int((predict_a(batch).argmax(1) != predict_b(batch).argmax(1)).sum())
    return differ / max(1, len(x))
