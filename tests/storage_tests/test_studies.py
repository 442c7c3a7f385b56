"""storage.studies: URLs and their errors, SQLite folders, and the cluster path on a REAL
PostgreSQL (127.0.0.1:5432, database ``test``): concurrent worker processes sharing one study and
its budget, and the heartbeat that fails a dead worker's trial and retries it (no trial lost).

PostgreSQL tests skip (saying why) only when the server is unreachable. Each uses a unique study
name and deletes its study at the end. ``PARETO_TEST_POSTGRES`` overrides the URL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

import storage.studies as storage_studies
from models.errors import UserError
from storage.studies import (
    default_store,
    load_study,
    open_artifact_store,
    open_storage,
    sqlite_path,
)

ROOT = Path(__file__).resolve().parents[2]
# study.ask() on a heartbeat storage warns that heartbeats come from Study.optimize: here the
# tests beat by hand to fake a live or a dead worker.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used:UserWarning")
PG_URL = os.environ.get("PARETO_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


# ------------------------------------------------------------------------------ URLs and SQLite


@pytest.mark.parametrize("url", ["mongodb://x", "redis://127.0.0.1/0", "runs/search.db", "sqlite:runs.db", "", "postgres"])
def test_bad_urls_are_one_line_errors_naming_the_url(url: str) -> None:
    with pytest.raises(UserError) as exc:
        open_storage(url)
    msg = str(exc.value)
    assert repr(url) in msg and "\n" not in msg
    assert "sqlite:///runs/search.db" in msg  # says what a valid URL looks like


def test_unreachable_postgresql_is_a_user_error() -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/test"
    with pytest.raises(UserError) as exc:
        open_storage(url)
    msg = str(exc.value)
    assert msg.startswith(f"cannot open storage {url!r}") and "\n" not in msg


def test_sqlite_creates_its_folder(tmp_path: Path) -> None:
    db = tmp_path / "a" / "b" / "search.db"
    url = f"sqlite:///{db}"
    storage = open_storage(url)
    assert db.parent.is_dir()
    optuna.create_study(study_name="s", storage=storage)
    assert db.is_file()
    assert sqlite_path(url) == db
    assert sqlite_path("sqlite:///:memory:") is None and sqlite_path(PG_URL) is None
    assert storage.get_heartbeat_interval() == storage_studies.HEARTBEAT_SECONDS
    assert open_storage(url, heartbeat=False).get_heartbeat_interval() is None


def test_store_lives_beside_the_database(tmp_path: Path) -> None:
    assert default_store(f"sqlite:///{tmp_path}/search.db") == str(tmp_path)
    assert default_store(PG_URL) == "runs"
    open_artifact_store(tmp_path / "shared" / "artifacts")
    assert (tmp_path / "shared" / "artifacts").is_dir()


def test_loading_a_missing_study_lists_the_existing_ones(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/search.db")
    optuna.create_study(study_name="present", storage=storage)
    with pytest.raises(UserError, match="no study 'absent' in this storage; existing: present"):
        load_study("absent", storage)


# ------------------------------------------------------------------------------ PostgreSQL


def _postgres_reachable() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc}); pip install 'pareto-compress[postgres]'"
    dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {PG_URL} is unreachable: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
    return None


@pytest.fixture(scope="module")
def pg_url() -> str:
    reason = _postgres_reachable()
    if reason:
        pytest.skip(reason)
    return PG_URL


@pytest.fixture
def study_name(pg_url: str) -> Iterator[str]:
    """A unique study name; the study (if created) is deleted afterwards."""
    name = f"pytest-{uuid.uuid4().hex[:12]}"
    yield name
    storage = open_storage(pg_url, heartbeat=False)
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _overlap(trials: list[optuna.trial.FrozenTrial]) -> bool:
    """Whether two trials ran at the same time (each worker runs one trial at a time)."""
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))


@pytest.mark.slow
def test_two_worker_processes_share_one_postgresql_study(pg_url: str, study_name: str, tmp_path: Path) -> None:
    """``search.run --jobs 2`` (two worker processes) then ``search.worker`` on a real PostgreSQL.
    Real digits trials: ~1-3 s each unloaded, the baseline once (~2 s); minutes on a loaded machine."""
    store = str(tmp_path / "store")
    _run(["search.run", "--study", "quantization", "--preset", "digits", "--trials", "6", "--jobs", "2",
          "--storage", pg_url, "--store", store, "--name", study_name, "--quiet"], timeout=540)
    study = optuna.load_study(study_name=study_name, storage=pg_url)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert not [t for t in trials if t.state in (TrialState.FAIL, TrialState.RUNNING)], [t.state for t in trials]
    # The budget is checked before each trial: two workers may each start one as the count reaches
    # the total, so it can overshoot by at most (jobs - 1) = 1.
    assert len(finished) in (6, 7), len(finished)
    assert study.user_attrs["total_trials"] == 6
    assert all(t.user_attrs["device"].startswith("cpu") for t in finished)
    assert {t.user_attrs["seed"] for t in finished} == {t.number for t in finished}  # seed 0: trial number
    assert _overlap(finished), "the two workers never ran a trial at the same time"
    # A third worker joins with a larger total: the budget is the study's, not the worker's.
    _run(["search.worker", "--name", study_name, "--storage", pg_url, "--trials", "8", "--store", store, "--quiet"],
         timeout=300)
    study = optuna.load_study(study_name=study_name, storage=pg_url)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 8
    # Joining again with the same total runs nothing.
    _run(["search.worker", "--name", study_name, "--storage", pg_url, "--trials", "8", "--store", store, "--quiet"],
         timeout=300)
    assert len(optuna.load_study(study_name=study_name, storage=pg_url).trials) == len(states)


def _fast_heartbeat_storage(url: str, monkeypatch: pytest.MonkeyPatch) -> RDBStorage:
    """open_storage with a 1 s heartbeat and a 2 s grace period (the documented overrides)."""
    monkeypatch.setenv("PARETO_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("PARETO_GRACE_SECONDS", "2")
    from search.trials import retry

    # As the search's workers open it: stale trials re-queued by search.trials.retry (params
    # only: no dead attempt's artifacts).
    storage = open_storage(url, on_stale=retry)
    assert storage.get_heartbeat_interval() == 1 and storage.grace_period == 2
    assert storage.get_heartbeat_stale_trial_callback() is retry
    return storage


def test_a_dead_workers_trial_is_failed_and_retried(pg_url: str, study_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = _fast_heartbeat_storage(pg_url, monkeypatch)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage, directions=["maximize", "maximize"])
    trial = study.ask()
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("plan", {"steps": []})
    storage.record_heartbeat(trial._trial_id)  # the worker beat once, then died
    time.sleep(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    retry = trials[1]
    assert retry.system_attrs["fixed_params"] == {"x": x}  # a queued trial: its parameters are fixed
    # The plan is re-derived from the parameters; the record starts afresh, naming the attempt.
    assert retry.user_attrs == {"retry_of": trial.number, "retries": 1}

    # The next worker to ask runs the retried trial: same parameters, nothing lost.
    seen: list[float] = []

    def objective(t: optuna.Trial) -> tuple[float, float]:
        seen.append(t.suggest_float("x", 0.0, 1.0))
        return 0.9, 2.0

    study.optimize(objective, n_trials=1)
    assert seen == [x]
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.FAIL, TrialState.COMPLETE]


def test_a_plan_is_retried_at_most_twice(pg_url: str, study_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = _fast_heartbeat_storage(pg_url, monkeypatch)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage, directions=["maximize", "maximize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for _ in range(3):  # the original dies, then both its retries die too
            trial = study.ask()
            trial.suggest_float("x", 0.0, 1.0)
            storage.record_heartbeat(trial._trial_id)
            time.sleep(3.0)
            optuna.storages.fail_stale_trials(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL] * 3  # search.trials.MAX_RETRIES = 2: no fourth copy


def test_a_live_trial_is_not_failed(pg_url: str, study_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = _fast_heartbeat_storage(pg_url, monkeypatch)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage, directions=["maximize", "maximize"])
    trial = study.ask()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for _ in range(3):
            storage.record_heartbeat(trial._trial_id)  # a live worker keeps beating
            time.sleep(0.5)
            optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.RUNNING]
    study.tell(trial, (0.9, 2.0))
