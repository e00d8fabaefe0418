"""fednode.workload: models, dataset loaders (on generated files of the real formats), partitions."""
from __future__ import annotations

import gzip
import hashlib
import math
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fednode.workload import (DATASETS, MODELS, Dataset, batched_features, build_model, dataset_spec, load_dataset,
                              partition, shard_for, stacked_state)
from fednode.workload.datasets import read_idx, stratified_split
from proto.layout import Layout

REPO = Path(__file__).resolve().parents[2]
SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]
SMALL = {"resnet18": {"width": 8}}
"""Narrower ResNet-18 (same blocks and strides) where full width would only cost time."""


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------
# models


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_shapes_and_feature_split(name):
    for shape in SHAPES:
        torch.manual_seed(0)
        model = build_model(name, shape, 7, **SMALL.get(name, {})).eval()
        assert model.input_shape == shape and model.num_classes == 7
        assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.out_features == 7
        x = torch.randn(3, *shape)
        with torch.no_grad():
            out = model(x)
            z = model.features(x)
            assert out.shape == (3, 7)
            assert z.shape == (3, model.classifier.in_features)
            torch.testing.assert_close(model.classifier(z), out, rtol=0, atol=0)
            torch.testing.assert_close(model(x, features_only=True), z, rtol=0, atol=0)


def test_model_architectures():
    assert [m.out_features for m in build_model("mlp", (1, 28, 28), 10).modules()
            if isinstance(m, torch.nn.Linear)] == [200, 10]
    assert build_model("logreg", (1, 28, 28), 10).classifier.in_features == 784
    cnn = build_model("cnn", (1, 28, 28), 10)
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in cnn.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) == 2 and len(linears) == 2
    assert cnn.fc1.weight.numel() + cnn.fc1.bias.numel() == 1_605_760  # the paper's "1.6 million"
    resnet = build_model("resnet18", (3, 32, 32), 10)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in resnet.modules()) == 20  # 17 3x3 + 3 1x1 shortcuts
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules()) == 20
    assert resnet.classifier.in_features == 512
    assert 11_000_000 < sum(p.numel() for p in resnet.parameters()) < 11_300_000
    with torch.no_grad():  # full width runs on the smallest and the largest input
        assert resnet.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
        assert build_model("resnet18", (1, 8, 8), 10).eval()(torch.randn(1, 1, 8, 8)).shape == (1, 10)
    with pytest.raises(ValueError, match="logreg"):
        build_model("vgg", (1, 28, 28), 10)
    with pytest.raises(ValueError):
        build_model("cnn", (784,), 10)


@pytest.mark.parametrize("name,shape", [("logreg", (1, 28, 28)), ("mlp", (1, 28, 28)), ("cnn", (1, 28, 28)),
                                        ("resnet18", (3, 32, 32))])
def test_vmap_features_over_stacked_weights(name, shape):
    torch.manual_seed(1)
    models = [build_model(name, shape, 10, **SMALL.get(name, {})) for _ in range(3)]
    for m in models:  # move BatchNorm running stats away from their init so they matter
        m.train()
        with torch.no_grad():
            m(torch.randn(8, *shape))
        m.eval()
    layout = Layout.from_module(models[0])
    matrix = torch.stack([layout.flatten(m.state_dict()) for m in models])
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected = torch.stack([m.features(x) for m in models])
    shared = batched_features(models[0], stacked_state(layout, matrix), x)
    torch.testing.assert_close(shared, expected, rtol=1e-5, atol=1e-5)
    per_model = batched_features(models[0], stacked_state(layout, matrix), x.expand(3, *x.shape),
                                 per_model_inputs=True)
    torch.testing.assert_close(per_model, expected, rtol=1e-5, atol=1e-5)
    # the raw torch.func route works too
    from torch.func import functional_call, vmap
    params = stacked_state(layout, matrix)
    raw = vmap(lambda p: functional_call(models[0], p, (x,), {"features_only": True}))(params)
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layout_round_trip(name):
    torch.manual_seed(2)
    src, dst = build_model(name, (1, 28, 28), 10), build_model(name, (1, 28, 28), 10)
    if name == "resnet18":
        src.train()
        with torch.no_grad():
            src(torch.randn(4, 1, 28, 28))
    layout = Layout.from_module(src)
    assert layout.d == sum(t.numel() for t in src.state_dict().values() if t.is_floating_point())
    vec = layout.flatten(src.state_dict())
    for key, value in layout.unflatten(vec).items():
        assert torch.equal(value, src.state_dict()[key])
    layout.load_into(dst, vec)
    for key, value in src.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(dst.state_dict()[key], value), key
    assert Layout.from_json(layout.to_json()).hash() == layout.hash()
    x = torch.randn(2, 1, 28, 28)
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# bundled datasets


def test_mnist5k_real_images():
    ds = load_dataset("mnist5k")
    assert isinstance(ds, Dataset) and ds.name == "mnist5k" and "mnist5k" in DATASETS
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.train_x.shape == (4000, 1, 28, 28) and ds.test_x.shape == (1000, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert np.bincount(ds.train_y.numpy(), minlength=10).tolist() == [400] * 10  # stratified
    assert np.bincount(ds.test_y.numpy(), minlength=10).tolist() == [100] * 10
    # normalised with MNIST statistics: background maps to -mean/std, ink to (1-mean)/std
    lo, hi = -0.1307 / 0.3081, (1 - 0.1307) / 0.3081
    assert math.isclose(ds.train_x.min().item(), lo, rel_tol=1e-5)
    assert math.isclose(ds.train_x.max().item(), hi, rel_tol=1e-5)
    assert abs(ds.train_x.mean().item()) < 0.05 and abs(ds.train_x.std().item() - 1) < 0.05
    pixels = ds.train_x * 0.3081 + 0.1307
    assert (pixels * 255 - torch.round(pixels * 255)).abs().max().item() < 1e-3  # whole 0..255 grey levels
    assert (pixels > 0.5).float().mean().item() > 0.05  # real digits have ink
    assert load_dataset("mnist5k") is ds  # cached
    other = load_dataset("mnist5k", seed=1)
    assert not torch.equal(other.test_y, ds.test_y) or not torch.equal(other.test_x, ds.test_x)
    again = load_dataset("mnist5k", test_fraction=0.1)
    assert again.num_train == 4500 and again.num_test == 500
    # train and test are disjoint images
    train_keys = {hashlib.sha1(r.numpy().tobytes()).digest() for r in ds.train_x}
    assert not any(hashlib.sha1(r.numpy().tobytes()).digest() in train_keys for r in ds.test_x[:200])


def test_stratified_split_deterministic():
    labels = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    a = stratified_split(labels, 0.2, seed=3)
    b = stratified_split(labels, 0.2, seed=3)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    train_idx, test_idx = a
    assert len(test_idx) == 30 and np.bincount(labels[test_idx]).tolist() == [2, 4, 6, 8, 10]
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(150))


def test_digits():
    ds = load_dataset("digits")
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.num_train + ds.num_test == 1797 and ds.num_test == round(0.2 * 1797)
    assert abs(ds.train_x.mean().item()) < 1e-4 and abs(ds.train_x.std().item() - 1) < 1e-3


def test_dataset_names_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="mnist5k"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("emnist", data_dir=str(tmp_path), split="nope")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="emnist-balanced-train-images-idx3-ubyte"):
        load_dataset("emnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pathmnist.npz"):
        load_dataset("medmnist:pathmnist", data_dir=str(tmp_path))
    assert dataset_spec("mnist5k") == ((1, 28, 28), 10)
    assert dataset_spec("emnist:letters") == ((1, 28, 28), 26)
    assert dataset_spec("cifar10") == ((3, 32, 32), 10)
    assert dataset_spec("medmnist:bloodmnist") == ((3, 28, 28), 8)


# ---------------------------------------------------------------------------
# file loaders on small generated files of the real formats


def _idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, dtype_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write(path: Path, data: bytes, gz: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_idx_set(root: Path, prefix: str, splits: tuple[str, str], n: tuple[int, int], num_classes: int,
                   gz: bool, seed: int, label_offset: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in zip(splits, n):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % num_classes + label_offset).astype(np.uint8)
        _write(root / f"{prefix}{split}-images-idx3-ubyte", _idx_bytes(images), gz)
        _write(root / f"{prefix}{split}-labels-idx1-ubyte", _idx_bytes(labels), gz)
        out[split] = (images, labels)
    return out


def _denormalise(x: torch.Tensor, ds: Dataset, scale: float = 255.0) -> np.ndarray:
    c = x.shape[1]
    mean = torch.tensor(ds.mean).view(1, c, 1, 1)
    std = torch.tensor(ds.std).view(1, c, 1, 1)
    return torch.round((x * std + mean) * scale).to(torch.int64).numpy()


def _expected(raw: np.ndarray, mean, std, scale: float = 255.0) -> torch.Tensor:
    c = raw.shape[1]
    x = torch.from_numpy(raw.astype(np.float32)) / scale
    return (x - torch.tensor(mean).view(1, c, 1, 1)) / torch.tensor(std).view(1, c, 1, 1)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_mnist_and_fashion(tmp_path, gz):
    raw = _write_idx_set(tmp_path / "mnist", "", ("train", "t10k"), (30, 12), 10, gz, seed=5)
    ds = load_dataset("mnist", data_dir=str(tmp_path))
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and (ds.mean, ds.std) == ((0.1307,), (0.3081,))
    for x, y, split in ((ds.train_x, ds.train_y, "train"), (ds.test_x, ds.test_y, "t10k")):
        images, labels = raw[split]
        assert np.array_equal(_denormalise(x, ds)[:, 0], images)
        torch.testing.assert_close(x, _expected(images[:, None], ds.mean, ds.std), rtol=1e-6, atol=1e-6)
        assert np.array_equal(y.numpy(), labels.astype(np.int64))
    # Fashion-MNIST: same format, torchvision's folder layout, its own statistics
    raw = _write_idx_set(tmp_path / "FashionMNIST" / "raw", "", ("train", "t10k"), (20, 10), 10, gz, seed=6)
    fm = load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert fm.name == "fashion-mnist" and fm.mean == (0.2860,)
    assert np.array_equal(_denormalise(fm.test_x, fm)[:, 0], raw["t10k"][0])


def test_idx_bad_magic(tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    (tmp_path / "good").write_bytes(_idx_bytes(images))
    assert read_idx(tmp_path / "good", ndim=3).shape == (2, 28, 28)
    (tmp_path / "float").write_bytes(_idx_bytes(images, dtype_code=0x0D))
    with pytest.raises(ValueError, match="dtype code 0x0d"):
        read_idx(tmp_path / "float")
    (tmp_path / "junk").write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "junk")
    with pytest.raises(ValueError, match="dimensions"):
        read_idx(tmp_path / "good", ndim=1)
    (tmp_path / "short").write_bytes(_idx_bytes(images)[:-5])
    with pytest.raises(ValueError, match="payload"):
        read_idx(tmp_path / "short")
    # a bad file inside a dataset surfaces as the same clear error
    _write_idx_set(tmp_path / "d", "", ("train", "t10k"), (4, 4), 10, False, seed=0)
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x01\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="bad magic"):
        load_dataset("mnist", data_dir=str(tmp_path / "d"))


def test_emnist_naming_transpose_and_letters(tmp_path):
    raw = _write_idx_set(tmp_path, "emnist-balanced-", ("train", "test"), (47, 10), 47, True, seed=7)
    ds = load_dataset("emnist", data_dir=str(tmp_path))
    assert ds.name == "emnist:balanced" and ds.num_classes == 47
    # stored transposed: the loader transposes back
    assert np.array_equal(_denormalise(ds.train_x, ds)[:, 0], raw["train"][0].transpose(0, 2, 1))
    assert np.array_equal(ds.train_y.numpy(), raw["train"][1])
    train = raw["train"][0].astype(np.float64) / 255
    assert math.isclose(ds.mean[0], train.mean(), abs_tol=1e-6) and math.isclose(ds.std[0], train.std(), abs_tol=1e-6)
    raw = _write_idx_set(tmp_path / "emnist", "emnist-letters-", ("train", "test"), (26, 26), 26, False, seed=8,
                         label_offset=1)
    letters = load_dataset("emnist:letters", data_dir=str(tmp_path))
    same = load_dataset("emnist", data_dir=str(tmp_path), split="letters")
    assert same is letters and letters.num_classes == 26
    assert np.array_equal(letters.test_y.numpy(), raw["test"][1].astype(np.int64) - 1)
    assert letters.test_y.min().item() == 0 and letters.test_y.max().item() == 25


def test_cifar10_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(9)
    written = {}
    for name, count in [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 4)]:
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count).tolist()
        with open(folder / name, "wb") as f:  # the official dict format
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * count}, f)
        written[name] = (data, labels)
    ds = load_dataset("cifar10", data_dir=str(tmp_path))
    assert ds.input_shape == (3, 32, 32) and ds.num_train == 15 and ds.num_test == 4
    train_data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    back = _denormalise(ds.train_x, ds)
    assert np.array_equal(back.reshape(15, 3072), train_data)
    assert back[2, 1, 3, 4] == train_data[2, 1024 + 3 * 32 + 4]  # channel planes, row-major
    assert ds.train_y.tolist() == train_labels and ds.test_y.tolist() == written["test_batch"][1]
    torch.testing.assert_close(ds.test_x, _expected(written["test_batch"][0].reshape(-1, 3, 32, 32), ds.mean, ds.std),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flag,rgb", [("bloodmnist", True), ("pneumoniamnist", False)])
def test_medmnist_npz(tmp_path, flag, rgb):
    rng = np.random.default_rng(10)
    classes = {"bloodmnist": 8, "pneumoniamnist": 2}[flag]
    shape = (28, 28, 3) if rgb else (28, 28)
    arrays = {}
    for split, count in (("train", 16), ("val", 4), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, size=(count, 1)).astype(np.uint8)
    np.savez_compressed(tmp_path / f"{flag}.npz", **arrays)
    ds = load_dataset(f"medmnist:{flag}", data_dir=str(tmp_path))
    channels = 3 if rgb else 1
    assert ds.name == f"medmnist:{flag}" and ds.num_classes == classes and ds.input_shape == (channels, 28, 28)
    assert ds.num_train == 16 and ds.num_test == 6 and ds.train_y.shape == (16,)
    expected_images = arrays["train_images"].transpose(0, 3, 1, 2) if rgb else arrays["train_images"][:, None]
    assert np.array_equal(_denormalise(ds.train_x, ds), expected_images)
    assert np.array_equal(ds.test_y.numpy(), arrays["test_labels"].reshape(-1))
    # per-channel statistics of the train split -> per-channel mean 0, std 1
    torch.testing.assert_close(ds.train_x.mean(dim=(0, 2, 3)), torch.zeros(channels), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.train_x.std(dim=(0, 2, 3), unbiased=False), torch.ones(channels), atol=1e-4, rtol=0)
    if rgb:  # multi-label files are refused
        np.savez(tmp_path / "multimnist.npz", train_images=arrays["train_images"],
                 train_labels=np.zeros((16, 3), np.uint8), test_images=arrays["test_images"],
                 test_labels=np.zeros((6, 3), np.uint8))
        with pytest.raises(ValueError, match="multi-label"):
            load_dataset("medmnist:multimnist", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------
# partitions


def _check_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))  # disjoint + complete
    assert all(p.dtype == np.int64 for p in parts)


def _mean_entropy(parts, labels, classes=10):
    ent = []
    for p in parts:
        q = np.bincount(labels[p], minlength=classes) / len(p)
        q = q[q > 0]
        ent.append(-(q * np.log(q)).sum())
    return float(np.mean(ent))


@pytest.fixture(scope="module")
def labels():
    return load_dataset("mnist5k").train_y.numpy()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_partition_cover_and_determinism(labels, scheme):
    a = partition(labels, 17, scheme, alpha=0.3, seed=11)
    b = partition(torch.from_numpy(labels), 17, scheme, alpha=0.3, seed=11)
    c = partition(labels, 17, scheme, alpha=0.3, seed=12)
    assert len(a) == 17 and all(len(p) >= 1 for p in a)
    _check_cover(a, len(labels))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_partition_same_in_another_process(labels, tmp_path):
    code = ("import hashlib, numpy as np\n"
            "from fednode.workload.partition import partition\n"
            "labels = np.load(__import__('sys').argv[1])\n"
            "parts = partition(labels, 9, 'dirichlet', alpha=0.2, seed=42)\n"
            "print(hashlib.sha256(b''.join(p.tobytes() + b'|' for p in parts)).hexdigest())\n")
    npy = tmp_path / "labels.npy"
    np.save(npy, labels)
    out = subprocess.run([sys.executable, "-c", code, str(npy)], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    parts = partition(labels, 9, "dirichlet", alpha=0.2, seed=42)
    assert out == hashlib.sha256(b"".join(p.tobytes() + b"|" for p in parts)).hexdigest()


def test_partition_skews(labels):
    iid = partition(labels, 20, "iid", seed=0)
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    skewed = partition(labels, 20, "dirichlet", alpha=0.1, seed=0)
    assert _mean_entropy(skewed, labels) < 0.6 * _mean_entropy(iid, labels)
    mild = partition(labels, 20, "dirichlet", alpha=100.0, seed=0)
    assert _mean_entropy(mild, labels) > 0.9 * _mean_entropy(iid, labels)
    quantity = partition(labels, 20, "quantity", alpha=0.5, seed=0)
    sizes = np.array([len(p) for p in quantity])
    assert sizes.max() > 4 * sizes.min()
    assert _mean_entropy(quantity, labels) > 0.8 * _mean_entropy(iid, labels)  # labels stay mixed


def test_partition_min_size_and_errors(labels):
    for scheme in ("dirichlet", "quantity"):
        parts = partition(labels, 30, scheme, alpha=0.2, seed=3, min_size=25)
        assert min(map(len, parts)) >= 25
        _check_cover(parts, len(labels))
    assert min(map(len, partition(labels, 100, "dirichlet", alpha=0.1, seed=0))) >= 1
    with pytest.raises(ValueError, match="iid"):
        partition(labels, 4, "sorted")
    with pytest.raises(ValueError, match="at least"):
        partition(labels, 10, "iid", min_size=401)
    with pytest.raises(ValueError, match="alpha"):
        partition(labels, 10, "dirichlet", alpha=0.0)


def test_shard_for():
    ds = load_dataset("mnist5k")
    parts = partition(ds.train_y, 8, "dirichlet", alpha=0.5, seed=4)
    x, y = shard_for(ds, 3, 8, "dirichlet", 0.5, 4)
    assert torch.equal(y, ds.train_y[torch.from_numpy(parts[3])]) and x.shape == (len(parts[3]), 1, 28, 28)
    with pytest.raises(ValueError):
        shard_for(ds, 8, 8)


# ---------------------------------------------------------------------------
# sanity training


def test_logreg_learns_mnist5k():
    ds = load_dataset("mnist5k")
    torch.manual_seed(0)
    model = build_model("logreg", ds.input_shape, ds.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        order = torch.randperm(ds.num_train, generator=gen)
        for start in range(0, ds.num_train, 100):
            idx = order[start:start + 100]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(ds.train_x[idx]), ds.train_y[idx]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(ds.test_x).argmax(1) == ds.test_y).float().mean().item()
    assert accuracy > 0.8


def test_cifar_loader_refuses_a_batch_that_would_run_code(tmp_path):
    import os
    import pickle

    import pytest

    from fednode.workload.datasets import _cifar_batch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(ValueError, match="not allowed"):
        _cifar_batch(p)
