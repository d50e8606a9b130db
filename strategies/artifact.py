"""The packed weights file: what a trial's `size_bytes` measures.

Layout (little-endian)::

    b"ACWF" | uint16 version | uint32 header length | zlib(JSON header) | payload

The JSON header holds:

- ``tensors``: every state-dict tensor in order, as ``{name, shape, dtype, encoding, layout,
  offset, length}`` (+ ``bits`` for codes); offset/length index the payload.
- ``identity``: modules that are nn.Identity in the saved model (the folded BatchNorms).
- ``conv_groups``: each convolution's groups, which structured pruning may change.

Encodings:

- ``raw``: the tensor's bytes in its own dtype (biases, BN parameters and statistics,
  unquantized weights, scales and activation qparams).
- ``codes``: a quantized weight as b-bit codes, offset to unsigned (code + 2^(b-1)-1) and
  bit-packed, most significant bit first: b bits per weight, not a byte. Its per-channel
  scales are the ``raw`` tensor ``<layer>.weight_scale``; the weight is codes × scale.

Layouts, chosen per tensor by whichever is smaller:

- ``dense``: every element.
- ``sparse``: a 1-bit-per-element presence bitmap (np.packbits, MSB first) followed by only
  the non-zero elements in the tensor's encoding. -0.0 counts as zero and reloads as +0.0,
  which computes the same: pruning by multiplying with a mask leaves -0.0 behind for every
  negative weight, and storing those would make half the pruned weights cost full price.

The loader rebuilds the model from the workload's factory: folded BNs become nn.Identity,
layers are resized to the stored shapes (structured pruning made them smaller), and the
quantization buffers and input fake-quant are restored. Outputs are bit-identical.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from strategies.fold import set_submodule_
from strategies.quantization import (
    QUANT_BUFFERS,
    WIDTH_BUFFER,
    qmax,
    quant_state,
    set_input_quantization_,
    set_weight_quantization_,
)

logger = logging.getLogger(__name__)

MAGIC = b"ACWF"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length


# ------------------------------------------------------------------ bit packing


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Signed codes in [-qmax, qmax] → b bits each, most significant bit first."""
    unsigned = (codes.astype(np.int64).ravel() + qmax(bits)).astype(np.uint16)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint16)
    return np.packbits(((unsigned[:, None] >> shifts) & 1).astype(np.uint8)).tobytes()


def unpack_codes(data: bytes, count: int, bits: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    unsigned = flat.astype(np.int64) @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return (unsigned - qmax(bits)).astype(np.int32)


def _present(values: np.ndarray) -> np.ndarray:
    return values != 0


def _pack(values: np.ndarray, encode: Callable[[np.ndarray], bytes]) -> tuple[str, bytes]:
    dense = encode(values)
    present = _present(values)
    if present.all():
        return "dense", dense
    sparse = np.packbits(present).tobytes() + encode(values[present])
    return ("sparse", sparse) if len(sparse) < len(dense) else ("dense", dense)


# ------------------------------------------------------------------------ save


def encode_model(model: nn.Module) -> bytes:
    """The artifact's bytes for `model` (see the module docstring for the layout)."""
    modules = dict(model.named_modules())
    entries, chunks, offset = [], [], 0
    for name, tensor in model.state_dict().items():
        layer, _, attr = name.rpartition(".")
        if attr == WIDTH_BUFFER:
            continue  # stored as the weight entry's "bits"
        tensor = tensor.detach().cpu().contiguous()
        entry: dict = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        state = quant_state(modules[layer]) if attr == "weight" else None
        if state is not None:
            codes = state.codes.cpu().numpy().ravel()
            layout, data = _pack(codes, lambda v, b=state.bits: pack_codes(v, b))
            entry.update(encoding="codes", bits=state.bits)
        else:
            layout, data = _pack(tensor.numpy().ravel(), lambda v: v.tobytes())
            entry.update(encoding="raw")
        entry.update(layout=layout, offset=offset, length=len(data))
        entries.append(entry)
        chunks.append(data)
        offset += len(data)
    header = {
        "tensors": entries,
        "identity": [name for name, m in modules.items() if name and isinstance(m, nn.Identity)],
        "conv_groups": {name: m.groups for name, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)},
    }
    packed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return _PREFIX.pack(MAGIC, VERSION, len(packed)) + packed + b"".join(chunks)


def save_artifact(model: nn.Module, path: str | Path) -> int:
    """Write the packed file atomically (temp file + rename); returns its size in bytes."""
    data = encode_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    size = path.stat().st_size
    logger.debug("wrote %s: %d bytes", path, size)
    return size


# ------------------------------------------------------------------------ load


def _parse(data: bytes, path: Path) -> tuple[dict, memoryview]:
    if len(data) < _PREFIX.size or data[:4] != MAGIC:
        raise ValueError(f"{path} is not an autocompress weights file (bad magic)")
    _, version, length = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise ValueError(f"{path} has format version {version}; this reader knows version {VERSION}")
    start = _PREFIX.size + length
    try:
        header = json.loads(zlib.decompress(data[_PREFIX.size : start]))
    except (zlib.error, ValueError) as error:
        raise ValueError(f"{path} is truncated or has a corrupt header: {error}") from None
    payload = memoryview(data)[start:]
    try:
        expected = sum(int(entry["length"]) for entry in header["tensors"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} has a malformed header: {type(error).__name__}: {error}") from None
    if len(payload) != expected:
        raise ValueError(f"{path} is truncated or has trailing bytes: {len(payload)} payload bytes, not {expected}")
    return header, payload


def read_header(path: str | Path) -> dict:
    """The JSON header of an artifact (the tensor table, identity modules, conv groups)."""
    path = Path(path)
    return _parse(path.read_bytes(), path)[0]


def _stored_bytes(entry: dict, n: int) -> int:
    if entry["encoding"] == "codes":
        return (n * entry["bits"] + 7) // 8
    return n * np.dtype(entry["dtype"]).itemsize


def _values(entry: dict, data: bytes, n: int) -> np.ndarray:
    if entry["encoding"] == "codes":
        return unpack_codes(data, n, entry["bits"])
    return np.frombuffer(data, dtype=np.dtype(entry["dtype"]), count=n).copy()


def _decode(entry: dict, blob: bytes) -> np.ndarray:
    count = math.prod(entry["shape"])
    if entry["layout"] == "dense":
        mask_bytes, present = 0, np.ones(count, dtype=bool)
    else:
        mask_bytes = (count + 7) // 8
        present = np.unpackbits(np.frombuffer(blob[:mask_bytes], dtype=np.uint8), count=count).astype(bool)
    n = int(present.sum())
    expected = mask_bytes + _stored_bytes(entry, n)
    if len(blob) != expected:
        raise ValueError(f"tensor {entry['name']} has {len(blob)} bytes, expected {expected}")
    values = np.zeros(count, dtype=np.int32 if entry["encoding"] == "codes" else np.dtype(entry["dtype"]))
    values[present] = _values(entry, blob[mask_bytes:], n)
    return values.reshape(entry["shape"])


def _set_tensor_(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Install `value` as the module's parameter or buffer `attr`, whatever its old shape."""
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=True if old is None else old.requires_grad)
    elif attr in module._buffers or attr in QUANT_BUFFERS:
        module.register_buffer(attr, value)
    else:
        raise AttributeError(f"{type(module).__name__} has no parameter or buffer {attr!r}")


def _fix_sizes_(module: nn.Module, groups: int | None) -> None:
    """Make a resized layer's size attributes agree with its tensors (they drive repr and export)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        module.groups = groups if groups is not None else module.groups
        first, second = module.weight.shape[0], module.weight.shape[1] * module.groups
        # a transposed conv's weight is (in, out / groups, ...), a plain one's (out, in / groups, ...)
        module.in_channels, module.out_channels = (first, second) if module.transposed else (second, first)
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
        module.num_features = module.running_mean.shape[0]


def load_artifact(path: str | Path, factory: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild the saved model on `factory()`'s architecture, in eval mode.

    Raises ValueError for a truncated or foreign file, or one the factory's model cannot hold.
    """
    path = Path(path)
    header, payload = _parse(path.read_bytes(), path)
    model = factory()
    try:
        for name in header["identity"]:
            set_submodule_(model, name, nn.Identity())
        modules = dict(model.named_modules())
        values = {}
        for entry in header["tensors"]:
            blob = bytes(payload[entry["offset"] : entry["offset"] + entry["length"]])
            try:
                values[entry["name"]] = torch.from_numpy(_decode(entry, blob))
            except ValueError as error:
                raise ValueError(f"{path} is corrupt: {error}") from None
        for entry in header["tensors"]:
            layer, _, attr = entry["name"].rpartition(".")
            module, value = modules[layer], values[entry["name"]]
            if entry["encoding"] == "codes":
                _set_tensor_(module, attr, torch.zeros(value.shape))
                set_weight_quantization_(module, value, values[f"{layer}.weight_scale"], entry["bits"])
            elif attr == "input_scale":  # registers both qparams and the fake-quant hook
                set_input_quantization_(module, value, values[f"{layer}.input_zero_point"])
            elif attr != "input_zero_point":
                _set_tensor_(module, attr, value)
    except (AttributeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} does not fit the factory's model: {type(error).__name__}: {error}") from None
    for name, module in model.named_modules():
        _fix_sizes_(module, header["conv_groups"].get(name))
    stored = {entry["name"] for entry in header["tensors"]}
    expected = {key for key in model.state_dict() if not key.endswith(f".{WIDTH_BUFFER}")}
    if stored != expected:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise ValueError(f"{path} does not fit the factory's model: missing {missing[:5]}, unexpected {extra[:5]}")
    return model.eval()


__all__ = ["MAGIC", "VERSION", "encode_model", "load_artifact", "read_header", "save_artifact"]
