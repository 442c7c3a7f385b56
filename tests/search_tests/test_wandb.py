"""search.wandb_log: a finished trial is logged to an offline W&B run (no network)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'pareto-compress[wandb]')")

from objectives import record  # noqa: E402
from search.wandb_log import WandbLogger  # noqa: E402

PLAN = {"version": 1, "steps": [{"technique": "int", "config": {"bits": 4}}], "policy": {}, "finetune": {}}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_offline_run_logs_a_trial_and_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)

    study = optuna.create_study(study_name="wandb-test", directions=["maximize", "maximize"])
    study.set_metric_names(["val_accuracy", "compression_ratio"])
    study.add_trial(create_trial(values=[0.93, 7.5], user_attrs={record.PLAN: PLAN, record.FAMILIES: "int", record.BYTES: 1234}))
    stopped = {record.STOPPED_AT_EPOCH: 1, record.STOPPED_VALUES: {"val_accuracy": 0.5, "compression_ratio": 9.0}}
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={record.PLAN: PLAN, record.FAMILIES: "int", **stopped}))

    logger = WandbLogger("wandb-test", {"space": "quantization", "preset": "digits"}, project="pareto-compress-test")
    try:
        for t in study.trials:
            logger(study, t)
        run_dir = Path(logger.run.dir).parent
        summary = dict(logger.run.summary)
    finally:
        logger.close()

    assert run_dir.is_relative_to(tmp_path), run_dir
    assert run_dir.name.startswith("offline-run-"), run_dir
    assert list(run_dir.glob("*.wandb")), f"no offline run file in {run_dir}"
    # The summary keeps the last logged row (the pruned trial); the first row's values were logged too.
    assert summary["trial"] == 1 and summary["state"] == "PRUNED"
    assert summary["val_accuracy"] == pytest.approx(0.93)
    assert summary["compression_ratio"] == pytest.approx(7.5)
    assert json.loads(summary["plan"]) == PLAN
    assert summary["families"] == "int"
    assert summary["stopped_at_epoch"] == 1 and summary["stopped_val_accuracy"] == pytest.approx(0.5)
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
