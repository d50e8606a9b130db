"""The packed weights file: what a trial's `size_bytes` measures.

Layout::

    b"ACW1" | uint32 LE header length | zlib(JSON header) | payload

The header lists every state-dict tensor with its shape, encoding and byte range in the
payload, plus the BatchNorms folded away. Encodings, chosen per tensor by whichever is
smaller:

- ``raw``: the tensor's bytes in its own dtype (biases, BN statistics, float weights).
- ``codes``: quantized weights as b-bit codes, bit-packed (b bits per weight, not a byte),
  offset to unsigned. The per-channel scales are their own ``raw`` tensor.
- ``sparse``: a 1-bit-per-element presence bitmap (np.packbits) followed by only the
  non-zero elements, themselves ``raw`` or ``codes``.

The loader rebuilds the model from the workload's factory: folded BNs become nn.Identity,
layers are resized to the stored shapes (structured pruning made them smaller), and
quantization buffers and input fake-quant are restored. Outputs are bit-identical.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from strategies.quantization import qmax, set_input_quantization_, set_weight_quantization_, weight_codes

MAGIC = b"ACW1"
VERSION = 1


# ------------------------------------------------------------------ bit packing


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Signed codes in [-qmax, qmax] → b bits each, most significant bit first."""
    unsigned = (codes.astype(np.int64) + qmax(bits)).astype(np.uint16)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint16)
    return np.packbits(((unsigned[:, None] >> shifts) & 1).astype(np.uint8)).tobytes()


def unpack_codes(data: bytes, count: int, bits: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    unsigned = flat.astype(np.int64) @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return (unsigned - qmax(bits)).astype(np.int32)


def _dense_and_sparse(values: np.ndarray, encode: Callable[[np.ndarray], bytes]) -> tuple[str, bytes]:
    dense = encode(values)
    nonzero = values != 0
    if nonzero.all():
        return "dense", dense
    sparse = np.packbits(nonzero).tobytes() + encode(values[nonzero])
    return ("sparse", sparse) if len(sparse) < len(dense) else ("dense", dense)


# ------------------------------------------------------------------------ save


def _quantized(model: nn.Module) -> dict[str, int]:
    """Layer name → weight bits, for layers carrying weight quantization buffers."""
    return {name: int(m.weight_bits) for name, m in model.named_modules() if hasattr(m, "weight_bits")}


def _folded(model: nn.Module) -> list[str]:
    # Folded BatchNorms are the Identity modules (re-applying Identity to a factory's own is harmless).
    return [name for name, m in model.named_modules() if isinstance(m, nn.Identity) and name]


def encode_model(model: nn.Module) -> bytes:
    quantized = _quantized(model)
    entries, chunks, offset = [], [], 0
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        layer, _, attr = name.rpartition(".")
        entry: dict = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        if attr == "weight_bits":
            continue  # recorded in the header as "bits"
        if attr == "weight" and layer in quantized:
            bits = quantized[layer]
            module = model.get_submodule(layer)
            codes = weight_codes(tensor, module.weight_scale, bits).numpy().ravel()
            layout, data = _dense_and_sparse(codes, lambda v, b=bits: pack_codes(v, b))
            entry.update(encoding="codes", layout=layout, bits=bits, count=int(codes.size))
        else:
            values = tensor.numpy().ravel()
            layout, data = _dense_and_sparse(values, lambda v: v.tobytes())
            entry.update(encoding="raw", layout=layout, count=int(values.size))
        entry.update(offset=offset, length=len(data))
        entries.append(entry)
        chunks.append(data)
        offset += len(data)
    inputs = [name for name, m in model.named_modules() if hasattr(m, "input_scale")]
    header = {"version": VERSION, "folded": _folded(model), "input_quantized": inputs, "tensors": entries}
    packed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return MAGIC + struct.pack("<I", len(packed)) + packed + b"".join(chunks)


def save_artifact(model: nn.Module, path: str | Path) -> int:
    """Write the packed file atomically; returns its size in bytes."""
    data = encode_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size


# ------------------------------------------------------------------------ load


def _read_header(data: bytes, path: Path) -> tuple[dict, memoryview]:
    if len(data) < 8 or data[:4] != MAGIC:
        raise ValueError(f"{path} is not an autocompress weights file (bad magic)")
    (length,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(zlib.decompress(data[8 : 8 + length]))
    except (zlib.error, ValueError) as error:
        raise ValueError(f"{path} has a corrupt header: {error}") from None
    if header.get("version") != VERSION:
        raise ValueError(f"{path} has format version {header.get('version')}, this reader knows {VERSION}")
    payload = memoryview(data)[8 + length :]
    end = max((e["offset"] + e["length"] for e in header["tensors"]), default=0)
    if len(payload) != end:
        raise ValueError(f"{path} is truncated or has trailing bytes: payload {len(payload)} bytes, expected {end}")
    return header, payload


def _decode(entry: dict, blob: bytes) -> np.ndarray:
    count = entry["count"]
    if entry["encoding"] == "codes":
        decode = lambda data, n: unpack_codes(data, n, entry["bits"])  # noqa: E731
        dtype = np.int32
    else:
        dtype = np.dtype(entry["dtype"])
        decode = lambda data, n: np.frombuffer(data, dtype=dtype, count=n).copy()  # noqa: E731
    if entry["layout"] == "dense":
        return decode(blob, count)
    mask_bytes = (count + 7) // 8
    mask = np.unpackbits(np.frombuffer(blob[:mask_bytes], dtype=np.uint8))[:count].astype(bool)
    values = np.zeros(count, dtype=dtype)
    values[mask] = decode(blob[mask_bytes:], int(mask.sum()))
    return values


def _resize_(module: nn.Module, attr: str, shape: torch.Size) -> None:
    """Give a layer's parameter/buffer the stored shape, and fix the layer's size attributes."""
    current = getattr(module, attr, None)
    if current is None or current.shape != shape:
        replacement = torch.zeros(shape, dtype=current.dtype if current is not None else torch.float32)
        if attr in module._parameters or (current is None and attr == "bias"):
            module._parameters[attr] = nn.Parameter(replacement, requires_grad=True)
        else:
            module._buffers[attr] = replacement
    if attr != "weight" and not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return
    if isinstance(module, nn.Conv2d):
        module.out_channels, module.in_channels = shape[0], shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = shape[0], shape[1]
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and len(shape) == 1:
        module.num_features = shape[0]


def load_artifact(path: str | Path, factory: Callable[[], nn.Module]) -> nn.Module:
    path = Path(path)
    header, payload = _read_header(path.read_bytes(), path)
    model = factory()
    for name in header["folded"]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    tensors = {}
    for entry in header["tensors"]:
        blob = bytes(payload[entry["offset"] : entry["offset"] + entry["length"]])
        tensors[entry["name"]] = (entry, torch.from_numpy(_decode(entry, blob).reshape(entry["shape"])))
    for name, (entry, value) in tensors.items():
        layer, _, attr = name.rpartition(".")
        module = model.get_submodule(layer) if layer else model
        if attr in ("weight_scale", "input_scale", "input_zero_point"):
            continue  # restored with their layer below
        _resize_(module, attr, value.shape)
        if entry["encoding"] == "codes":
            scale = tensors[f"{layer}.weight_scale"][1]
            set_weight_quantization_(module, value, scale, entry["bits"])
        else:
            getattr(module, attr).data = value.to(getattr(module, attr).dtype)
    for layer in header["input_quantized"]:
        module = model.get_submodule(layer)
        set_input_quantization_(module, tensors[f"{layer}.input_scale"][1], tensors[f"{layer}.input_zero_point"][1])
    return model.eval()


__all__ = ["save_artifact", "load_artifact", "encode_model", "pack_codes", "unpack_codes"]
