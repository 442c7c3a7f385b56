"""Per-trial overhead of the search outside training, on three storages, side by side.

What a trial costs besides compressing and fine-tuning: **sampling** (``study.ask`` and
``spaces.plan.suggest_plan`` with the product's TPE sampler on the ``all`` space of the digits
CNN, per-layer parameters included, TPE's history capped as the product caps it) and
**storage** (claiming the slot under the study's lock,
the first heartbeat, the record's attribute writes a real trial makes, ``tell``), through the
product's own loop (``search.trials.run_trials``). Each worker runs a trial whose training is
replaced by nothing, so the time between two of its trials is the overhead. ``--workers``
processes share one study of ``--trials`` trials on each storage: PostgreSQL (this machine's,
a fresh database per run), SQLite (a file) and a journal file (Optuna's ``JournalStorage``; its
claims are not under a cross-process lock: the product's workers use SQL storages).

Reported per storage: mean and median milliseconds per trial of each worker's wall clock (all
workers share this machine's cores: with more workers than cores the wall clock includes waiting
for a core) and of its CPU time (what the trial costs where each worker has its own core), split
into sampling and the rest; the same over the first and the last 100 trials (TPE's cost grows
with the history); and the mean as a share of the digits preset's median trial time, measured in
the same run (``search.run --preset digits`` trials, training included).

Usage::

    python benchmarks/storage.py --trials 1000 --workers 8 --uncapped postgresql --out benchmarks/storage.md
    python benchmarks/storage.py --trials 40 --workers 2 --digits-trials 4    # smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
STUDY = "overhead"


def _record_like_a_trial(trial: Any, plan: Any) -> None:
    """The attribute writes of a real trial (objectives/objective.py), with stand-in values."""
    from objectives import record

    record.write(trial, plan=plan.to_dict(), families=plan.families, seed=trial.number, preset="digits",
                 dataset="digits", baseline_seed=0, baseline_key="0" * 16, baseline_bytes=755465, device="cpu")
    record.write(trial, predicted_bytes=50_000)
    for k in range(1, 5):  # the curve is written epoch by epoch
        record.write(trial, curve=[0.9] * k)
    record.write(trial, bytes=50_000, breakdown={"conv1": 300, "conv2": 20_000, "fc1": 29_700}, epochs=4,
                 constraints=[0.0], wall_seconds=0.0)


def _storage(kind: str, url: str) -> Any:
    import optuna

    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    from search.trials import retry
    from storage.studies import open_storage

    return open_storage(url, on_stale=retry)


def _worker(kind: str, url: str, total: int, out: str, seed: int) -> None:
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from models.registry import create_model
    from search.samplers import make_sampler
    from search.trials import run_trials
    from spaces.plan import get_study_space, suggest_plan
    from spaces.policy import LayerPolicy
    from storage.locks import study_lock

    storage = _storage(kind, url)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    study.sampler = make_sampler("tpe", seed=seed)
    space = get_study_space("all")
    layers = [p for p, _ in LayerPolicy().eligible(create_model("digits_cnn"))]
    finetune = {"epochs": (1.0, 8.0), "lr": (1e-3, 1e-1), "distill_weight": (0.0, 0.9), "distill_temperature": (1.0, 8.0)}
    rows: list[dict[str, float]] = []
    state = {"wall": time.perf_counter(), "cpu": time.process_time(), "suggest_wall": 0.0, "suggest_cpu": 0.0}
    rng = np.random.default_rng(seed)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        plan = suggest_plan(trial, space, None, finetune, layers)
        state["suggest_wall"], state["suggest_cpu"] = time.perf_counter() - w, time.process_time() - c
        _record_like_a_trial(trial, plan)
        return float(rng.uniform(0.8, 0.99)), float(rng.uniform(1.0, 100.0))

    def done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        w, c = time.perf_counter(), time.process_time()
        rows.append({"number": trial.number, "wall": w - state["wall"], "cpu": c - state["cpu"],
                     "suggest_wall": state["suggest_wall"], "suggest_cpu": state["suggest_cpu"]})
        state["wall"], state["cpu"] = time.perf_counter(), time.process_time()

    run_trials(study, objective, total, study_lock(storage, STUDY), sampler_seed=seed, callbacks=[done])
    Path(out).write_text(json.dumps(rows))


def _fresh_pg() -> tuple[str, Any]:
    import sqlalchemy

    name = f"pc_bench_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()

    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", drop


def run_storage(kind: str, trials: int, workers: int, tmp: Path, history: str | None = None) -> dict[str, Any]:
    """One storage: a fresh study, ``workers`` processes, ``trials`` trials; per-trial rows.
    ``history`` sets the workers' ``$PARETO_TPE_HISTORY`` (None: as this process has it)."""
    import optuna

    if history is not None:
        os.environ["PARETO_TPE_HISTORY"] = history  # the spawned workers inherit it

    drop = None
    tag = f"{kind}-{history or 'default'}"
    if kind == "postgresql":
        url, drop = _fresh_pg()
    elif kind == "sqlite":
        url = f"sqlite:///{tmp / f'overhead-{tag}.db'}"
    else:
        url = str(tmp / f"overhead-{tag}.journal")
    try:
        storage = _storage(kind, url)
        optuna.create_study(study_name=STUDY, storage=storage, directions=["maximize", "maximize"])
        ctx = mp.get_context("spawn")
        outs = [tmp / f"{tag}-{i}.json" for i in range(workers)]
        start = time.perf_counter()
        procs = [ctx.Process(target=_worker, args=(kind, url, trials, str(o), 1000 + i)) for i, o in enumerate(outs)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        elapsed = time.perf_counter() - start
        if any(p.exitcode for p in procs):
            raise SystemExit(f"error: a {kind} worker failed (exit codes {[p.exitcode for p in procs]})")
        rows = [r for o in outs for r in json.loads(o.read_text())]
        study = optuna.load_study(study_name=STUDY, storage=_storage(kind, url))
        finished = sum(1 for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    finally:
        if drop is not None:
            drop()
    label = kind if history is None else f"{kind}, TPE history cap {history if history != '0' else 'off'}"
    return {"storage": label, "rows": rows, "elapsed": elapsed, "finished": finished}


def digits_trial_seconds(n: int, tmp: Path) -> list[float]:
    """Durations of ``n`` real trials of ``search.run --preset digits`` (training included)."""
    import subprocess

    import optuna

    url = f"sqlite:///{tmp / 'digits.db'}"
    subprocess.run([sys.executable, "-m", "search.run", "--study", "all", "--preset", "digits", "--trials", str(n),
                    "--storage", url, "--quiet"], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PARETO_THREADS": "1"})
    study = optuna.load_study(study_name="all-digits", storage=url)
    return [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials
            if t.datetime_complete is not None and t.state == optuna.trial.TrialState.COMPLETE]


def _history_cap() -> str:
    try:
        from search.samplers import tpe_history
    except ImportError:  # code from before the cap
        return "none (this code has no cap)"
    cap = tpe_history()
    return f"{cap} finished trials" if cap else "off (0)"


def _ms(values: list[float]) -> str:
    return f"{1000 * statistics.mean(values):.0f} / {1000 * statistics.median(values):.0f}"


def summarise(res: dict[str, Any], median_trial: float) -> str:
    rows = sorted(res["rows"], key=lambda r: r["number"])
    wall, cpu = [r["wall"] for r in rows], [r["cpu"] for r in rows]
    sw, sc = [r["suggest_wall"] for r in rows], [r["suggest_cpu"] for r in rows]
    first, last = rows[:100], rows[-100:]
    share = 100 * statistics.mean(cpu) / median_trial
    return (f"| {res['storage']} | {res['finished']} | {_ms(wall)} | {_ms(sw)} | {_ms(cpu)} | {_ms(sc)} | "
            f"{_ms([r['cpu'] for r in first])} | {_ms([r['cpu'] for r in last])} | {share:.1f} % | "
            f"{100 * statistics.mean(wall) / median_trial:.1f} % |")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python benchmarks/storage.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--storages", default="postgresql,sqlite,journal")
    p.add_argument("--uncapped", default="", help="storages to run again with TPE's history cap off "
                   "($PARETO_TPE_HISTORY=0), for comparison, e.g. postgresql")
    p.add_argument("--digits-trials", type=int, default=20, help="real digits trials for the median trial time")
    p.add_argument("--out", default=None, help="write the Markdown here (and the JSON beside it)")
    args = p.parse_args(argv)
    cap = _history_cap()  # before a run with the cap off changes this process's environment
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        load0 = os.getloadavg()[0]
        digits = digits_trial_seconds(args.digits_trials, tmp)
        median_trial = statistics.median(digits)
        results = [run_storage(kind, args.trials, args.workers, tmp) for kind in args.storages.split(",")]
        # The same storages with the cap off, in the same run: TPE's cost without it.
        results += [run_storage(kind, args.trials, args.workers, tmp, "0") for kind in args.uncapped.split(",") if kind]
        load1 = os.getloadavg()[0]
    lines = [
        "# Per-trial overhead: sampling + storage (`benchmarks/storage.py`)",
        "",
        f"- command: `python benchmarks/storage.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average "
        f"{load0:.1f} at start, {load1:.1f} at end; {args.workers} worker processes, 1 torch thread each",
        f"- digits preset, median trial time {median_trial:.2f} s over {len(digits)} real trials (`search.run "
        "--preset digits --study all`, training included, 1 thread)",
        "- per trial: ask + `suggest_plan` (TPE, `all` space, per-layer parameters) = sampling; the rest = claim "
        "under the lock, heartbeat, the record's writes, tell. ms as mean / median",
        f"- TPE's history cap (`$PARETO_TPE_HISTORY`, `search/samplers.py`): {cap} (rows marked 'cap off': 0)",
        "",
        "| storage | trials | wall ms | of which sampling | CPU ms | of which sampling | CPU ms, first 100 | "
        "CPU ms, last 100 | CPU mean / median trial | wall mean / median trial |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[summarise(r, median_trial) for r in results],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"median_trial_seconds": median_trial, "digits_trials": digits,
             "results": [{k: v for k, v in r.items()} for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
