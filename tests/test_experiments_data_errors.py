"""experiments.data on damaged or wrong files: a clear error naming the file, never a
stray zlib/numpy/IndexError later; and ZCA's provenance says what it was fit on."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from wnorm import WnormError
from experiments import data as datasets

from fakes import idx_bytes, write_cifar, write_fashion


def test_bad_deflate_data_names_the_file(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    blob = bytearray(path.read_bytes())
    blob[12:20] = b"\xff" * 8  # inside the deflate stream
    path.write_bytes(bytes(blob))
    with pytest.raises(WnormError, match="train-labels-idx1-ubyte.gz: cannot be read as gzip"):
        datasets.load("fashion-mnist", tmp_path, download=False)


def test_idx_header_dimensions_that_overflow_are_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    # 4 dims of 2**16: a product of 2**64, 0 in 64-bit arithmetic, so a bare header "fits"
    path.write_bytes(struct.pack(">BBBB4I", 0, 0, 8, 4, *[2**16] * 4))
    with pytest.raises(WnormError, match="x-idx3-ubyte: IDX dims"):
        datasets.read_idx(path)


def test_fashion_images_must_be_28x28(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    rng = np.random.default_rng(0)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(rng.integers(0, 256, (30, 32, 32)))))
    with pytest.raises(WnormError, match=r"train-images-idx3-ubyte.gz.*\(N, 28, 28\)"):
        datasets.load("fashion-mnist", tmp_path, download=False)


@pytest.mark.parametrize("labels", [[10] * 8, [-1] * 8, [255] * 8, b"\x01" * 8, ["a"] * 8,
                                    [0.5] * 8])
def test_cifar_labels_must_be_integers_0_to_9(tmp_path: Path, labels: object) -> None:
    write_cifar(tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((8, 3072), np.uint8), b"labels": labels}, f)
    with pytest.raises(WnormError, match="data_batch_2: b'labels' must be"):
        datasets.load("cifar10", tmp_path, zca=False)


def test_fashion_zca_is_fit_on_the_full_training_set_and_says_so(tmp_path: Path) -> None:
    write_fashion(tmp_path, n_train=40, n_test=10)
    sub = datasets.load("fashion-mnist", tmp_path, train_subset=10, zca=True, download=False)
    full = datasets.load("fashion-mnist", tmp_path, zca=True, download=False)
    assert "fit on the full training set: 40 examples" in sub.preprocessing
    # the same whitening as on the full set: the subset's images are among the full set's
    idx = datasets.subset_indices(40, 10, 0)
    torch.testing.assert_close(sub.x_train, full.x_train[torch.from_numpy(idx)])
    torch.testing.assert_close(sub.x_test, full.x_test)


def test_an_empty_test_set_is_an_error_not_zero_percent_error(tmp_path: Path) -> None:
    write_fashion(tmp_path / "fm", n_test=0)
    with pytest.raises(WnormError, match=r"t10k-images-idx3-ubyte.gz and .*t10k-labels-idx1-"
                       r"ubyte.gz hold no test examples"):
        datasets.load("fashion-mnist", tmp_path / "fm", download=False)
    write_cifar(tmp_path / "c", n_test=0)
    with pytest.raises(WnormError, match=r"test_batch: holds no images"):
        datasets.load("cifar10", tmp_path / "c", zca=False)


def test_fashion_errors_name_the_missing_file_or_the_file_given_as_a_folder(
        tmp_path: Path) -> None:
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(WnormError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\] \(it has "
                       r"train-images"):
        datasets.load("fashion-mnist", tmp_path, download=False)
    with pytest.raises(WnormError, match=r"is a file; expected the folder"):
        datasets.load("fashion-mnist", tmp_path / "train-images-idx3-ubyte.gz", download=False)


def test_a_cifar_batch_that_cannot_be_unpickled_is_a_one_line_error(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"cnosuchmod\nThing\n.")  # GLOBAL of a missing module
    with pytest.raises(WnormError, match=r"test_batch: not a CIFAR-10 python batch "
                       r"\(ModuleNotFoundError"):
        datasets.load("cifar10", tmp_path, zca=False)


def test_a_cifar_folder_missing_a_batch_names_the_extracted_folder(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(WnormError, match=r"cifar10: .*cifar-10-batches-py lacks test_batch\."):
        datasets.load("cifar10", tmp_path, zca=False)
