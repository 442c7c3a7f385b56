"""Device-resident data loading.

The whole split lives on the device as uint8 (CIFAR-10's 50k training images are 150 MB), so an
epoch is a ``randperm`` plus one gather per batch: no DataLoader worker processes, no PIL, no
host-to-device copies in the hot loop. Augmentation (random crop with reflect padding, horizontal
flip) is done for the whole batch at once with index arithmetic, and normalisation is fused into
the uint8 -> float conversion.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from models.spec import DataSpec

PAD = 4  # reflect padding of the random crop, as in the usual CIFAR recipe


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map indices in [-PAD, size + PAD) into [0, size) as reflect padding would."""
    index = index.abs()
    return (size - 1) - (size - 1 - index).abs()


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (reflect pad ``PAD``, same size out) and horizontal flip of a whole batch.

    ``x`` is (B, C, H, W) of any dtype. Each image gets its own offsets and flip. The padding is
    folded into the gather indices, so no padded copy of the batch is ever made.
    """
    b, c, h, w = x.shape
    dev = x.device
    dy = torch.randint(0, 2 * PAD + 1, (b, 1), device=dev, generator=generator) - PAD
    dx = torch.randint(0, 2 * PAD + 1, (b, 1), device=dev, generator=generator) - PAD
    rows = _reflect(dy + torch.arange(h, device=dev), h)  # (B, H)
    cols = _reflect(dx + torch.arange(w, device=dev), w)  # (B, W)
    flip = torch.rand(b, 1, device=dev, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    # Gather rows then columns per image: index (B, C, H, W) built by broadcasting.
    out = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


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
        self.x = x.to(self.device).contiguous()
        self.y = y.to(self.device, torch.int64)
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
        out = torch.addcmul(self.shift, xb.float(), self.scale)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.train:
            order = torch.randperm(n, device=self.device, generator=self.generator)
            stops = range(0, max(n - self.batch_size, 0) + 1, self.batch_size)
            for start in stops:
                idx = order[start : start + self.batch_size]
                xb = self.x[idx]
                if self.augment:
                    xb = random_crop_flip(xb, self.generator)
                yield self.normalize(xb), self.y[idx]
        else:
            for start in range(0, n, self.batch_size):
                yield (
                    self.normalize(self.x[start : start + self.batch_size]),
                    self.y[start : start + self.batch_size],
                )
