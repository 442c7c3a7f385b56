"""``python -m search.run``: create (or resume) a study and run its trials here.

Running it again continues the same study up to ``--trials`` in total. ``--jobs N`` starts N
local worker processes (GPUs assigned round-robin); other machines join with
``python -m search.worker --storage <same URL>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

from models.errors import UserError, cli_main
from models.presets import DEFAULT_PRESET, list_presets
from objectives.objective import parse_objectives
from objectives.pipeline import Workbench
from search.progress import ProgressDisplay, study_stats
from search.refine import DEFAULT_ETA, DEFAULT_FACTOR, check_options, refine, summary_lines
from search.samplers import SAMPLER_HELP, SAMPLERS, make_sampler
from search.studies import StudyConfig, create_or_load, new_techniques, study_space
from search.worker import (
    BUDGET_ATTR,
    add_worker_args,
    build_objective,
    pick_device,
    work,
)
from spaces.plan import PER_LAYER_MAX, study_names
from storage.studies import default_store, open_storage


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m search.run``."""
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="all", help=f"named study space: {', '.join(study_names())} (default: all)")
    p.add_argument("--trials", type=int, default=200, help="total trials of the study, over all workers (default: 200)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"{', '.join(list_presets())} (default: {DEFAULT_PRESET})")
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
                   help="also search the fine-tune: epochs (1..2x the preset's), learning rate, distillation from the baseline")
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
    finetune_space = {}
    if args.tune_finetune:
        from models.presets import get_preset

        ft = get_preset(args.preset).finetune
        finetune_space = {"epochs": [1, 2 * ft.epochs], "lr": [ft.lr / 10, ft.lr * 10],
                          "distill_weight": [0.0, 0.9], "distill_temperature": [1.0, 8.0]}
    return StudyConfig(
        space=args.study, preset=args.preset, dataset=args.dataset, seed=args.seed,
        objectives=parse_objectives(args.objectives), sampler=args.sampler,
        early_stopping=not args.no_early_stopping, max_bytes=args.max_bytes, min_ratio=args.min_ratio,
        max_accuracy_drop=args.max_accuracy_drop, finetune_space=finetune_space, per_layer_max=args.per_layer_max,
    )


def _spawn(args: argparse.Namespace, name: str, store: str) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "PARETO_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
    procs = []
    for i in range(args.jobs):
        cmd = [sys.executable, "-m", "search.worker", "--name", name, "--storage", args.storage, "--store", store,
               "--data-dir", args.data_dir, "--worker-index", str(i), "--quiet"]
        if args.device:
            cmd += ["--device", args.device]
        procs.append(subprocess.Popen(cmd, env=env))
    return procs


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    logging.getLogger("optuna").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    config = study_config(args)
    if args.refine < 0:
        raise UserError(f"--refine must be >= 0 (0: off), got {args.refine}")
    # Checked before the search, not after it.
    check_options(max(args.refine, 1), args.refine_factor, args.refine_eta, ("--refine", "--refine-factor", "--refine-eta"))
    sampler = make_sampler(config.sampler, seed=config.seed * 1000 + args.worker_index, constraints=config.has_constraints)
    storage = open_storage(args.storage)
    store = args.store or default_store(args.storage)
    log = None if args.quiet else (lambda s: print(s, flush=True))
    bench = Workbench.load(config.preset, dataset=config.dataset, data_dir=args.data_dir, store=store,
                           seed=config.seed, device=pick_device(args.device, args.worker_index), log=log)
    name = args.name or config.default_name()
    study = create_or_load(name, storage, config, bench, sampler)
    study.set_user_attr(BUDGET_ATTR, args.trials)
    print(f"study {name!r} on {args.storage}: baseline val {bench.record.val_accuracy:.4f}, "
          f"{bench.baseline_bytes} bytes; {study_stats(study, bench.record.val_accuracy).done} trials done", flush=True)
    added = new_techniques(study, study_space(study))  # study_space refuses changed techniques
    if added:
        print(f"note: this study searches the space it was created with; {', '.join(added)} "
              "(newer) go to a new study: pass --name", flush=True)
    start = time.perf_counter()
    with ProgressDisplay(study, bench.record.val_accuracy, args.trials) as progress:
        if args.jobs == 1:
            callbacks = [progress.update]
            if args.wandb:
                from search.wandb_log import WandbLogger

                callbacks.append(WandbLogger(name, config.to_dict()))
            work(study, build_objective(study, config, bench, store, log), args.trials, callbacks)
        else:
            procs = _spawn(args, name, store)
            while any(p.poll() is None for p in procs):
                time.sleep(2.0)
                progress.update()
            if any(p.returncode for p in procs):
                raise UserError(f"{sum(1 for p in procs if p.returncode)} of {args.jobs} workers failed (see their messages above)")
    stats = study_stats(study, bench.record.val_accuracy)
    print(stats.line(args.trials))
    if args.refine:
        results = refine(study, build_objective(study, config, bench, store, log), top=args.refine,
                         factor=args.refine_factor, eta=args.refine_eta, log=log)
        print("\n".join(summary_lines(results)), flush=True)
    print(f"finished in {time.perf_counter() - start:.0f} s; browse: python -m search.dashboard --storage {args.storage}; "
          f"export: python -m search.export --name {name} --storage {args.storage}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
