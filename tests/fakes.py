"""Small format-true dataset files for the experiments' tests (tests/ is not a package: the
test files import this module by name)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (unsigned bytes) as an IDX file."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(d: Path, n_train: int = 30, n_test: int = 10, gz: bool = True,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST IDX files of random images and labels in ``d``; returns them."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    d.mkdir(parents=True, exist_ok=True)
    for stem, a in arrays.items():
        blob = idx_bytes(a)
        if gz:
            (d / (stem + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (d / stem).write_bytes(blob)
    return arrays


def write_cifar(d: Path, per_batch: int = 8, n_test: int = 6, seed: int = 0) -> None:
    """CIFAR-10's six python batches, of random images and labels, in ``d``."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(n)],
        }
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
