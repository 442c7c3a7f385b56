"""Tests of models.loader: batches, normalisation, augmentation against a reference, epochs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.datasets import load_dataset
from models.loader import PAD, DeviceLoader, is_resident, place, random_crop_flip, transfer_stats
from models.spec import DataSpec
from models.train import loaders

CIFAR_SPEC = DataSpec(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), augment=True)
PLAIN_SPEC = DataSpec(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), augment=False)


def _random_images(n: int, seed: int = 0, c: int = 3, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)


def _pattern(size: int = 32) -> torch.Tensor:
    """One 3-channel image asymmetric in both directions: channel 0 encodes the row, channel 1
    the column, channel 2 a position hash, so every crop offset and flip gives a distinct image."""
    r = torch.arange(size).view(-1, 1).expand(size, size)
    c = torch.arange(size).view(1, -1).expand(size, size)
    img = torch.stack([r * 7, c * 7, (r * size + c) * 13 % 251])
    return img.to(torch.uint8)


def _reference_candidates(img: torch.Tensor) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every crop of the reflect-padded image and of its mirror, by (dy, dx, mirrored)."""
    c, h, w = img.shape
    padded = F.pad(img[None].float(), (PAD, PAD, PAD, PAD), mode="reflect")[0]
    mirror = padded.flip(-1)
    out = {}
    for dy in range(-PAD, PAD + 1):
        for dx in range(-PAD, PAD + 1):
            rows = slice(PAD + dy, PAD + dy + h)
            cols = slice(PAD + dx, PAD + dx + w)
            out[(dy, dx, False)] = padded[:, rows, cols].to(torch.uint8)
            out[(dy, dx, True)] = mirror[:, rows, cols].to(torch.uint8)
    return out


def _identify(out: torch.Tensor, img: torch.Tensor) -> list[tuple[int, int, bool]]:
    """The (dy, dx, mirrored) of every reference candidate equal to ``out``."""
    return [k for k, v in _reference_candidates(img).items() if torch.equal(v, out)]


def _denormalize(xb: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """Invert the loader's normalisation back to uint8 (checking it lands on integers)."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    raw = (xb * std + mean) * 255.0
    assert (raw - raw.round()).abs().max() < 1e-3
    return raw.round().clamp(0, 255).to(torch.uint8)


def _normalized(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


# --- shapes, dtypes, normalisation -------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_batch_shapes_and_dtypes(train: bool) -> None:
    x, y = _random_images(100), torch.arange(100) % 10
    loader = DeviceLoader(x, y, CIFAR_SPEC, 32, train=train)
    batches = list(loader)
    assert len(batches) == len(loader)
    for xb, yb in batches[:-1]:
        assert xb.shape == (32, 3, 32, 32) and xb.dtype == torch.float32
        assert yb.shape == (32,) and yb.dtype == torch.int64
        assert xb.device.type == "cpu" and yb.device.type == "cpu"


def test_labels_of_other_int_dtypes_become_int64() -> None:
    x, y = _random_images(10), torch.arange(10, dtype=torch.int32)
    _, yb = next(iter(DeviceLoader(x, y, PLAIN_SPEC, 10, train=False)))
    assert yb.dtype == torch.int64 and torch.equal(yb, torch.arange(10))


def test_normalisation_matches_formula() -> None:
    x, y = _random_images(64), torch.zeros(64, dtype=torch.int64)
    loader = DeviceLoader(x, y, CIFAR_SPEC, 64, train=False)
    xb, _ = next(iter(loader))
    torch.testing.assert_close(xb, _normalized(x, CIFAR_SPEC), atol=1e-5, rtol=1e-5)
    # Extremes: 0 and 255 map to -mean/std and (1 - mean)/std.
    ends = torch.stack([torch.zeros(3, 32, 32), torch.full((3, 32, 32), 255.0)]).to(torch.uint8)
    xb, _ = next(iter(DeviceLoader(ends, torch.zeros(2), CIFAR_SPEC, 2, train=False)))
    mean, std = torch.tensor(CIFAR_SPEC.mean), torch.tensor(CIFAR_SPEC.std)
    torch.testing.assert_close(xb[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(xb[1, :, 0, 0], (1 - mean) / std)


def test_channels_last_batches() -> None:
    x, y = _random_images(8), torch.zeros(8, dtype=torch.int64)
    loader = DeviceLoader(x, y, CIFAR_SPEC, 8, train=True, channels_last=True)
    xb, _ = next(iter(loader))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    xb_eval, _ = next(iter(DeviceLoader(x, y, CIFAR_SPEC, 8, train=False, channels_last=True)))
    assert xb_eval.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(xb_eval, _normalized(x, CIFAR_SPEC), atol=1e-5, rtol=1e-5)


# --- augmentation against a reference ---------------------------------------------------------


def test_reference_candidates_are_distinct_for_the_pattern() -> None:
    # Sanity check of the test itself: the pattern identifies offset and flip uniquely.
    cands = list(_reference_candidates(_pattern()).values())
    assert len(cands) == 2 * (2 * PAD + 1) ** 2
    assert len({c.numpy().tobytes() for c in cands}) == len(cands)


def test_random_crop_flip_matches_reference_on_pattern() -> None:
    img = _pattern()
    batch = img[None].repeat(128, 1, 1, 1)
    out = random_crop_flip(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == torch.uint8
    cands = _reference_candidates(img)
    seen = []
    for i in range(len(out)):
        matches = [k for k, v in cands.items() if torch.equal(v, out[i])]
        assert len(matches) == 1, f"image {i} is not a crop of the padded image or its mirror"
        seen.append(matches[0])
    dys, dxs, flips = {k[0] for k in seen}, {k[1] for k in seen}, {k[2] for k in seen}
    assert flips == {False, True}  # flips really flip, and not always
    assert dys <= set(range(-PAD, PAD + 1)) and dxs <= set(range(-PAD, PAD + 1))
    assert len(dys) >= 5 and len(dxs) >= 5  # offsets vary over the batch
    assert {-PAD, PAD} & dys and {-PAD, PAD} & dxs  # the extremes are reachable


def test_random_crop_flip_matches_reference_on_random_images() -> None:
    x = _random_images(32, seed=1)
    out = random_crop_flip(x, torch.Generator().manual_seed(5))
    for i in range(len(x)):
        assert len(_identify(out[i], x[i])) == 1


def test_random_crop_flip_is_seeded() -> None:
    x = _random_images(16)
    a = random_crop_flip(x, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, torch.Generator().manual_seed(3))
    c = random_crop_flip(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_train_loader_augments_every_image_of_a_batch() -> None:
    # Labels carry the image index, so each output can be traced back to its source.
    n = 96
    x = _random_images(n, seed=2)
    x[: n // 2] = _pattern()  # half the set is the asymmetric pattern
    y = torch.arange(n)
    loader = DeviceLoader(x, y, CIFAR_SPEC, 48, train=True, seed=7)
    seen = []
    for xb, yb in loader:
        raw = _denormalize(xb, CIFAR_SPEC)
        for img, idx in zip(raw, yb.tolist(), strict=True):
            matches = _identify(img, x[idx])
            assert len(matches) == 1, f"output of image {idx} is no crop/flip of it"
            seen.append(matches[0])
    assert len(seen) == n
    assert {k[2] for k in seen} == {False, True}
    assert all(-PAD <= k[0] <= PAD and -PAD <= k[1] <= PAD for k in seen)
    assert len({(k[0], k[1]) for k in seen}) > 10
    assert any(k != (0, 0, False) for k in seen)


@pytest.mark.parametrize(("spec", "train"), [(PLAIN_SPEC, True), (CIFAR_SPEC, False), (PLAIN_SPEC, False)])
def test_no_augmentation_unless_train_and_spec_augment(spec: DataSpec, train: bool) -> None:
    x, y = _random_images(64, seed=3), torch.arange(64)
    loader = DeviceLoader(x, y, spec, 16, train=train, seed=1)
    assert not loader.augment
    for _ in range(2):
        for xb, yb in loader:
            torch.testing.assert_close(xb, _normalized(x[yb], spec), atol=1e-5, rtol=1e-5)


def test_augment_flag() -> None:
    x, y = _random_images(4), torch.arange(4)
    assert DeviceLoader(x, y, CIFAR_SPEC, 2, train=True).augment
    assert not DeviceLoader(x, y, CIFAR_SPEC, 2, train=False).augment
    assert not DeviceLoader(x, y, PLAIN_SPEC, 2, train=True).augment


# --- epochs, shuffling, seeding -----------------------------------------------------------------


def test_train_epoch_covers_each_index_at_most_once_and_drops_last() -> None:
    n, bs = 1000, 64
    loader = DeviceLoader(_random_images(n, size=8, c=1), torch.arange(n), _grey_spec(), bs, train=True)
    assert len(loader) == n // bs
    orders = []
    for _ in range(3):
        labels = [yb for _, yb in loader]
        assert len(labels) == n // bs
        assert all(len(b) == bs for b in labels)  # no partial batch
        order = torch.cat(labels)
        assert len(order) == (n // bs) * bs
        assert len(set(order.tolist())) == len(order)  # no index twice within an epoch
        assert set(order.tolist()) <= set(range(n))
        orders.append(order)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    assert set(orders[0].tolist()) != set(orders[1].tolist())  # a different subset is dropped


def test_train_split_smaller_than_a_batch_gives_one_batch() -> None:
    loader = DeviceLoader(_random_images(10, size=8, c=1), torch.arange(10), _grey_spec(), 64, train=True)
    batches = list(loader)
    assert len(loader) == 1 and len(batches) == 1
    assert sorted(batches[0][1].tolist()) == list(range(10))


def test_same_seed_same_batches_different_seed_different() -> None:
    x, y = _random_images(200, seed=4), torch.arange(200)

    def two_epochs(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = DeviceLoader(x, y, CIFAR_SPEC, 50, train=True, seed=seed)
        return [b for _ in range(2) for b in loader]

    a, b, c = two_epochs(11), two_epochs(11), two_epochs(12)
    assert len(a) == len(b) == 8
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c, strict=True))


def test_eval_loader_keeps_order_and_covers_all() -> None:
    n, bs = 1000, 64
    x, y = _random_images(n, size=8, c=1), torch.arange(n)
    loader = DeviceLoader(x, y, _grey_spec(), bs, train=False)
    assert len(loader) == -(-n // bs) == 16
    for _ in range(2):  # the same every pass
        batches = list(loader)
        assert len(batches) == 16 and len(batches[-1][1]) == n - 15 * bs
        assert torch.equal(torch.cat([yb for _, yb in batches]), y)
        torch.testing.assert_close(torch.cat([xb for xb, _ in batches]), _normalized(x, _grey_spec()))


# --- errors ---------------------------------------------------------------------------------------


def test_errors() -> None:
    x, y = _random_images(10), torch.arange(10)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(x.float(), y, CIFAR_SPEC, 4, train=True)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(x[:, 0], y, CIFAR_SPEC, 4, train=True)  # 3-D
    with pytest.raises(ValueError, match="10 images but y has 9 labels"):
        DeviceLoader(x, y[:9], CIFAR_SPEC, 4, train=True)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(x, y, CIFAR_SPEC, 0, train=False)
    with pytest.raises(ValueError, match="1 channels but the DataSpec has 3"):
        DeviceLoader(x[:, :1].contiguous(), y, CIFAR_SPEC, 4, train=False)


# --- placement: one counted copy per split and device ------------------------------------------


def test_place_counts_host_data_and_not_resident_data() -> None:
    cpu = torch.device("cpu")
    x = _random_images(6)
    copies, nbytes = transfer_stats()
    resident = place(x, cpu)
    assert transfer_stats() == (copies + 1, nbytes + x.nbytes)
    assert is_resident(resident, cpu) and not is_resident(x, cpu)
    assert torch.equal(resident, x) and resident.is_contiguous()
    assert place(resident, cpu) is resident and place(resident, "cpu") is resident
    assert transfer_stats() == (copies + 1, nbytes + x.nbytes)
    place(x, cpu)  # host data again: a second copy, as it would be on a GPU
    assert transfer_stats()[0] == copies + 2
    strided = x.transpose(2, 3)
    assert place(strided, cpu).is_contiguous()


def test_loaders_of_resident_data_copy_nothing_and_share_the_padded_copy() -> None:
    cpu = torch.device("cpu")
    x, y = place(_random_images(20), cpu), place(torch.arange(20), cpu)
    before = transfer_stats()
    a = DeviceLoader(x, y, CIFAR_SPEC, 4, train=True, seed=0)
    b = DeviceLoader(x, y, CIFAR_SPEC, 4, train=True, seed=1)
    assert transfer_stats() == before
    assert a.x is x and a.padded is not None and a.padded is b.padded
    # Host data: counted, and each loader pads its own copy.
    host = _random_images(20)
    c = DeviceLoader(host, torch.arange(20), CIFAR_SPEC, 4, train=True)
    d = DeviceLoader(host, torch.arange(20), CIFAR_SPEC, 4, train=True)
    assert transfer_stats()[0] == before[0] + 4
    assert c.padded is not None and d.padded is not None and c.padded is not d.padded


# --- real data: the train loader sees train images only ----------------------------------------


def test_digits_loaders_hold_no_val_or_test_images() -> None:
    data = load_dataset("digits", val_fraction=0.15, seed=0)
    train_loader, val_loader = loaders(data, 64, torch.device("cpu"), seed=0)
    val_bytes = {img.numpy().tobytes() for img in data.x_val}
    test_bytes = {img.numpy().tobytes() for img in data.x_test}
    train_bytes = {img.numpy().tobytes() for img in data.x_train}
    # What the train loader yields over an epoch, turned back into uint8 images.
    served = [
        img.numpy().tobytes()
        for xb, _ in train_loader
        for img in _denormalize(xb, data.spec)
    ]
    assert len(served) == len(train_loader) * 64 == (len(data.x_train) // 64) * 64
    assert len(set(served)) == len(served)
    assert set(served) <= train_bytes
    assert not set(served) & val_bytes and not set(served) & test_bytes
    assert not train_bytes & val_bytes and not train_bytes & test_bytes
    # The validation loader serves exactly the validation split, in order.
    served_val = [img.numpy().tobytes() for xb, _ in val_loader for img in _denormalize(xb, data.spec)]
    assert served_val == [img.numpy().tobytes() for img in data.x_val]


def _grey_spec() -> DataSpec:
    return DataSpec(1, 8, 10, (0.5,), (0.25,), augment=False)
