"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: the one reader (zero-shot classification
and the linear probe use it through ``eval/classification_data.py``; ``.ci/run`` checks :data:`FASHION_MNIST_DIR`)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_PREFIX = {"test": "t10k", "train": "train"}


def read_idx(path: Path) -> np.ndarray:
    """idx-ubyte(.gz) → uint8 array; dimensions from the header (big-endian int32 after a 4-byte magic)."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def read_fashion_mnist(
    split: str = "test", root: str | os.PathLike = FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of ``split`` (``test`` = t10k, ``train``), as stored
    (light-on-dark; callers invert for dark-on-white). A missing package is a FileNotFoundError saying what
    to install."""
    if split not in _PREFIX:
        raise ValueError(f"Fashion-MNIST split {split!r}: use one of {list(_PREFIX)}")
    base = Path(root)
    try:
        images = read_idx(base / f"{_PREFIX[split]}-images-idx3-ubyte.gz")
        labels = read_idx(base / f"{_PREFIX[split]}-labels-idx1-ubyte.gz")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"Fashion-MNIST not found under {base}: apt-get install dataset-fashion-mnist") from e
    return images, labels
