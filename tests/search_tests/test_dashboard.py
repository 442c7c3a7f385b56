"""search.dashboard: a real optuna-dashboard server (a subprocess on 127.0.0.1) serves a study's
trials, plans, families, metric names and artifacts over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState, create_trial

from objectives import record
from storage.studies import open_artifact_store

ROOT = Path(__file__).resolve().parents[2]
STUDY = "dashboard-test"
PLANS = [
    {"version": 1, "steps": [{"technique": "prune", "config": {"sparsity": 0.5}},
                             {"technique": "int", "config": {"bits": 4}}], "policy": {}, "finetune": {}},
    {"version": 1, "steps": [{"technique": "int", "config": {"bits": 8}}], "policy": {}, "finetune": {}},
    {"version": 1, "steps": [], "policy": {}, "finetune": {}},
]
FAMILIES = ["prune+int", "int", "fp32"]
VALUES = [[0.91, 12.0], [0.95, 4.0], [0.97, 1.0]]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (127.0.0.1 only)
        return r.read()


def _get_json(url: str) -> Any:
    return json.loads(_get(url))


@pytest.fixture(scope="module")
def study_storage(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, bytes]:
    """A SQLite study of three finished trials and a pruned one (no training), with an artifact."""
    root = tmp_path_factory.mktemp("dashboard")
    url = f"sqlite:///{root}/search.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY, storage=url, directions=["maximize", "maximize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_accuracy", "compression_ratio"])
    # Trial 0 runs like a real one (artifacts are attached while a trial runs).
    payload = b"PCZ-test-artifact"
    src = root / "trial-0.pcz"
    src.write_bytes(payload)
    trial = study.ask()
    record.write(trial, plan=PLANS[0], families=FAMILIES[0])
    store = open_artifact_store(str(root / "artifacts"))
    record.write(trial, artifact_id=upload_artifact(artifact_store=store, file_path=str(src), study_or_trial=trial))
    study.tell(trial, VALUES[0])
    for plan, fam, values in zip(PLANS[1:], FAMILIES[1:], VALUES[1:], strict=True):
        study.add_trial(create_trial(values=values, user_attrs={record.PLAN: plan, record.FAMILIES: fam}))
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={record.PLAN: PLANS[0], record.FAMILIES: FAMILIES[0]}))
    return url, root, payload


@pytest.fixture(scope="module")
def server(study_storage: tuple[str, Path, bytes]) -> Iterator[str]:
    """``python -m search.dashboard`` on a free port; yields its base URL; killed at the end."""
    url, root, _ = study_storage
    port = _free_port()
    log = open(root / "dashboard.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.dashboard", "--storage", url, "--port", str(port), "--store", str(root)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the dashboard exited with {proc.returncode}: {(root / 'dashboard.log').read_text()}")
            try:
                _get(f"{base}/api/meta", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"the dashboard did not answer within 30 s: {(root / 'dashboard.log').read_text()}")
                time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _study_id(base: str) -> int:
    studies = _get_json(f"{base}/api/studies")["study_summaries"]
    return next(s["study_id"] for s in studies if s["study_name"] == STUDY)


def test_lists_the_study(server: str) -> None:
    studies = _get_json(f"{server}/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == [STUDY]
    assert [d.lower() for d in studies[0]["directions"]] == ["maximize", "maximize"]


def test_study_detail_has_plans_families_and_metric_names(server: str) -> None:
    raw = _get(f"{server}/api/studies/{_study_id(server)}")
    detail = json.loads(raw)
    assert b"val_accuracy" in raw and b"compression_ratio" in raw
    assert detail["objective_names"] == ["val_accuracy", "compression_ratio"]
    trials = detail["trials"]
    assert len(trials) == 4
    assert [t["state"].lower() for t in trials] == ["complete", "complete", "complete", "pruned"]
    for t, plan, fam, values in zip(trials, PLANS, FAMILIES, VALUES, strict=False):
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert attrs[record.FAMILIES] == fam
        assert json.loads(attrs[record.PLAN]) == plan  # the dashboard shows user attrs as JSON text
        assert t["values"] == values
    # All three complete trials are mutually non-dominated: the dashboard's Pareto front.
    assert sorted(t["number"] for t in detail["best_trials"]) == [0, 1, 2]


def test_serves_a_trial_artifact_from_the_store(server: str, study_storage: tuple[str, Path, bytes]) -> None:
    url, _, payload = study_storage
    study = optuna.load_study(study_name=STUDY, storage=url)
    trial = study.trials[0]
    artifact_id = record.TrialRecord.from_trial(trial).artifact_id
    got = _get(f"{server}/artifacts/{_study_id(server)}/{trial._trial_id}/{artifact_id}")
    assert got == payload


def test_a_bad_storage_url_is_a_one_line_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "search.dashboard", "--storage", "mongodb://x", "--port", str(_free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "mongodb://x" in err and err.startswith("error: storage URL")
