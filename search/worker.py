"""``python -m search.worker``: join an existing study from any machine and run trials until the
study's total budget (``--trials`` of ``search.run``, shared by all workers) is spent."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch

from models.errors import UserError, check_folder, cli_main
from models.train import resolve_device
from objectives.objective import Objective
from objectives.pipeline import Workbench
from search.early_stopping import ParetoStopper
from search.notes import save_study_note, save_trial_note
from search.samplers import make_sampler
from search.studies import StudyConfig, find_study_name, stored_config, study_space
from search.trials import process_seed, retry, run_trials
from storage.locks import study_lock
from storage.studies import (
    DEFAULT_STORAGE,
    check_storage,
    default_store,
    load_study,
    open_artifact_store,
    open_storage,
)

BUDGET_ATTR = "total_trials"
STORAGE_ENV = "PARETO_STORAGE"  # the storage URL's default: keeps a password off command lines
THREADS_ENV = "PARETO_THREADS"


def available_cpus() -> int:
    """CPUs this process may use: its affinity (what SLURM and taskset give it), capped by a
    cgroup v2 CPU quota (what Kubernetes' limits set)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def thread_share(local_workers: int) -> int:
    """Torch threads for one of ``local_workers`` workers on this node: ``$PARETO_THREADS`` when
    set (the override), else an equal share of :func:`available_cpus`."""
    raw = os.environ.get(THREADS_ENV)
    if raw is not None:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise UserError(f"{THREADS_ENV}={raw!r} is not a positive integer; unset it or give e.g. {THREADS_ENV}=2")
        return value
    return max(1, available_cpus() // max(1, local_workers))


def pick_device(name: str | None, worker_index: int) -> torch.device:
    """``--device``, else GPUs round-robin by worker index, else CPU."""
    if name:
        return resolve_device(name)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{worker_index % torch.cuda.device_count()}")
    return torch.device("cpu")


def build_objective(study: optuna.Study, config: StudyConfig, bench: Workbench, store: str,
                    log: Callable[[str], None] | None) -> Objective:
    """The objective of a study's trials, as its stored configuration says."""
    return Objective(
        bench,
        study_space(study),
        objectives=config.objectives,
        constraints=config.constraints,
        stopper=ParetoStopper().hook if config.early_stopping else None,
        artifact_store=open_artifact_store(str(Path(store) / "artifacts")),
        finetune_space={k: (v[0], v[1]) for k, v in config.finetune_space.items()} or None,
        seed=config.seed,
        log=log,
    )


def work(study: optuna.Study, objective: Objective, total: int, callbacks: Sequence[Callable[..., Any]] = (), *,
         sampler_seed: int | None = None, log: Callable[[str], None] | None = None) -> None:
    """Run trials until ``total`` hold a slot of the budget (:func:`search.trials.run_trials`:
    an exact total with any number of workers, stale trials redone, signals handled); a trial
    that raises is recorded FAIL (with its error) and the worker goes on, unless several fail in
    a row. Every finished trial gets its dashboard note, and the study's note and charts are
    refreshed when the run ends (:mod:`search.notes`)."""
    run_trials(study, objective, total, study_lock(study._storage, study.study_name), sampler_seed=sampler_seed,
               callbacks=[*callbacks, save_trial_note], store=objective.artifact_store, log=log)
    save_study_note(study, log)


def run_worker(args: argparse.Namespace, study_name: str | None = None, callbacks: Sequence[Callable[..., Any]] = ()) -> optuna.Study:
    """Load the study named by ``args`` and work on it."""
    storage = open_storage(args.storage, create=False, on_stale=retry)
    name = study_name or args.name or find_study_name(storage, args.study, args.preset)
    study = load_study(name, storage)
    config = stored_config(study)
    total = int(study.user_attrs.get(BUDGET_ATTR, 0))
    if args.trials is not None:
        total = args.trials
    store = args.store or default_store(args.storage)
    torch.set_num_threads(thread_share(1))
    log = None if args.quiet else (lambda s: print(s, flush=True))
    bench = Workbench.load(
        config.preset, dataset=config.dataset, data_dir=args.data_dir, store=store, seed=config.seed,
        device=pick_device(args.device, args.worker_index), log=log,
    )
    seed = process_seed(args.sampler_seed)
    study.sampler = make_sampler(config.sampler, seed=seed, constraints=config.has_constraints)
    objective = build_objective(study, config, bench, store, log)
    work(study, objective, total, callbacks, sampler_seed=seed, log=log)
    return study


def check_worker_args(args: argparse.Namespace, *, create: bool = False) -> None:
    """Refuse bad worker options (:func:`add_worker_args`) in one line before anything is opened
    or created: the worker index, the device, the storage URL and its SQLite file (``create``: it
    may be absent), the store (writable: baselines and artifacts go there) and the data folder."""
    if args.worker_index < 0:
        raise UserError(f"--worker-index must be >= 0, got {args.worker_index}")
    pick_device(args.device, args.worker_index)
    check_storage(args.storage, create=create)
    check_folder(args.store or default_store(args.storage), "--store")
    check_folder(args.data_dir, "--data-dir", write=False)


def add_study_args(p: argparse.ArgumentParser) -> None:
    """How a command that joins an existing study finds it (see ``find_study_name``)."""
    p.add_argument("--study", default="all", help="named study space (default: all)")
    p.add_argument("--name", default=None, help="exact Optuna study name (default: the one study of --study/--preset)")
    p.add_argument("--preset", default=None, help="disambiguates when several presets share a space")


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """Options every worker understands."""
    p.add_argument("--storage", default=os.environ.get(STORAGE_ENV, DEFAULT_STORAGE),
                   help=f"study storage URL (default: ${STORAGE_ENV}, else {DEFAULT_STORAGE})")
    p.add_argument("--store", default=None, help="root of baselines/ and artifacts/ (shared on clusters; default: beside the SQLite file, else runs)")
    p.add_argument("--data-dir", default="data", help="where datasets live or are downloaded to (default: data)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPUs round-robin by worker, else CPU)")
    p.add_argument("--worker-index", type=int, default=0, help="this worker's index (picks its GPU)")
    p.add_argument("--sampler-seed", type=int, default=None,
                   help="seed this worker's sampler (default: fresh per process, recorded on each trial; "
                        "workers given the same value sample the same plans)")
    p.add_argument("--quiet", action="store_true", help="no per-trial log lines")


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m search.worker``."""
    p = argparse.ArgumentParser(prog="python -m search.worker", description=__doc__)
    add_study_args(p)
    p.add_argument("--trials", type=int, default=None, help="override the study's total budget")
    add_worker_args(p)
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    logging.getLogger("optuna").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    check_worker_args(args)
    study = run_worker(args)
    print(f"worker {args.worker_index} done: study {study.study_name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
