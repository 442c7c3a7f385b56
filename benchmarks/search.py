"""Search quality against cost: hypervolume against epochs spent and against wall-clock.

Three configurations of the real ``python -m search.run`` on the ``digits`` preset (``--study
all``, accuracy and compression ratio), each with several seeds (the seed sets the baseline, the
validation split and the sampler):

* ``tpe+es``: the default, TPE (multivariate, grouped, constant liar) with multi-objective early
  stopping;
* ``tpe``: the same sampler with ``--no-early-stopping``;
* ``random``: ``--sampler random`` with ``--no-early-stopping`` (the plain reference: every trial
  fine-tunes its full budget).

Each run is its own SQLite study under ``--out``; all share one ``--store`` so that the digits
baseline of a seed is trained once (before any run starts, so its time is never counted). From the
stored trials the script computes, for the first n finished (complete or stopped) trials, the
hypervolume of ``search.progress.study_hypervolume`` (fixed reference point: accuracy floor =
baseline validation accuracy - 10 points, ratio 1, log ratio axis), the cumulative fine-tune
epochs (a stopped trial spent ``len(curve)`` epochs, an untrained or infeasible one 0) and the
cumulative wall-clock seconds (``datetime_complete`` of the n-th trial minus ``datetime_start``
of the first: sampler and storage overhead included, baseline training not).

It writes a markdown report (``--md``, default ``benchmarks/search.md``), a PNG (``--png``,
default ``benchmarks/search_hv.png``: HV against epochs, wall-clock and trials, the mean over
seeds with min-max bands) and the raw curves as JSON under ``--out``. Running it again resumes
unfinished studies (``search.run`` continues a study up to ``--trials``); ``--analyze-only``
only rebuilds the report from the studies already under ``--out``.

The report also replays stopping-rule variants (the rule in ``search.early_stopping`` as the code
has it, with other parameters, the previous rule, and an oracle bound) over the recorded curves of
the runs without early stopping: cheap, no training.

Usage::

    python benchmarks/search.py --out /tmp/searchbench                  # full: 3 configs x 3 seeds x 200 trials
    python benchmarks/search.py --trials 20 --seeds 1 --out /tmp/sb \\
        --md /tmp/sb/search.md --png /tmp/sb/search_hv.png             # smoke run, a minute or two
    python benchmarks/search.py --out /tmp/searchbench --analyze-only       # rebuild the report
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESET = "digits"
STUDY = "all"
SAVING_GOAL = 0.30


@dataclass(frozen=True)
class Config:
    """One searched configuration."""

    key: str
    label: str
    args: tuple[str, ...]


CONFIGS = (
    Config("tpe+es", "TPE + early stopping (default)", ()),
    Config("tpe", "TPE, no early stopping", ("--no-early-stopping",)),
    Config("random", "random, no early stopping", ("--sampler", "random", "--no-early-stopping")),
)
BY_KEY = {c.key: c for c in CONFIGS}
DEFAULT_CONFIGS = ",".join(c.key for c in CONFIGS)


@dataclass
class RunCurve:
    """Per-trial cumulative measurements of one run (index i = after i+1 finished trials)."""

    config: str
    seed: int
    baseline_val: float
    hv: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    trial_seconds: float = 0.0  # sum of the trials' own wall_seconds (objective time)
    stopped: int = 0
    infeasible: int = 0
    failed: int = 0
    run_seconds: float | None = None
    load_before: float | None = None
    load_after: float | None = None
    t_first: str | None = None
    t_last: str | None = None
    per_trial: list[tuple[int, float]] = field(default_factory=list)  # (epochs, objective seconds)

    @property
    def n(self) -> int:
        return len(self.hv)


def study_name(config: str, seed: int) -> str:
    return f"bench-{config.replace('+', '-')}-s{seed}"


def storage_url(out: Path, config: str, seed: int) -> str:
    return f"sqlite:///{(out / 'studies' / f'{study_name(config, seed)}.db').resolve()}"


def run_command(out: Path, config: Config, seed: int, trials: int) -> list[str]:
    """The ``search.run`` command of one run."""
    return [
        sys.executable,
        "-m",
        "search.run",
        "--preset",
        PRESET,
        "--study",
        STUDY,
        "--trials",
        str(trials),
        "--seed",
        str(seed),
        "--name",
        study_name(config.key, seed),
        "--storage",
        storage_url(out, config.key, seed),
        "--store",
        str((out / "store").resolve()),
        "--quiet",
        *config.args,
    ]


def train_baselines(out: Path, seeds: list[int]) -> dict[int, float]:
    """Train (or load) the digits baseline of each seed in the shared store, before any run."""
    from objectives.pipeline import Workbench

    accs = {}
    for seed in seeds:
        t0 = time.perf_counter()
        bench = Workbench.load(PRESET, store=str((out / "store").resolve()), seed=seed)
        accs[seed] = bench.record.val_accuracy
        print(
            f"baseline seed {seed}: val {bench.record.val_accuracy:.4f} ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return accs


def run_one(
    out: Path, config: Config, seed: int, trials: int, threads: int
) -> dict[str, float | int | str] | None:
    """Run (or resume) one study to ``trials`` in a subprocess; its output goes to a log file.
    None when the study is already complete (its recorded run metadata stays)."""
    if finished_trials(out, config.key, seed) >= trials:
        print(f"complete already: {config.key} seed {seed}", flush=True)
        return None
    cmd = run_command(out, config, seed, trials)
    log = out / "logs" / f"{study_name(config.key, seed)}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load_before = os.getloadavg()[0]
    code = code_fingerprint()
    t0 = time.perf_counter()
    print(
        f"[{dt.datetime.now():%H:%M:%S}] start {config.key} seed {seed} ({trials} trials)",
        flush=True,
    )
    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    print(
        f"[{dt.datetime.now():%H:%M:%S}] done  {config.key} seed {seed}: rc {rc}, {seconds:.0f} s"
        f" (load {load_before:.1f} -> {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    if rc != 0:
        raise RuntimeError(f"{config.key} seed {seed} failed (rc {rc}); see {log}")
    return {
        "rc": rc,
        "seconds": seconds,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "code": code,
    }


CODE_PACKAGES = ("models", "spaces", "storage", "objectives", "search")


def code_fingerprint() -> str:
    """A short hash of every module of the packages a run imports (other work may edit the tree
    while the benchmark runs: runs with different fingerprints ran different code)."""
    import hashlib

    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def finished_trials(out: Path, config: str, seed: int) -> int:
    """Complete or stopped trials already in a run's study (0 when there is none)."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(
            study_name=study_name(config, seed), storage=storage_url(out, config, seed)
        )
    except KeyError:
        return 0
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def trial_epochs(t) -> int:  # noqa: ANN001 - FrozenTrial
    """Fine-tune epochs a trial spent: recorded ``epochs``, else its curve's length, else 0."""
    if "epochs" in t.user_attrs:
        return int(t.user_attrs["epochs"])
    if "curve" in t.user_attrs:
        return len(t.user_attrs["curve"])
    return 0


def measure(out: Path, config: str, seed: int, max_trials: int) -> RunCurve:
    """The cumulative HV / epochs / wall-clock curve of one stored run."""
    import optuna
    from optuna.trial import TrialState

    from objectives.objective import is_feasible
    from search.progress import study_hypervolume

    study = optuna.load_study(
        study_name=study_name(config, seed), storage=storage_url(out, config, seed)
    )
    base = float(study.user_attrs["baseline"]["val_accuracy"])
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    curve = RunCurve(config, seed, base)
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    if not starts:
        return curve
    t0 = min(starts)
    curve.t_first = f"{t0:%Y-%m-%d %H:%M}"
    finished, epochs = [], 0
    for t in trials:
        if t.state == TrialState.FAIL:
            curve.failed += 1
            epochs += trial_epochs(t)
            continue
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        if len(finished) >= max_trials:
            break
        finished.append(t)
        epochs += trial_epochs(t)
        curve.trial_seconds += float(t.user_attrs.get("wall_seconds", 0.0))
        curve.per_trial.append((trial_epochs(t), float(t.user_attrs.get("wall_seconds", 0.0))))
        curve.stopped += t.state == TrialState.PRUNED or "stopped_at_epoch" in t.user_attrs
        curve.infeasible += t.state == TrialState.COMPLETE and not is_feasible(t)
        curve.hv.append(study_hypervolume(finished, base))
        curve.epochs.append(epochs)
        curve.wall.append((t.datetime_complete - t0).total_seconds())
        curve.t_last = f"{t.datetime_complete:%Y-%m-%d %H:%M}"
    return curve


# ---------------------------------------------------------------------------------------------
# statistics over seeds


def at(curve: RunCurve, n: int) -> float | None:
    """HV after ``n`` finished trials (None when the run is shorter)."""
    return curve.hv[n - 1] if curve.n >= n else None


def step_value(xs: list[float], ys: list[float], x: float) -> float:
    """The step function through (xs, ys) at ``x`` (0 before the first point)."""
    i = int(np.searchsorted(np.asarray(xs), x, side="right")) - 1
    return ys[i] if i >= 0 else 0.0


def mean_curve(
    curves: list[RunCurve], axis: str, points: int = 400
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over seeds of HV on a common grid of ``axis`` (epochs, wall or trials),
    up to the longest run's end; a run that ended earlier stays at its final HV (what that budget
    bought), so the mean reaches the mean of the final HVs exactly at the longest run's end."""
    xs_per = [list(range(1, c.n + 1)) if axis == "trials" else getattr(c, axis) for c in curves]
    end = max(x[-1] for x in xs_per)
    grid = np.linspace(0.0, end, points)
    ys = np.array(
        [[step_value(x, c.hv, g) for g in grid] for x, c in zip(xs_per, curves, strict=True)]
    )
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def cost_to_reach(curve: RunCurve, target: float, axis: str = "epochs") -> float | None:
    """Cumulative epochs (or wall seconds) at the first trial whose HV >= ``target``."""
    for i, h in enumerate(curve.hv):
        if h >= target - 1e-12:
            return float(getattr(curve, axis)[i])
    return None


def mean_cost_to_reach(curves: list[RunCurve], target: float, axis: str = "epochs") -> float | None:
    """Where the mean-over-seeds HV curve first reaches ``target`` (None if it does not)."""
    grid, mean, _, _ = mean_curve(curves, axis, points=4000)
    hit = np.nonzero(mean >= target - 1e-12)[0]
    return float(grid[hit[0]]) if hit.size else None


def ms(values: list[float | None], fmt: str = "{:.4f}") -> str:
    """``mean ± std`` (sample std over seeds) of the values that exist."""
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(float(np.mean(v)))} ± {fmt.format(float(np.std(v, ddof=1)))}"


def mean_std(values: list[float | None]) -> tuple[float | None, float]:
    v = [x for x in values if x is not None]
    if not v:
        return None, 0.0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# replay of stopping rules on the curves of runs without early stopping


@dataclass(frozen=True)
class ReplayRule:
    """A stopping rule to replay.

    ``estimator`` "current" replays the rule in ``search.early_stopping`` as the code has it now
    (``headroom(gains_after(...), accuracy, StopRule(**params))``), with ``params`` overriding
    ``StopRule`` fields; "max" is the rule the tree had until 2026-11-23 11:43 (the largest
    remaining gain of the family's >= ``min_curves`` finished curves, else of all when there are
    >= 2 x ``min_curves``), "q90" the same with the 90th percentile; "oracle" knows each trial's
    final accuracy and stops after epoch 1 every trial that a finished one dominates.
    """

    name: str
    min_curves: int = 5
    margin: float = 0.0
    estimator: str = "max"
    params: tuple[tuple[str, float], ...] = ()


REPLAY_RULES = (
    ReplayRule("current rule (StopRule() defaults)", estimator="current"),
    ReplayRule("current rule, quantile 0.75", estimator="current", params=(("quantile", 0.75),)),
    ReplayRule("current rule, quantile 0.8", estimator="current", params=(("quantile", 0.8),)),
    ReplayRule("current rule, window 0.02", estimator="current", params=(("window", 0.02),)),
    ReplayRule("current rule, min_curves 5", estimator="current", params=(("min_curves", 5),)),
    ReplayRule("current rule, margin 0.01", estimator="current", params=(("margin", 0.01),)),
    ReplayRule("previous rule (until 11:43): max gain, min_curves 5 (the measured runs above)"),
    ReplayRule("previous rule, min_curves 2", min_curves=2),
    ReplayRule("previous rule, 90th-percentile gain", estimator="q90"),
    ReplayRule(
        "bound: an oracle that stops after epoch 1 every trial a finished one dominates",
        estimator="oracle",
    ),
)


def _current_headroom(
    rule: ReplayRule, finished: list, epoch: int, acc: float
) -> tuple[float | None, float]:  # noqa: ANN001
    """Headroom and margin of the rule in ``search.early_stopping`` today."""
    from search import early_stopping as es

    stop_rule = es.StopRule(**dict(rule.params))
    return es.headroom(es.gains_after(finished, epoch), acc, stop_rule), stop_rule.margin


def _headroom(
    rule: ReplayRule, finished: list, family: str, epoch: int, acc: float
) -> float | None:  # noqa: ANN001
    def est(curves: list[list[float]]) -> float | None:
        gains = [c[-1] - c[epoch - 1] for c in curves if len(c) > epoch]
        if not gains:
            return None
        return float(np.quantile(gains, 0.9)) if rule.estimator == "q90" else max(gains)

    own = [t.user_attrs["curve"] for t in finished if t.user_attrs.get("families") == family]
    if len(own) >= rule.min_curves:
        return est(own)
    pooled = [t.user_attrs["curve"] for t in finished]
    return est(pooled) if len(pooled) >= 2 * rule.min_curves else None


def replay(
    out: Path, config: str, seed: int, max_trials: int, rule: ReplayRule
) -> dict[str, float]:
    """Replay ``rule`` over the trials of a run without early stopping, in their order: a trial the
    rule would have stopped after epoch e spends e epochs and drops out of the front. (The sampler
    is not replayed: in a real run it would see the stopped trials and propose others.)"""
    import optuna
    from optuna.trial import TrialState

    from objectives.objective import is_feasible
    from search.progress import front_trials, study_hypervolume

    study = optuna.load_study(
        study_name=study_name(config, seed), storage=storage_url(out, config, seed)
    )
    base = float(study.user_attrs["baseline"]["val_accuracy"])
    base_bytes = float(study.user_attrs["baseline"]["bytes"])
    trials = [
        t
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        if t.state == TrialState.COMPLETE
    ][:max_trials]
    kept, epochs, full_epochs, stopped, lost_front = [], 0, 0, 0, 0
    full_front = {t.number for t in front_trials(trials)}
    for t in trials:
        curve = t.user_attrs.get("curve") or []
        full_epochs += len(curve)
        if not curve:
            kept.append(t)
            continue
        ratio = base_bytes / float(t.user_attrs.get("predicted_bytes", t.user_attrs.get("bytes")))
        stop_at = None
        for e in range(1, len(curve)):
            fin = [
                k
                for k in kept
                if k.values is not None and is_feasible(k) and "curve" in k.user_attrs
            ]
            better = [k.values[0] for k in fin if k.values[1] >= ratio]
            if not better:
                continue
            if rule.estimator == "oracle":  # knows the final accuracy: stops after epoch 1 or never
                if max(better) > t.values[0]:
                    stop_at = e
                break
            if rule.estimator == "current":
                room, margin = _current_headroom(rule, fin, e, curve[e - 1])
            else:
                room, margin = (
                    _headroom(rule, fin, t.user_attrs.get("families"), e, curve[e - 1]),
                    rule.margin,
                )
            if room is not None and max(better) > curve[e - 1] + room + margin:
                stop_at = e
                break
        if stop_at is None:
            epochs += len(curve)
            kept.append(t)
        else:
            epochs += stop_at
            stopped += 1
            lost_front += t.number in full_front
    return {
        "hv": study_hypervolume(kept, base),
        "hv_full": study_hypervolume(trials, base),
        "epochs": epochs,
        "full_epochs": full_epochs,
        "stopped": stopped,
        "lost_front": lost_front,
        "trials": len(trials),
    }


def replay_table(out: Path, seeds: list[int], max_trials: int) -> list[str]:
    """Markdown lines: every replay rule over the no-early-stopping TPE runs."""
    lines = [
        "| rule (replayed) | epochs saved | HV after replay (full run's HV) | stopped trials | of them on the full run's front |",
        "|---|---|---|---|---|",
    ]
    for rule in REPLAY_RULES:
        rs = [replay(out, "tpe", s, max_trials, rule) for s in seeds]
        saved = [1 - r["epochs"] / r["full_epochs"] for r in rs if r["full_epochs"]]
        lines.append(
            f"| {rule.name} | {ms([100 * x for x in saved], '{:.1f}')} % | {ms([r['hv'] for r in rs])} "
            f"({ms([r['hv_full'] for r in rs])}) | {ms([r['stopped'] for r in rs], '{:.1f}')} | "
            f"{ms([r['lost_front'] for r in rs], '{:.1f}')} |"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# report


def es_vs_noes(es_all: list[RunCurve], noes_all: list[RunCurve]) -> dict[str, object] | None:
    """Epochs saved by an early-stopping configuration against TPE without, on their common seeds."""
    seeds = {c.seed for c in es_all if c.n} & {c.seed for c in noes_all if c.n}
    es = [c for c in es_all if c.seed in seeds]
    noes = [c for c in noes_all if c.seed in seeds]
    if not es:
        return None
    m_es, s_es = mean_std([c.hv[-1] for c in es])
    m_no, s_no = mean_std([c.hv[-1] for c in noes])
    spread = max(s_es, s_no)
    target = min(m_es, m_no)
    e_es, e_no = mean_cost_to_reach(es, target), mean_cost_to_reach(noes, target)
    w_es, w_no = mean_cost_to_reach(es, target, "wall"), mean_cost_to_reach(noes, target, "wall")
    equal = m_es >= m_no - spread
    saving = 1.0 - e_es / e_no if e_es is not None and e_no else None
    tot_es = float(np.mean([c.epochs[-1] for c in es]))
    tot_no = float(np.mean([c.epochs[-1] for c in noes]))
    per_seed = []
    for a in sorted(es, key=lambda c: c.seed):
        b = next(c for c in noes if c.seed == a.seed)
        t = min(a.hv[-1], b.hv[-1])
        ea, eb = cost_to_reach(a, t), cost_to_reach(b, t)
        wa, wb = cost_to_reach(a, t, "wall"), cost_to_reach(b, t, "wall")
        per_seed.append(
            {
                "seed": a.seed,
                "hv_es": a.hv[-1],
                "hv_noes": b.hv[-1],
                "target": t,
                "epochs_es": ea,
                "epochs_noes": eb,
                "wall_es": wa,
                "wall_noes": wb,
                "saving": 1.0 - ea / eb if ea is not None and eb else None,
                "epochs_es_to_noes_final": cost_to_reach(a, b.hv[-1]),
            }
        )
    paired = [p["saving"] for p in per_seed if p["saving"] is not None]
    paired_wall = [
        1.0 - p["wall_es"] / p["wall_noes"] for p in per_seed if p["wall_es"] and p["wall_noes"]
    ]
    return {
        "paired_saving": mean_std(paired),
        "paired_wall_saving": mean_std(paired_wall),
        "seeds": sorted(seeds),
        "hv_es": m_es,
        "hv_es_std": s_es,
        "hv_noes": m_no,
        "hv_noes_std": s_no,
        "spread": spread,
        "target": target,
        "epochs_es": e_es,
        "epochs_noes": e_no,
        "wall_es": w_es,
        "wall_noes": w_no,
        "equal_hv": equal,
        "saving": saving,
        "total_epochs_es": tot_es,
        "total_epochs_noes": tot_no,
        "saving_at_equal_trials": 1.0 - tot_es / tot_no,
        "holds": bool(equal and saving is not None and saving >= SAVING_GOAL),
        "per_seed": per_seed,
    }


def analyse(curves: dict[str, list[RunCurve]], trials: dict[str, int]) -> dict[str, object]:
    """The numbers of the report and the verdicts on the two goals."""
    res: dict[str, object] = {}
    # Goal 1: epochs saved by early stopping at equal hypervolume (and the same for experiments).
    noes = curves.get("tpe", [])
    for key, es_curves in curves.items():
        if key.startswith("tpe+es") and noes:
            g = es_vs_noes(es_curves, noes)
            if g is not None:
                res["goal1" if key == "tpe+es" else f"goal1:{key}"] = g
    es = curves.get("tpe+es", [])
    # Goal 2: the default sampler at 100 trials vs random at 200.
    rnd = curves.get("random", [])
    if es and rnd:
        n_def, n_rnd = 100, 200
        d = [at(c, n_def) for c in es]
        r = [at(c, n_rnd) for c in rnd]
        if all(x is not None for x in d + r):
            md, sd = mean_std(d)
            mr, sr = mean_std(r)
            res["goal2"] = {
                "n_default": n_def,
                "n_random": n_rnd,
                "hv_default": md,
                "hv_default_std": sd,
                "hv_random": mr,
                "hv_random_std": sr,
                "holds": md >= mr,
            }
        else:
            res["goal2"] = {
                "n_default": n_def,
                "n_random": n_rnd,
                "holds": None,
                "note": f"not measured: needs {n_def} default trials and {n_rnd} random trials",
            }
    return res


def plot(curves: dict[str, list[RunCurve]], path: Path) -> None:
    """HV against epochs, wall-clock and trials: mean over seeds, min-max bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    # The first trials go from 0 to most of the final HV; start the axis at the 10th trial's HV.
    early = [c.hv[min(9, c.n - 1)] for cs in curves.values() for c in cs if c.n]
    y_low = max(0.0, min(early) - 0.02) if early else 0.0
    colors = {"tpe+es": "tab:blue", "tpe": "tab:orange", "random": "tab:green"}
    for ax, axis, xlabel in zip(
        axes,
        ("epochs", "wall", "trials"),
        (
            "fine-tune epochs spent (cumulative)",
            "wall-clock seconds (cumulative)",
            "finished trials",
        ),
        strict=True,
    ):
        for key, cs in curves.items():
            cs = [c for c in cs if c.n]
            if not cs:
                continue
            grid, mean, lo, hi = mean_curve(cs, axis)
            ax.plot(
                grid, mean, color=colors.get(key), label=f"{BY_KEY[key].label} ({len(cs)} seeds)"
            )
            ax.fill_between(grid, lo, hi, color=colors.get(key), alpha=0.2, linewidth=0)
        ax.set_ylim(bottom=y_low)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("hypervolume (acc x log ratio)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(
        "digits, --study all: hypervolume vs cost (mean over seeds, band = min..max; "
        "a seed's run that ended stays at its final HV)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_opt(x: float | None, fmt: str = "{:.0f}") -> str:
    return "not reached" if x is None else fmt.format(x)


def pct(m_s: tuple[float | None, float]) -> str:
    """``mean ± std`` of fractions, in percent."""
    m, sd = m_s
    return "-" if m is None else f"{100 * m:.1f} ± {100 * sd:.1f} %"


def goal1_lines(g1: dict, title: str) -> list[str]:
    """The verdict and the per-seed table of one early-stopping comparison."""
    ok = "**met**" if g1["holds"] else "**not met**"
    sv = "-" if g1["saving"] is None else f"{100 * g1['saving']:.1f} %"
    lines = [
        f"{title}: {ok}. "
        f"Final HV with early stopping {g1['hv_es']:.4f} ± {g1['hv_es_std']:.4f}, without {g1['hv_noes']:.4f} ± "
        f"{g1['hv_noes_std']:.4f} (equal within the seed spread {g1['spread']:.4f}: {'yes' if g1['equal_hv'] else 'no'}). "
        f"Epochs the mean-over-seeds curves need to reach the HV both reach ({g1['target']:.4f}): "
        f"{fmt_opt(g1['epochs_es'])} with early stopping, {fmt_opt(g1['epochs_noes'])} without: **{sv} saved**"
        + (
            f" (wall-clock {g1['wall_es']:.0f} s vs {g1['wall_noes']:.0f} s). "
            if g1["wall_es"] is not None and g1["wall_noes"] is not None
            else " (wall-clock: per seed below). "
        )
        + "At equal trial count the runs "
        f"spent {g1['total_epochs_es']:.0f} vs {g1['total_epochs_noes']:.0f} epochs "
        f"({100 * g1['saving_at_equal_trials']:.1f} % saved). Paired per seed (below), the saving at the HV "
        f"both runs of a seed reach is {pct(g1['paired_saving'])} of epochs and {pct(g1['paired_wall_saving'])} "
        "of wall-clock.",
        "",
        "   Per seed (same baseline, so HVs compare exactly; target = the lower of the two final HVs):",
        "",
        "   | seed | final HV ES | final HV no-ES | epochs ES to target | epochs no-ES to target | saved "
        "| wall s ES / no-ES to target | epochs ES to no-ES final HV |",
        "   |---|---|---|---|---|---|---|---|",
    ]
    for p in g1["per_seed"]:
        saved = "-" if p["saving"] is None else f"{100 * p['saving']:.1f} %"
        lines.append(
            f"   | {p['seed']} | {p['hv_es']:.4f} | {p['hv_noes']:.4f} | {fmt_opt(p['epochs_es'])} | "
            f"{fmt_opt(p['epochs_noes'])} | {saved} | {fmt_opt(p['wall_es'])} / {fmt_opt(p['wall_noes'])} | "
            f"{fmt_opt(p['epochs_es_to_noes_final'])} |"
        )
    return [*lines, ""]


def report(
    curves: dict[str, list[RunCurve]],
    trials: dict[str, int],
    res: dict[str, object],
    meta: dict[str, str],
) -> str:
    """The markdown report."""
    lines = [
        "## Search: hypervolume against epochs and wall-clock (`benchmarks/search.py`)",
        "",
        f"Command: `{meta['command']}` ({meta['elapsed']}).",
        f"Machine: {meta['machine']}. {meta['versions']}.",
        f"Runs: {meta['runs']}",
        "",
        "Preset `digits` (small CNN on scikit-learn's 8x8 digits, fine-tune 4 epochs per trial), `--study all`, "
        "objectives validation accuracy and compression ratio. Hypervolume: `search.progress.study_hypervolume` "
        "(reference point: accuracy floor = the seed's baseline val accuracy - 10 points, ratio 1; ratio axis in "
        "log scale), over the first n finished (complete or stopped) trials. Epochs: fine-tune epochs actually run "
        "(a stopped trial counts the epochs of its curve; an infeasible or untrained one 0). Wall-clock: from the "
        "first trial's start to the n-th trial's end (sampler and storage time included, the baseline's training "
        "not: it is trained once per seed before the runs). `random` runs without early stopping. Mean ± sample "
        "std over seeds.",
        "",
        "| configuration | seeds | HV @50 | HV @100 | HV @200 | epochs to 200 trials | wall s to 200 trials "
        "| stopped / infeasible per run | time between trials (storage; sampling excluded) | epochs to reach no-ES final HV |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    g1 = res.get("goal1")
    for key, cs in curves.items():
        cs = [c for c in cs if c.n]
        if not cs:
            continue
        full = [c for c in cs if c.n >= 200]
        ep = (
            ms([c.epochs[-1] for c in full], "{:.0f}")
            if full
            else f"({ms([c.epochs[-1] for c in cs], '{:.0f}')} to {cs[0].n})"
        )
        wall = (
            ms([c.wall[-1] for c in full], "{:.0f}")
            if full
            else f"({ms([c.wall[-1] for c in cs], '{:.0f}')} to {cs[0].n})"
        )
        overhead = ms([100.0 * (1 - c.trial_seconds / c.wall[-1]) for c in cs], "{:.1f}") + " %"
        reach = "-"
        if g1 is not None:
            m_no = g1["hv_noes"]
            e = mean_cost_to_reach(cs, m_no)
            reach = fmt_opt(e) + (f" (HV {m_no:.4f})" if key == "tpe" else "")
        lines.append(
            f"| {BY_KEY[key].label} | {len(cs)} | {ms([at(c, 50) for c in cs])} | {ms([at(c, 100) for c in cs])} | "
            f"{ms([at(c, 200) for c in cs])} | {ep} | {wall} | "
            f"{np.mean([c.stopped for c in cs]):.1f} / {np.mean([c.infeasible for c in cs]):.1f} | {overhead} | {reach} |"
        )
    fits = []
    for cs in curves.values():
        for c in cs:
            pts = np.array(c.per_trial, dtype=float)
            if len(pts) > 10 and np.ptp(pts[:, 0]) > 0:
                a, b = np.linalg.lstsq(
                    np.vstack([np.ones(len(pts)), pts[:, 0]]).T, pts[:, 1], rcond=None
                )[0]
                fits.append((a, b))
    if fits:
        fa, fb = np.array(fits).T
        lines += [
            "",
            f"Cost of a trial (least squares of each run's trial seconds on its epochs, range over runs): "
            f"{fa.min():.2f}..{fa.max():.2f} s fixed (compress, predict size, encode, evaluate) + "
            f"{fb.min():.2f}..{fb.max():.2f} s per fine-tune epoch, so epochs saved give back less wall-clock "
            "than their share of epochs.",
        ]
    lines += [
        "",
        "Hypervolume after n trials (mean ± std over seeds):",
        "",
        "| n | " + " | ".join(BY_KEY[k].label for k in curves) + " |",
        "|---|" + "---|" * len(curves),
    ]
    longest = max((c.n for cs in curves.values() for c in cs), default=0)
    for n in range(10, longest + 1, 10):
        lines.append(
            f"| {n} | " + " | ".join(ms([at(c, n) for c in cs]) for cs in curves.values()) + " |"
        )
    lines += ["", "### Goals", ""]
    if g1 is not None:
        lines += goal1_lines(
            g1,
            "1. *Early stopping saves >= 30 % of epochs at equal hypervolume (within seed spread)*",
        )
    for key in curves:
        g = res.get(f"goal1:{key}")
        if g is not None:
            lines += goal1_lines(
                g,
                f"Experiment `{key}` ({BY_KEY[key].label}), seeds {g['seeds']}, against TPE without early stopping",
            )
    g2 = res.get("goal2")
    if g2 is not None:
        if g2["holds"] is None:
            lines.append(
                f"2. *The default sampler at 100 trials reaches at least random's hypervolume at 200*: {g2['note']}."
            )
        else:
            ok = "**met**" if g2["holds"] else "**not met**"
            lines.append(
                f"2. *The default sampler at {g2['n_default']} trials reaches at least random's hypervolume at "
                f"{g2['n_random']}*: {ok}: TPE + early stopping at {g2['n_default']} trials {g2['hv_default']:.4f} ± "
                f"{g2['hv_default_std']:.4f}, random at {g2['n_random']} trials {g2['hv_random']:.4f} ± {g2['hv_random_std']:.4f}."
            )
    lines += ["", f"![hypervolume against epochs, wall-clock and trials]({meta['png']})", ""]
    if meta.get("replay"):
        lines += [
            "### Replay: stopping-rule variants on the runs without early stopping",
            "",
            "Not a run: each rule is replayed over the recorded per-epoch curves of the `TPE, no early stopping` "
            "runs, in trial order (a trial the rule stops after epoch e spends e epochs and leaves the front; the "
            "sampler is not replayed, so a real run would then propose other trials). The row of the rule the "
            "measured `TPE + early stopping` runs used checks the replay against them (at equal trial count). "
            "Mean ± std over seeds.",
            "",
            *meta["replay"],
            "",
        ]
    return "\n".join(lines)


def machine_line(jobs: int, threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} CPU cores ({cpu}), no GPU; {jobs} run(s) at a time, {threads} torch thread(s) each"


def versions_line() -> str:
    import optuna
    import torch

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, optuna {optuna.__version__}, "
        f"numpy {np.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trials", type=int, default=200, help="trials per run (default: 200)")
    p.add_argument(
        "--tpe-trials",
        type=int,
        default=None,
        help="trials of the two TPE configurations (default: --trials)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default: 3)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default: 0)")
    p.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma list, any of {DEFAULT_CONFIGS} (default: all)",
    )
    p.add_argument(
        "--out",
        default="runs/bench-search",
        help="working folder: studies, shared store, logs, raw curves",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="runs at the same time (default: 2; more than the cores makes no sense)",
    )
    p.add_argument(
        "--md",
        default=str(ROOT / "benchmarks" / "search.md"),
        help="markdown report (default: benchmarks/search.md)",
    )
    p.add_argument(
        "--png",
        default=str(ROOT / "benchmarks" / "search_hv.png"),
        help="plot (default: benchmarks/search_hv.png)",
    )
    p.add_argument(
        "--analyze-only",
        action="store_true",
        help="only rebuild the report from the studies under --out",
    )
    args = p.parse_args(argv)

    started = time.perf_counter()
    out = Path(args.out)
    for sub in ("studies", "store", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; known: {', '.join(BY_KEY)}")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    trials = {
        k: (args.tpe_trials or args.trials) if k.startswith("tpe") else args.trials for k in keys
    }
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    threads = max(1, cores // args.jobs)

    runs_file = out / "runs.json"
    runs_meta: dict[str, dict] = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    if not args.analyze_only:
        import torch

        torch.set_num_threads(cores)
        train_baselines(out, seeds)
        # Seed-major order, so that runs sharing the machine at a time are of different configurations.
        todo = [(BY_KEY[k], s) for s in seeds for k in keys]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {
                (c.key, s): pool.submit(run_one, out, c, s, trials[c.key], threads) for c, s in todo
            }
            for (key, s), fut in futures.items():
                try:
                    info = fut.result()
                except RuntimeError as exc:  # report the others anyway
                    print(f"error: {exc}", file=sys.stderr)
                    continue
                if info is None:
                    continue
                runs_meta[f"{key}/{s}"] = {
                    **runs_meta.get(f"{key}/{s}", {}),
                    **info,
                    "trials": trials[key],
                }
                runs_file.write_text(json.dumps(runs_meta, indent=1))

    curves: dict[str, list[RunCurve]] = {}
    for k in keys:
        cs = []
        for s in seeds:
            try:
                c = measure(out, k, s, trials[k])
            except KeyError:  # study not there yet
                continue
            info = runs_meta.get(f"{k}/{s}", {})
            c.run_seconds, c.load_before, c.load_after = (
                info.get("seconds"),
                info.get("load_before"),
                info.get("load_after"),
            )
            cs.append(c)
        if cs:
            curves[k] = cs
    if not curves:
        print(f"no studies under {out}", file=sys.stderr)
        return 1
    (out / "curves.json").write_text(
        json.dumps({k: [asdict(c) for c in cs] for k, cs in curves.items()})
    )
    res = analyse(curves, trials)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    png = Path(args.png)
    plot(curves, png)
    md = Path(args.md)
    runs = [v for k, v in runs_meta.items() if not k.startswith("_")]
    loads = [v.get("load_before") for v in runs] + [v.get("load_after") for v in runs]
    loads = [x for x in loads if x is not None]
    run_desc = ", ".join(f"{k} x {len(curves.get(k, []))} seeds x {trials[k]} trials" for k in keys)
    by_code: dict[str, list[str]] = {}
    for k, v in runs_meta.items():
        if not k.startswith("_") and v.get("code"):
            by_code.setdefault(v["code"], []).append(k)
    if by_code:
        groups = "; ".join(f"{c}: {', '.join(sorted(ks))}" for c, ks in by_code.items())
        run_desc += f"; code fingerprint at each run's start (runs that share one ran the same code): {groups}"
    if loads:
        run_desc += (
            f"; 1-minute load average at run starts/ends {min(loads):.1f}..{max(loads):.1f} on {cores} cores "
            "(the machine was shared with other work: wall-clock numbers carry that noise)"
        )
    rel = os.path.relpath(png, md.parent)
    command = "python " + shlex.join(
        ["benchmarks/search.py", *(argv if argv is not None else sys.argv[1:])]
    )
    span = [t for cs in curves.values() for c in cs for t in (c.t_first, c.t_last) if t]
    elapsed = f"studies from {min(span)} to {max(span)}" if span else ""
    previous = runs_meta.get("_commands", {}).get("list", [])
    if "command" in runs_meta.get("_command", {}):  # the first format of runs.json
        previous = [runs_meta["_command"]["command"], *previous]
    if args.analyze_only:
        command = "`, then `".join(previous or ["?"]) + f"`; report rebuilt with `{command}"
    else:
        runs_meta["_commands"] = {"list": [*previous, command]}
        runs_meta.pop("_command", None)
        runs_file.write_text(json.dumps(runs_meta, indent=1))
        command = "`, then `".join(runs_meta["_commands"]["list"])
        elapsed = f"{(time.perf_counter() - started) / 60:.1f} min; " + elapsed
    meta = {
        "command": command,
        "replay": replay_table(out, [c.seed for c in curves["tpe"]], trials["tpe"])
        if "tpe" in curves
        else None,
        "elapsed": elapsed,
        "machine": machine_line(args.jobs, threads),
        "versions": versions_line(),
        "runs": run_desc + ".",
        "png": rel,
    }
    text = report(curves, trials, res, meta)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
