"""search.trials on real databases (SQLite and the PostgreSQL of this machine): an exact budget
with many workers, stale trials redone before the budget is judged spent, retries that carry no
artifacts, a seed per worker process, and SIGTERM/SIGINT recorded as FAIL and re-queued."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from objectives import record
from search.trials import (
    Heartbeat,
    claim,
    counted,
    process_seed,
    retry,
    run_trials,
    sweep_artifacts,
)
from storage.locks import study_lock

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind (PostgreSQL: the shared ``pg_url`` fixture)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/study.db"
    return str(request.getfixturevalue("pg_url"))


def _storage(url: str, grace: int | None = None) -> optuna.storages.RDBStorage:
    from storage.studies import open_storage

    storage = open_storage(url, on_stale=retry)
    if grace is not None:  # the tests' own, short heartbeat schedule
        storage.heartbeat_interval, storage.grace_period = 1, grace
    return storage


def quick(trial: optuna.Trial) -> float:
    """A trial that takes a moment, like a tiny real one."""
    x = trial.suggest_float("x", 0.0, 1.0)
    time.sleep(0.01)
    return x


def _worker(url: str, name: str, total: int) -> None:
    storage = _storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    run_trials(study, quick, total, study_lock(storage, name), sampler_seed=process_seed())


def test_many_workers_finish_exactly_the_total(url: str) -> None:
    # Six workers on a total of 24 once finished 25: counting and creating were two steps.
    storage = _storage(url)
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    storage.engine.dispose()  # forked workers open their own connections
    ctx = mp.get_context("fork")  # no re-import of torch per worker: seconds, not tens
    procs = [ctx.Process(target=_worker, args=(url, "s", 24)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    study = optuna.load_study(study_name="s", storage=_storage(url))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 24 and len(states) == 24
    # Each process drew its own sampler seed and recorded it on its trials.
    seeds = {t.user_attrs[record.SAMPLER_SEED] for t in study.trials}
    workers = {t.user_attrs[record.WORKER] for t in study.trials}
    assert len(seeds) == len(workers) >= 2


def test_a_stale_last_trial_is_redone_before_the_budget_is_judged_spent(url: str) -> None:
    # A worker killed during the study's last trial left it RUNNING forever, and a re-run exited
    # at once: the study held N-1 finished trials.
    storage = _storage(url, grace=1)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.enqueue_trial({"x": 0.25})
    study.optimize(quick, n_trials=2)
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    Heartbeat.once(study, dead)  # its worker beat once, then died
    time.sleep(1.5)
    run_trials(study, quick, 3, study_lock(storage, "s"))
    trials = study.get_trials(deepcopy=False)
    assert trials[dead.number].state == TrialState.FAIL
    redo = [t for t in trials if t.user_attrs.get(record.RETRY_OF) == dead.number]
    assert len(redo) == 1 and redo[0].state == TrialState.COMPLETE and redo[0].params == trials[dead.number].params
    assert counted(study) == 3 and sum(t.state == TrialState.COMPLETE for t in trials) == 3


def test_an_idle_worker_waits_for_a_running_trial_instead_of_ending_short(tmp_path: Path) -> None:
    storage = _storage(f"sqlite:///{tmp_path}/s.db", grace=1)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    running = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    Heartbeat.once(study, running)
    waits: list[str] = []
    # The running trial's worker is dead (no more beats): after the grace period the idle
    # worker fails it, claims the re-queued plan and runs it.
    trial = claim(study, 1, study_lock(storage, "s"), wait=0.2, log=waits.append)
    assert trial is not None and waits and "waiting for 1 running trial" in waits[0]
    assert trial.user_attrs[record.RETRY_OF] == running.number
    study.tell(trial, 0.5)
    assert claim(study, 1, study_lock(storage, "s"), wait=0.2) is None


def test_a_retry_carries_the_plan_and_never_the_dead_attempts_artifacts(tmp_path: Path) -> None:
    storage = _storage(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    store = FileSystemArtifactStore(str(tmp_path / "artifacts"))
    (tmp_path / "artifacts").mkdir()
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    trial.set_user_attr(record.WORKER, "dead:1")
    blob = tmp_path / "a.pcz"
    blob.write_bytes(b"partial")
    artifact = upload_artifact(artifact_store=store, file_path=str(blob), study_or_trial=trial)
    failed = study.tell(trial, state=TrialState.FAIL)
    retry(study, failed)
    retry(study, failed)  # found stale by one worker and interrupted in another: queued once
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 1
    assert not any(k.startswith("artifacts:") for k in waiting[0].system_attrs)
    assert waiting[0].user_attrs == {record.RETRY_OF: failed.number, record.RETRIES: 1}
    # The dead attempt's file is deleted; nothing else is.
    assert sweep_artifacts(study, store) == 1 and not (tmp_path / "artifacts" / artifact).exists()
    # A plan whose attempts keep failing is given up after MAX_RETRIES re-queues.
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    second = study.tell(study.ask(dist), state=TrialState.FAIL)
    retry(study, second)
    third = study.tell(study.ask(dist), state=TrialState.FAIL)
    retry(study, third)
    assert second.params == third.params == failed.params
    assert (second.user_attrs[record.RETRIES], third.user_attrs[record.RETRIES]) == (1, 2)
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_a_queued_plan_stopped_before_its_first_parameter_is_queued_again(tmp_path: Path) -> None:
    # A retry (or refinement) holds its plan as queued parameters until the objective suggests
    # them: stopped before that, its plan must go back to the queue, not be lost.
    study = optuna.create_study(study_name="s", storage=_storage(f"sqlite:///{tmp_path}/s.db"), direction="maximize")
    study.enqueue_trial({"x": 0.25}, user_attrs={record.RETRY_OF: 7, record.RETRIES: 1})
    failed = study.tell(study.ask(), state=TrialState.FAIL)
    assert failed.params == {}
    assert retry(study, failed)
    (waiting,) = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert waiting.system_attrs["fixed_params"] == {"x": 0.25} and waiting.user_attrs[record.RETRIES] == 2
    # A sampled trial stopped before its first parameter has no plan: nothing is queued.
    fresh = optuna.create_study(direction="maximize")
    assert not retry(fresh, fresh.tell(fresh.ask(), state=TrialState.FAIL))
    assert not fresh.get_trials(states=(TrialState.WAITING,))


def test_resumes_sample_new_plans() -> None:
    # The sampler seed once depended only on the study seed and the worker index: a resumed
    # study replayed its first plans (trial 6 == trial 0).
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=process_seed()))
    run_trials(study, quick, 3, study_lock(study._storage, "s"))
    study.sampler = optuna.samplers.RandomSampler(seed=process_seed())
    run_trials(study, quick, 6, study_lock(study._storage, "s"))
    xs = [t.params["x"] for t in study.trials]
    assert len(xs) == 6 and len(set(xs)) == 6
    assert process_seed(7) == 7


SLOW_WORKER = textwrap.dedent("""
    import sys, time, optuna
    from search.trials import run_trials
    from storage.locks import study_lock
    from storage.studies import open_storage

    def slow(trial):
        trial.suggest_float("x", 0.0, 1.0)
        print("started", flush=True)
        time.sleep(60)
        return 1.0

    storage = open_storage(sys.argv[1])
    study = optuna.load_study(study_name="s", storage=storage)
    try:
        run_trials(study, slow, 5, study_lock(storage, "s"))
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
""")


def test_a_trial_interrupted_before_its_first_parameter_is_failed_and_not_requeued(tmp_path: Path) -> None:
    # A worker's first trial loads its data before sampling: a signal then leaves no plan to
    # re-queue (CI once caught this race), and the one line says so instead of claiming a retry.
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="s", storage=_storage(url), direction="maximize")
    script = SLOW_WORKER.replace('trial.suggest_float("x", 0.0, 1.0)\n    print("started", flush=True)\n    time.sleep(60)',
                                 'print("started", flush=True)\n    time.sleep(60)\n    trial.suggest_float("x", 0.0, 1.0)')
    assert script != SLOW_WORKER
    proc = subprocess.Popen([sys.executable, "-c", script, url], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == ["error: interrupted by SIGTERM: the running trial was recorded FAIL; not re-queued "
                                        "(no plan sampled yet, or its retries are spent): its slot is sampled anew"]
    (only,) = optuna.load_study(study_name="s", storage=_storage(url)).trials
    assert only.state == TrialState.FAIL and not only.params


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_fails_the_running_trial_requeues_it_and_exits_with_one_line(
    tmp_path: Path, signum: signal.Signals
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="s", storage=_storage(url), direction="maximize")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WORKER, url], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == [f"error: interrupted by {signum.name}: the running trial was recorded FAIL and re-queued"]
    study = optuna.load_study(study_name="s", storage=_storage(url))
    first, redo = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs[record.FAIL_REASON] == f"interrupted by {signum.name}"
    assert redo.state == TrialState.WAITING and redo.user_attrs[record.RETRY_OF] == 0
    assert redo.system_attrs["fixed_params"] == first.params
