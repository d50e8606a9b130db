"""Materialising a compressed model in its deployable form: the packed file and the runtime.

Accuracy is computed on the runtime's outputs and latency times the runtime, so both
measure what would be deployed rather than the PyTorch simulation.
"""

from __future__ import annotations

import contextlib
import functools
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
from strategies.inputs import Inputs, NamedInputs, from_runtime_feed, input_names, runtime_feed
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


def export_onnx(model: nn.Module, example_inputs: Inputs, path: Path) -> Path:
    """The model as an ONNX graph with a dynamic batch axis (and sequence axis, for named inputs)."""
    names = input_names(example_inputs)
    if isinstance(example_inputs, NamedInputs):
        # one mapping argument: the trailing {} tells the exporter that no keyword arguments follow
        args = (dict(example_inputs.items()), {})
        axes = {
            name: {0: "batch", 1: "sequence"} if t.dim() > 1 else {0: "batch"} for name, t in example_inputs.items()
        }
    else:
        args, axes = (example_inputs,), {names[0]: {0: "batch"}}
    # The TorchScript-based exporter: ~0.3 s per model here, against ~6 s for the dynamo one.
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=names,
                output_names=["logits"],
                dynamic_axes={**axes, "logits": {0: "batch"}},
            )
    except Exception as error:
        raise ExportError(f"ONNX export failed: {type(error).__name__}: {error}") from error
    return path


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX512-VNNI or AVX-VNNI): 8-bit dot products into int32. Read once."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni"))


def max_signed_weight_bits() -> int:
    """The widest weight codes that ONNX Runtime may run as signed int8 on this CPU.

    Its u8×s8 kernels are its fast ones (measured on LeNet-5 at batch 64, AVX512-VNNI: 2.1×
    the float model, against 1.4× for the u8×u8 kernels that zero-point 128 selects). Without
    VNNI they add pairs of u8×s8 products in 16 bits, which saturates for 8-bit weights
    (measured under an emulated AVX2 CPU: 1.8 % of LeNet-5's predictions changed); 7-bit codes
    cannot saturate, which is ONNX Runtime's own answer (its reduce_range). So: 8 with VNNI,
    7 without, and wider layers keep uint8 codes with zero-point 128.
    """
    return 8 if cpu_has_vnni() else 7


def _dequantized(graph, initializers: dict, nodes: list, name: str, values, scale, zero_point, axis: int = 0) -> None:
    """Replace initializer `name` by `values` behind a per-channel DequantizeLinear (appended to `nodes`)."""
    from onnx import helper, numpy_helper

    graph.initializer.remove(initializers.pop(name))
    graph.initializer.extend(
        [
            numpy_helper.from_array(values, f"{name}_codes"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
            numpy_helper.from_array(zero_point, f"{name}_zero_point"),
        ]
    )
    inputs = [f"{name}_codes", f"{name}_scale", f"{name}_zero_point"]
    nodes.append(helper.make_node("DequantizeLinear", inputs, [name], axis=axis, name=f"{name}_dequantize"))


def _matmul_weights(graph, initializers: dict) -> dict[bytes, str]:
    """The initializers that are a MatMul's second input, by their bytes: a Linear layer applied
    to a sequence (3-D input) exports as MatMul with its weight transposed, under no name of its own."""
    from onnx import numpy_helper

    names = {node.input[1] for node in graph.node if node.op_type == "MatMul" and node.input[1] in initializers}
    return {numpy_helper.to_array(initializers[n]).tobytes(): n for n in names}


def quantize_onnx_weights_(path: Path, model: nn.Module, max_signed_bits: int | None = None) -> int:
    """Give ONNX Runtime the trial's integer weights wherever it will run integer kernels.

    For layers whose input is quantized, the weight goes into the ONNX file as the trial's
    codes behind a DequantizeLinear, and the bias as its int32 steps of input_scale ×
    weight_scale (which the simulation already rounds it to), so ORT fuses QLinearConv/QGemm
    on exactly those integers (left as float, ORT would quantize the weights itself,
    differently). A Linear layer on a sequence exports as MatMul with the weight transposed
    and the bias in a float Add after it: there the codes go in transposed (per-column scales).
    Codes up to `max_signed_bits` wide (default: `max_signed_weight_bits()`) are stored as int8,
    wider ones as uint8 with zero-point 128: the same values either way. Weight-only quantized
    layers keep float weights (exactly codes × scale), dequantized once at load time rather
    than on every call. Returns the layers rewritten.
    """
    import onnx

    signed_bits = max_signed_weight_bits() if max_signed_bits is None else max_signed_bits
    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    initializers = {init.name: init for init in graph.initializer}
    matmul = None
    nodes, layers = [], 0
    for name, module in weight_layers(model):
        state = quant_state(module)
        if state is None or state.input_scale is None:
            continue
        codes, scale = state.codes.cpu().numpy(), state.scale.cpu().numpy()
        weight, axis = f"{name}.weight", 0
        if weight not in initializers:
            matmul = _matmul_weights(graph, initializers) if matmul is None else matmul
            weight = matmul.get(module.weight.detach().cpu().numpy().T.tobytes())
            if weight is None or weight not in initializers:
                raise ExportError(f"the ONNX export has no initializer for {name}.weight to quantize")
            codes, axis = codes.T, 1
        layers += 1
        signed = state.bits <= signed_bits
        values, zero_point = (codes.astype(np.int8), 0) if signed else ((codes + 128).astype(np.uint8), 128)
        zero_points = np.full(len(scale), zero_point, values.dtype)
        _dequantized(graph, initializers, nodes, weight, np.ascontiguousarray(values), scale, zero_points, axis)
        if axis == 0 and module.bias is not None and f"{name}.bias" in initializers:
            step = (state.input_scale * state.scale).cpu().numpy().astype(np.float32)
            steps = np.round(module.bias.detach().cpu().numpy() / step).astype(np.int32)
            _dequantized(graph, initializers, nodes, f"{name}.bias", steps, step, np.zeros(len(step), np.int32))
    if nodes:
        for node in reversed(nodes):
            graph.node.insert(0, node)
        _flatten_as_reshape(graph)
        _pool_before_relu(graph)
        onnx.save(graph_model, str(path))
    return layers


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


def _pool_before_relu(graph) -> None:
    """Write Relu → MaxPool as MaxPool → Relu where a float layer feeds an integer one.

    There ORT moves the integer layer's QuantizeLinear back through the MaxPool to the Relu
    and runs the pool on uint8 with a generic NCHW kernel: measured on LeNet-5 at batch 64
    (first conv float, the rest int8), 2.8 ms of a 6.2 ms call went to that one pool. With the
    Relu after the pool, ORT stops there: the pool runs in float (0.3 ms) and the Relu folds
    into the QuantizeLinear; the whole call took 3.1 ms. Max commutes with Relu (a
    non-decreasing function), so both orders compute the same values. An integer layer's
    Relu is left alone: ORT fuses it into that layer's integer kernel.
    """
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def feeds_quantize(name: str) -> bool:
        users = consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == "Reshape":  # Flatten is a Reshape by now
            return feeds_quantize(users[0].output[0])
        return bool(users) and all(n.op_type == "QuantizeLinear" for n in users)

    def integer_input(node) -> bool:
        source = producer.get(node.input[0]) if node.input else None
        return source is not None and source.op_type == "DequantizeLinear"

    for pool in list(graph.node):
        relu = producer.get(pool.input[0]) if pool.op_type == "MaxPool" and len(pool.output) == 1 else None
        if relu is None or relu.op_type != "Relu" or len(consumers[relu.output[0]]) != 1:
            continue
        source = producer.get(relu.input[0])
        if not feeds_quantize(pool.output[0]) or (source is not None and integer_input(source)):
            continue
        # The edges stay; the two nodes trade what they compute, so the graph stays in order.
        relu.attribute.extend(pool.attribute)
        del pool.attribute[:]
        relu.op_type, pool.op_type = "MaxPool", "Relu"
        relu.name, pool.name = pool.name, relu.name


_FEED_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def example_feed(session, length: int | None) -> dict[str, np.ndarray]:
    """A batch of one for an ONNX Runtime session's inputs: zeros for float inputs, ones for
    integer ones (token ids, masks), `length` on every dynamic per-sample axis."""
    feed = {}
    for spec in session.get_inputs():
        if spec.type not in _FEED_TYPES:
            raise ValueError(f"ONNX input {spec.name!r} has type {spec.type}, not one of {list(_FEED_TYPES)}")
        shape = [d if isinstance(d, int) else length for d in spec.shape[1:]]
        if None in shape:
            raise ValueError(f"ONNX input {spec.name!r} has a dynamic per-sample shape {spec.shape[1:]} and no length")
        dtype = _FEED_TYPES[spec.type]
        feed[spec.name] = (np.zeros if dtype == np.float32 else np.ones)((1, *shape), dtype)
    return feed


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


def _torch_eager(model: nn.Module, out_dir: Path, threads: int, example_inputs: Inputs) -> Deployable:
    def run(batch: np.ndarray | dict[str, np.ndarray]) -> torch.Tensor:
        with torch.no_grad(), torch_threads(threads):
            return model(from_runtime_feed(batch))

    def predict(x: Inputs) -> torch.Tensor:
        with torch.no_grad(), torch_threads(threads):
            return model(x)

    return Deployable(out_dir / ARTIFACT_NAME, None, run, predict, model)


def _onnxruntime(model: nn.Module, out_dir: Path, threads: int, example_inputs: Inputs) -> Deployable:
    onnx_path = export_onnx(model, example_inputs, out_dir / ONNX_NAME)
    quantize_onnx_weights_(onnx_path, model)
    session = ort_session(onnx_path, threads)

    def run(batch: np.ndarray | dict[str, np.ndarray]) -> object:
        return session.run(None, runtime_feed(batch))

    def predict(x: Inputs) -> torch.Tensor:
        return torch.from_numpy(session.run(None, runtime_feed(x))[0])

    return Deployable(out_dir / ARTIFACT_NAME, onnx_path, run, predict, model)


# The runtimes a model can be deployed on (YAML `latency.runtime`): each builds the runner
# for a model whose artifact is already written to `out_dir`.
RUNTIMES: dict[str, Callable[[nn.Module, Path, int, Inputs], Deployable]] = {
    "onnxruntime": _onnxruntime,
    "torch": _torch_eager,
}


def materialize(
    model: nn.Module,
    out_dir: Path,
    *,
    runtime: str = "onnxruntime",
    threads: int = 1,
    example_inputs: Inputs,
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


# Two embeddings of one sample agree when their cosine similarity is at least this.
AGREE_COSINE = 0.99


def check_agreement(
    predict_a: Callable[[Inputs], torch.Tensor],
    predict_b: Callable[[Inputs], torch.Tensor],
    x: Inputs,
    batch_size: int = 1000,
    outputs: str = "logits",
) -> float:
    """Fraction of rows on which two predict functions disagree: their argmax differs (logits),
    or their cosine similarity is below AGREE_COSINE (embeddings)."""
    differ = 0
    for i in range(0, len(x), batch_size):
        batch = x[i : i + batch_size]
        a, b = predict_a(batch), predict_b(batch)
        if outputs == "embeddings":
            differ += int(
                (torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1) < AGREE_COSINE).sum()
            )
        else:
            differ += int((a.argmax(1) != b.argmax(1)).sum())
    return differ / max(1, len(x))
