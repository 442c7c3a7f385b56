"""``python -m search.run``: create (or resume) a study and run its trials here.

Running it again continues the same study up to ``--trials`` in total. ``--jobs N`` starts N
local worker processes (GPUs assigned round-robin); other machines join with
``python -m search.worker --storage <same URL>``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from models.errors import UserError, cli_main
from models.presets import DEFAULT_PRESET, FALLBACK_PRESET, default_preset, get_preset, list_presets
from objectives.objective import parse_objectives
from objectives.pipeline import Workbench
from search.progress import ProgressDisplay, study_stats
from search.refine import DEFAULT_ETA, DEFAULT_FACTOR, check_options, refine, summary_lines
from search.samplers import SAMPLER_HELP, SAMPLERS, make_sampler
from search.studies import (
    StudyConfig,
    create_or_load,
    new_techniques,
    newer_finetune_keys,
    stored_config,
    study_space,
)
from search.trials import process_seed, retry
from search.worker import (
    BUDGET_ATTR,
    STORAGE_ENV,
    add_worker_args,
    build_objective,
    check_worker_args,
    pick_device,
    thread_share,
    work,
)
from spaces.plan import PER_LAYER_MAX, study_names
from storage.locks import redact
from storage.studies import default_store, new_paths, open_storage, remove_new


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m search.run``."""
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="all", help=f"named study space: {', '.join(study_names())} (default: all)")
    p.add_argument("--trials", type=int, default=200, help="total trials of the study, over all workers (default: 200)")
    p.add_argument("--preset", default=None,
                   help=f"{', '.join(list_presets())} (default: {DEFAULT_PRESET}; {FALLBACK_PRESET} on a machine "
                        f"without CUDA whose --data-dir lacks CIFAR-10)")
    p.add_argument("--dataset", default=None, help="override the preset's dataset (e.g. mnist-t10k, npz:PATH)")
    p.add_argument("--name", default=None, help="Optuna study name (default: <study>-<preset>)")
    p.add_argument("--jobs", type=int, default=1, help="local worker processes (default: 1)")
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS, help=SAMPLER_HELP)
    p.add_argument("--objectives", default="acc,ratio", help="acc,ratio (default) or acc,ratio,bitops")
    p.add_argument("--max-accuracy-drop", type=float, default=None, help="points below the baseline's val accuracy beyond which a trial is infeasible")
    p.add_argument("--max-bytes", type=int, default=None, help="artifact size limit; larger plans are infeasible and not trained")
    p.add_argument("--min-ratio", type=float, default=None, help="compression ratio floor; plans below are infeasible and not trained")
    p.add_argument("--no-early-stopping", action="store_true", help="never stop a trial early")
    p.add_argument("--tune-finetune", action="store_true",
                   help="also search the fine-tune: epochs (1..2x the preset's), optimizer (the preset's SGD or AdamW at a "
                        "constant rate) and its learning rate, distillation from the baseline")
    p.add_argument("--per-layer-max", type=int, default=PER_LAYER_MAX,
                   help=f"models with at most this many conv/linear layers sample each layer's intensity (sparsity, bits, "
                        f"clusters, rank) on its own; 0: one value per technique (default: {PER_LAYER_MAX})")
    p.add_argument("--seed", type=int, default=0, help="seed of the baseline, the splits and the samplers (default: 0)")
    p.add_argument("--wandb", action="store_true", help="log every trial to Weights & Biases (WANDB_MODE=offline works)")
    p.add_argument("--refine", type=int, default=0,
                   help="after the search, refine the top K plans with longer fine-tunes, as python -m search.refine "
                        "--top K does (default: 0, off)")
    p.add_argument("--refine-factor", type=float, default=DEFAULT_FACTOR,
                   help=f"with --refine: last round's fine-tune = factor x the preset's epochs (default: {DEFAULT_FACTOR:g})")
    p.add_argument("--refine-eta", type=int, default=DEFAULT_ETA,
                   help=f"with --refine: successive halving keeps 1/eta of the plans per round (default: {DEFAULT_ETA})")
    add_worker_args(p)
    return p


def study_config(args: argparse.Namespace) -> StudyConfig:
    """The study configuration the arguments describe (validated)."""
    if args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    if args.per_layer_max < 0:
        raise UserError(f"--per-layer-max must be >= 0, got {args.per_layer_max}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    # A constraint no plan can meet makes every trial infeasible: refused, not searched.
    if args.max_bytes is not None and args.max_bytes < 1:
        raise UserError(f"--max-bytes must be >= 1 (an artifact size in bytes), got {args.max_bytes}")
    if args.min_ratio is not None and not (math.isfinite(args.min_ratio) and args.min_ratio > 0):
        raise UserError(f"--min-ratio must be a number > 0 (e.g. 10: ten times smaller), got {args.min_ratio}")
    if args.max_accuracy_drop is not None and not (math.isfinite(args.max_accuracy_drop) and 0 <= args.max_accuracy_drop <= 100):
        raise UserError(f"--max-accuracy-drop must be in 0..100 accuracy points, got {args.max_accuracy_drop}")
    get_preset(args.preset)  # an unknown preset is refused before the storage is opened
    finetune_space = {}
    if args.tune_finetune:
        ft = get_preset(args.preset).finetune
        finetune_space = {"epochs": [1, 2 * ft.epochs], "lr": [ft.lr / 10, ft.lr * 10],
                          "distill_weight": [0.0, 0.9], "distill_temperature": [1.0, 8.0],
                          # Adam's useful rates, around the soft weight-sharing recipe's 5e-4.
                          "adamw_lr": [1e-4, 5e-3]}
    return StudyConfig(
        space=args.study, preset=args.preset, dataset=args.dataset, seed=args.seed,
        objectives=parse_objectives(args.objectives), sampler=args.sampler,
        early_stopping=not args.no_early_stopping, max_bytes=args.max_bytes, min_ratio=args.min_ratio,
        max_accuracy_drop=args.max_accuracy_drop, finetune_space=finetune_space, per_layer_max=args.per_layer_max,
    )


def _die_with_parent() -> None:
    # Linux: a worker gets SIGTERM when the parent dies, even by SIGKILL (no orphans); the
    # worker then records its trial FAIL and re-queues it like any interrupted worker.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(args: argparse.Namespace, name: str, store: str) -> list[subprocess.Popen[bytes]]:
    # The storage URL goes through the environment, not the command line: a password in it
    # would show in every process listing.
    env = {**os.environ, "PARETO_THREADS": str(thread_share(args.jobs)), STORAGE_ENV: args.storage}
    procs = []
    for i in range(args.jobs):
        cmd = [sys.executable, "-m", "search.worker", "--name", name, "--store", store,
               "--data-dir", args.data_dir, "--worker-index", str(i), "--quiet"]
        if args.device:
            cmd += ["--device", args.device]
        if args.sampler_seed is not None:
            cmd += ["--sampler-seed", str(args.sampler_seed + i)]
        # A session of its own: a terminal's Ctrl-C reaches the parent only, which forwards it
        # once (a worker signalled twice would be cut short while it re-queues its trial).
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True,
                                      preexec_fn=_die_with_parent if sys.platform == "linux" else None))
    return procs


def _supervise(procs: list[subprocess.Popen[bytes]], tick: Callable[[], None]) -> None:
    """Wait for the workers, calling ``tick`` every 2 s; SIGTERM/SIGINT are forwarded to every
    worker, which records its trial FAIL and re-queues it; then one line and a non-zero exit."""
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(2.0)
            if not received:
                tick()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if received:
        raise UserError(f"interrupted by {signal.Signals(received[0]).name}: every worker recorded its running "
                        "trial FAIL and re-queued its plan where it had one")
    if any(p.returncode for p in procs):
        raise UserError(f"{sum(1 for p in procs if p.returncode)} of {len(procs)} workers failed (see their messages above)")


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    logging.getLogger("optuna").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    if args.preset is None:  # the default, or digits on a CPU machine without CIFAR-10 (one line says so)
        args.preset, note = default_preset(args.data_dir, args.dataset)
        if note:
            print(note, flush=True)
    config = study_config(args)
    import torch

    torch.set_num_threads(thread_share(1))
    if args.refine < 0:
        raise UserError(f"--refine must be >= 0 (0: off), got {args.refine}")
    # Checked before the search, not after it.
    check_options(max(args.refine, 1), args.refine_factor, args.refine_eta, ("--refine", "--refine-factor", "--refine-eta"))
    seed = process_seed(args.sampler_seed)
    sampler = make_sampler(config.sampler, seed=seed, constraints=config.has_constraints)
    check_worker_args(args, create=True)  # paths and device: one line, before anything is created
    created = new_paths(args.storage)
    storage = open_storage(args.storage, on_stale=retry)
    store = args.store or default_store(args.storage)
    log = None if args.quiet else (lambda s: print(s, flush=True))
    try:
        bench = Workbench.load(config.preset, dataset=config.dataset, data_dir=args.data_dir, store=store,
                               seed=config.seed, device=pick_device(args.device, args.worker_index), log=log)
    except (Exception, KeyboardInterrupt):  # a missing dataset, say: leave no empty storage behind
        remove_new(created, storage)
        raise
    name = args.name or config.default_name()
    study = create_or_load(name, storage, config, bench, sampler)
    given, config = config, stored_config(study)  # what every worker runs (a study older than an option keeps its record)
    study.set_user_attr(BUDGET_ATTR, args.trials)
    print(f"study {name!r} on {redact(args.storage)}: baseline val {bench.record.val_accuracy:.4f}, "
          f"{bench.baseline_bytes} bytes; {study_stats(study, bench.record.val_accuracy).done} trials done", flush=True)
    added = new_techniques(study, study_space(study))  # study_space refuses changed techniques
    if added:
        print(f"note: this study searches the space it was created with; {', '.join(added)} "
              "(newer) go to a new study: pass --name", flush=True)
    older = newer_finetune_keys(config, given)
    if older:
        print(f"note: this study was created before --tune-finetune searched {', '.join(older)}; it resumes "
              "as it was created: pass --name for a new study that searches it", flush=True)
    start = time.perf_counter()
    with ProgressDisplay(study, bench.record.val_accuracy, args.trials) as progress:
        if args.jobs == 1:
            callbacks = [progress.update]
            if args.wandb:
                from search.wandb_log import WandbLogger

                callbacks.append(WandbLogger(name, config.to_dict()))
            work(study, build_objective(study, config, bench, store, log), args.trials, callbacks, sampler_seed=seed, log=log)
        else:
            _supervise(_spawn(args, name, store), progress.update)
    stats = study_stats(study, bench.record.val_accuracy)
    print(stats.line(args.trials))
    if args.refine:
        results = refine(study, build_objective(study, config, bench, store, log), top=args.refine,
                         factor=args.refine_factor, eta=args.refine_eta, log=log)
        print("\n".join(summary_lines(results)), flush=True)
    print(f"finished in {time.perf_counter() - start:.0f} s; browse: python -m search.dashboard --storage {redact(args.storage)}; "
          f"export: python -m search.export --name {name} --storage {redact(args.storage)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
