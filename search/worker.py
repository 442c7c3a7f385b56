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
from optuna.trial import TrialState

from models.errors import UserError, cli_main
from models.train import resolve_device
from objectives.objective import Objective, is_refinement
from objectives.pipeline import Workbench
from search.early_stopping import ParetoStopper
from search.samplers import make_sampler
from search.studies import StudyConfig, find_study_name, stored_config, study_space
from storage.studies import (
    DEFAULT_STORAGE,
    default_store,
    load_study,
    open_artifact_store,
    open_storage,
)

MAX_CONSECUTIVE_FAILURES = 5
BUDGET_ATTR = "total_trials"


def pick_device(name: str | None, worker_index: int) -> torch.device:
    """``--device``, else GPUs round-robin by worker index, else CPU."""
    if name:
        return resolve_device(name)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{worker_index % torch.cuda.device_count()}")
    return torch.device("cpu")


def counted(study: optuna.Study) -> int:
    """Trials that count against the budget: finished (complete or stopped) and running search
    trials; refinement trials (``search.refine``) do not count."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if not is_refinement(t))


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


def work(study: optuna.Study, objective: Objective, total: int, callbacks: Sequence[Callable[..., Any]] = ()) -> None:
    """Run trials until ``total`` count against the budget; a trial that raises is recorded FAIL
    (with its error) and the worker goes on, unless several fail in a row."""
    failures = 0

    def note_failure(st: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal failures
        failures = failures + 1 if trial.state == TrialState.FAIL else 0

    while counted(study) < total:
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[note_failure, *callbacks], gc_after_trial=False)
        if failures >= MAX_CONSECUTIVE_FAILURES:
            last = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))[-1]
            reason = last.system_attrs.get("fail_reason", "see the log")
            raise UserError(f"{failures} trials failed in a row; last: {str(reason).splitlines()[-1][:300]}")


def run_worker(args: argparse.Namespace, study_name: str | None = None, callbacks: Sequence[Callable[..., Any]] = ()) -> optuna.Study:
    """Load the study named by ``args`` and work on it."""
    storage = open_storage(args.storage)
    name = study_name or args.name or find_study_name(storage, args.study, args.preset)
    study = load_study(name, storage)
    config = stored_config(study)
    total = int(study.user_attrs.get(BUDGET_ATTR, 0))
    if args.trials is not None:
        total = args.trials
    store = args.store or default_store(args.storage)
    torch.set_num_threads(max(1, int(os.environ.get("PARETO_THREADS", torch.get_num_threads()))))
    log = None if args.quiet else (lambda s: print(s, flush=True))
    bench = Workbench.load(
        config.preset, dataset=config.dataset, data_dir=args.data_dir, store=store, seed=config.seed,
        device=pick_device(args.device, args.worker_index), log=log,
    )
    study.sampler = make_sampler(config.sampler, seed=config.seed * 1000 + args.worker_index, constraints=config.has_constraints)
    objective = build_objective(study, config, bench, store, log)
    work(study, objective, total, callbacks)
    return study


def add_study_args(p: argparse.ArgumentParser) -> None:
    """How a command that joins an existing study finds it (see ``find_study_name``)."""
    p.add_argument("--study", default="all", help="named study space (default: all)")
    p.add_argument("--name", default=None, help="exact Optuna study name (default: the one study of --study/--preset)")
    p.add_argument("--preset", default=None, help="disambiguates when several presets share a space")


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """Options every worker understands."""
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"study storage URL (default: {DEFAULT_STORAGE})")
    p.add_argument("--store", default=None, help="root of baselines/ and artifacts/ (shared on clusters; default: beside the SQLite file, else runs)")
    p.add_argument("--data-dir", default="data", help="where datasets live or are downloaded to (default: data)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPUs round-robin by worker, else CPU)")
    p.add_argument("--worker-index", type=int, default=0, help="this worker's index (seeds its sampler, picks its GPU)")
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
    study = run_worker(args)
    print(f"worker {args.worker_index} done: study {study.study_name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
