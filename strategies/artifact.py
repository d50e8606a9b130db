"""The packed weights file: what a trial's `size_bytes` measures.

Layout (little-endian)::

    b"ACWF" | uint16 version | uint32 header length | zlib(JSON header) | payload

Each tensor takes whichever layout (where its stored elements are) and encoding (what they are)
is smallest for it, entropy-coded where that pays:

    dense      every element, no index
    bitmap     a presence bit per element (np.packbits)
    bernoulli  the presence bits entropy-coded as independent, P(present) = nnz / size
    gaps       the zeros before each element (Deep Compression's relative indices), entropy-coded
               with `index_table`; the symbol `escape` skips that many zeros and stores nothing
    packed     a quantized weight's b-bit codes + 2^(b-1)-1, bit-packed MSB first; the weight
               is codes × the per-channel scales of the tensor `<layer>.weight_scale`
    ans        those unsigned codes entropy-coded with `table`
    raw        the tensor's bytes in its own dtype
    palette    at most 256 distinct floats (a codebook layer's weights), sorted, raw, then each
               element's index into them entropy-coded with `table` (or, with `index_bits`,
               bit-packed at that width, as the writer does when told not to entropy-code)
    planes     float bytes as byte planes (a weight's sign-and-exponent byte holds a few bits),
               each plain or entropy-coded: `planes` lists [length] or [length, table] of each
    zlib       the packed or raw bytes, raw deflate: the general-purpose baseline

The JSON header holds ``tensors`` (each state-dict tensor in order: ``name, shape, dtype, layout,
encoding``, its [index, values] byte ``lengths``, ``bits`` if quantized, ``nnz`` unless dense, the
coders' parameters), ``identity`` (folded BatchNorms), ``conv_groups``, ``module_lists`` (the
length of each stack of layers, shorter where layers were removed) and the payload's ``crc32``.
-0.0 is stored as +0.0, which computes the same (a mask product leaves -0.0 for negative weights).
Entropy coding is constriction's ANS coder (32-bit little-endian words) with a categorical model
built from a table ``[lo, count(lo), count(lo + 1), ...]`` of integer counts, so writer and reader
build the same one; comparing candidates, a table counts at its compressed JSON size. Version 1
files (``raw``/``codes`` in ``dense``/``sparse``) still load; outputs reload bit-identical.
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

from strategies.activations import set_input_quantization_
from strategies.codebook import CODEBOOK
from strategies.coding import decode_tensor, encode_tensor
from strategies.fold import set_submodule_
from strategies.quantization import (
    QUANT_BUFFERS,
    WIDTH_BUFFER,
    quant_state,
    set_weight_quantization_,
)

logger = logging.getLogger(__name__)

MAGIC = b"ACWF"
VERSION = 2
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_SCALES = {"weight_scale", "input_scale", "input_zero_point", CODEBOOK}  # size_breakdown's "scales"


def encode_model(model: nn.Module, entropy_coded: bool = True) -> bytes:
    """The artifact's bytes for `model` (see the module docstring for the layout); without
    `entropy_coded`, with bit-level layouts and encodings only."""
    modules = dict(model.named_modules())
    entries, chunks = [], []
    for name, tensor in model.state_dict().items():
        layer, _, attr = name.rpartition(".")
        if attr == WIDTH_BUFFER:
            continue  # stored as the weight entry's "bits"
        tensor = tensor.detach().cpu().contiguous()
        entry: dict = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        state = quant_state(modules[layer]) if attr == "weight" else None
        bits = {} if state is None else {"bits": state.bits}
        flat = (tensor if state is None else state.codes.cpu()).numpy().ravel()
        fields, index, values = encode_tensor(flat, **bits, entropy_coded=entropy_coded)
        entries.append({**entry, **bits, **fields, "lengths": [len(index), len(values)]})
        chunks += [index, values]
    payload = b"".join(chunks)
    header = {
        "tensors": entries,
        "identity": [name for name, m in modules.items() if name and isinstance(m, nn.Identity)],
        "conv_groups": {name: m.groups for name, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)},
        "module_lists": {name: len(m) for name, m in modules.items() if isinstance(m, nn.ModuleList)},
        "crc32": zlib.crc32(payload),
    }
    packed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return _PREFIX.pack(MAGIC, VERSION, len(packed)) + packed + payload


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


def _as_v2(entry: dict) -> dict:
    """A version-1 entry in version 2's terms: its bitmap is the index part of its bytes."""
    split = (math.prod(entry["shape"]) + 7) // 8 if entry["layout"] == "sparse" else 0
    names = {key: {"sparse": "bitmap", "codes": "packed"}.get(entry[key], entry[key]) for key in ("layout", "encoding")}
    return {**entry, **names, "lengths": [split, int(entry["length"]) - split]}


def _parse(data: bytes, path: Path) -> tuple[dict, list[tuple[dict, bytes, bytes]]]:
    """The header as stored, and each tensor's entry in version 2's terms with its two parts."""
    if len(data) < _PREFIX.size or data[:4] != MAGIC:
        raise ValueError(f"{path} is not an autocompress weights file (bad magic)")
    _, version, length = _PREFIX.unpack_from(data)
    if version not in (1, VERSION):
        raise ValueError(f"{path} has format version {version}; this reader knows versions 1 and {VERSION}")
    payload = data[_PREFIX.size + length :]
    try:
        header = json.loads(zlib.decompress(data[_PREFIX.size : _PREFIX.size + length]))
        entries = [entry if version == VERSION else _as_v2(entry) for entry in header["tensors"]]
        lengths = [int(n) for entry in entries for n in entry["lengths"]]
        if len(lengths) != 2 * len(entries) or min(lengths, default=0) < 0:
            raise ValueError("a tensor's lengths are not two non-negative numbers")
        bounds = np.cumsum([0, *lengths]).tolist()
        checksum = header["crc32"] if version == VERSION else zlib.crc32(payload)
    except (zlib.error, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is truncated or has a corrupt header: {type(error).__name__}: {error}") from None
    if len(payload) != bounds[-1]:
        raise ValueError(f"{path} is truncated or has trailing bytes: {len(payload)} payload bytes, not {bounds[-1]}")
    if checksum != zlib.crc32(payload):
        raise ValueError(f"{path} is corrupt: its payload does not match its crc32")
    parts = [payload[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return header, [(entry, parts[2 * i], parts[2 * i + 1]) for i, entry in enumerate(entries)]


def read_header(path: str | Path) -> dict:
    """The JSON header of an artifact as stored (the tensor table, identity modules, conv groups)."""
    path = Path(path)
    return _parse(path.read_bytes(), path)[0]


def size_breakdown(path: str | Path) -> dict[str, int]:
    """Bytes per part of an artifact, from its header, summing to its length: ``codes`` (quantized or
    codebook weights' symbols), ``indices`` (where the non-zeros are), ``scales`` (weight scales,
    codebooks, activation qparams), ``raw`` (biases, float weights, BN statistics) and ``header``."""
    path = Path(path)
    data = path.read_bytes()
    _, tensors = _parse(data, path)
    clustered = {e["name"].rpartition(".")[0] for e, _, _ in tensors if e["name"].endswith(f".{CODEBOOK}")}
    sizes = dict.fromkeys(("codes", "indices", "scales", "raw"), 0)
    for entry, index, values in tensors:
        layer, _, attr = entry["name"].rpartition(".")
        coded = "bits" in entry or (attr == "weight" and layer in clustered)
        kind = "scales" if attr in _SCALES else "codes" if coded else "raw"
        sizes["scales" if kind == "scales" else "indices"] += len(index)
        sizes[kind] += len(values)
    return {**sizes, "header": len(data) - sum(sizes.values())}


def _set_tensor_(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Install `value` as the module's parameter or buffer `attr`, whatever its old shape."""
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=True if old is None else old.requires_grad)
    elif attr in module._buffers or attr in QUANT_BUFFERS or attr == CODEBOOK:
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
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
        module.num_features = module.running_mean.shape[0]


def load_artifact(path: str | Path, factory: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild the saved model on `factory()`'s architecture, in eval mode; ValueError for a truncated,
    corrupt or foreign file, or one the factory's model cannot hold."""
    path = Path(path)
    header, tensors = _parse(path.read_bytes(), path)
    try:
        values = {entry["name"]: torch.from_numpy(decode_tensor(entry, index, data)) for entry, index, data in tensors}
    except (ValueError, KeyError, TypeError, IndexError, zlib.error) as error:
        raise ValueError(f"{path} is corrupt: {type(error).__name__}: {error}") from None
    model = factory()
    try:
        for name, length in header.get("module_lists", {}).items():  # layers removed from a stack
            stack = model.get_submodule(name)
            if not isinstance(stack, nn.ModuleList) or len(stack) < length:
                raise TypeError(f"{name} is not a stack of at least {length} modules")
            del stack[length:]
        for name in header["identity"]:
            set_submodule_(model, name, nn.Identity())
        modules = dict(model.named_modules())
        for entry, _, _ in tensors:
            layer, _, attr = entry["name"].rpartition(".")
            module, value = modules[layer], values[entry["name"]]
            if "bits" in entry:
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
    stored = {entry["name"] for entry, _, _ in tensors}
    expected = {key for key in model.state_dict() if not key.endswith(f".{WIDTH_BUFFER}")}
    if stored != expected:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise ValueError(f"{path} does not fit the factory's model: missing {missing[:5]}, unexpected {extra[:5]}")
    return model.eval()


__all__ = ["MAGIC", "VERSION", "encode_model", "load_artifact", "read_header", "save_artifact", "size_breakdown"]
