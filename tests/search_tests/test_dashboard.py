"""search.dashboard: a real optuna-dashboard server (a subprocess on 127.0.0.1) serves a study's
trials, plans, families, metric names and artifacts over HTTP."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _serving(cmd: list[str], log_path: Path) -> Iterator[str]:
    """Run the dashboard command ``cmd`` (``{port}`` filled in) until it answers; yield its base
    URL; kill it at the end."""
    port = _free_port()
    log = open(log_path, "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen([c.format(port=port) for c in cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the dashboard exited with {proc.returncode}: {log_path.read_text()}")
            try:
                _get(f"{base}/api/meta", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"the dashboard did not answer within 30 s: {log_path.read_text()}")
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


def _search_dashboard(url: str, root: Path) -> list[str]:
    return [sys.executable, "-m", "search.dashboard", "--storage", url, "--port", "{port}", "--store", str(root)]


@pytest.fixture(scope="module")
def server(study_storage: tuple[str, Path, bytes]) -> Iterator[str]:
    """``python -m search.dashboard`` on a free port; yields its base URL; killed at the end."""
    url, root, _ = study_storage
    with _serving(_search_dashboard(url, root), root / "dashboard.log") as base:
        yield base


def _study_id(base: str, name: str = STUDY) -> int:
    studies = _get_json(f"{base}/api/studies")["study_summaries"]
    return next(s["study_id"] for s in studies if s["study_name"] == name)


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
        if t["number"] == 0:  # written by record.write: out of the attribute table (the note shows it)
            assert record.PLAN not in attrs
        else:  # studies recorded before keep it there, still readable
            assert json.loads(attrs[record.PLAN]) == plan
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


# ------------------------------------------------- notes and charts of a real (tiny) digits study

NOTES_STUDY = "notes-digits"
# Stage choices of the trials the search runs (their settings are sampled): two plans that
# compress, and an fp32 plan that --min-ratio 1.5 makes infeasible. One fine-tune epoch
# without distillation (--tune-finetune) keep them short.
_SHORT = {"finetune.epochs": 1, "finetune.lr": 0.01, "finetune.distill_weight": 0.0, "finetune.distill_temperature": 4.0}
ENQUEUED = [
    {"stage.structure": "none", "stage.sparsity": "prune", "stage.weights": "int", "int.learned_step": False,
     "stage.activations": "none", **_SHORT},
    {"stage.structure": "lowrank", "stage.sparsity": "none", "stage.weights": "int", "int.learned_step": False,
     "stage.activations": "actquant", **_SHORT},
    {"stage.structure": "none", "stage.sparsity": "none", "stage.weights": "fp32", "stage.activations": "none", **_SHORT},
]
STOPPED = {"val_accuracy": 0.42, "compression_ratio": 7.5}


@pytest.fixture(scope="module")
def digits_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A digits study run by ``search.run`` (three trials, one infeasible) plus a stopped trial
    added by hand (early stopping needs five finished curves first: too slow here)."""
    from search import run as run_cli

    root = tmp_path_factory.mktemp("notes")
    url = f"sqlite:///{root}/search.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=NOTES_STUDY, storage=url, directions=["maximize", "maximize"])
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={  # trial 0
        record.PLAN: PLANS[0], record.FAMILIES: FAMILIES[0], record.CURVE: [0.3, 0.42],
        record.STOPPED_AT_EPOCH: 2, record.STOPPED_VALUES: STOPPED}))
    for params in ENQUEUED:
        study.enqueue_trial(params)
    run_cli.main(["--study", "all", "--name", NOTES_STUDY, "--trials", "4", "--preset", "digits", "--storage", url,
                  "--min-ratio", "1.5", "--tune-finetune", "--sampler-seed", "0", "--quiet"])
    from search.notes import save_trial_note

    study = optuna.load_study(study_name=NOTES_STUDY, storage=url)
    save_trial_note(study, study.trials[0])  # what a worker's callback does for the trials it runs
    return url, root


@pytest.fixture(scope="module")
def notes_server(digits_study: tuple[str, Path]) -> Iterator[str]:
    url, root = digits_study
    with _serving(_search_dashboard(url, root), root / "dashboard.log") as base:
        yield base


def _detail(base: str) -> dict[str, Any]:
    return _get_json(f"{base}/api/studies/{_study_id(base, NOTES_STUDY)}")


def test_every_finished_trial_has_a_note_with_plan_bytes_and_curve(notes_server: str, digits_study: tuple[str, Path]) -> None:
    study = optuna.load_study(study_name=NOTES_STUDY, storage=digits_study[0])
    served = {t["number"]: t["note"]["body"] for t in _detail(notes_server)["trials"]}
    assert [t.state for t in study.trials] == [TrialState.PRUNED] + [TrialState.COMPLETE] * 3
    for t in study.trials:
        note = served[t.number]
        rec = record.TrialRecord.from_trial(t, study.metric_names)
        assert note.startswith(f"### Trial {t.number}: {rec.families}"), note[:200]
        for i, step in enumerate(rec.to_plan().steps, 1):
            assert f"| {i} | {step.stage} | {step.technique} | {step.family} |" in note
            for layer, override in step.layers.items():
                assert f"| `{layer}` |" in note and f"{step.technique}.{next(iter(override))}" in note
        if t.number == 0:
            assert "**Stopped early** after epoch 2: val accuracy 0.4200 at ratio 7.50×" in note
            continue
        if rec.infeasible:
            assert t.params["stage.weights"] == "fp32"
            assert f"**Infeasible**: {rec.infeasible}" in note and "#### Validation curve" not in note
            continue
        assert f"#### Validation curve\n\n`{notes_sparkline(rec.curve)}`" in note
        assert rec.bytes is not None and f"| **this trial** | {rec.values['val_accuracy']:.4f} | " in note
        assert f"{rec.bytes:,} B" in note and f"#### Bytes by unit: {rec.bytes:,} B" in note
        for unit, n in rec.breakdown.items():
            assert f"| `{unit}` | {n:,} |" in note
    assert sum("**Infeasible**" in n for n in served.values()) == 1


def notes_sparkline(curve: list[float]) -> str:
    from search.notes import sparkline

    return sparkline(curve)


def test_the_study_note_and_charts_show_the_front_by_family_on_a_log_axis(notes_server: str,
                                                                           digits_study: tuple[str, Path]) -> None:
    from search.notes import BYTES_CHART_ID, FRONT_CHART_ID
    from search.progress import front_trials

    study = optuna.load_study(study_name=NOTES_STUDY, storage=digits_study[0])
    front = front_trials(study.trials)
    assert front, "no trial on the front"
    detail = _detail(notes_server)
    note = detail["note"]["body"]
    base = study.user_attrs["baseline"]
    assert note.startswith(f"## {NOTES_STUDY}")
    assert f"| fp32 | {base['model']} | digits | {base['val_accuracy']:.4f} | {base['test_accuracy']:.4f} |" in note
    for t in front:
        assert (f"| #{t.number} | {t.user_attrs['families']} | {t.values[0]:.4f} | {t.values[1]:.2f}× "
                f"| {t.user_attrs['bytes']:,} |") in note
    charts = {g["id"]: json.loads(g["graph_object"]) for g in detail["plotly_graph_objects"]}
    assert set(charts) == {FRONT_CHART_ID, BYTES_CHART_ID}
    chart = charts[FRONT_CHART_ID]
    assert chart["layout"]["xaxis"]["type"] == "log"
    traces = {t["name"]: t for t in chart["data"]}
    for t in front:
        assert t.values[1] in traces[t.user_attrs["families"]]["x"]
    stopped = traces["stopped early (at the stop)"]
    assert (stopped["x"], stopped["y"]) == ([STOPPED["compression_ratio"]], [STOPPED["val_accuracy"]])
    bars = [t for t in charts[BYTES_CHART_ID]["data"] if t["type"] == "bar"]
    assert len(bars[0]["x"]) == len(front)
    for column, t in enumerate(front):  # each stacked bar adds up to the artifact's bytes
        assert sum(b["y"][column] for b in bars) == t.user_attrs["bytes"]
    served = json.dumps(detail["note"]) + json.dumps(detail["plotly_graph_objects"])
    served += "".join(t["note"]["body"] for t in detail["trials"])
    assert "sqlite:" not in served and str(digits_study[1]) not in served


def test_the_real_artifact_downloads_from_both_dashboard_commands(notes_server: str, digits_study: tuple[str, Path]) -> None:
    url, root = digits_study
    study = optuna.load_study(study_name=NOTES_STUDY, storage=url)
    trial = next(t for t in study.trials if record.ARTIFACT_ID in t.user_attrs)
    artifact_id = trial.user_attrs[record.ARTIFACT_ID]
    stored = (root / "artifacts" / artifact_id).read_bytes()
    path = f"/artifacts/{_study_id(notes_server, NOTES_STUDY)}/{trial._trial_id}/{artifact_id}"
    with urllib.request.urlopen(notes_server + path, timeout=10) as r:  # noqa: S310 (127.0.0.1 only)
        assert r.status == 200 and r.read() == stored
    # The README's plain optuna-dashboard line, with the artifact directory it names.
    cli = str(Path(sys.executable).parent / "optuna-dashboard")
    with _serving([cli, url, "--port", "{port}", "--artifact-dir", str(root / "artifacts")], root / "plain.log") as base:
        assert _get(base + path) == stored


def test_export_refreshes_the_study_note(digits_study: tuple[str, Path], tmp_path: Path) -> None:
    import optuna_dashboard

    from search import export as export_cli

    url, root = digits_study
    study = optuna.load_study(study_name=NOTES_STUDY, storage=url)
    optuna_dashboard.save_note(study, "stale")
    export_cli.main(["--name", NOTES_STUDY, "--storage", url, "--out", str(tmp_path / "out")])
    assert optuna_dashboard.get_note(study).startswith(f"## {NOTES_STUDY}")
