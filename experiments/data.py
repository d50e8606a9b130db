"""Fashion-MNIST from IDX files (Debian's `dataset-fashion-mnist`), and splits."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from search.config import ConfigError
from search.workload import Split

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
MEAN, STD = 0.2860, 0.3530
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# How a deployment turns a 28x28 uint8 image into the model's input, as `load_fashion_mnist` does.
PREPROCESSING = {
    "input": "float32 (N, 1, 28, 28) from uint8 pixels: (pixel / 255 - mean) / std",
    "scale": 1 / 255,
    "mean": MEAN,
    "std": STD,
    "class_names": list(CLASS_NAMES),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetMissingError(ConfigError, FileNotFoundError):
    """The dataset files are not there: bad input, so the CLI exits 2 with this message."""


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file, gzip'd or plain: magic (0, 0, dtype, ndim), big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable IDX file: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path} is truncated or corrupt: {len(data)} bytes, expected {expected} for shape {dims}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _find(data_dir: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def fashion_mnist_files(data_dir: str | Path | None = None) -> dict[str, Path]:
    data_dir = Path(data_dir) if data_dir else DEFAULT_FASHION_MNIST_DIR
    found = {key: _find(data_dir, stem) for key, stem in FILES.items()}
    missing = [FILES[k] + ".gz" for k, p in found.items() if p is None]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST files missing in {data_dir}: {', '.join(missing)}. "
            "Install them with `apt-get install dataset-fashion-mnist` (Debian), "
            "or point --data-dir / workload.data_dir at a directory holding the IDX files."
        )
    return found  # type: ignore[return-value]


def load_fashion_mnist(data_dir: str | Path | None = None) -> tuple[Split, Split, dict]:
    """(train, test, preprocessing): x float32 (N, 1, 28, 28) normalised, y int64."""
    files = fashion_mnist_files(data_dir)

    def images(path: Path) -> torch.Tensor:
        x = torch.from_numpy(read_idx(path).astype(np.float32) / 255.0)
        return ((x - MEAN) / STD).unsqueeze(1)

    def labels(path: Path) -> torch.Tensor:
        return torch.from_numpy(read_idx(path).astype(np.int64))

    train = Split(images(files["train_x"]), labels(files["train_y"]))
    test = Split(images(files["test_x"]), labels(files["test_y"]))
    for name, split in (("train", train), ("test", test)):
        if len(split.x) != len(split.y):
            raise ValueError(f"Fashion-MNIST {name} images and labels differ in count")
    return train, test, PREPROCESSING
