"""Tests of models.datasets: every path offline, on bundled data or files written here."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from urllib.error import URLError

import numpy as np
import pytest
import torch

import models.datasets as ds
from models.datasets import MIN_VAL, Splits, list_datasets, load_dataset, split_indices, val_size
from models.errors import DataNotFoundError, UnknownNameError, UserError

# The official MNIST test set lives outside the repository: tests find it only when this variable
# names its folder (e.g. PARETO_MNIST_T10K=../shared/data/mnist-t10k).
_T10K_ENV = os.environ.get("PARETO_MNIST_T10K", "")
T10K_DIR = Path(_T10K_ENV).expanduser().resolve() if _T10K_ENV else None


def _rows(x: torch.Tensor, y: torch.Tensor) -> Counter:
    return Counter((img.numpy().tobytes(), int(lbl)) for img, lbl in zip(x, y, strict=True))


def _check_layout(s: Splits) -> None:
    c, size = s.spec.channels, s.spec.size
    for x, y in ((s.x_train, s.y_train), (s.x_val, s.y_val), (s.x_test, s.y_test)):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous() and x.device.type == "cpu"
        assert x.shape[1:] == (c, size, size) and x.shape[0] == y.shape[0]
        assert y.ndim == 1


# --- digits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset("digits", val_fraction=0.1, seed=0, download=False)


def test_digits_shapes_and_counts(digits: Splits) -> None:
    _check_layout(digits)
    assert digits.name == "digits"
    assert digits.spec.channels == 1 and digits.spec.size == 8 and digits.spec.num_classes == 10
    assert not digits.spec.augment
    n_train, n_val, n_test = len(digits.y_train), len(digits.y_val), len(digits.y_test)
    assert n_train + n_val + n_test == 1797
    assert abs(n_test - 0.2 * 1797) <= 10
    assert n_val == round(0.1 * (1797 - n_test))
    assert int(digits.x_train.max()) == 255 and int(digits.x_train.min()) == 0
    assert "train" in digits.summary() and "\n" not in digits.summary()


def test_digits_is_a_partition_of_the_original(digits: Splits) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.round(bunch.images * 255 / 16).astype(np.uint8)[:, None])
    original = _rows(x, torch.from_numpy(bunch.target))
    parts = [
        _rows(digits.x_train, digits.y_train),
        _rows(digits.x_val, digits.y_val),
        _rows(digits.x_test, digits.y_test),
    ]
    assert parts[0] + parts[1] + parts[2] == original
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def test_digits_test_split_is_stratified(digits: Splits) -> None:
    counts = torch.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38


def test_digits_spec_matches_pixels(digits: Splits) -> None:
    allx = torch.cat([digits.x_train, digits.x_val, digits.x_test]).double() / 255
    assert digits.spec.mean[0] == pytest.approx(allx.mean().item(), abs=1e-4)
    assert digits.spec.std[0] == pytest.approx(allx.std(unbiased=False).item(), abs=1e-4)


def test_digits_deterministic_and_seeded(digits: Splits) -> None:
    again = load_dataset("digits", val_fraction=0.1, seed=0)
    for a, b in zip(
        (digits.x_train, digits.y_train, digits.x_val, digits.y_val, digits.x_test),
        (again.x_train, again.y_train, again.x_val, again.y_val, again.x_test),
        strict=True,
    ):
        assert torch.equal(a, b)
    other = load_dataset("digits", val_fraction=0.1, seed=1)
    assert torch.equal(other.x_test, digits.x_test) and torch.equal(other.y_test, digits.y_test)
    assert not torch.equal(other.x_val, digits.x_val)
    assert len(other.y_val) == len(digits.y_val)


def test_val_fraction_zero_and_bounds() -> None:
    s = load_dataset("digits", val_fraction=0.0)
    assert len(s.y_val) == 0 and s.x_val.shape[1:] == (1, 8, 8)
    for bad in (-0.1, 0.51, 1.0):
        with pytest.raises(UserError, match="val_fraction"):
            load_dataset("digits", val_fraction=bad)


# --- split_indices -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,frac", [(0, 0.1), (1, 0.5), (10, 0.0), (100, 0.1), (1001, 0.5), (50_000, 0.1)]
)
def test_split_indices_properties(n: int, frac: float) -> None:
    train, val = split_indices(n, frac, seed=3)
    assert len(val) == val_size(n, frac) and len(train) + len(val) == n
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    again = split_indices(n, frac, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)


@pytest.mark.parametrize(
    "n,frac,expected",
    [(1437, 0.15, 216), (7999, 0.1, 800), (8000, 0.1, MIN_VAL), (8000, 0.3, 2400), (54_000, 0.1, 5400), (8000, 0.0, 0)],
)
def test_val_size_has_a_floor_where_the_training_split_can_spare_it(n: int, frac: float, expected: int) -> None:
    # mnist-t10k's 8,000 training images at 0.1 gave 800 validation images: selection noise of
    # the size of the +0.5-point margins. Smaller datasets (digits) keep their fraction.
    assert val_size(n, frac) == expected


def test_split_indices_depends_on_seed() -> None:
    assert not np.array_equal(split_indices(1000, 0.1, 0)[1], split_indices(1000, 0.1, 1)[1])
    with pytest.raises(UserError):
        split_indices(10, 0.6, 0)


# --- CIFAR -------------------------------------------------------------------------------------


def _dump(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_arrays(n: int, seed: int, classes: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, classes, n).tolist()


def _write_cifar10(root: Path, n: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = _cifar_arrays(n, i, 10)
        _dump(
            folder / name,
            {b"batch_label": b"x", b"data": data, b"labels": labels, b"filenames": [b"a"] * n},
        )
    return folder


def test_cifar10_loads_real_format(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    s = load_dataset("cifar10", tmp_path, val_fraction=0.0, download=False)
    _check_layout(s)
    assert s.name == "cifar10" and s.spec.augment and s.spec.num_classes == 10
    assert len(s.y_train) == 100 and len(s.y_val) == 0 and len(s.y_test) == 20
    data0, labels0 = _cifar_arrays(20, 0, 10)
    # Rows are the R plane, then G, then B, each 32x32 row-major.
    assert int(s.x_train[3, 0, 5, 7]) == data0[3, 5 * 32 + 7]
    assert int(s.x_train[3, 1, 5, 7]) == data0[3, 1024 + 5 * 32 + 7]
    assert int(s.x_train[3, 2, 31, 0]) == data0[3, 2048 + 31 * 32]
    assert s.y_train[:20].tolist() == labels0
    data5, labels5 = _cifar_arrays(20, 5, 10)
    assert torch.equal(s.x_test, torch.from_numpy(data5.reshape(20, 3, 32, 32)))
    assert s.y_test.tolist() == labels5


def test_cifar10_val_split_from_train(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    s = load_dataset("cifar10", tmp_path, val_fraction=0.2, seed=1, download=False)
    assert len(s.y_train) == 80 and len(s.y_val) == 20 and len(s.y_test) == 20
    full = load_dataset("cifar10", tmp_path, val_fraction=0.0, download=False)
    assert _rows(s.x_train, s.y_train) + _rows(s.x_val, s.y_val) == _rows(
        full.x_train, full.y_train
    )


def test_cifar100_loads_real_format(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for i, name in enumerate(("train", "test")):
        data, labels = _cifar_arrays(30, i, 100)
        _dump(folder / name, {b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * 30})
    s = load_dataset("cifar100", tmp_path, val_fraction=0.1, download=False)
    _check_layout(s)
    assert s.spec.num_classes == 100 and s.spec.mean == (0.5071, 0.4865, 0.4409)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (27, 3, 30)
    assert s.y_test.tolist() == _cifar_arrays(30, 1, 100)[1]


def test_cifar_legacy_numpy_module_name(tmp_path: Path) -> None:
    """The original files (numpy 1, Python 2) reference numpy.core.multiarray._reconstruct."""
    folder = _write_cifar10(tmp_path)
    raw = (folder / "test_batch").read_bytes()
    legacy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert legacy != raw or b"numpy.core.multiarray" in raw
    (folder / "test_batch").write_bytes(legacy)
    s = load_dataset("cifar10", tmp_path, val_fraction=0.0, download=False)
    assert len(s.y_test) == 20


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_is_refused(tmp_path: Path) -> None:
    folder = _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    data, labels = _cifar_arrays(20, 0, 10)
    _dump(folder / "data_batch_2", {b"data": data, b"labels": labels, b"x": _Evil(marker)})
    with pytest.raises(UserError, match="data_batch_2") as info:
        load_dataset("cifar10", tmp_path, download=False)
    assert "system" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_cifar_malformed_batch(tmp_path: Path) -> None:
    folder = _write_cifar10(tmp_path)
    _dump(folder / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(UserError, match="3072"):
        load_dataset("cifar10", tmp_path, download=False)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="test_batch"):
        load_dataset("cifar10", tmp_path, download=False)


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "data_batch_1..5" in msg and "cifar-10-python.tar.gz" in msg
    with pytest.raises(DataNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path, download=False)


def test_cifar_download_failure_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def offline(**kwargs: object) -> None:
        calls.append(kwargs)
        raise URLError("<urlopen error [Errno -3]\nTemporary failure in name resolution>")

    fake_tv = SimpleNamespace(datasets=SimpleNamespace(CIFAR10=offline, MNIST=offline))
    monkeypatch.setattr(ds, "import_torchvision", lambda: fake_tv)
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", tmp_path, download=True)
    msg = str(info.value)
    assert "\n" not in msg and "download of CIFAR-10 failed" in msg and "name resolution" in msg
    assert calls == [{"root": str(tmp_path), "train": True, "download": True}]
    with pytest.raises(DataNotFoundError, match="MNIST/raw"):
        load_dataset("mnist", tmp_path, download=True)


# --- MNIST -------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray) -> bytes:
    return (
        struct.pack(">BBBB", 0, 0, 0x08, arr.ndim)
        + struct.pack(f">{arr.ndim}I", *arr.shape)
        + arr.tobytes()
    )


def _write_mnist(raw: Path, n_train: int = 30, n_test: int = 10) -> dict[str, np.ndarray]:
    raw.mkdir(parents=True)
    rng = np.random.default_rng(7)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for i, (name, arr) in enumerate(arrays.items()):
        if i % 2:
            (raw / f"{name}.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
        else:
            (raw / name).write_bytes(_idx_bytes(arr))
    return arrays


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_idx_round_trip(tmp_path: Path, name: str, folder: str) -> None:
    arrays = _write_mnist(tmp_path / folder / "raw")
    s = load_dataset(name, tmp_path, val_fraction=0.0, download=False)
    _check_layout(s)
    assert s.name == name and s.spec.size == 28 and s.spec.channels == 1 and not s.spec.augment
    assert torch.equal(s.x_train[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert s.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert torch.equal(s.x_test[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert s.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    split = load_dataset(name, tmp_path, val_fraction=0.2, download=False)
    assert (len(split.y_train), len(split.y_val), len(split.y_test)) == (24, 6, 10)


def test_fashion_mnist_from_the_debian_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = tmp_path / "usr-share-datasets-fashion-mnist"  # stands in for the package's folder
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", debian)
    data_dir = tmp_path / "data"
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir, download=False)
    msg = str(info.value)
    assert "\n" not in msg and str(data_dir / "FashionMNIST" / "raw") in msg and str(debian) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    arrays = _write_mnist(debian, n_train=20, n_test=6)
    s = load_dataset("fashion-mnist", data_dir, val_fraction=0.0, download=False)
    assert s.name == "fashion-mnist" and (len(s.y_train), len(s.y_test)) == (20, 6)
    assert torch.equal(s.x_train[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert s.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # --data-dir comes first.
    own = _write_mnist(data_dir / "FashionMNIST" / "raw", n_train=12, n_test=4)
    s = load_dataset("fashion-mnist", data_dir, val_fraction=0.0, download=False)
    assert len(s.y_train) == 12 and s.y_train.tolist() == own["train-labels-idx1-ubyte"].tolist()


def test_fashion_mnist_debian_location_is_tried_before_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian = tmp_path / "debian"
    _write_mnist(debian)
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", debian)
    monkeypatch.setattr(ds, "import_torchvision", lambda: pytest.fail("no download when installed"))
    assert len(load_dataset("fashion-mnist", tmp_path / "data", val_fraction=0.0).y_train) == 30


def test_mnist_corrupt_and_missing(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 8)
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path, download=False)
    (raw / "train-images-idx3-ubyte").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", tmp_path, download=False)
    assert str(raw) in str(info.value) and "mnist-t10k" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(
    T10K_DIR is None or not T10K_DIR.is_dir(), reason="set PARETO_MNIST_T10K to the MNIST test-set folder"
)
def test_mnist_t10k_shared(tmp_path: Path) -> None:
    assert T10K_DIR is not None
    explicit = load_dataset(f"mnist-t10k:{T10K_DIR}", val_fraction=0.1, seed=0)
    _check_layout(explicit)
    assert explicit.name.startswith("mnist-t10k:")
    assert explicit.spec.size == 28 and explicit.spec.mean == (0.1307,)
    assert (len(explicit.y_train), len(explicit.y_val), len(explicit.y_test)) == (6000, 2000, 2000)
    assert sorted(set(explicit.y_test.tolist())) == list(range(10))
    (tmp_path / "mnist-t10k").symlink_to(T10K_DIR)  # the same files, found under --data-dir
    s = load_dataset("mnist-t10k", tmp_path, val_fraction=0.1, seed=0)
    assert s.name == "mnist-t10k"
    assert torch.equal(explicit.x_test, s.x_test) and torch.equal(explicit.x_val, s.x_val)


def test_mnist_t10k_looks_only_in_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist-t10k", tmp_path / "data")
    msg = str(info.value)
    assert f"not found in {tmp_path / 'data' / 'mnist-t10k'} (" in msg and "mnist-t10k:DIR" in msg


def test_mnist_t10k_from_data_dir(tmp_path: Path) -> None:
    folder = tmp_path / "mnist-t10k"
    folder.mkdir()
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 50, dtype=np.uint8)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(x)))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(y)))
    s = load_dataset("mnist-t10k", tmp_path, val_fraction=0.0)
    assert torch.equal(s.x_train[:, 0], torch.from_numpy(x[:40]))
    assert torch.equal(s.x_test[:, 0], torch.from_numpy(x[40:]))
    with pytest.raises(DataNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset(f"mnist-t10k:{tmp_path / 'nowhere'}")


def test_t10k_split_seed_zero_is_the_fixed_split_and_others_draw_the_test_set() -> None:
    train, test = ds.t10k_split(10_000, 0)
    assert np.array_equal(train, np.arange(8_000)) and np.array_equal(test, np.arange(8_000, 10_000))
    splits = {seed: ds.t10k_split(10_000, seed) for seed in (1, 2)}
    for train, test in splits.values():
        assert (len(train), len(test)) == (8_000, 2_000)
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(10_000))
        assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert not np.array_equal(splits[1][1], splits[2][1])
    assert not np.array_equal(splits[1][1], np.arange(8_000, 10_000))
    assert np.array_equal(ds.t10k_split(10_000, 1)[1], splits[1][1])  # the same seed, the same split


def test_mnist_t10k_split_follows_the_seed(tmp_path: Path) -> None:
    folder = tmp_path / "t10k"
    folder.mkdir()
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 50, dtype=np.uint8)
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(x))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(y))
    name = f"mnist-t10k:{folder}"
    zero = load_dataset(name, val_fraction=0.2, seed=0)
    assert torch.equal(zero.x_test[:, 0], torch.from_numpy(x[40:]))  # unchanged from before seeds
    one = load_dataset(name, val_fraction=0.2, seed=1)
    assert (len(one.y_train), len(one.y_val), len(one.y_test)) == (32, 8, 10)
    _, test_idx = ds.t10k_split(50, 1)
    assert torch.equal(one.x_test[:, 0], torch.from_numpy(x[test_idx]))
    assert one.y_test.tolist() == y[test_idx].tolist()  # labels travel with their images
    everything = _rows(torch.cat([one.x_train, one.x_val, one.x_test]), torch.cat([one.y_train, one.y_val, one.y_test]))
    assert everything == _rows(torch.from_numpy(x[:, None]), torch.from_numpy(y.astype(np.int64)))
    again = load_dataset(name, val_fraction=0.2, seed=1)
    assert torch.equal(again.x_test, one.x_test) and torch.equal(again.x_train, one.x_train)


# --- npz ---------------------------------------------------------------------------------------


def test_npz_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    nchw_float = rng.random((10, 3, 32, 32)).astype(np.float32)
    path = tmp_path / "d.npz"
    np.savez(
        path, x_train=nhwc, y_train=np.arange(40) % 4, x_test=nchw_float, y_test=np.arange(10) % 5
    )
    s = load_dataset(f"npz:{path}", val_fraction=0.0)
    _check_layout(s)
    assert s.name == f"npz:{path.resolve()}"
    assert s.spec.channels == 3 and s.spec.size == 32 and s.spec.num_classes == 5 and s.spec.augment
    assert torch.equal(s.x_train, torch.from_numpy(nhwc.transpose(0, 3, 1, 2).copy()))
    assert torch.equal(s.x_test, torch.from_numpy(np.round(nchw_float * 255).astype(np.uint8)))
    expected_mean = nhwc.reshape(-1, 3).mean(0) / 255
    assert np.allclose(s.spec.mean, expected_mean, atol=1e-4)
    assert np.allclose(s.spec.std, (nhwc.reshape(-1, 3) / 255).std(0), atol=1e-4)

    grey = tmp_path / "g.npz"
    x = rng.integers(0, 256, (20, 12, 12), dtype=np.uint8)
    np.savez(
        grey, x_train=x, y_train=np.arange(20) % 2, x_test=x[:4], y_test=np.array([0, 1, 0, 1])
    )
    g = load_dataset(f"npz:{grey}", val_fraction=0.25, seed=2)
    assert g.spec.channels == 1 and g.spec.size == 12 and not g.spec.augment
    assert (len(g.y_train), len(g.y_val), len(g.y_test)) == (15, 5, 4)


def test_npz_malformed(tmp_path: Path) -> None:
    x = np.zeros((4, 8, 8), np.uint8)
    missing = tmp_path / "missing.npz"
    np.savez(missing, x_train=x, y_train=np.arange(4) % 2, x_test=x)
    with pytest.raises(UserError, match="y_test"):
        load_dataset(f"npz:{missing}")
    short = tmp_path / "short.npz"
    np.savez(short, x_train=x, y_train=np.arange(3) % 2, x_test=x, y_test=np.arange(4) % 2)
    with pytest.raises(UserError, match="y_train has 3 labels"):
        load_dataset(f"npz:{short}")
    with pytest.raises(DataNotFoundError, match="nope.npz"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")


# --- image folders -----------------------------------------------------------------------------


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for split, per_class in (("train", 3), ("test", 2)):
        for cls in ("zebra", "ant"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
                written[(split, cls, i)] = arr
    Image.fromarray(np.zeros((14, 14, 3), np.uint8)).save(tmp_path / "train" / "ant" / "big.png")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    s = load_dataset(f"imagefolder:{tmp_path}", val_fraction=0.0)
    _check_layout(s)
    assert s.spec.channels == 3 and s.spec.size == 10 and s.spec.num_classes == 2
    assert s.y_train.tolist() == [0, 0, 0, 0, 1, 1, 1]  # "ant" < "zebra"
    assert s.y_test.tolist() == [0, 0, 1, 1]
    assert torch.equal(
        s.x_train[0], torch.from_numpy(written[("train", "ant", 0)].transpose(2, 0, 1).copy())
    )
    assert torch.equal(s.x_train[3], torch.zeros(3, 10, 10, dtype=torch.uint8))  # big.png, resized


def test_imagefolder_greyscale(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((6, 6), 200 if cls == "a" else 10, np.uint8)).save(
                tmp_path / split / cls / "x.png"
            )
    s = load_dataset(f"imagefolder:{tmp_path}", val_fraction=0.0)
    assert s.spec.channels == 1 and s.x_train.shape == (2, 1, 6, 6)
    assert s.x_test[:, 0, 0, 0].tolist() == [200, 10]
    with pytest.raises(DataNotFoundError):
        load_dataset(f"imagefolder:{tmp_path / 'train'}")


# --- names and errors --------------------------------------------------------------------------


def test_list_datasets() -> None:
    assert list_datasets() == sorted(
        ["cifar10", "cifar100", "mnist", "fashion-mnist", "digits", "mnist-t10k"]
    )


@pytest.mark.parametrize("name", ["imagenet", "cifar", "foo:bar", "npz"])
def test_unknown_name(name: str) -> None:
    with pytest.raises(UnknownNameError) as info:
        load_dataset(name, download=False)
    msg = str(info.value)
    assert "\n" not in msg and repr(name) in msg
    for known in [*list_datasets(), "npz:PATH", "imagefolder:PATH"]:
        assert known in msg


def test_missing_path_after_prefix() -> None:
    with pytest.raises(UserError, match="npz:PATH"):
        load_dataset("npz:")


def test_names_are_case_insensitive() -> None:
    assert load_dataset(" Digits ", download=False).name == "digits"
