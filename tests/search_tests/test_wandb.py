"""search.wandb_log: finished trials (with their validation curves and the study's baseline) and
an export's front are logged to offline W&B runs (no network)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'pareto-compress[wandb]')")

from objectives import record  # noqa: E402
from search.wandb_log import WandbLogger, log_export  # noqa: E402

PLAN = {"version": 1, "steps": [{"technique": "int", "config": {"bits": 4}}], "policy": {}, "finetune": {}}
BASELINE = {"val_accuracy": 0.97, "test_accuracy": 0.965, "bytes": 755465, "key": "k"}


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """W&B offline, every file under ``tmp_path``. wandb keeps the settings of its first run in
    a process-wide singleton: torn down before and after, so each test reads its own."""
    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield tmp_path
    wandb.teardown()


def _tables(files_dir: Path, key: str) -> list[dict]:
    """The tables logged under ``key``, in the order they were logged (W&B names them
    ``<key>_<step>_<hash>.table.json``)."""
    paths = sorted((files_dir / "media" / "table").glob(f"{key}_*.table.json"), key=lambda p: int(p.name.split("_")[-2]))
    return [json.loads(p.read_text()) for p in paths]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_offline_run_logs_a_trial_and_finishes(offline: Path) -> None:
    tmp_path = offline
    study = optuna.create_study(study_name="wandb-test", directions=["maximize", "maximize"])
    study.set_metric_names(["val_accuracy", "compression_ratio"])
    study.set_user_attr("baseline", BASELINE)
    study.add_trial(create_trial(values=[0.93, 7.5], user_attrs={record.PLAN: PLAN, record.FAMILIES: "int", record.BYTES: 1234,
                                                                 record.CURVE: [0.61, 0.88, 0.93]}))
    stopped = {record.STOPPED_AT_EPOCH: 2, record.STOPPED_VALUES: {"val_accuracy": 0.5, "compression_ratio": 9.0},
               record.CURVE: [0.31, 0.5]}
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={record.PLAN: PLAN, record.FAMILIES: "int", **stopped}))

    logger = WandbLogger("wandb-test", {"space": "quantization", "preset": "digits"}, project="pareto-compress-test")
    try:
        for t in study.trials:
            logger(study, t)
        run_dir = Path(logger.run.dir).parent
        summary = dict(logger.run.summary)
        config = dict(logger.run.config)
    finally:
        logger.close()
    logger.close()  # a second close (the exit hook's) does nothing

    assert run_dir.is_relative_to(tmp_path), run_dir
    assert run_dir.name.startswith("offline-run-"), run_dir
    assert list(run_dir.glob("*.wandb")), f"no offline run file in {run_dir}"
    # The summary keeps the last logged row (the pruned trial); the first row's values were logged too.
    assert summary["trial"] == 1 and summary["state"] == "PRUNED"
    assert summary["val_accuracy"] == pytest.approx(0.93)
    assert summary["compression_ratio"] == pytest.approx(7.5)
    assert json.loads(summary["plan"]) == PLAN
    assert summary["families"] == "int"
    assert summary["stopped_at_epoch"] == 2 and summary["stopped_val_accuracy"] == pytest.approx(0.5)
    # The run's config holds the study's configuration and its baseline (read from the study).
    assert config["space"] == "quantization" and config["baseline"] == BASELINE
    # Each trial's validation curve is a table of (epoch, val_accuracy); close() logs them all.
    curves = _tables(run_dir / "files", "curve")
    assert [c["data"] for c in curves] == [[[1, 0.61], [2, 0.88], [3, 0.93]], [[1, 0.31], [2, 0.5]]]
    assert curves[0]["columns"] == ["epoch", "val_accuracy"]
    (everything,) = _tables(run_dir / "files", "curves")
    assert everything["columns"] == ["trial", "state", "epoch", "val_accuracy"]
    assert everything["data"] == [[0, "COMPLETE", 1, 0.61], [0, "COMPLETE", 2, 0.88], [0, "COMPLETE", 3, 0.93],
                                  [1, "PRUNED", 1, 0.31], [1, "PRUNED", 2, 0.5]]
    # Finished: no active run remains and the finished run refuses more rows.
    assert wandb.run is None
    with pytest.raises(wandb.errors.UsageError):
        logger.run.log({"trial": 2})
    # The offline record file holds the logged rows. wandb's service process writes it
    # asynchronously (finish() may return before it is flushed), so wait for it.
    records = next(run_dir.glob("*.wandb"))
    needles = (b"val_accuracy", b"compression_ratio", b"families", b"PRUNED", b"bits")
    deadline = time.monotonic() + 60
    while not all(n in records.read_bytes() for n in needles) and time.monotonic() < deadline:
        time.sleep(0.5)
    data = records.read_bytes()
    assert all(n in data for n in needles), [n for n in needles if n not in data]


def test_export_logs_the_front_with_test_accuracy(offline: Path) -> None:
    plans = [
        {"trial": 3, "families": "prune+int", "values": {"val_accuracy": 0.96, "compression_ratio": 20.0},
         "test_accuracy": 0.955, "bytes": 37000, "plan_file": "plan-trial-3.json"},
        {"trial": 7, "families": "lowrank+prune+int+act", "values": {"val_accuracy": 0.93, "compression_ratio": 80.0},
         "test_accuracy": 0.921, "bytes": 9400, "plan_file": "plan-trial-7.json",
         "refined_trial": 12, "refined_test_accuracy": 0.94},
    ]
    summary = {"study": "all-digits", "config": {"space": "all", "preset": "digits"}, "baseline": BASELINE,
               "metric_names": ["val_accuracy", "compression_ratio"], "hypervolume": 0.21,
               "accuracy_floor": {"points": 10.0, "val_accuracy": 0.87, "left_out": [5]}, "plans": plans}
    run = log_export(summary, project="pareto-compress-test")
    files = Path(run.dir)
    assert files.is_relative_to(offline)
    assert run.name == "all-digits-export"
    assert wandb.run is None  # finished
    assert dict(run.config)["baseline"] == BASELINE and dict(run.config)["accuracy_floor"]["left_out"] == [5]
    (front,) = _tables(files, "front")
    rows = [dict(zip(front["columns"], row, strict=True)) for row in front["data"]]
    assert [(r["trial"], r["families"], r["test_accuracy"], r["compression_ratio"]) for r in rows] == [
        (3, "prune+int", 0.955, 20.0), (7, "lowrank+prune+int+act", 0.921, 80.0)]
    assert rows[1]["refined_test_accuracy"] == 0.94 and rows[0]["refined_trial"] is None
    # The summary scalars are in the offline record file (written asynchronously: wait for it).
    records = next(files.parent.glob("*.wandb"))
    deadline = time.monotonic() + 60
    while b"best_test_accuracy" not in records.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"best_test_accuracy" in records.read_bytes() and b"front_size" in records.read_bytes()
