"""GPU benchmarks, side by side in one run (under 8 minutes on one H200):

1. **Training throughput.** ResNet-18 (``models.create_model("resnet18")``) trained through
   ``models.train.train`` on the device-resident loader (``models.loader.DeviceLoader``: uint8 data
   on the device, crop/flip/normalise there; bf16 autocast and channels-last on CUDA) against the
   same model and step fed by torchvision's ``DataLoader`` the way a user would otherwise do it:
   RandomCrop(size, padding=4) + RandomHorizontalFlip + Normalize in worker processes, pinned
   memory, a copy to the device per batch. Two such pipelines: a CIFAR10-style dataset (one PIL
   image per item, ``ToTensor``, as ``torchvision.datasets.CIFAR10`` does) and a ``TensorDataset``
   of uint8 tensors with ``transforms.v2`` per item.
2. **Search throughput.** Trials/hour of a ``python -m search.run`` study of the
   ``cifar10-resnet-mini`` preset on synthetic CIFAR data (an ``npz:PATH`` dataset written here),
   ``--jobs 1`` against ``--jobs 4`` on one GPU. The baseline is trained once, in this process,
   before either study is timed, so no figure contains it.
3. **Host-to-device bytes per trial.** A few trials in this process (``Objective`` over a
   ``Workbench``, an in-memory Optuna study), counted by ``models.loader.transfer_stats()``.

The data is synthetic: uint8 3xSxS images, 10 classes (a per-class random template plus noise, so
the models have something to learn), made by this script. Every figure carries a sentence saying
what it includes.

Usage::

    python benchmarks/gpu.py                          # full configuration; needs CUDA
    python benchmarks/gpu.py --tiny --out figures.json  # seconds-long smoke run, CPU or GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: import the repository's packages
    sys.path.insert(0, str(REPO))

from models.datasets import Splits, load_dataset  # noqa: E402
from models.errors import UserError, cli_main  # noqa: E402
from models.registry import create_model  # noqa: E402
from models.spec import DataSpec  # noqa: E402
from models.train import TrainConfig, autocast, make_optimizer, train  # noqa: E402
from models.tv import import_torchvision  # noqa: E402

PRESET = "cifar10-resnet-mini"
CLASSES = 10
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's, as the presets use


@dataclass(frozen=True)
class Config:
    """Sizes of one run (``FULL`` on a GPU, ``TINY`` for CI)."""

    size: int  # image height and width
    train_images: int  # part 1: training images per epoch
    val_images: int  # part 1: validation images (train() validates after every epoch)
    batch: int
    timed_epochs: int  # part 1: epochs timed per pipeline, after a warm-up
    warmup_batches: int  # part 1: torchvision warm-up (starts the persistent workers)
    workers: int  # part 1: DataLoader num_workers
    search_train: int  # part 2: training images in the npz (the preset holds out 10 % for val)
    search_test: int
    study: str  # parts 2 and 3: the named study space
    trials: int
    jobs: tuple[int, int]
    study_timeout: float  # seconds; a study still running then is stopped and counted as is
    transfer_trials: int  # part 3
    threads: int | None = None  # torch intra-op threads here and in the study processes


FULL = Config(
    size=32, train_images=50_000, val_images=1_000, batch=512, timed_epochs=3, warmup_batches=20,
    workers=8, search_train=50_000, search_test=10_000, study="all", trials=20, jobs=(1, 4), study_timeout=140.0,
    transfer_trials=3,
)
TINY = Config(
    size=8, train_images=64, val_images=16, batch=16, timed_epochs=1, warmup_batches=1,
    workers=2, search_train=96, search_test=16, study="pruning", trials=2, jobs=(1, 2), study_timeout=120.0,
    transfer_trials=2, threads=1,  # CI runners are small and shared: one thread per process
)


@dataclass
class Figure:
    """One measured number and what it includes."""

    value: float | int | None
    unit: str
    what: str


# --- data ---------------------------------------------------------------------------------------


def synthetic_cifar(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images (N, 3, size, size) and int64 labels in 0..9: half a per-class random
    template, half noise (learnable, unlike pure noise; the speed does not depend on it)."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(1234).integers(0, 256, (CLASSES, 3, size, size), dtype=np.uint8)
    y = rng.integers(0, CLASSES, n, dtype=np.int64)
    noise = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    return (templates[y] >> 1) + (noise >> 1), y


def write_npz(path: Path, config: Config) -> None:
    """The ``npz:PATH`` dataset of part 2 (arrays x_train, y_train, x_test, y_test)."""
    x_train, y_train = synthetic_cifar(config.search_train, config.size, seed=1)
    x_test, y_test = synthetic_cifar(config.search_test, config.size, seed=2)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


# --- part 1: training throughput ------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work: a timer must not stop before the kernels do."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_resnet18(device: torch.device) -> nn.Module:
    """ResNet-18 with the same initial weights every call, on ``device`` as train() places it."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=CLASSES).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def time_project(x: np.ndarray, y: np.ndarray, config: Config, device: torch.device) -> tuple[Figure, Figure]:
    """ResNet-18 through ``models.train.train``: (images/s of the timed call, median epoch rate)."""
    xv, yv = synthetic_cifar(config.val_images, config.size, seed=3)
    spec = DataSpec(3, config.size, CLASSES, MEAN, STD, augment=True)
    xt, yt, xvt, yvt = (torch.from_numpy(a) for a in (x, y, xv, yv))
    data = Splits(name="synthetic-cifar", spec=spec, x_train=xt, y_train=yt, x_val=xvt, y_val=yvt,
                  x_test=xvt, y_test=yvt)
    recipe = TrainConfig(epochs=1, batch_size=config.batch, lr=0.05, schedule="constant")
    model = fresh_resnet18(device)
    train(model, data, recipe, device=device)  # warm-up: kernels, allocator, autocast caches
    synchronize(device)
    start = time.perf_counter()
    result = train(model, data, recipe.replace(epochs=config.timed_epochs), device=device)
    synchronize(device)
    seconds = time.perf_counter() - start
    per_epoch = result.images / len(result.history)
    epoch_rates = sorted(per_epoch / r.seconds for r in result.history)
    steps = "bf16 autocast, channels-last" if device.type == "cuda" else "fp32 (CPU)"
    total = Figure(
        result.images / seconds, "images/s",
        f"one models.train.train call of {config.timed_epochs} epoch(s) over {len(x):,} images, batch "
        f"{config.batch}, {steps}, after a 1-epoch warm-up call; wall-clock of the whole call: upload "
        "of the uint8 splits, per-epoch shuffle + random crop (reflect pad 4) + flip on the device, "
        f"normalisation, forward/backward/SGD step, and a validation pass over {config.val_images:,} "
        "images after each epoch",
    )
    median = Figure(
        epoch_rates[len(epoch_rates) // 2], "images/s",
        "median over the timed epochs of training images / epoch seconds (an epoch's seconds "
        "include its validation pass; not the upload)",
    )
    return total, median


class PILCifar(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10`` does per item: HWC uint8 -> PIL image -> transform."""

    def __init__(self, x_hwc: np.ndarray, y: np.ndarray, transform: Callable[[Any], torch.Tensor]) -> None:
        self.x, self.y, self.transform = x_hwc, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


class TransformedTensors(torch.utils.data.TensorDataset):
    """A ``TensorDataset`` of uint8 (C, H, W) images with a per-item tensor transform."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(x, y)
        self.transform = transform

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().__getitem__(i)
        return self.transform(x), y


def torchvision_datasets(x: np.ndarray, y: np.ndarray, size: int) -> dict[str, torch.utils.data.Dataset]:
    """The two user pipelines: CIFAR10-style PIL items, and a TensorDataset with transforms.v2."""
    t = import_torchvision().transforms
    from torchvision.transforms import v2  # a submodule: not imported by torchvision itself
    pil = t.Compose([t.RandomCrop(size, padding=4), t.RandomHorizontalFlip(), t.ToTensor(), t.Normalize(MEAN, STD)])
    tensor = v2.Compose([
        v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD),
    ])
    return {
        "pil": PILCifar(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y, pil),
        "tensor": TransformedTensors(torch.from_numpy(x), torch.from_numpy(y), tensor),
    }


def time_torchvision(dataset: torch.utils.data.Dataset, config: Config, device: torch.device) -> float:
    """Images/s of the same training step fed by a torchvision ``DataLoader``.

    The step is models.train.train's: channels-last model and batches and bf16 autocast on CUDA,
    ``make_optimizer``'s SGD, a (constant) LambdaLR step, the loss summed on the device.
    """
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch, shuffle=True, drop_last=True, num_workers=config.workers,
        pin_memory=cuda, persistent_workers=config.workers > 0, generator=torch.Generator().manual_seed(0),
    )
    model = fresh_resnet18(device)
    recipe = TrainConfig(epochs=1, batch_size=config.batch, lr=0.05, schedule="constant")
    optimizer = make_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    criterion = nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), device=device)
    model.train()

    def run(limit: int | None) -> int:
        nonlocal loss_sum
        images = 0
        for i, (xb, yb) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            xb = xb.to(device, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            if cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                loss = criterion(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().float()
            images += len(yb)
        return images

    run(config.warmup_batches)  # starts the persistent workers; kernels and allocator warm up
    synchronize(device)
    start = time.perf_counter()
    images = sum(run(None) for _ in range(config.timed_epochs))
    synchronize(device)
    seconds = time.perf_counter() - start
    float(loss_sum)
    return images / seconds  # the persistent workers stop when the loader is collected


def bench_training(config: Config, device: torch.device, log: Callable[[str], None]) -> dict[str, Figure]:
    """Part 1: the project's loader and loop against torchvision's DataLoader pipelines."""
    x, y = synthetic_cifar(config.train_images, config.size, seed=0)
    log(f"[1/3] ResNet-18 training, {config.train_images:,} synthetic images 3x{config.size}x{config.size}, "
        f"batch {config.batch}, {config.timed_epochs} timed epoch(s) per pipeline")
    project, median = time_project(x, y, config, device)
    log(f"  project (DeviceLoader + models.train.train): {project.value:,.0f} images/s")
    pin = ", pin_memory" if device.type == "cuda" else ""
    common = (
        f"{config.timed_epochs} epoch(s) over {len(x):,} images, batch {config.batch}, after {config.warmup_batches} "
        f"warm-up batch(es) that start the persistent workers; wall-clock of DataLoader(shuffle, "
        f"num_workers={config.workers}{pin}) + copy to the device + the same training step; no "
        "validation pass"
    )
    figures = {"train_img_s_project": project, "train_img_s_project_median_epoch": median}
    whats = {
        "pil": "per item (as torchvision.datasets.CIFAR10): PIL image, RandomCrop(size, padding=4), "
        "RandomHorizontalFlip, ToTensor, Normalize; ",
        "tensor": "TensorDataset of uint8 tensors, per item transforms.v2 RandomCrop(size, padding=4), "
        "RandomHorizontalFlip, ToDtype(float32, scale), Normalize; ",
    }
    for name, dataset in torchvision_datasets(x, y, config.size).items():
        rate = time_torchvision(dataset, config, device)
        log(f"  torchvision DataLoader ({name}): {rate:,.0f} images/s")
        figures[f"train_img_s_torchvision_{name}"] = Figure(rate, "images/s", whats[name] + common)
        figures[f"train_speedup_vs_torchvision_{name}"] = Figure(
            project.value / rate, "x", f"train_img_s_project / train_img_s_torchvision_{name}"
        )
    return figures


# --- part 2: search throughput ---------------------------------------------------------------------


def train_baseline(npz: Path, store: Path, device: torch.device) -> float:
    """Train and cache the preset's baseline on the npz data; seconds taken.

    ``search.run`` finds it in ``store`` under the same key (preset, dataset path, sizes, seed 0,
    budget, code version) and loads it, so the timed studies never train it.
    """
    from models.baseline import load_or_train_baseline
    from models.presets import get_preset

    preset = get_preset(PRESET)
    data = load_dataset(f"npz:{npz}", val_fraction=preset.val_fraction, seed=0)
    start = time.perf_counter()
    model, _ = load_or_train_baseline(preset, data, seed=0, store=store, device=device)
    synchronize(device)
    seconds = time.perf_counter() - start
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the studies run in other processes on the same GPU
    return seconds


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``proc`` and the workers it started (its own process group), TERM then KILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(15.0)
    with contextlib.suppress(ProcessLookupError):  # workers that outlived it, or it itself
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_study(jobs: int, npz: Path, work: Path, config: Config, device: torch.device) -> dict[str, Any]:
    """One ``python -m search.run`` study; its wall-clock and its trials' timestamps."""
    import optuna
    from optuna.trial import TrialState

    url = f"sqlite:///{work / f'jobs{jobs}.db'}"
    cmd = [
        sys.executable, "-m", "search.run", "--study", config.study, "--trials", str(config.trials),
        "--preset", PRESET, "--dataset", f"npz:{npz}", "--storage", url, "--store", str(work / "store"),
        "--jobs", str(jobs), "--no-early-stopping",
    ]
    if device.type == "cuda":
        cmd += ["--device", str(device)]  # every worker on this one GPU (not round-robin)
    log_path = work / f"jobs{jobs}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if config.threads:
        env["OMP_NUM_THREADS"] = str(config.threads)  # search.run's workers take cores // jobs
    start = time.perf_counter()
    with log_path.open("wb") as log_file:
        # Its own session, so that a study past its time can be stopped with all its workers.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(config.study_timeout)
            truncated = False
        except subprocess.TimeoutExpired:
            _stop(proc)
            truncated = True
    wall = time.perf_counter() - start
    output = log_path.read_text(errors="replace")
    if proc.returncode and not truncated:
        tail = "\n".join(output.splitlines()[-15:])
        raise RuntimeError(f"search.run --jobs {jobs} failed (exit {proc.returncode}):\n{tail}")
    names = optuna.get_all_study_names(storage=url)
    trials = optuna.load_study(study_name=names[0], storage=url).get_trials(deepcopy=False) if names else []
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = sum(t.state == TrialState.FAIL for t in trials)
    span = 0.0
    if done:
        first = min(t.datetime_start for t in done if t.datetime_start is not None)
        last = max(t.datetime_complete for t in done if t.datetime_complete is not None)
        span = (last - first).total_seconds()
    return {
        "jobs": jobs, "finished": len(done), "failed": failed, "wall_seconds": wall, "trial_span_seconds": span,
        "truncated": truncated, "baseline_trained_in_study": "training baseline" in output,
        "command": " ".join(cmd),
    }


def bench_search(config: Config, work: Path, npz: Path, device: torch.device,
                 log: Callable[[str], None]) -> tuple[dict[str, Figure], dict[str, Any]]:
    """Part 2: trials/hour of the same study with ``--jobs`` a and b on one device."""
    log(f"[2/3] search.run --preset {PRESET}: {config.trials} trials, --jobs {config.jobs[0]} vs "
        f"{config.jobs[1]}, npz of {config.search_train:,} + {config.search_test:,} synthetic images")
    baseline_seconds = train_baseline(npz, work / "store", device)
    log(f"  baseline trained and cached in {baseline_seconds:.1f} s (outside every figure)")
    runs = []
    for jobs in config.jobs:
        run = run_study(jobs, npz, work, config, device)
        runs.append(run)
        log(f"  --jobs {jobs}: {run['finished']} trials finished in {run['wall_seconds']:.1f} s wall-clock "
            f"({run['trial_span_seconds']:.1f} s first trial start to last end)"
            + (" [stopped at the time limit]" if run["truncated"] else ""))
    figures: dict[str, Figure] = {}
    for run in runs:
        j = run["jobs"]
        if run["finished"] == 0:
            raise RuntimeError(f"search.run --jobs {j} finished no trial in {run['wall_seconds']:.0f} s")
        cut = " (stopped at --study-timeout: the trials finished by then)" if run["truncated"] else ""
        figures[f"search_trials_per_hour_jobs{j}_wall"] = Figure(
            run["finished"] / run["wall_seconds"] * 3600, "trials/h",
            f"finished trials / wall-clock of the whole `python -m search.run --jobs {j}` command{cut}: "
            "process start-up, imports, CUDA init, data load and cached-baseline load in every process, "
            "study creation and the trials (fine-tune at the preset's budget, no early stopping); "
            "baseline training NOT included (trained and cached before)",
        )
        figures[f"search_trials_per_hour_jobs{j}_trials"] = Figure(
            run["finished"] / max(run["trial_span_seconds"], 1e-9) * 3600, "trials/h",
            f"finished trials / (last trial's end - first trial's start) from the study's timestamps, --jobs {j}"
            f"{cut}: the trials alone (sampler and storage included; start-up and baseline NOT included)",
        )
    a, b = config.jobs
    for kind in ("wall", "trials"):
        figures[f"search_speedup_jobs{b}_vs_jobs{a}_{kind}"] = Figure(
            figures[f"search_trials_per_hour_jobs{b}_{kind}"].value / figures[f"search_trials_per_hour_jobs{a}_{kind}"].value,
            "x", f"search_trials_per_hour_jobs{b}_{kind} / search_trials_per_hour_jobs{a}_{kind}",
        )
    figures["search_baseline_train_seconds"] = Figure(
        baseline_seconds, "s", f"training the {PRESET} baseline once on the npz data (in no trials/hour figure)",
    )
    return figures, {"preset": PRESET, "options": f"--study {config.study} --no-early-stopping" + (f" --device {device}" if device.type == "cuda" else ""),
                     "runs": runs}


# --- part 3: host-to-device bytes per trial ------------------------------------------------------


def transfer_counter() -> Callable[[], tuple[int, int]] | None:
    """``models.loader.transfer_stats`` (copies, bytes so far in this process), when it exists."""
    import models.loader

    return getattr(models.loader, "transfer_stats", None)


def bench_transfers(config: Config, work: Path, npz: Path, device: torch.device,
                    log: Callable[[str], None]) -> tuple[dict[str, Figure], dict[str, Any]]:
    """Part 3: bytes copied host -> device by ``Workbench.load`` and by each in-process trial."""
    import optuna

    from objectives.objective import Objective
    from objectives.pipeline import Workbench
    from search.samplers import make_sampler
    from spaces.plan import get_study_space

    stats = transfer_counter()
    log(f"[3/3] host-to-device transfers over {config.transfer_trials} in-process trials of {PRESET}")
    if stats is None:
        log("  models.loader.transfer_stats() does not exist yet: transfers not counted")
    counts: list[tuple[int, int]] = []

    def snap() -> None:
        if stats is not None:
            copies, nbytes = stats()
            counts.append((int(copies), int(nbytes)))

    snap()
    bench = Workbench.load(PRESET, dataset=f"npz:{npz}", store=str(work / "store"), seed=0, device=device)
    snap()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=make_sampler("tpe", seed=0))
    start = time.perf_counter()
    study.optimize(Objective(bench, get_study_space(config.study), seed=0), n_trials=config.transfer_trials,
                   callbacks=[lambda _study, _trial: snap()])
    seconds = time.perf_counter() - start
    figures: dict[str, Figure] = {}
    extra = {"available": stats is not None, "trials": config.transfer_trials, "trial_seconds": seconds,
             "families": [t.user_attrs.get("families") for t in study.trials]}
    if stats is None:
        return figures, extra
    deltas = [(c1 - c0, b1 - b0) for (c0, b0), (c1, b1) in zip(counts, counts[1:], strict=False)]
    setup, first, later = deltas[0], deltas[1], deltas[2:]
    extra["per_trial"] = [{"copies": c, "bytes": b} for c, b in deltas[1:]]
    scope = f"models.loader.transfer_stats() deltas in this process, device {device}"
    if device.type == "cpu":
        scope += " (on a CPU place() aliases host memory: no bytes move, but they are counted)"
    figures["h2d_bytes_workbench_load"] = Figure(setup[1], "bytes", f"{scope}: Workbench.load (data, cached baseline)")
    figures["h2d_copies_workbench_load"] = Figure(setup[0], "copies", f"{scope}: Workbench.load")
    figures["h2d_bytes_first_trial"] = Figure(first[1], "bytes", f"{scope}: the first trial (plan, fine-tune, evaluation)")
    figures["h2d_copies_first_trial"] = Figure(first[0], "copies", f"{scope}: the first trial")
    if later:
        figures["h2d_bytes_per_later_trial"] = Figure(
            sum(b for _, b in later) / len(later), "bytes", f"{scope}: mean over trials 2..{config.transfer_trials}"
        )
        figures["h2d_copies_per_later_trial"] = Figure(
            sum(c for c, _ in later) / len(later), "copies", f"{scope}: mean over trials 2..{config.transfer_trials}"
        )
    return figures, extra


# --- driver --------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    """Where this ran."""
    info = {
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": import_torchvision().__version__, "device": str(device),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(figures: dict[str, Figure]) -> list[str]:
    """A compact aligned table: name, value, unit."""
    width = max(len(k) for k in figures)
    lines = []
    for name, fig in figures.items():
        if fig.value is None:
            value = "n/a"
        elif fig.unit in ("bytes", "copies"):
            value = f"{fig.value:,.0f}"
        elif fig.unit in ("x", "s"):
            value = f"{fig.value:.2f}"
        else:
            value = f"{fig.value:,.0f}"
        lines.append(f"{name:<{width}}  {value:>14}  {fig.unit}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke configuration (CI; CPU or GPU)")
    p.add_argument("--out", default=None, help="also write the figures as JSON to this file (default: stdout only)")
    p.add_argument("--trials", type=int, default=None, help="trials per study (default 20; tiny 2)")
    p.add_argument("--study", default=None,
                   help="study space of parts 2 and 3 (default all; tiny pruning, the cheapest on a CPU)")
    p.add_argument("--workers", type=int, default=None, help="torchvision DataLoader num_workers (default 8; tiny 2)")
    p.add_argument("--study-timeout", type=float, default=None,
                   help="seconds a study may run before it is stopped and counted as is (default 140)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of this process and the study processes (default: torch's; tiny 1)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: training, search, transfers")
    return p.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Run the three measurements, print a table, write JSON to ``--out``."""
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not args.tiny and not cuda:
        raise UserError("no CUDA device: use --tiny (the full configuration is sized for one GPU)")
    config = TINY if args.tiny else FULL
    options = {"trials": args.trials, "workers": args.workers, "study": args.study, "threads": args.threads,
               "study_timeout": args.study_timeout}
    changes = {k: v for k, v in options.items() if v is not None}
    config = replace(config, **changes)
    if config.trials < 1 or config.workers < 0:
        raise UserError(f"--trials must be >= 1 and --workers >= 0, got {config.trials} and {config.workers}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"training", "search", "transfers"}
    if unknown:
        raise UserError(f"--skip {','.join(sorted(unknown))} is not a part; use training, search, transfers")
    device = torch.device("cuda:0" if cuda else "cpu")
    if config.threads:
        torch.set_num_threads(config.threads)

    def log(line: str) -> None:
        print(line, flush=True)

    started = time.perf_counter()
    figures: dict[str, Figure] = {}
    report: dict[str, Any] = {"configuration": "tiny" if args.tiny else "full", "config": asdict(config),
                              "machine": machine(device), "notes": []}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = Path(tmp)
        npz = work / "synthetic-cifar.npz"
        parts = report["part_seconds"] = {}
        if "training" not in skip:
            mark = time.perf_counter()
            figures.update(bench_training(config, device, log))
            parts["training"] = time.perf_counter() - mark
        if not {"search", "transfers"} <= skip:
            write_npz(npz, config)
        if "search" not in skip:
            mark = time.perf_counter()
            search_figures, report["search"] = bench_search(config, work, npz, device, log)
            figures.update(search_figures)
            parts["search"] = time.perf_counter() - mark
        if "transfers" not in skip:
            mark = time.perf_counter()
            transfer_figures, report["transfers"] = bench_transfers(config, work, npz, device, log)
            figures.update(transfer_figures)
            parts["transfers"] = time.perf_counter() - mark
            if not report["transfers"]["available"]:
                report["notes"].append("models.loader.transfer_stats() is not in this tree yet: no transfer figures")
    report["seconds"] = time.perf_counter() - started
    report["figures"] = {k: asdict(v) for k, v in figures.items()}
    print()
    spent = ", ".join(f"{k} {v:.0f} s" for k, v in report["part_seconds"].items())
    print(f"{report['configuration']} configuration on {device}"
          + (f" ({report['machine'].get('gpu')})" if cuda else "") + f", {report['seconds']:.0f} s ({spent})")
    print("\n".join(format_table(figures)))
    for note in report["notes"]:
        print(f"note: {note}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {out} (each with what it includes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
