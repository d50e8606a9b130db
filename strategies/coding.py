"""One tensor's bytes in the packed weights file: the cheapest layout and encoding, and back.

The layouts and encodings are listed in `strategies.artifact`'s docstring. With
``entropy_coded=False`` only the bit-level ones compete (dense or bitmap, packed or raw): the
file a trial would get without entropy coding, which the benchmark compares against.
"""

from __future__ import annotations

import json
import math
import zlib

import constriction
import numpy as np

from strategies.quantization import qmax

_ESCAPES = (16, 64, 256)  # the longest zero runs the gaps layout tries coding as one symbol
_MAX_PALETTE = 256  # beyond this many distinct values a palette's table outweighs its gain
Candidate = tuple[int, dict, bytes]  # its cost in bytes, its header fields, its bytes
_cost = lambda candidate: candidate[0]


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Signed codes in [-qmax, qmax] → b bits each, most significant bit first."""
    unsigned = (codes.astype(np.int64).ravel() + qmax(bits)).astype(np.uint16)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint16)
    return np.packbits(((unsigned[:, None] >> shifts) & 1).astype(np.uint8)).tobytes()


def unpack_codes(data: bytes, count: int, bits: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    unsigned = flat.astype(np.int64) @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return (unsigned - qmax(bits)).astype(np.int32)


def _model(table: list[int] | float):
    """The categorical model of a table, or the Bernoulli one of P(1)."""
    if isinstance(table, float):
        return constriction.stream.model.Bernoulli(table, perfect=False)
    return constriction.stream.model.Categorical(np.asarray(table[1:], dtype=np.float64), perfect=False)


def _ans(symbols: np.ndarray, model) -> bytes:
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), model)
    return coder.get_compressed().astype("<u4").tobytes()


def _unans(data: bytes, model, n: int) -> np.ndarray:
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
    symbols = coder.decode(model, n)
    if not coder.is_empty():  # a damaged stream almost never ends in the coder's initial state
        raise ValueError("an entropy-coded stream does not end where its symbols do")
    return symbols


def _coded(symbols: np.ndarray, key: str = "table") -> Candidate:
    """Non-negative symbols entropy-coded with a table of their own counts, as ``{key: table}``."""
    if not symbols.size:
        return 0, {key: [0, 1]}, b""
    lo = int(symbols.min())
    table = [lo, *map(int, np.bincount(symbols - lo))]
    data = _ans(symbols - lo, _model(table)) if len(table) > 2 else b""  # a single symbol says nothing
    return len(data) + len(zlib.compress(json.dumps(table).encode(), 9)), {key: table}, data


def _uncoded(table: list[int], data: bytes, n: int) -> np.ndarray:
    if len(table) == 2 and not data:
        return np.full(n, int(table[0]), dtype=np.int64)
    return _unans(data, _model(table), n).astype(np.int64) + int(table[0])


def _index(present: np.ndarray, entropy_coded: bool = True) -> Candidate:
    """The cheapest way to say which elements are non-zero (some are not); a bitmap only, without
    `entropy_coded`."""
    size, nnz = present.size, int(present.sum())
    bitmap = np.packbits(present).tobytes()
    options = [(len(bitmap), {"layout": "bitmap"}, bitmap)]
    if entropy_coded:
        bernoulli = _ans(present, _model(nnz / size))
        options.append((len(bernoulli), {"layout": "bernoulli"}, bernoulli))
    gaps = np.diff(np.flatnonzero(present), prepend=-1) - 1  # the zeros before each element
    for escape in _ESCAPES if nnz and entropy_coded else ():
        skips = gaps // escape
        symbols = np.full(int(skips.sum()) + nnz, escape, dtype=np.int64)
        symbols[np.cumsum(skips + 1) - 1] = gaps % escape
        cost, coder, data = _coded(symbols, "index_table")
        options.append((cost, {"layout": "gaps", "escape": escape, "symbols": len(symbols), **coder}, data))
    cost, fields, data = min(options, key=_cost)
    return cost, {**fields, "nnz": nnz}, data


def _float_options(values: np.ndarray) -> list[Candidate]:
    options = []
    sample = values[:: max(1, values.size // 4096)]  # most float tensors fail this cheaper test
    if len(np.unique(sample)) <= _MAX_PALETTE and len(palette := np.unique(values)) <= _MAX_PALETTE:
        cost, coder, data = _coded(np.searchsorted(palette, values))
        fields = {"encoding": "palette", "palette": len(palette), **coder}
        options.append((cost + palette.nbytes, fields, palette.tobytes() + data))
    planes = np.frombuffer(values.tobytes(), dtype=np.uint8).reshape(-1, values.itemsize).T
    parts = [min(_coded(plane), (plane.size, {}, plane.tobytes()), key=_cost) for plane in planes]
    listed = [[len(data), *coder.values()] for _, coder, data in parts]
    options.append((sum(map(_cost, parts)), {"encoding": "planes", "planes": listed}, b"".join(p[2] for p in parts)))
    return options


def _palette_packed(values: np.ndarray) -> list[Candidate]:
    """At most 256 distinct floats, then each element's index into them in fixed-width bits."""
    palette = np.unique(values)
    if not values.size or len(palette) > _MAX_PALETTE:
        return []
    width = max(1, math.ceil(math.log2(len(palette))))
    data = palette.tobytes() + pack_codes(np.searchsorted(palette, values) - qmax(width), width)
    return [(len(data), {"encoding": "palette", "palette": len(palette), "index_bits": width}, data)]


def _encoding(values: np.ndarray, bits: int | None, entropy_coded: bool = True) -> Candidate:
    """The cheapest encoding of the stored elements: signed codes if `bits`, else raw values."""
    plain = values.tobytes() if bits is None else pack_codes(values, bits)
    options = [(len(plain), {"encoding": "raw" if bits is None else "packed"}, plain)]
    if not entropy_coded:
        return min(options + (_palette_packed(values) if values.dtype.kind == "f" else []), key=_cost)
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)  # raw; level 9 is 10x slower on zero runs for nothing
    squeezed = deflate.compress(plain) + deflate.flush()
    options.append((len(squeezed), {"encoding": "zlib"}, squeezed))
    if bits is not None:
        cost, coder, data = _coded(values.astype(np.int64) + qmax(bits))
        options.append((cost, {"encoding": "ans", **coder}, data))
    elif values.dtype.kind == "f" and values.size:
        options += _float_options(values)
    return min(options, key=_cost)


def encode_tensor(flat: np.ndarray, bits: int | None = None, entropy_coded: bool = True) -> tuple[dict, bytes, bytes]:
    """(header fields, index bytes, value bytes) of the cheapest layout and encoding."""
    present = flat != 0
    flat = np.where(present, flat, np.zeros_like(flat))  # -0.0 is stored as +0.0
    cost, fields, values = _encoding(flat, bits, entropy_coded)
    best = cost, {"layout": "dense", **fields}, b"", values
    if not present.all():
        index_cost, index_fields, index = _index(present, entropy_coded)
        cost, fields, values = _encoding(flat[present], bits, entropy_coded)
        if index_cost + cost < best[0]:
            best = index_cost + cost, {**index_fields, **fields}, index, values
    return best[1:]


def _positions(entry: dict, index: bytes, size: int) -> np.ndarray | None:
    """Which elements are stored: None for all of them, else a boolean mask."""
    layout = entry["layout"]
    if layout == "dense":
        return None
    if layout == "bitmap":
        return np.unpackbits(np.frombuffer(index, np.uint8), count=size) > 0
    nnz = int(entry["nnz"])
    if layout == "bernoulli":
        return _unans(index, _model(nnz / size), size) > 0
    if layout != "gaps":
        raise ValueError(f"unknown layout {layout!r}")
    escape, symbols = int(entry["escape"]), _uncoded(entry["index_table"], index, int(entry["symbols"]))
    stored = (np.cumsum(np.where(symbols == escape, escape, symbols + 1)) - 1)[symbols != escape]
    if len(stored) != nnz or (nnz and not (0 <= stored.min() and np.all(np.diff(stored) > 0) and stored[-1] < size)):
        raise ValueError(f"the gaps do not place {nnz} elements in order within {size}")
    present = np.zeros(size, dtype=bool)
    present[stored] = True
    return present


def decode_tensor(entry: dict, index: bytes, data: bytes) -> np.ndarray:
    size, bits, dtype = math.prod(entry["shape"]), entry.get("bits"), np.dtype(entry["dtype"])
    if (present := _positions(entry, index, size)) is not None:
        full = np.zeros(size, dtype=np.int32 if bits else dtype)
        full[present] = _values(entry, data, int(present.sum()))
        return full.reshape(entry["shape"])
    return _values(entry, data, size).reshape(entry["shape"])


def _values(entry: dict, data: bytes, n: int) -> np.ndarray:
    encoding, bits, dtype = entry["encoding"], entry.get("bits"), np.dtype(entry["dtype"])
    if encoding == "zlib":
        encoding, data = ("raw" if bits is None else "packed"), zlib.decompress(data, -15)
    if (encoding in ("packed", "ans")) != (bits is not None):
        raise ValueError(f"encoding {encoding!r} cannot hold {f'{bits}-bit codes' if bits else entry['dtype']}")
    if encoding == "packed":
        return unpack_codes(data, n, bits)
    if encoding == "ans":
        return (_uncoded(entry["table"], data, n) - qmax(bits)).astype(np.int32)
    if encoding == "raw":
        return np.frombuffer(data, dtype=dtype).copy()
    if encoding == "palette":
        split, width = int(entry["palette"]) * dtype.itemsize, entry.get("index_bits")
        if width:
            indices = unpack_codes(data[split:], n, width) + qmax(width)
        else:
            indices = _uncoded(entry["table"], data[split:], n)
        return np.frombuffer(data[:split], dtype=dtype)[indices]
    if encoding != "planes":
        raise ValueError(f"unknown encoding {encoding!r}")
    planes, ends = [], np.cumsum([0] + [int(plane[0]) for plane in entry["planes"]])
    for (_, *table), start, end in zip(entry["planes"], ends, ends[1:], strict=False):
        planes.append(_uncoded(table[0], data[start:end], n) if table else np.frombuffer(data[start:end], np.uint8))
    return np.stack(planes, axis=1).astype(np.uint8).view(dtype).ravel()
