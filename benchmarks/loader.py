"""Loader and training-step throughput: the device-resident loader against torchvision's DataLoader.

One run measures, on the same 50,000 random uint8 CIFAR-shaped images and the same batch size:

* ``models.loader.DeviceLoader`` (train=True, random crop with reflect padding + horizontal
  flip, normalisation fused into the uint8 -> float conversion), one full epoch;
* ``torch.utils.data.DataLoader`` over a Dataset that makes a PIL image per item and applies the
  usual torchvision transforms (RandomCrop(32, padding=4, padding_mode="reflect"),
  RandomHorizontalFlip, ToTensor, Normalize), with ``num_workers`` 2 and 0, one full epoch each
  (or ``--batches`` batches for every loader alike);
* the training-step throughput (forward + backward + optimizer step, through
  ``models.train.make_optimizer`` and the device loader) of every registered model on its own
  input shape.

``--device cuda`` runs the loader and the model steps on the GPU (bf16 autocast and channels-last,
as ``models.train`` does there); ``--synthetic-resnet18-gpu`` adds a longer ResNet-18 measurement
at batch 512. Both are skipped with a note when CUDA is absent.

Usage::

    python benchmarks/loader.py                      # CPU; writes benchmarks/loader.md
    python benchmarks/loader.py --device cuda --synthetic-resnet18-gpu --out benchmarks/loader-cuda.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.loader import DeviceLoader
from models.registry import create_model, get_model_info
from models.spec import DataSpec
from models.train import TrainConfig, autocast, make_optimizer
from models.tv import import_torchvision

CIFAR_SPEC = DataSpec(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), augment=True)
STEP_MODELS = ("resnet18", "mobilenetv2", "wrn16_4", "lenet300", "lenet5", "digits_cnn")


@dataclass
class Row:
    """One measured line of a table."""

    name: str
    images: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        """Images per second."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timing must not stop before the kernels do)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` random uint8 images (N, C, H, W), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


class PILDataset(torch.utils.data.Dataset):
    """The usual torchvision pipeline: one PIL image per item, transformed on the host."""

    def __init__(self, x_hwc: np.ndarray, y: np.ndarray, transform: object) -> None:
        self.x, self.y, self.transform = x_hwc, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def _consume(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], limit: int | None, device: torch.device) -> tuple[int, float]:
    """Iterate ``batches`` (at most ``limit``); return (images, seconds), creation of the iterator included."""
    start = time.perf_counter()
    images = 0
    for i, (xb, yb) in enumerate(batches):
        if limit is not None and i >= limit:
            break
        images += len(yb)
        if xb.dtype != torch.float32:  # pragma: no cover - a loader bug, not a timing
            raise RuntimeError(f"batch dtype {xb.dtype}")
    synchronize(device)
    return images, time.perf_counter() - start


def bench_device_loader(
    x: torch.Tensor, y: torch.Tensor, batch: int, limit: int | None, device: torch.device, repeats: int = 3
) -> Row:
    """One epoch (or ``limit`` batches) of the device-resident train loader, data already resident.

    An epoch takes well under a second, so it is timed ``repeats`` times and the median reported.
    """
    loader = DeviceLoader(x, y, CIFAR_SPEC, batch, train=True, device=device, seed=0, channels_last=device.type == "cuda")
    _consume(loader, 2, device)  # warm-up: allocator, kernels
    runs = sorted((_consume(loader, limit, device) for _ in range(max(1, repeats))), key=lambda r: r[1])
    images, seconds = runs[len(runs) // 2]
    note = f"median of {len(runs)} epochs" if len(runs) > 1 else ""
    return Row(f"DeviceLoader ({device.type}, augment on device)", images, seconds, note)


def bench_dataloader(x: torch.Tensor, y: torch.Tensor, batch: int, limit: int | None, workers: int) -> Row:
    """One epoch (or ``limit`` batches) of torchvision's DataLoader with PIL transforms, on the CPU."""
    tv = import_torchvision()
    t = tv.transforms
    transform = t.Compose([
        t.RandomCrop(32, padding=4, padding_mode="reflect"),
        t.RandomHorizontalFlip(),
        t.ToTensor(),
        t.Normalize(CIFAR_SPEC.mean, CIFAR_SPEC.std),
    ])
    dataset = PILDataset(x.permute(0, 2, 3, 1).contiguous().numpy(), y.numpy(), transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )
    images, seconds = _consume(loader, limit, torch.device("cpu"))
    return Row(f"torchvision DataLoader + PIL transforms, num_workers={workers}", images, seconds,
               "worker start-up included" if workers else "")


def bench_train_step(name: str, batch: int, warmup: int, steps: int, device: torch.device, bf16_note: bool = True) -> Row:
    """Training-step images/s of model ``name`` on random data of its input shape.

    Each step is what :func:`models.train.train` does: a device-loader batch, forward under the
    device's autocast, cross-entropy, backward, an optimizer step from ``make_optimizer``.
    """
    spec = get_model_info(name).data_spec
    n = batch * (warmup + steps)
    x = random_images(n, spec.channels, spec.size, seed=1)
    y = torch.randint(0, spec.num_classes, (n,), generator=torch.Generator().manual_seed(2))
    cuda = device.type == "cuda"
    loader = DeviceLoader(x, y, spec, batch, train=True, device=device, seed=0, channels_last=cuda)
    torch.manual_seed(0)
    model = create_model(name).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = make_optimizer(model, TrainConfig(batch_size=batch, lr=0.01))
    criterion = nn.CrossEntropyLoss()
    start = 0.0
    images = 0
    for i, (xb, yb) in enumerate(loader):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        with autocast(device):
            loss = criterion(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            images += len(yb)
    synchronize(device)
    seconds = time.perf_counter() - start
    shape = f"{spec.channels}x{spec.size}x{spec.size}"
    precision = "bf16 autocast, channels-last" if cuda else "fp32"
    return Row(f"{name} ({shape}, batch {batch})", images, seconds, f"{steps} timed steps after {warmup} warm-up; {precision}")


def cpu_name() -> str:
    """The CPU's model name (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: torch.device) -> str:
    """One line describing where this ran."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tv = import_torchvision()
    text = (f"{cores} CPU cores ({cpu_name()}), torch {torch.__version__} "
            f"(intra-op threads: {torch.get_num_threads()}), torchvision {tv.__version__}, "
            f"Python {platform.python_version()}")
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def table(rows: list[Row], reference: Row | None = None, ratio_label: str = "ratio") -> list[str]:
    """Markdown table of ``rows`` (images/s, optionally ``reference``'s rate over each row's)."""
    head = ["| what | images | seconds | images/s |" + (f" {ratio_label} |" if reference else "") + " note |"]
    head.append("|---|---:|---:|---:|" + ("---:|" if reference else "") + "---|")
    for r in rows:
        ratio = f" {reference.rate / r.rate:.1f}x |" if reference else ""
        head.append(f"| {r.name} | {r.images:,} | {r.seconds:.2f} | {r.rate:,.0f} |{ratio} {r.note} |")
    return head


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=50_000, help="CIFAR-shaped images in the set (default 50,000)")
    p.add_argument("--batch", type=int, default=512, help="loader batch size (default 512)")
    p.add_argument("--batches", type=int, default=None, help="time this many batches per loader instead of one epoch")
    p.add_argument("--repeats", type=int, default=3, help="DeviceLoader epochs timed; the median is reported")
    p.add_argument("--workers", default="2,0", help="DataLoader num_workers values to measure (default 2,0)")
    p.add_argument("--step-batch", type=int, default=128, help="batch of the training-step measurements")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per model")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model")
    p.add_argument("--models", default=",".join(STEP_MODELS), help="models for the step table ('' for none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of this process (default: torch's, one per core)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (loader and model steps)")
    p.add_argument("--synthetic-resnet18-gpu", action="store_true",
                   help="also measure ResNet-18 bf16 + channels-last training at batch 512 on the GPU")
    p.add_argument("--out", default=None, help="markdown output (default benchmarks/loader.md, -cuda.md on GPU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every measurement, print the markdown report and write it to ``--out``."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    notes: list[str] = []
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        notes.append(f"--device {args.device} requested but CUDA is not available: measured on the CPU instead.")
        device = torch.device("cpu")
    out = Path(args.out or ("benchmarks/loader-cuda.md" if device.type == "cuda" else "benchmarks/loader.md"))
    command = "python benchmarks/loader.py" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))

    load_start = os.getloadavg()[0]
    x = random_images(args.images, 3, 32)
    y = torch.randint(0, 10, (args.images,), generator=torch.Generator().manual_seed(1))
    print(f"loader: {args.images:,} images 3x32x32 uint8, batch {args.batch}", flush=True)
    device_row = bench_device_loader(x, y, args.batch, args.batches, device, args.repeats)
    print(f"  {device_row.name}: {device_row.rate:,.0f} images/s", flush=True)
    loader_rows = [device_row]
    for workers in (int(w) for w in args.workers.split(",") if w.strip()):
        row = bench_dataloader(x, y, args.batch, args.batches, workers)
        print(f"  {row.name}: {row.rate:,.0f} images/s", flush=True)
        loader_rows.append(row)

    step_rows = []
    models = [m for m in args.models.split(",") if m.strip()]
    if models:
        print(f"training steps on {device.type}, batch {args.step_batch}", flush=True)
    for name in models:
        row = bench_train_step(name, args.step_batch, args.warmup, args.steps, device)
        print(f"  {row.name}: {row.rate:,.0f} images/s", flush=True)
        step_rows.append(row)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if max(load_start, os.getloadavg()[0]) > 0.5 * cores:
        notes.append(
            "Other processes were using the cores during this run: every rate is a lower bound. Under "
            "contention torch's multi-threaded ops (intra-op threads > 1) slow down far more than "
            "single-threaded ones; `--threads 1` gives steadier numbers on a shared machine."
        )
    gpu_rows = []
    if args.synthetic_resnet18_gpu:
        if torch.cuda.is_available():
            gpu = device if device.type == "cuda" else torch.device("cuda")
            row = bench_train_step("resnet18", 512, 10, 40, gpu)
            print(f"  GPU {row.name}: {row.rate:,.0f} images/s", flush=True)
            gpu_rows.append(row)
        else:
            notes.append("--synthetic-resnet18-gpu skipped: CUDA is not available on this machine.")

    lines = [
        "# Loader and training-step throughput",
        "",
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine(device)}",
        f"- 1-minute load average at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f}"
        " (other processes on the machine compete for the same cores when this is above ~0.5)",
        f"- data: {args.images:,} random uint8 3x32x32 images, batch {args.batch}, "
        + (f"{args.batches} batches per loader" if args.batches else "one full epoch per loader (last partial batch dropped)"),
        "- both loaders: random crop 32 with reflect padding 4, horizontal flip, normalisation to float32",
        "",
        "## Loaders",
        "",
        *table(loader_rows, device_row, "DeviceLoader / this"),
        "",
    ]
    for row in loader_rows[1:]:
        lines.append(f"- DeviceLoader / {row.name}: **{device_row.rate / row.rate:.1f}x**")
    lines.append("")
    if step_rows:
        lines += [f"## Training steps ({device.type})", "",
                  "forward + backward + optimizer step (SGD, Nesterov) on device-loader batches of random data",
                  "", *table(step_rows), ""]
    if gpu_rows:
        lines += ["## ResNet-18 on the GPU (synthetic CIFAR-shaped data)", "", *table(gpu_rows), ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    report = "\n".join(lines)
    print()
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
