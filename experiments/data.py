r"""The two image datasets of the experiments, loaded into memory as float tensors.

- ``fashion-mnist``: the four IDX files (``train-images-idx3-ubyte[.gz]`` ...), looked for in
  ``--data-dir`` if given, else in ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu:
  ``apt-get install dataset-fashion-mnist``), else in the cache dir (``$WNORM_DATA`` or
  ``~/.cache/wnorm``), else downloaded there from Zalando's servers and checked.
- ``cifar10``: the "python version" batches (``data_batch_1`` ... ``data_batch_5``,
  ``test_batch``) in ``--data-dir`` (or its ``cifar-10-batches-py/``), from
  https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz.

Preprocessing (the paper's, section 5): :math:`x \mapsto (x - 127.5)/128`, then for CIFAR-10
ZCA whitening with regularization :math:`10^{-5}`,

.. math::
    x \mapsto (x - m)\,U\,\mathrm{diag}\big(1/\sqrt{S + 10^{-5}}\big)\,U^\top,
    \qquad \tfrac1N (X-m)^\top (X-m) = U\,\mathrm{diag}(S)\,U^\top,

fit on the full training set (a ``train_subset`` only restricts what the network trains on; the
recorded preprocessing says how many examples it was fit on).

Checksums. Downloads are checked against the SHA-256 and size of the *decompressed* IDX payload:
Debian's ``.gz`` files were recompressed (they differ byte-wise from Zalando's, whose published
MD5s are kept below for reference) but hold the identical payload, and a checksum of the payload
accepts any faithful copy, gzipped or not.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from wnorm import WnormError

__all__ = [
    "ImageData",
    "load",
    "load_fashion_mnist",
    "load_cifar10",
    "read_idx",
    "fit_zca",
    "apply_zca",
    "find_file",
    "subset_indices",
    "default_cache_dir",
    "DATASETS",
]

DATASETS = ("fashion-mnist", "cifar10")

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
#: name -> (SHA-256 of the decompressed IDX file, its size in bytes, Zalando's MD5 of the .gz).
#: The first two were computed from Debian's ``dataset-fashion-mnist`` files and agree with
#: public records of the payload of Zalando's originals.
FASHION_FILES: dict[str, tuple[str, int, str]] = {
    "train-images-idx3-ubyte": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        47_040_016,
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ),
    "train-labels-idx1-ubyte": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        60_008,
        "25c81989df183df01b3e8a0aad5dffbe",
    ),
    "t10k-images-idx3-ubyte": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        7_840_016,
        "bef4ecab320f06d8554ea6380940ec79",
    ),
    "t10k-labels-idx1-ubyte": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        10_008,
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
}

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"

ZCA_REGULARIZATION = 1e-5
_IDX_UINT8 = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class ImageData:
    """A dataset in memory: images ``(N, C, H, W)`` float32, labels ``(N,)`` int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str
    preprocessing: str
    num_classes: int = 10

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "source": self.source,
            "train": int(self.x_train.shape[0]),
            "test": int(self.x_test.shape[0]),
            "shape": list(self.x_train.shape[1:]),
            "preprocessing": self.preprocessing,
        }


# --------------------------------------------------------------------------- IDX
def _open_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        is_gz = f.read(2) == _GZIP_MAGIC
    try:
        with (gzip.open if is_gz else open)(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise WnormError(f"{path}: cannot be read{' as gzip' if is_gz else ''} ({e})") from e


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or not) into a uint8 array.

    Format: magic ``0x0000 08 <ndim>`` (big-endian), then ``ndim`` big-endian uint32 sizes,
    then the bytes, row-major.

    Raises:
        WnormError: the magic, the type code or the size does not match; the message names the
            file and what was found.
    """
    path = Path(path)
    raw = _open_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise WnormError(f"{path}: not an IDX file (magic must start with two zero bytes); "
                         f"got {raw[:4].hex() or 'an empty file'}")
    if raw[2] != _IDX_UINT8:
        raise WnormError(f"{path}: IDX type code 0x{raw[2]:02x}; expected 0x08 (unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise WnormError(f"{path}: IDX header promises {ndim} dimensions but the file has "
                         f"{len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)  # Python ints: a corrupt header cannot overflow
    if len(raw) != expected:
        raise WnormError(f"{path}: IDX dims {dims} need {expected} bytes; got {len(raw)} "
                         "(truncated or corrupt file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def find_file(directory: Path, stem: str) -> Path | None:
    """``directory/stem.gz``, ``directory/stem`` or its dotted spelling, whichever exists."""
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        p = directory / name
        if p.is_file():
            return p
    return None


def _fashion_complete(directory: Path) -> bool:
    return all(find_file(directory, stem) is not None for stem in FASHION_FILES)


def default_cache_dir() -> Path:
    """``$WNORM_DATA``, else ``~/.cache/wnorm``: where downloads go."""
    env = os.environ.get("WNORM_DATA")
    return Path(env) if env else Path.home() / ".cache" / "wnorm"


def _download_fashion(target: Path, timeout: float = 30.0) -> None:
    """Fetch the four .gz files into ``target``, each checked against :data:`FASHION_FILES`."""
    target.mkdir(parents=True, exist_ok=True)
    for stem, (sha, size, _md5) in FASHION_FILES.items():
        dest = target / (stem + ".gz")
        if find_file(target, stem) is not None:
            continue
        errors = []
        for base in FASHION_URLS:
            url = base + stem + ".gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    blob = r.read()
            except OSError as e:
                errors.append(f"{url}: {e}")
                continue
            is_gz = blob[:2] == _GZIP_MAGIC
            payload = gzip.decompress(blob) if is_gz else blob
            got = hashlib.sha256(payload).hexdigest()
            if len(payload) != size or got != sha:
                errors.append(f"{url}: checksum mismatch (decompressed {len(payload)} bytes, "
                              f"sha256 {got}; expected {size} bytes, sha256 {sha})")
                continue
            with tempfile.NamedTemporaryFile(dir=target, delete=False) as tmp:
                tmp.write(blob)
            os.replace(tmp.name, dest if is_gz else target / stem)
            break
        else:
            raise WnormError(f"fashion-mnist: could not download {stem}.gz: " + "; ".join(errors))


def _missing_fashion(searched: list[Path], download_error: str | None) -> WnormError:
    where = ", ".join(str(p) for p in searched)
    extra = f" Download failed: {download_error}." if download_error else ""
    return WnormError(
        f"fashion-mnist: the IDX files ({', '.join(s + '[.gz]' for s in FASHION_FILES)}) were not "
        f"found in {where}.{extra} Get them with `sudo apt-get install dataset-fashion-mnist` "
        f"(installs to {FASHION_SYSTEM_DIR}), or put them in a directory and pass "
        f"`--data-dir DIR`, or run where the internet is reachable to download them from "
        f"{FASHION_URLS[0]}"
    )


def _locate_fashion(data_dir: str | os.PathLike[str] | None, download: bool) -> Path:
    if data_dir is not None:
        d = Path(data_dir)
        if _fashion_complete(d):
            return d
        if d.exists() and not d.is_dir():
            raise WnormError(f"fashion-mnist: --data-dir {d} is a file; expected the folder "
                             "that holds the four IDX files")
        have = [stem for stem in FASHION_FILES if find_file(d, stem) is not None]
        if have:  # some are there: name the others
            lack = [s + "[.gz]" for s in FASHION_FILES if s not in have]
            raise WnormError(f"fashion-mnist: {d} lacks {', '.join(lack)} (it has "
                             f"{', '.join(have)})")
        raise _missing_fashion([d], None)
    cache = default_cache_dir() / "fashion-mnist"
    searched = [FASHION_SYSTEM_DIR, cache]
    for d in searched:
        if _fashion_complete(d):
            return d
    if not download:
        raise _missing_fashion(searched, None)
    try:
        _download_fashion(cache)
    except WnormError as e:
        raise _missing_fashion(searched, str(e)) from e
    return cache


def _scale(x: np.ndarray) -> Tensor:
    """uint8 -> float32 in about [-1, 1]: (x - 127.5) / 128, as the paper's script."""
    return (torch.from_numpy(x.astype(np.float32)) - 127.5) / 128.0


def subset_indices(n: int, size: int | None, seed: int, option: str = "subset size",
            where: str = "") -> np.ndarray | None:
    """Indices of a fixed random subset of ``size`` of ``n`` examples (None: all of them).

    Raises:
        WnormError: ``size`` < 1, or more than the ``n`` examples there are (naming ``option``).
    """
    if size is None:
        return None
    if size <= 0:
        raise WnormError(f"{option} must be >= 1; got {size}")
    if size > n:
        raise WnormError(f"{option} {size} is more than the {n} examples of {where or 'the set'}")
    if size == n:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    zca: bool = False,
    download: bool = True,
    subset_seed: int = 0,
) -> ImageData:
    """Fashion-MNIST as ``(N, 1, 28, 28)`` float32 in about [-1, 1] (optionally ZCA-whitened).

    Subsets are fixed random draws (``subset_seed``), the same for every run seed and variant.

    Raises:
        WnormError: the files are missing (the message says how to get them) or malformed.
    """
    d = _locate_fashion(data_dir, download)
    arrays = {}
    for stem in FASHION_FILES:
        path = find_file(d, stem)
        assert path is not None  # _locate_fashion checked
        arrays[stem] = read_idx(path)
    splits = {}
    for split, prefix, subset in (("train", "train", train_subset), ("test", "t10k", test_subset)):
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        ipath = find_file(d, f"{prefix}-images-idx3-ubyte")
        lpath = find_file(d, f"{prefix}-labels-idx1-ubyte")
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0] \
                or images.shape[1:] != (28, 28):
            raise WnormError(f"fashion-mnist: {ipath} and {lpath}: {split} images {images.shape} "
                             f"and labels {labels.shape}; expected (N, 28, 28) and (N,)")
        if labels.size == 0:  # an empty test set would read as 0% error
            raise WnormError(f"fashion-mnist: {ipath} and {lpath} hold no {split} examples")
        if labels.max() > 9:
            raise WnormError(f"fashion-mnist: {lpath}: {split} labels must be 0..9; "
                             f"got max {labels.max()}")
        idx = subset_indices(len(labels), subset, subset_seed, f"--{split}-subset",
                      f"the fashion-mnist {split} set in {d}")
        if idx is not None:
            images, labels = images[idx], labels[idx]
        splits[split] = (_scale(images)[:, None], torch.from_numpy(labels.astype(np.int64)))
        if split == "train" and zca:
            zca_fit = _scale(arrays["train-images-idx3-ubyte"])[:, None]  # the full training set
    return _finish("fashion-mnist", splits, str(d), zca, zca_fit if zca else None)


# --------------------------------------------------------------------------- CIFAR-10
def _cifar_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    hint = (f"Download the CIFAR-10 python version from {CIFAR_URL}, extract it "
            "(tar xzf cifar-10-python.tar.gz) and pass `--data-dir path/to/cifar-10-batches-py`")
    if data_dir is None:
        raise WnormError(f"cifar10: no --data-dir given. {hint}")
    d = Path(data_dir)
    files = CIFAR_TRAIN + (CIFAR_TEST,)
    cands = (d, d / "cifar-10-batches-py")
    for cand in cands:
        if all((cand / f).is_file() for f in files):
            return cand
    # name the folder that holds most of them (the extracted one, when there is one)
    best = max(cands, key=lambda c: sum((c / f).is_file() for f in files))
    missing = [f for f in files if not (best / f).is_file()]
    raise WnormError(f"cifar10: {best} lacks {', '.join(missing)}. {hint}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # unpickling can raise anything its input names (a missing module)
        raise WnormError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
        raise WnormError(f"{path}: a CIFAR-10 batch is a dict with b'data' and b'labels'; "
                         f"got {keys}")
    data = np.asarray(batch[b"data"])
    raw = batch[b"labels"]
    labels = np.asarray(raw) if not isinstance(raw, (bytes, bytearray, str)) else np.asarray([])
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu") \
            or (labels.size == 0 and len(raw) != 0):
        raise WnormError(f"{path}: b'labels' must be a list of integers 0..9; got "
                         f"{type(raw).__name__} of {labels.dtype if labels.size else '?'}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise WnormError(f"{path}: b'labels' must be 0..9; got values from {labels.min()} to "
                         f"{labels.max()}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise WnormError(f"{path}: b'data' must be uint8 of shape (N, 3072); "
                         f"got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise WnormError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    if data.shape[0] == 0:  # an empty test batch would read as 0% error
        raise WnormError(f"{path}: holds no images")
    return data, labels


def load_cifar10(
    data_dir: str | os.PathLike[str] | None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    zca: bool = True,
    subset_seed: int = 0,
) -> ImageData:
    """CIFAR-10 as ``(N, 3, 32, 32)`` float32: (x - 127.5)/128, then ZCA (fit on the training set).

    Raises:
        WnormError: the batches are missing (the message gives the download URL) or malformed.
    """
    d = _cifar_dir(data_dir)
    parts = [_read_cifar_batch(d / f) for f in CIFAR_TRAIN]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_cifar_batch(d / CIFAR_TEST)
    splits = {}
    zca_fit = _scale(x_train) if zca else None
    for split, x, y, subset in (("train", x_train, y_train, train_subset),
                                ("test", x_test, y_test, test_subset)):
        idx = subset_indices(len(y), subset, subset_seed, f"--{split}-subset",
                      f"the cifar10 {split} set in {d}")
        if idx is not None:
            x, y = x[idx], y[idx]
        splits[split] = (_scale(x).reshape(-1, 3, 32, 32), torch.from_numpy(y))
    return _finish("cifar10", splits, str(d), zca, zca_fit)


# --------------------------------------------------------------------------- ZCA
def fit_zca(x: Tensor, regularization: float = ZCA_REGULARIZATION,
            chunk: int = 4096) -> tuple[Tensor, Tensor]:
    r"""Fit ZCA whitening on ``x`` ``(N, ...)``: returns ``(mean (D,), W (D, D))`` such that
    ``(x.flatten(1) - mean) @ W`` has covariance :math:`U\,\mathrm{diag}(S/(S+\epsilon))\,U^\top
    \approx I` (float64 statistics, as the authors' ``nn.ZCA``)."""
    flat = x.reshape(x.shape[0], -1)
    n, dims = flat.shape
    mean = torch.zeros(dims, dtype=torch.float64)
    for i in range(0, n, chunk):
        mean += flat[i:i + chunk].double().sum(0)
    mean /= n
    cov = torch.zeros(dims, dims, dtype=torch.float64)
    for i in range(0, n, chunk):
        c = flat[i:i + chunk].double() - mean
        cov += c.T @ c
    cov /= n
    s, u = torch.linalg.eigh(cov)
    s = s.clamp_min(0.0)
    w = (u * (1.0 / torch.sqrt(s + regularization))) @ u.T
    return mean, w


def apply_zca(x: Tensor, mean: Tensor, w: Tensor, chunk: int = 4096) -> Tensor:
    """``(x.flatten(1) - mean) @ w``, reshaped like ``x``, in float32."""
    flat = x.reshape(x.shape[0], -1)
    m, w32 = mean.float(), w.float()
    out = torch.empty_like(flat, dtype=torch.float32)
    for i in range(0, flat.shape[0], chunk):
        out[i:i + chunk] = (flat[i:i + chunk].float() - m) @ w32
    return out.reshape(x.shape)


def _finish(name: str, splits: dict[str, tuple[Tensor, Tensor]], source: str, zca: bool,
            zca_fit: Tensor | None = None) -> ImageData:
    prep = "(x-127.5)/128"
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    if zca:
        fit = zca_fit if zca_fit is not None else xtr
        mean, w = fit_zca(fit)
        xtr, xte = apply_zca(xtr, mean, w), apply_zca(xte, mean, w)
        what = ("the full training set" if zca_fit is not None
                else "the training examples used")
        prep += f", ZCA (reg {ZCA_REGULARIZATION:g}, fit on {what}: {fit.shape[0]} examples)"
    return ImageData(name, xtr.contiguous(), ytr, xte.contiguous(), yte, source, prep)


def load(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    zca: bool | None = None,
    download: bool = True,
) -> ImageData:
    """Load ``name`` (one of :data:`DATASETS`); ``zca`` defaults to True for CIFAR-10 only."""
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, train_subset=train_subset, test_subset=test_subset,
                                  zca=bool(zca), download=download)
    if name == "cifar10":
        return load_cifar10(data_dir, train_subset=train_subset, test_subset=test_subset,
                            zca=True if zca is None else zca)
    raise WnormError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
