"""Device-resident data loading.

The whole split lives on the device as uint8 (CIFAR-10's 50k training images are 150 MB), so an
epoch is a ``randperm`` plus one gather per batch: no DataLoader worker processes, no PIL, no
host-to-device copies in the hot loop. Augmentation (random crop with reflect padding, horizontal
flip) is done for the whole batch at once with index arithmetic, and normalisation is fused into
the uint8 -> float conversion.

Data reaches a device only through :func:`place`, which counts every copy it makes
(:func:`transfer_stats`). A tensor :func:`place` returned is *resident* on its device: placing it
again, or building a :class:`DeviceLoader` from it, copies nothing. ``Splits.to(device)`` places
every split once, so a worker that keeps that resident copy (``Workbench.load`` does) builds its
train, validation, calibration and BatchNorm loaders without moving data again.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator

import torch

from models.spec import DataSpec

PAD = 4  # reflect padding of the random crop, as in the usual CIFAR recipe

# Tensors returned by place(), by id. Weak values: an entry dies with its tensor, so a recycled id
# never matches (the lookup also checks identity).
_RESIDENT: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
# Reflect-padded copies of resident training images, by id of the images; dropped with them.
_PADDED: dict[int, torch.Tensor] = {}
_LOCK = threading.Lock()
_COPIES = 0
_BYTES = 0


def is_resident(t: torch.Tensor, device: torch.device | str) -> bool:
    """True when ``t`` is a tensor that :func:`place` returned for ``device``."""
    return _RESIDENT.get(id(t)) is t and t.device == _concrete(torch.device(device))


def _concrete(device: torch.device) -> torch.device:
    """``device`` with the index its tensors report (``cuda`` -> ``cuda:<current>``)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda") and device.index is None:
        return torch.device(device.type, 0)
    return device


def place(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` resident on ``device``: the one way dataset tensors reach a loader's device.

    A tensor already resident there (returned by an earlier ``place``) comes back as is and costs
    nothing. Anything else is one counted copy (:func:`transfer_stats`) of ``t.nbytes`` bytes: a
    host-to-device copy on a GPU. When ``t`` is on ``device`` already (host data for a CPU
    loader) the result aliases its memory and no bytes move, but the copy is counted all the same,
    so that a test on a CPU sees every loader built from non-resident data. The result is
    contiguous; never modify it in place (every loader built from it shares it).
    """
    global _COPIES, _BYTES
    device = torch.device(device)
    if is_resident(t, device):
        return t
    out = t.to(device).contiguous()
    if out is t:
        out = t.detach()  # same memory, a distinct tensor: only this one is marked resident
    with _LOCK:
        _COPIES += 1
        _BYTES += t.nbytes
        _RESIDENT[id(out)] = out
    return out


def transfer_stats() -> tuple[int, int]:
    """``(copies, bytes)`` that :func:`place` has made in this process so far."""
    return _COPIES, _BYTES


def padded_images(x: torch.Tensor) -> torch.Tensor:
    """:func:`reflect_pad` of ``x``, made once per resident ``x`` and reused by every loader."""
    if _RESIDENT.get(id(x)) is not x:
        return reflect_pad(x)
    key = id(x)
    cached = _PADDED.get(key)
    if cached is None:
        cached = reflect_pad(x)
        with _LOCK:
            _PADDED[key] = cached
        weakref.finalize(x, _PADDED.pop, key, None)
    return cached


def reflect_pad(x: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Reflect-pad the last two dims of ``x`` (any dtype, uint8 included) by ``pad`` pixels."""
    h, w = x.shape[-2:]
    rows = _reflect(torch.arange(-pad, h + pad, device=x.device), h)
    cols = _reflect(torch.arange(-pad, w + pad, device=x.device), w)
    return x.index_select(-2, rows).index_select(-1, cols)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map indices in [-PAD, size + PAD) into [0, size) as reflect padding would."""
    index = index.abs()
    return (size - 1) - (size - 1 - index).abs()


def crop_flip_padded(
    padded: torch.Tensor, index: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crops (each image its own offset in [-PAD, PAD]^2) and horizontal flips of
    ``padded[index]``, where ``padded`` was made by :func:`reflect_pad`.

    Images are grouped by (offset, flip): after one sort each of the 162 groups is a contiguous
    run, written by one strided copy, and one ``index_select`` restores the random order. This
    moves each pixel about three times; per-pixel gather indices would move eight bytes of
    index per one-byte pixel.
    """
    n, c = len(index), padded.shape[1]
    h, w = padded.shape[2] - 2 * PAD, padded.shape[3] - 2 * PAD
    dev = padded.device
    side = 2 * PAD + 1
    groups = 2 * side * side
    key = torch.randint(0, groups, (n,), device=dev, generator=generator)
    order = torch.argsort(key)
    counts = torch.bincount(key, minlength=groups).tolist()
    source = padded.index_select(0, index[order])
    grouped = torch.empty((n, c, h, w), dtype=padded.dtype, device=dev)
    start = 0
    for k, count in enumerate(counts):
        if count:
            flip, offset = divmod(k, side * side)
            dy, dx = divmod(offset, side)
            crop = source[start : start + count, :, dy : dy + h, dx : dx + w]
            grouped[start : start + count] = crop.flip(3) if flip else crop
            start += count
    return grouped.index_select(0, torch.argsort(order))


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (reflect pad ``PAD``, same size out) and horizontal flip of a whole batch.

    ``x`` is (B, C, H, W) of any dtype. Each image gets its own offsets and flip.
    """
    return crop_flip_padded(reflect_pad(x), torch.arange(len(x), device=x.device), generator)


class DeviceLoader:
    """Batches of one split, resident on ``device``.

    Args:
        x: uint8 images (N, C, H, W).
        y: int64 labels (N,).
        spec: normalisation (mean/std) and whether to augment.
        batch_size: images per batch.
        train: shuffle each epoch, augment when ``spec.augment``, drop the last partial batch.
        device: where the data and the batches live.
        seed: seeds the shuffling and augmentation generator.
        channels_last: return batches in channels-last memory format (faster convs on GPU).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        spec: DataSpec,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"x must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} images but y has {len(y)} labels")
        if x.shape[1] != spec.channels:
            # mean/std of the wrong length would broadcast silently into wrong batches
            raise ValueError(f"x has {x.shape[1]} channels but the DataSpec has {spec.channels}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.x = place(x, self.device)
        # Augmenting loaders crop from a reflect-padded copy, made once per resident split.
        self.padded = padded_images(self.x) if (train and spec.augment) else None
        self.y = place(y, self.device).to(torch.int64)
        self.batch_size = batch_size
        self.train = train
        self.augment = train and spec.augment
        self.channels_last = channels_last
        std = torch.tensor(spec.std, dtype=torch.float32, device=self.device)
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device)
        # x_float = x_uint8 * scale + shift  ==  (x / 255 - mean) / std
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-mean / std).view(1, -1, 1, 1)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.x)
        if self.train:
            return max(1, n // self.batch_size)
        return -(-n // self.batch_size)

    def normalize(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> normalised float32 batch."""
        out = torch.addcmul(self.shift, xb, self.scale)  # one fused kernel, uint8 in, float32 out
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.train:
            order = torch.randperm(n, device=self.device, generator=self.generator)
            # One permuted (and augmented) copy per epoch: every batch is then a plain slice.
            if self.padded is not None:
                x = crop_flip_padded(self.padded, order, self.generator)
            else:
                x = self.x[order]
            y = self.y[order]
            for start in range(0, max(n - self.batch_size, 0) + 1, self.batch_size):
                yield self.normalize(x[start : start + self.batch_size]), y[start : start + self.batch_size]
        else:
            for start in range(0, n, self.batch_size):
                yield (
                    self.normalize(self.x[start : start + self.batch_size]),
                    self.y[start : start + self.batch_size],
                )
