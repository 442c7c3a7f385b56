"""Record a stopped trial PRUNED or COMPLETE with its partial values? Measured on real studies.

    python benchmarks/stopped_trials.py [--samplers tpe nsga2] [--seeds 0 1 2] [--trials 40]

For each sampler and seed, runs the same digits study (``--study all --preset digits``, early
stopping on) twice with ``python -m search.run``: once recording stopped trials PRUNED (the
default) and once COMPLETE with their partial (accuracy, ratio) values (the hidden
``--stopped-as complete``). Only trials that trained their full budget count towards the
hypervolume in both modes (partial trials are never exportable), so the numbers compare what a
user would export. It also reports how long the two runs sampled the very same plans (the
sampler's seed is the same, so they differ only once the sampler reacts to the stopped trials).
Prints a markdown report and writes it to benchmarks/stopped_trials.md (``--out``). Each run is
one worker process; seconds to tens of seconds per trial on 2 (shared) CPU cores. Studies are
kept in ``--workdir``: a finished one is reused when the script runs again, an interrupted one
is run again from scratch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from search.progress import study_hypervolume  # noqa: E402

MODES = ("pruned", "complete")
TARGETS = (0.90, 0.95)


def _finished(url: str, name: str) -> int:
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return 0
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_study(workdir: Path, seed: int, mode: str, trials: int, sampler: str, store: Path) -> dict[str, Any]:
    """Run one study (or reuse a finished one); return its per-trial hypervolume curve and counts."""
    db = workdir / f"{sampler}-seed{seed}-{mode}.db"
    url = f"sqlite:///{db}"
    name = f"stopped-{mode}-{seed}"
    cmd = [sys.executable, "-m", "search.run", "--study", "all", "--preset", "digits", "--trials", str(trials),
           "--seed", str(seed), "--sampler", sampler, "--stopped-as", mode, "--storage", url,
           "--store", str(store), "--name", name, "--quiet"]
    start = time.perf_counter()
    if db.exists() and _finished(url, name) < trials:
        # An interrupted study is run again from scratch: resuming would restart the sampler's
        # random stream mid-study and break the pairing of the two modes.
        print(f"{db.name}: interrupted study, starting it again", file=sys.stderr, flush=True)
        db.unlink()
    if not db.exists():
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=url)
    baseline = study.user_attrs["baseline"]["val_accuracy"]
    trials_ = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    finished = [t for t in trials_ if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    curve = [study_hypervolume(finished[: n + 1], baseline) for n in range(len(finished))]
    stopped = [t for t in finished if "stopped_at_epoch" in t.user_attrs]
    trial_seconds = [t.user_attrs.get("wall_seconds", 0.0) for t in finished]
    span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    return {
        "sampler": sampler, "params": [t.params for t in finished[:trials]],
        "seed": seed, "mode": mode, "hv_curve": curve, "final_hv": curve[-1] if curve else 0.0,
        "finished": len(finished), "stopped": len(stopped), "wall_s": wall, "study_s": span, "trial_s": sum(trial_seconds),
        "cum_trial_s": [sum(trial_seconds[: n + 1]) for n in range(len(finished))],
        "epochs": sum(t.user_attrs.get("epochs", 0) for t in finished),
        "baseline": baseline,
    }


def first_reaching(curve: list[float], target: float) -> int | None:
    """1-based number of trials after which ``curve`` reaches ``target`` (None: never)."""
    return next((i + 1 for i, v in enumerate(curve) if v >= target - 1e-12), None)


def same_plans(a: dict[str, Any], b: dict[str, Any]) -> int:
    """How many leading trials of two runs sampled identical parameters."""
    return next((i for i, (x, y) in enumerate(zip(a["params"], b["params"], strict=False)) if x != y),
                min(len(a["params"]), len(b["params"])))


def report(results: list[dict[str, Any]], args: argparse.Namespace, total_s: float) -> str:
    """Markdown report."""
    lines = [
        "## Stopped trials: PRUNED or COMPLETE with partial values (`benchmarks/stopped_trials.py`)",
        "",
        f"Command: `python benchmarks/stopped_trials.py --samplers {' '.join(args.samplers)} --seeds "
        f"{' '.join(map(str, args.seeds))} --trials {args.trials}`, {datetime.date.today()}; the studies took "
        f"{sum(r['study_s'] for r in results) / 60:.0f} min in all (this invocation {total_s / 60:.1f} min; finished studies are reused).",
        f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, optuna {optuna.__version__}; "
        "one worker process per study, no GPU.",
        f"Study: `--study all --preset digits --trials {args.trials}`, early stopping on; the hypervolume (HV) is "
        "`search.progress.study_hypervolume` of the exportable trials (full budget, feasible) after each finished trial. "
        "Targets are fractions of the better final HV of the two modes of the same sampler and seed. "
        "Trial time is the sum of the trials' wall times (the machine was shared: compare it loosely). "
        "'same plans' counts the leading trials for which both modes sampled identical parameters.",
        "",
        "| sampler | seed | mode | final HV | stopped / finished | same plans | epochs trained | trial time (s) | "
        + " | ".join(f"trials to {int(100 * x)}%" for x in TARGETS) + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(TARGETS),
    ]
    for sampler in args.samplers:
        for seed in args.seeds:
            pair = [r for r in results if r["seed"] == seed and r["sampler"] == sampler]
            best = max(r["final_hv"] for r in pair)
            same = same_plans(*pair)
            for r in pair:
                reach = [first_reaching(r["hv_curve"], x * best) for x in TARGETS]
                lines.append(
                    f"| {sampler} | {seed} | {r['mode']} | {r['final_hv']:.4f} | {r['stopped']} / {r['finished']} | "
                    f"{same} | {r['epochs']} | {r['trial_s']:.0f} | " + " | ".join(str(n) if n else "never" for n in reach) + " |"
                )
    lines.append("")
    for sampler in args.samplers:
        for mode in MODES:
            rs = [r for r in results if r["mode"] == mode and r["sampler"] == sampler]
            lines.append(
                f"- {sampler}, {mode}: mean final HV {statistics.mean(r['final_hv'] for r in rs):.4f}, "
                f"mean stopped {statistics.mean(r['stopped'] for r in rs):.1f} of {args.trials}, "
                f"mean epochs trained {statistics.mean(r['epochs'] for r in rs):.1f}"
            )
        wins = sum(
            1 for seed in args.seeds
            if next(r for r in results if r["seed"] == seed and r["sampler"] == sampler and r["mode"] == "complete")["final_hv"]
            > next(r for r in results if r["seed"] == seed and r["sampler"] == sampler and r["mode"] == "pruned")["final_hv"]
        )
        lines.append(f"- {sampler}: COMPLETE ends with the higher HV on {wins} of {len(args.seeds)} seeds.")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the comparison and print/write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samplers", nargs="+", default=["tpe", "nsga2"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--workdir", default=None, help="keep (and reuse) the studies here (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "stopped_trials.md"))
    p.add_argument("--json", default=None, help="also write the raw results (per-trial HV curves) here")
    args = p.parse_args()
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for sampler in args.samplers:
            for seed in args.seeds:
                for mode in MODES:
                    r = run_study(work, seed, mode, args.trials, sampler, work / "store")
                    print(f"{sampler} seed {seed} {mode}: final HV {r['final_hv']:.4f}, {r['stopped']} stopped, "
                          f"{r['wall_s']:.0f} s", file=sys.stderr, flush=True)
                    results.append(r)
    text = report(results, args, time.perf_counter() - start)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
