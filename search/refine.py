"""``python -m search.refine``: re-train the most promising plans of a study with longer
fine-tunes (multi-fidelity), in successive-halving rounds, as trials of the same study.

Search trials fine-tune briefly (the preset's budget); a plan's accuracy after a longer
fine-tune is what a user of the exported plan gets. Refinement spends that longer fine-tune on
the plans worth it:

*Which plans.* Candidates are the finished search trials (:func:`objectives.objective.
is_exportable`: COMPLETE, feasible, full budget, not refinement trials). They are ranked by
**hypervolume contribution** in (val_accuracy, compression_ratio), with the reference point and
the log-ratio axis of :func:`search.progress.study_hypervolume`: a front trial's contribution is
HV(front) - HV(front without it). The front (:func:`search.progress.front_trials`) comes first,
largest contribution first; when it holds fewer than ``top`` trials the rest is filled from the
dominated trials by non-domination rank (the front of what is left, then the next, ...), each
rank ordered by its own contributions (:func:`rank`). Ties go to the higher accuracy, then the
higher ratio, then the lower trial number.

*Successive halving* (:func:`schedule`). With ``n = min(top, candidates)`` plans, round ``r``
(0 first) refines ``n // eta**r`` plans; there are ``R`` rounds, the most that keep at least
``eta`` plans in the last one (at least one round). Round ``r`` fine-tunes
``max(1, round(F / eta**(R - 1 - r)))`` epochs, ``F = max(1, round(factor x the preset's
fine-tune epochs))``: the last round trains exactly ``F``. ``top=8, eta=2``: 8 plans at F/4, the
best 4 at F/2, the best 2 at F. After each round the plans are ranked as above by the round's
refined values (feasible refined trials first) and the best go on.

*Trials of the same study.* Each refinement run is a trial enqueued with its parent's params and
the user attributes ``refine_of`` (parent's number), ``fidelity_epochs`` and ``refine_round``
(:mod:`objectives.record`), so any worker (``search.worker``, ``study.optimize``) runs it like a
search trial: the objective trains the parent's recorded plan with ``finetune.epochs`` = the
fidelity and the parent's seed, never stops it early, and uploads its artifact and plan file,
which ``search.apply`` reproduces byte for byte. Refinement trials do not count against the
study's budget (:func:`search.worker.counted`) and never enter the search front. This command
runs the enqueued trials itself until each round's are finished (by it or other workers), then
enqueues the next round. A (parent, fidelity) pair that already has a finished refinement trial
is not run again, so running it twice, or after an interruption, resumes. In the rare case that
another worker takes the last waiting trial just before this process asks for it, Optuna hands
this process a new search trial instead, and it runs that one as a search trial.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from models.errors import UserError, cli_main
from objectives import record
from objectives.objective import Objective, is_exportable, is_feasible, is_refinement
from objectives.pipeline import Workbench
from search.notes import save_trial_note
from search.progress import ACCURACY_FLOOR_POINTS, hypervolume, pareto_indices
from search.samplers import make_sampler
from search.studies import find_study_name, stored_config
from search.trials import (
    Interrupted,
    fail_stale,
    interruptible,
    process_seed,
    retry,
    run_one,
    start,
)
from search.worker import (
    add_study_args,
    add_worker_args,
    build_objective,
    check_worker_args,
    pick_device,
    thread_share,
)
from storage.locks import redact
from storage.studies import default_store, load_study, open_storage

DEFAULT_TOP = 8
DEFAULT_FACTOR = 5.0
DEFAULT_ETA = 2
POLL_SECONDS = 5.0  # while only other workers' refinement trials are running

Point = tuple[float, float]  # (val_accuracy, compression_ratio)


@dataclass(frozen=True)
class Round:
    """One successive-halving round: ``size`` plans fine-tuned ``epochs`` epochs."""

    index: int
    size: int
    epochs: int


@dataclass(frozen=True)
class Refined:
    """A finished refinement trial of a round."""

    parent: int
    trial: int
    epochs: int
    values: tuple[float, ...]
    feasible: bool


@dataclass(frozen=True)
class RoundResult:
    """A round and its refined trials, best first; ``dropped`` names parents whose refinement
    failed."""

    round: Round
    refined: list[Refined]
    dropped: list[int]


def check_options(top: int, factor: float, eta: int,
                  names: tuple[str, str, str] = ("--top", "--factor", "--eta")) -> None:
    """Refuse options successive halving cannot use, in one line naming the option."""
    if top < 1:
        raise UserError(f"{names[0]} must be >= 1, got {top}")
    if not (factor > 0 and math.isfinite(factor)):
        raise UserError(f"{names[1]} must be a number > 0, got {factor}")
    if eta < 2:
        raise UserError(f"{names[2]} must be >= 2, got {eta}")


def final_epochs(factor: float, preset_epochs: int) -> int:
    """Fine-tune epochs of the last round: ``factor`` x the preset's, at least one."""
    return max(1, round(factor * preset_epochs))


def schedule(plans: int, eta: int, final: int) -> list[Round]:
    """The rounds for ``plans`` plans (module docstring): sizes ``plans // eta**r`` while the
    last keeps at least ``eta`` plans (one round at least), epochs growing by ``eta`` per round
    up to ``final``."""
    sizes = [plans]
    while sizes[-1] // eta >= eta:
        sizes.append(sizes[-1] // eta)
    last = len(sizes) - 1
    return [Round(r, n, max(1, round(final / eta ** (last - r)))) for r, n in enumerate(sizes)]


def study_hv(points: Sequence[Point], baseline_accuracy: float) -> float:
    """Hypervolume of (accuracy, ratio) points exactly as :func:`search.progress.
    study_hypervolume` computes it (same reference point, log ratio)."""
    ref = (baseline_accuracy - ACCURACY_FLOOR_POINTS / 100.0, 0.0)
    return hypervolume([(a, math.log(r)) for a, r in points if r > 0], ref)


def contributions(points: Sequence[Point], baseline_accuracy: float) -> list[float]:
    """Hypervolume contribution of each point: HV(all) - HV(all but it)."""
    total = study_hv(points, baseline_accuracy)
    return [total - study_hv([p for j, p in enumerate(points) if j != i], baseline_accuracy)
            for i in range(len(points))]


def rank(points: Sequence[Point], baseline_accuracy: float) -> list[int]:
    """Indices of ``points``, most promising first: by non-domination rank, and within a rank
    by hypervolume contribution to it (ties: higher accuracy, higher ratio, lower index)."""
    remaining, order = list(range(len(points))), []
    while remaining:
        layer = [remaining[i] for i in pareto_indices([points[j] for j in remaining])]
        contrib = contributions([points[j] for j in layer], baseline_accuracy)
        ranked = sorted(zip(contrib, layer, strict=True),
                        key=lambda cj: (-cj[0], -points[cj[1]][0], -points[cj[1]][1], cj[1]))
        order += [j for _, j in ranked]
        taken = set(layer)
        remaining = [j for j in remaining if j not in taken]
    return order


def choose(trials: Sequence[FrozenTrial], top: int, baseline_accuracy: float) -> list[FrozenTrial]:
    """The ``top`` most promising search trials to refine (module docstring)."""
    ok = sorted((t for t in trials if is_exportable(t)), key=lambda t: t.number)
    order = rank([(t.values[0], t.values[1]) for t in ok], baseline_accuracy)
    return [ok[i] for i in order[:top]]


def refinements_of(trials: Sequence[FrozenTrial]) -> dict[tuple[int, int], list[FrozenTrial]]:
    """Refinement trials by (parent number, fidelity epochs), in trial order."""
    out: dict[tuple[int, int], list[FrozenTrial]] = {}
    for t in trials:
        if is_refinement(t) and record.FIDELITY_EPOCHS in t.user_attrs:
            key = (int(t.user_attrs[record.REFINE_OF]), int(t.user_attrs[record.FIDELITY_EPOCHS]))
            out.setdefault(key, []).append(t)
    return out


def best_refinements(trials: Sequence[FrozenTrial]) -> dict[int, FrozenTrial]:
    """For each refined search trial, its finished refinement at the highest fidelity (the
    latest such trial on a tie): what export shows beside it."""
    best: dict[int, FrozenTrial] = {}
    for (parent, epochs), ts in refinements_of(trials).items():
        done = [t for t in ts if t.state == TrialState.COMPLETE and t.values is not None]
        if done:
            current = best.get(parent)
            if current is None or epochs >= int(current.user_attrs[record.FIDELITY_EPOCHS]):
                best[parent] = done[-1]
    return best


def _run_round(study: optuna.Study, objective: Objective, parents: Sequence[FrozenTrial], rnd: Round,
               log: Callable[[str], None], poll_seconds: float) -> dict[int, FrozenTrial]:
    """Enqueue the round's missing refinements, run trials until none of them waits or runs,
    and return each parent's finished refinement."""
    active = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    existing = refinements_of(study.get_trials(deepcopy=False))
    for p in parents:
        if not any(t.state in active for t in existing.get((p.number, rnd.epochs), [])):
            study.enqueue_trial(p.params, user_attrs={record.REFINE_OF: p.number, record.FIDELITY_EPOCHS: rnd.epochs,
                                                      record.REFINE_ROUND: rnd.index})
    keys = {(p.number, rnd.epochs) for p in parents}
    while True:
        mine = [t for k, ts in refinements_of(study.get_trials(deepcopy=False)).items() if k in keys for t in ts]
        if any(t.state == TrialState.WAITING for t in mine):
            with interruptible():
                try:
                    save_trial_note(study, run_one(study, start(study), objective, objective.artifact_store))
                except Interrupted as exc:
                    raise UserError(exc.message("refinement")) from None
        elif any(t.state == TrialState.RUNNING for t in mine):
            # Another worker runs it; a worker that died is failed (and re-queued once) here.
            fail_stale(study)
            time.sleep(poll_seconds)
        else:
            break
    done: dict[int, FrozenTrial] = {}
    for t in mine:
        if t.state == TrialState.COMPLETE and t.values is not None:
            done[int(t.user_attrs[record.REFINE_OF])] = t  # the latest, if several
    for p in parents:
        if p.number not in done:
            failed = [t for t in mine if int(t.user_attrs[record.REFINE_OF]) == p.number]
            reason = (failed[-1].user_attrs.get(record.FAIL_REASON) or "see the log") if failed else "not run"
            log(f"  trial {p.number}: refinement failed, dropped ({str(reason).splitlines()[-1][:200]})")
    return done


def refine(study: optuna.Study, objective: Objective, *, top: int = DEFAULT_TOP, factor: float = DEFAULT_FACTOR,
           eta: int = DEFAULT_ETA, log: Callable[[str], None] | None = None,
           poll_seconds: float = POLL_SECONDS) -> list[RoundResult]:
    """Refine the ``top`` most promising search trials of ``study`` in successive-halving rounds
    (module docstring), running the trials with ``objective``; return the rounds."""
    check_options(top, factor, eta)
    say = log or (lambda _s: None)
    baseline_accuracy = objective.bench.record.val_accuracy
    parents = choose(study.get_trials(deepcopy=False), top, baseline_accuracy)
    if not parents:
        raise UserError(f"study {study.study_name!r} has no finished, feasible search trial to refine; "
                        "run its search first (python -m search.run)")
    final = final_epochs(factor, objective.bench.preset.finetune.epochs)
    results: list[RoundResult] = []
    for rnd in schedule(len(parents), eta, final):
        parents = parents[:rnd.size]
        say(f"refine round {rnd.index}: {len(parents)} plans, {rnd.epochs} fine-tune epochs "
            f"(trials {', '.join(str(p.number) for p in parents)})")
        done = _run_round(study, objective, parents, rnd, say, poll_seconds)
        if not done:
            raise UserError(f"every refinement of round {rnd.index} failed; see the failed trials of study "
                            f"{study.study_name!r} (python -m search.dashboard)")
        by_parent = {p.number: p for p in parents}
        feasible = [n for n in by_parent if n in done and is_feasible(done[n])]
        infeasible = [n for n in by_parent if n in done and not is_feasible(done[n])]
        order = [feasible[i] for i in rank([(done[n].values[0], done[n].values[1]) for n in feasible],
                                           baseline_accuracy)] + infeasible
        refined = [Refined(n, done[n].number, rnd.epochs, tuple(done[n].values), is_feasible(done[n])) for n in order]
        results.append(RoundResult(rnd, refined, [n for n in by_parent if n not in done]))
        for r in refined:
            search = by_parent[r.parent].values
            say(f"  trial {r.parent} -> {r.trial}: val {r.values[0]:.4f} (search {search[0]:.4f}), "
                f"ratio {r.values[1]:.2f}{'' if r.feasible else ' (infeasible)'}")
        parents = [by_parent[n] for n in order]
    return results


def summary_lines(results: Sequence[RoundResult]) -> list[str]:
    """A short text summary of the rounds."""
    lines = []
    for res in results:
        lines.append(f"round {res.round.index}: {len(res.refined)} plans at {res.round.epochs} epochs"
                     + (f" ({len(res.dropped)} failed)" if res.dropped else ""))
        lines += [f"  trial {r.parent:>4} -> {r.trial:>4}  val {r.values[0]:.4f}  ratio {r.values[1]:.2f}"
                  f"{'' if r.feasible else '  infeasible'}" for r in res.refined]
    return lines


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m search.refine``."""
    p = argparse.ArgumentParser(prog="python -m search.refine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p)
    p.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"plans to refine in the first round (default: {DEFAULT_TOP})")
    p.add_argument("--factor", type=float, default=DEFAULT_FACTOR,
                   help=f"last round's fine-tune = factor x the preset's epochs (default: {DEFAULT_FACTOR:g})")
    p.add_argument("--eta", type=int, default=DEFAULT_ETA,
                   help=f"each round keeps 1/eta of the plans and trains eta x the epochs (default: {DEFAULT_ETA})")
    add_worker_args(p)
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    logging.getLogger("optuna").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    check_options(args.top, args.factor, args.eta)
    check_worker_args(args)  # before anything is opened: a mistyped --storage creates nothing
    storage = open_storage(args.storage, create=False, on_stale=retry)
    study = load_study(args.name or find_study_name(storage, args.study, args.preset), storage)
    config = stored_config(study)
    store = args.store or default_store(args.storage)
    torch.set_num_threads(thread_share(1))
    log = None if args.quiet else (lambda s: print(s, flush=True))
    bench = Workbench.load(config.preset, dataset=config.dataset, data_dir=args.data_dir, store=store, seed=config.seed,
                           device=pick_device(args.device, args.worker_index), log=log)
    study.sampler = make_sampler(config.sampler, seed=process_seed(args.sampler_seed), constraints=config.has_constraints)
    results = refine(study, build_objective(study, config, bench, store, log), top=args.top, factor=args.factor,
                     eta=args.eta, log=log)
    print("\n".join(summary_lines(results)))
    print(f"export: python -m search.export --name {study.study_name} --storage {redact(args.storage)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
