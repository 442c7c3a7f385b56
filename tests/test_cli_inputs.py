"""Every CLI refuses bad input in one line, before any work: a table of inputs a careful user
might give (malformed plan files, paths that are files or unwritable, damaged datasets, numbers
out of range, unknown names, busy ports), each run through the CLI's ``main(argv)`` in-process
(two through ``python -m`` in a subprocess).

Each row asserts a non-zero exit, exactly one non-empty line on stderr starting with
``error:`` and holding the row's needle, no ``Traceback``, nothing created or changed in the
test's folder, and, where the row uses the module's study, the study unchanged. Nothing trains:
baseline training and the dashboard server are replaced by failures, so a check that comes too
late fails its row instead of running."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import models.baseline
import models.datasets
import objectives.pipeline
from models import baseline as baseline_cli
from objectives import record
from search import apply as apply_cli
from search import dashboard as dashboard_cli
from search import export as export_cli
from search import refine as refine_cli
from search import run as run_cli
from search import worker as worker_cli
from search.studies import CONFIG_ATTR, SPACE_ATTR, StudyConfig, directions
from search.worker import BUDGET_ATTR
from spaces.plan import get_study_space

ROOT = Path(__file__).resolve().parents[1]
CLIS: dict[str, ModuleType] = {
    "search.run": run_cli, "search.worker": worker_cli, "search.export": export_cli, "search.apply": apply_cli,
    "search.refine": refine_cli, "search.dashboard": dashboard_cli, "models.baseline": baseline_cli,
}
STUDY = "all-digits"  # the module's study: digits, two infeasible trials
EMPTY = "empty-digits"  # the same configuration, no trials

PLAN = {"plan": {"steps": [{"technique": "int", "config": {"bits": 4}}]}, "preset": "digits", "seed": 0}


def _record(plan: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A plan file (a trial record) holding ``plan``."""
    return {"plan": plan, "preset": "digits", **fields}


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


GOOD_NPZ = _npz_bytes(x_train=np.zeros((20, 1, 8, 8), np.uint8), y_train=np.arange(20) % 2,
                      x_test=np.zeros((4, 1, 8, 8), np.uint8), y_test=np.arange(4) % 2)


@dataclass(frozen=True)
class Row:
    """One bad input: the CLI, its arguments (``{tmp}``, ``{db}``, ``{port}`` ... filled in), the
    text its error line must hold, and the files the test folder holds first."""

    id: str
    cli: str
    argv: tuple[str, ...]
    needle: str
    files: dict[str, Any] = field(default_factory=dict)  # name -> dict/list (JSON), str or bytes
    study: bool = False  # uses the module's study, which must be unchanged
    unwritable: str | None = None  # a folder of the test made unwritable (os.access says so)
    subprocess: bool = False  # through python -m, in a child process


def row(id: str, cli: str, argv: str, needle: str, **kw: Any) -> Row:
    return Row(id, cli, tuple(argv.split()), needle, **kw)


ROWS = [
    # --- what the user measured: malformed plan files (refused before any data loads)
    row("plan-steps-int", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz", "plan.steps: expected a list, got 5",
        files={"p.json": _record({"steps": 5})}),
    row("plan-step-no-technique", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz", 'plan.steps[0]: missing "technique"',
        files={"p.json": _record({"steps": [{"config": {"bits": 4}}]})}),
    row("plan-config-list", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz",
        "plan.steps[0].config: expected an object, got [4]",
        files={"p.json": _record({"steps": [{"technique": "int", "config": [4]}]})}),
    row("plan-policy-int", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz", "plan.policy: expected an object, got 3",
        files={"p.json": _record({"steps": [], "policy": 3})}),
    row("plan-min-weights-str", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz",
        'plan.policy.min_weights: expected int, got "abc"',
        files={"p.json": _record({"steps": [], "policy": {"min_weights": "abc"}})}),
    row("plan-finetune-epochs-str", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz",
        'plan.finetune.epochs: expected int, got "abc"', files={"p.json": _record({"steps": [], "finetune": {"epochs": "abc"}})}),
    row("plan-finetune-unknown-key", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz",
        "plan.finetune.epoch: unknown key; known: batch_size", files={"p.json": _record({"steps": [], "finetune": {"epoch": 2}})}),
    row("plan-binary", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz", "is not a JSON text file",
        files={"p.json": bytes(range(256))}, subprocess=True),
    row("plan-clusters-float", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz",
        "plan.steps[0].config.clusters: expected int, got 16.5",
        files={"p.json": _record({"steps": [{"technique": "codebook", "config": {"clusters": 16.5}}]})}),
    # --- a plan of another preset; the output path checked before any training
    row("plan-other-preset", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz --preset digits",
        "made on preset 'mnist-lenet5', not --preset 'digits'", files={"p.json": {**PLAN, "preset": "mnist-lenet5"}}),
    row("plan-layers-of-another-model", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz --preset digits",
        "steps[0].layers.fc3: preset 'digits' (model digits_cnn) has no such layer",
        files={"p.json": {"steps": [{"technique": "int", "config": {"bits": 4}, "layers": {"fc3": {"bits": 8}}}]}}),
    row("apply-out-under-file", "search.apply", "{tmp}/p.json --out {tmp}/afile/m.pcz",
        "--out {tmp}/afile/m.pcz cannot be written: {tmp}/afile is a file, not a folder", files={"p.json": PLAN}),
    row("apply-out-unwritable", "search.apply", "{tmp}/p.json --out {tmp}/ro/m.pcz",
        "--out {tmp}/ro/m.pcz cannot be written: {tmp}/ro is not writable", files={"p.json": PLAN}, unwritable="ro"),
    # --- paths: a file or an unwritable place where a folder belongs
    row("run-store-file", "search.run", "--preset digits --trials 1 --storage sqlite:///{tmp}/s/x.db --store {tmp}/afile",
        "--store {tmp}/afile is a file, not a folder"),
    row("run-storage-under-file", "search.run", "--preset digits --trials 1 --storage sqlite:///{tmp}/afile/x.db",
        "folder {tmp}/afile is a file, not a folder"),
    row("run-storage-unwritable", "search.run", "--preset digits --trials 1 --storage sqlite:///{tmp}/ro/x.db",
        "folder {tmp}/ro is not writable", unwritable="ro"),
    row("worker-store-file", "search.worker", "--name all-digits --storage {db} --store {tmp}/afile",
        "--store {tmp}/afile is a file, not a folder", study=True),
    row("export-out-file", "search.export", "--name all-digits --storage {db} --out {tmp}/afile",
        "--out {tmp}/afile is a file, not a folder", study=True),
    row("export-out-unwritable", "search.export", "--name all-digits --storage {db} --out {tmp}/ro/exports",
        "--out {tmp}/ro/exports cannot be created: {tmp}/ro is not writable", study=True, unwritable="ro"),
    # --- export of a study with nothing to export: no matplotlib error, no half-written files
    row("export-only-infeasible", "search.export", "--name all-digits --storage {db} --out {tmp}/exports",
        "no feasible complete trial to export (2 trials: 2 complete; 2 infeasible)", study=True),
    row("export-no-trials", "search.export", "--name empty-digits --storage {db} --out {tmp}/exports",
        "study 'empty-digits' has no trials yet", study=True),
    # --- damaged datasets
    row("npz-truncated", "models.baseline", "--dataset npz:{tmp}/d.npz --store {tmp}/store",
        "{tmp}/d.npz is truncated or corrupt (BadZipFile", files={"d.npz": GOOD_NPZ[: len(GOOD_NPZ) // 2]}),
    row("npz-is-npy", "models.baseline", "--dataset npz:{tmp}/d.npz --store {tmp}/store",
        "{tmp}/d.npz holds a single .npy array, not a .npz archive", files={"d.npz": _npy_bytes(np.zeros(3))}),
    row("mnist-offline-leaves-no-data-dir", "models.baseline", "--preset mnist-lenet5 --data-dir {tmp}/newdata",
        "MNIST not found in {tmp}/newdata/MNIST/raw"),
    # --- a busy port; constraints no plan can meet
    row("dashboard-port-in-use", "search.dashboard", "--storage {db} --port {port}",
        "port {port} on 127.0.0.1 is in use", study=True, subprocess=True),
    row("run-max-bytes-negative", "search.run", "--preset digits --storage {db} --max-bytes -1",
        "--max-bytes must be >= 1", study=True),
    row("run-min-ratio-zero", "search.run", "--preset digits --storage {db} --min-ratio 0",
        "--min-ratio must be a number > 0", study=True),
    # --- more: what a careful user might also try
    row("plan-is-folder", "search.apply", "{tmp}/adir --out {tmp}/m.pcz", "plan file {tmp}/adir is a folder"),
    row("plan-empty-file", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz", "is not valid JSON", files={"p.json": ""}),
    row("apply-out-is-folder", "search.apply", "{tmp}/p.json --out {tmp}/adir", "--out {tmp}/adir is a folder",
        files={"p.json": PLAN}),
    row("apply-out-is-plan", "search.apply", "{tmp}/p.json --out {tmp}/p.json", "is the plan file itself",
        files={"p.json": PLAN}),
    row("apply-epochs-negative", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz --epochs -1", "--epochs must be >= 0",
        files={"p.json": PLAN}),
    row("apply-store-file", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz --store {tmp}/afile",
        "--store {tmp}/afile is a file, not a folder", files={"p.json": PLAN}),
    row("plan-unknown-preset", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz", "unknown preset 'nope'",
        files={"p.json": {**PLAN, "preset": "nope"}}),
    row("plan-finetune-epochs-negative", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz",
        "plan.finetune.epochs must be >= 0, got -1", files={"p.json": _record({"steps": [], "finetune": {"epochs": -1}})}),
    row("plan-seed-negative", "search.apply", "{tmp}/p.json --out {tmp}/m.pcz", "seed: must be >= 0, got -1",
        files={"p.json": {**PLAN, "seed": -1}}),
    row("run-min-ratio-nan", "search.run", "--preset digits --storage {db} --min-ratio nan",
        "--min-ratio must be a number > 0", study=True),
    row("run-accuracy-drop-negative", "search.run", "--preset digits --storage {db} --max-accuracy-drop -1",
        "--max-accuracy-drop must be in 0..100", study=True),
    row("run-seed-negative", "search.run", "--preset digits --storage {db} --seed -1", "--seed must be >= 0", study=True),
    row("run-worker-index-negative", "search.run", "--preset digits --storage {db} --worker-index -1",
        "--worker-index must be >= 0", study=True),
    row("run-storage-no-file", "search.run", "--preset digits --storage sqlite:///", "names no database file"),
    row("run-storage-is-folder", "search.run", "--preset digits --storage sqlite:///{tmp}/adir",
        "{tmp}/adir is a folder, not a database file"),
    row("run-storage-bad-scheme", "search.run", "--preset digits --storage mongodb://localhost/x",
        "storage URL 'mongodb://localhost/x' is not valid"),
    row("run-unknown-preset", "search.run", "--preset nope --storage sqlite:///{tmp}/s/x.db", "unknown preset 'nope'"),
    row("run-bad-device", "search.run", "--preset digits --storage sqlite:///{tmp}/s/x.db --device tpu",
        "unknown device 'tpu'"),
    row("run-dataset-folder-leaves-no-storage", "search.run",
        "--preset digits --trials 1 --storage sqlite:///{tmp}/s/x.db --dataset npz:{tmp}/adir",
        "npz dataset {tmp}/adir is a folder"),
    row("worker-storage-missing", "search.worker", "--storage sqlite:///{tmp}/typo/search.db",
        "no database file {tmp}/typo/search.db"),
    row("worker-trials-zero", "search.worker", "--name all-digits --storage {db} --trials 0", "--trials must be >= 1",
        study=True),
    row("worker-unknown-study", "search.worker", "--name nope --storage {db} --store {tmp}/store",
        "no study 'nope' in this storage; existing: ", study=True),
    row("export-storage-missing", "search.export", "--storage sqlite:///{tmp}/typo/search.db --out {tmp}/exports",
        "no database file {tmp}/typo/search.db"),
    row("export-data-dir-file", "search.export", "--name all-digits --storage {db} --out {tmp}/e --data-dir {tmp}/afile",
        "--data-dir {tmp}/afile is a file, not a folder", study=True),
    row("refine-unknown-study", "search.refine", "--name nope --storage {db}", "no study 'nope' in this storage",
        study=True),
    row("refine-eta-one", "search.refine", "--name all-digits --storage {db} --eta 1", "--eta must be >= 2", study=True),
    row("dashboard-port-out-of-range", "search.dashboard", "--storage {db} --port 70000",
        "--port must be in 1..65535, got 70000", study=True),
    row("dashboard-host-not-here", "search.dashboard", "--storage {db} --host 192.0.2.1 --port {free}",
        "--host '192.0.2.1' is no address of this machine", study=True),
    row("dashboard-storage-missing", "search.dashboard", "--storage sqlite:///{tmp}/typo/search.db --port {free}",
        "no database file {tmp}/typo/search.db"),
    row("npz-empty-file", "models.baseline", "--dataset npz:{tmp}/d.npz --store {tmp}/store",
        "{tmp}/d.npz is not a .npz file (an empty file)", files={"d.npz": b""}),
    row("npz-text-file", "models.baseline", "--dataset npz:{tmp}/d.npz --store {tmp}/store",
        "{tmp}/d.npz is not a .npz file (not a zip archive)", files={"d.npz": "x_train,y_train\n1,2\n"}),
    row("baseline-seed-negative", "models.baseline", "--store {tmp}/store --seed -1", "seed must be >= 0, got -1"),
]


# ------------------------------------------------------------------------------------ fixtures


def _make_study(url: str, name: str, trials: int) -> None:
    """A study as ``search.run --preset digits --max-bytes 1`` records it, written directly (no
    baseline is trained): its configuration, baseline and space, and ``trials`` complete trials
    that broke the size constraint, as ``--max-bytes 1`` makes every trial do."""
    config = StudyConfig(space="all", preset="digits", max_bytes=1)
    study = optuna.create_study(study_name=name, storage=url, directions=directions(config.objectives))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_accuracy", "compression_ratio"])
    attrs = {CONFIG_ATTR: config.to_dict(), "preset": "digits", SPACE_ATTR: get_study_space("all").record(),
             "baseline": {"val_accuracy": 0.98, "test_accuracy": 0.98, "bytes": 755465, "key": "k", "model": "digits_cnn",
                          "dataset": "digits"},
             "code_version": "test", BUDGET_ATTR: trials}
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    for i in range(trials):
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, values=[0.9, 20.0 + i],
            user_attrs={record.PLAN: PLAN["plan"], record.CONSTRAINTS: [28000.0], record.INFEASIBLE: "size constraint violated before training"},
        ))


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A digits study of two infeasible trials and a study of the same configuration without
    trials, in one SQLite file."""
    root = tmp_path_factory.mktemp("cli-inputs")
    url = f"sqlite:///{root}/search.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _make_study(url, STUDY, 2)
    _make_study(url, EMPTY, 0)
    yield root


def _no_work(what: str) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{what} started: the input should have been refused before")

    return fail


class _OfflineTorchvision:
    """torchvision as on a machine without network: the download makes its folders, then fails."""

    class datasets:  # noqa: N801 (the attribute torchvision has)
        @staticmethod
        def MNIST(root: str, train: bool, download: bool) -> None:  # noqa: N802
            (Path(root) / "MNIST" / "raw").mkdir(parents=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: network unavailable (test)")


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _study_state(url: str) -> list[Any]:
    """Each study's name, attributes and trials (number, state, values, attributes)."""
    storage = optuna.storages.RDBStorage(url)
    try:
        return [
            (s.study_name, s.user_attrs,
             [(t.number, t.state.name, t.values, t.user_attrs) for t in optuna.load_study(study_name=s.study_name, storage=storage).trials])
            for s in optuna.get_all_study_summaries(storage)
        ]
    finally:
        storage.engine.dispose()


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _write(path: Path, content: Any) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))


def _run_child(cli: str, argv: list[str], cwd: Path) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", cli, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


# -------------------------------------------------------------------------------------- the table


@pytest.mark.parametrize("r", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_error_line_before_any_work(r: Row, study_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # default paths (runs/, data/, exports/) land where they are checked
    (tmp_path / "afile").write_text("a regular file\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "ro").mkdir()
    for name, content in r.files.items():
        _write(tmp_path / name, content)
    db = f"sqlite:///{study_dir}/search.db"
    values = {"tmp": str(tmp_path), "db": db}
    busy = None
    if "{port}" in " ".join(r.argv):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values["port"] = str(busy.getsockname()[1])
    if "{free}" in " ".join(r.argv):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            values["free"] = str(s.getsockname()[1])
    argv = [_fill(a, values) for a in r.argv]
    needle = _fill(r.needle, values)

    # Nothing may train or serve: a check that comes too late fails here instead.
    monkeypatch.setattr(models.baseline, "load_or_train_baseline", _no_work("baseline training"))
    monkeypatch.setattr(objectives.pipeline, "load_or_train_baseline", _no_work("baseline training"))
    import optuna_dashboard

    monkeypatch.setattr(optuna_dashboard, "run_server", _no_work("the dashboard server"))
    monkeypatch.setattr(models.datasets, "import_torchvision", lambda: _OfflineTorchvision)
    if r.unwritable:
        ro = (tmp_path / r.unwritable).resolve()
        real_access = os.access

        def access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
            if mode & os.W_OK and Path(path).resolve() == ro:
                return False  # as a read-only folder is, also when the tests run as root
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)

    before_tree, before_study = _tree(tmp_path), _study_state(db) if r.study else None
    try:
        if r.subprocess:
            code, out, err = _run_child(r.cli, argv, tmp_path)
        else:
            with pytest.raises(SystemExit) as exc:
                CLIS[r.cli].main(argv)
            code = exc.value.code
            out, err = capsys.readouterr()
    finally:
        if busy is not None:
            busy.close()

    assert code not in (0, None), (code, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert _tree(tmp_path) == before_tree, "the command created or changed files"
    if r.study:
        assert _study_state(db) == before_study, "the command changed the study"


def test_the_table_covers_every_cli() -> None:
    assert {r.cli for r in ROWS} == set(CLIS)
    assert len(ROWS) >= 26 + 15


# ------------------------------------------------------------------------------- beside the table


def test_a_failed_run_removes_only_the_storage_it_created(study_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The row run-dataset-folder-leaves-no-storage shows a new SQLite file removed with its new
    # folder; in a folder that exists, the new file goes with its side files and nothing else.
    monkeypatch.setattr(objectives.pipeline, "load_or_train_baseline", _no_work("baseline training"))
    (tmp_path / "keep.txt").write_text("the user's\n")
    with pytest.raises(SystemExit):
        run_cli.main(["--preset", "digits", "--storage", f"sqlite:///{tmp_path}/new.db", "--dataset", f"npz:{tmp_path}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    # An existing one, with its studies, stays when the same failure happens on it.
    db = f"sqlite:///{study_dir}/search.db"
    before = _study_state(db)
    with pytest.raises(SystemExit):
        run_cli.main(["--preset", "digits", "--storage", db, "--name", "other", "--dataset", f"npz:{tmp_path}"])
    assert (study_dir / "search.db").is_file() and _study_state(db) == before


def test_export_writes_nothing_when_an_artifact_is_corrupt(study_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A front whose second plan fails after the first was processed: no file of the first either.
    from search import export

    front = [SimpleNamespace(number=1), SimpleNamespace(number=2)]
    monkeypatch.setattr(export, "front_trials", lambda trials: front)
    monkeypatch.setattr(export.TrialRecord, "from_trial", classmethod(lambda cls, t, *a: cls(trial=t.number, plan={"steps": []})))
    calls = []

    def artifact(record: Any, store: Any, **kwargs: Any) -> Any:
        calls.append(record.trial)
        if record.trial == 2:
            raise export.UserError("artifact of trial 2 is corrupt (test)")
        return b"blob", None

    monkeypatch.setattr(export, "_artifact_and_model", artifact)
    monkeypatch.setattr(export, "evaluate_split", lambda *a: 0.5)
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{study_dir}/search.db")
    out = tmp_path / "exports"
    with pytest.raises(export.UserError, match="trial 2 is corrupt"):
        export.export(study, out, data_dir=str(tmp_path / "data"), store_root=str(study_dir), materialize=True)
    assert calls == [1, 2] and not out.exists()
