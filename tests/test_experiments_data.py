"""experiments.data: IDX and CIFAR-10 loaders on small format-true files, ZCA whitening."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from wnorm import WnormError
from experiments import data as datasets
from fakes import idx_bytes, write_cifar, write_fashion


# --------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_loader_reads_idx_values_and_scales(tmp_path: Path, gz: bool) -> None:
    arrays = write_fashion(tmp_path, gz=gz)
    data = datasets.load("fashion-mnist", tmp_path, download=False)
    assert data.x_train.shape == (30, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    expected = (torch.from_numpy(arrays["train-images-idx3-ubyte"]).float() - 127.5) / 128
    torch.testing.assert_close(data.x_train[:, 0], expected)
    assert data.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.y_test.dtype == torch.int64
    assert data.source == str(tmp_path)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "trunc").write_bytes(good[:-5])
    with pytest.raises(WnormError, match="need .* bytes"):
        datasets.read_idx(tmp_path / "trunc")
    (tmp_path / "float").write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 0))
    with pytest.raises(WnormError, match="type code 0x0d"):
        datasets.read_idx(tmp_path / "float")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(WnormError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "junk")


def test_fashion_subset_is_fixed_and_shared(tmp_path: Path) -> None:
    write_fashion(tmp_path, n_train=50)
    a = datasets.load("fashion-mnist", tmp_path, train_subset=12, test_subset=4, download=False)
    b = datasets.load("fashion-mnist", tmp_path, train_subset=12, test_subset=4, download=False)
    assert a.x_train.shape[0] == 12 and a.x_test.shape[0] == 4
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)


def test_missing_fashion_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(WnormError) as e:
        datasets.load("fashion-mnist", tmp_path / "nothing", download=False)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert str(tmp_path / "nothing") in msg


def test_missing_default_locations_and_no_download(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(datasets, "FASHION_SYSTEM_DIR", tmp_path / "sys")
    monkeypatch.setenv("WNORM_DATA", str(tmp_path / "cache"))
    with pytest.raises(WnormError, match="apt-get install dataset-fashion-mnist"):
        datasets.load("fashion-mnist", download=False)


def test_download_checks_payload_checksum(tmp_path: Path, monkeypatch) -> None:
    """A mirror is accepted only when the decompressed payload has the recorded SHA-256 and
    size; a corrupt mirror is reported, with what it got."""
    src = tmp_path / "mirror"
    arrays = write_fashion(src, gz=True)
    table = {stem: (hashlib.sha256(idx_bytes(a)).hexdigest(), len(idx_bytes(a)), "")
             for stem, a in arrays.items()}
    monkeypatch.setattr(datasets, "FASHION_SYSTEM_DIR", tmp_path / "sys")
    monkeypatch.setenv("WNORM_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "FASHION_FILES", table)
    monkeypatch.setattr(datasets, "FASHION_URLS", (src.as_uri() + "/",))
    data = datasets.load("fashion-mnist", download=True)
    assert data.x_train.shape[0] == 30
    assert data.source == str(tmp_path / "cache" / "fashion-mnist")

    bad = dict(table)
    stem = "t10k-labels-idx1-ubyte"
    bad[stem] = ("0" * 64, table[stem][1], "")
    monkeypatch.setattr(datasets, "FASHION_FILES", bad)
    monkeypatch.setenv("WNORM_DATA", str(tmp_path / "cache2"))
    with pytest.raises(WnormError, match="checksum mismatch"):
        datasets.load("fashion-mnist", download=True)


@pytest.mark.skipif(not datasets.FASHION_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist "
                    "not installed")
def test_recorded_checksums_match_the_installed_files() -> None:
    for stem, (sha, size, _) in datasets.FASHION_FILES.items():
        path = datasets.find_file(datasets.FASHION_SYSTEM_DIR, stem)
        assert path is not None, stem
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        assert len(raw) == size, stem
        assert hashlib.sha256(raw).hexdigest() == sha, stem


# --------------------------------------------------------------------------- CIFAR-10
def test_cifar_loader_layout_and_scaling(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    data = datasets.load("cifar10", tmp_path, zca=False)
    assert data.x_train.shape == (40, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    with open(tmp_path / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")
    row = torch.from_numpy(first[b"data"][0].astype(np.float32))
    # channel-major rows: 1024 red, 1024 green, 1024 blue, each 32x32 row-major
    torch.testing.assert_close(data.x_train[0, 1, 2, 3], (row[1024 + 2 * 32 + 3] - 127.5) / 128)
    assert data.y_train[:8].tolist() == first[b"labels"]


def test_cifar_finds_extracted_subfolder_and_applies_zca(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    data = datasets.load("cifar10", tmp_path, train_subset=10)
    assert data.x_train.shape == (10, 3, 32, 32)
    assert "ZCA" in data.preprocessing
    assert bool(torch.isfinite(data.x_train).all() and torch.isfinite(data.x_test).all())


def test_missing_cifar_names_the_url(tmp_path: Path) -> None:
    for where in (None, tmp_path):
        with pytest.raises(WnormError) as e:
            datasets.load("cifar10", where)
        assert datasets.CIFAR_URL in str(e.value) and "--data-dir" in str(e.value)


def test_cifar_rejects_a_malformed_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(WnormError, match=r"data_batch_3: b'data' must be uint8 of shape \(N, 3072\)"):
        datasets.load("cifar10", tmp_path)


# --------------------------------------------------------------------------- ZCA
def test_zca_whitened_training_data_has_identity_covariance() -> None:
    g = torch.Generator().manual_seed(0)
    d, n = 24, 4000
    # correlated, anisotropic data (variances from about 0.1 to 100: well above the 1e-5
    # regularization, so the whitened covariance must be the identity to within sampling error)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    mix = q * torch.logspace(-0.5, 1, d, dtype=torch.float64)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 3.0).float()
    mean, w = datasets.fit_zca(x.view(n, 2, 3, 4), chunk=1000)
    z = datasets.apply_zca(x.view(n, 2, 3, 4), mean, w).view(n, d).double()
    assert z.mean(0).abs().max() < 1e-4
    cov = (z - z.mean(0)).T @ (z - z.mean(0)) / n
    torch.testing.assert_close(cov, torch.eye(d, dtype=torch.float64), atol=2e-3, rtol=0)
    # ZCA is the symmetric whitening: W = W^T, and it is the closest whitening to the identity
    torch.testing.assert_close(w, w.T)
