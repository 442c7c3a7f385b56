"""search.export's front is honest: plans below the accuracy floor (baseline - 10 points, the
hypervolume's reference) are left out unless ``--accuracy-floor`` says otherwise; stopped trials
keep their values in trials.csv; pareto.png zooms on the useful band, labels points with trial
numbers and colours them by technique families. One digits study written directly (no
training): each trial's artifact is an untrained digits CNN."""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState, create_trial

from models.registry import create_model
from objectives import record
from search import export as export_cli
from search.export import front_figure
from search.studies import CONFIG_ATTR, SPACE_ATTR, StudyConfig, directions
from search.worker import BUDGET_ATTR
from spaces.plan import Plan, get_study_space
from storage.codec import encode
from storage.studies import open_artifact_store

NAME = "all-digits"
BASELINE = {"val_accuracy": 0.98, "test_accuracy": 0.975, "bytes": 755465, "key": "k", "model": "digits_cnn",
            "dataset": "digits"}
FLOOR = 0.98 - 0.10


def _plan(*steps: dict[str, Any]) -> dict[str, Any]:
    return Plan.from_dict({"steps": list(steps)}).to_dict()


INT4 = _plan({"technique": "int", "config": {"bits": 4}})
PRUNE = _plan({"technique": "prune", "config": {"sparsity": 0.5}})
# (state, values, families, plan, extra attributes)
TRIALS: list[tuple[TrialState, list[float] | None, str, dict[str, Any], dict[str, Any]]] = [
    (TrialState.COMPLETE, [0.975, 3.0], "prune", PRUNE, {}),                  # 0: front
    (TrialState.COMPLETE, [0.95, 20.0], "lowrank+prune+int+act", INT4, {}),  # 1: front
    (TrialState.COMPLETE, [0.088, 216.0], "binary", INT4, {}),                # 2: front, chance level
    (TrialState.PRUNED, None, "prune+int", INT4,                               # 3: stopped, non-dominated
     {record.STOPPED_AT_EPOCH: 2, record.CURVE: [0.95, 0.9722],
      record.STOPPED_VALUES: {"val_accuracy": 0.9722, "compression_ratio": 78.08}}),
    (TrialState.COMPLETE, [0.90, 10.0], "int", INT4, {}),                     # 4: dominated
]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("front")
    (root / "data").mkdir()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = StudyConfig(space="all", preset="digits")
    study = optuna.create_study(study_name=NAME, storage=f"sqlite:///{root}/search.db", directions=directions(config.objectives))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_accuracy", "compression_ratio"])
    for key, value in {CONFIG_ATTR: config.to_dict(), "preset": "digits", SPACE_ATTR: get_study_space("all").record(),
                       "baseline": BASELINE, "code_version": "test", BUDGET_ATTR: len(TRIALS)}.items():
        study.set_user_attr(key, value)
    store = open_artifact_store(str(root / "artifacts"))
    blob = encode(create_model("digits_cnn"))
    for i, (state, values, families, plan, extra) in enumerate(TRIALS):
        attrs = {record.PLAN: plan, record.FAMILIES: families, record.PRESET: "digits", record.DATASET: "digits",
                 record.SEED: i, record.CONSTRAINTS: [0.0], record.BYTES: len(blob), **extra}
        if state == TrialState.COMPLETE:
            store.write(f"artifact-{i}", io.BytesIO(blob))
            attrs[record.ARTIFACT_ID] = f"artifact-{i}"
        study.add_trial(create_trial(state=state, values=values, user_attrs=attrs))
    return root


def _export(root: Path, out: Path, *extra: str) -> None:
    export_cli.main(["--name", NAME, "--storage", f"sqlite:///{root}/search.db", "--store", str(root),
                     "--data-dir", str(root / "data"), "--out", str(out), *extra])


def test_a_chance_level_plan_is_left_out_by_default(study_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exports"
    _export(study_dir, out)
    summary = json.loads((out / "pareto.json").read_text())
    assert [p["trial"] for p in summary["plans"]] == [0, 1]
    assert summary["accuracy_floor"] == {"points": 10.0, "val_accuracy": pytest.approx(FLOOR), "left_out": [2]}
    assert sorted(p.name for p in out.glob("plan-trial-*.json")) == ["plan-trial-0.json", "plan-trial-1.json"]
    printed = capsys.readouterr().out
    assert "2 Pareto plans" in printed
    assert "trial    2" not in printed and "trial    1" in printed
    assert "left out 1 below the accuracy floor 0.8800" in printed and "trials 2;" in printed
    # trials.csv still lists every trial; the chance-level plan is on the (unfiltered) front.
    csv = pd.read_csv(out / "trials.csv")
    assert len(csv) == len(TRIALS) and bool(csv.set_index("number").loc[2, "pareto"])


def test_the_option_keeps_every_plan(study_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exports"
    _export(study_dir, out, "--accuracy-floor", "100")
    summary = json.loads((out / "pareto.json").read_text())
    assert [p["trial"] for p in summary["plans"]] == [0, 1, 2]
    assert summary["accuracy_floor"]["left_out"] == []
    assert (out / "plan-trial-2.json").is_file()
    assert "left out" not in capsys.readouterr().out


def test_a_floor_above_every_plan_is_one_line(study_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for floor, needle in [("0", "every Pareto plan of study 'all-digits' is below the accuracy floor 0.9800"),
                          ("-1", "--accuracy-floor must be >= 0"), ("nan", "--accuracy-floor must be >= 0")]:
        with pytest.raises(SystemExit) as exc:
            _export(study_dir, tmp_path / "exports", "--accuracy-floor", floor)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert not (tmp_path / "exports").exists()


def test_stopped_trials_keep_their_values_in_trials_csv(study_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exports"
    _export(study_dir, out)
    csv = pd.read_csv(out / "trials.csv").set_index("number")
    stopped = csv.loc[3]
    assert stopped["state"] == "PRUNED" and bool(stopped["stopped"])
    assert stopped["val_accuracy"] == pytest.approx(0.9722) and stopped["compression_ratio"] == pytest.approx(78.08)
    assert stopped["stopped_at_epoch"] == 2 and not bool(stopped["pareto"])
    assert not csv.drop(index=3)["stopped"].any()
    assert not any(math.isnan(v) for v in csv["val_accuracy"])


def _texts(fig: Any) -> tuple[list[str], list[str]]:
    ax = fig.axes[0]
    return [t.get_text() for t in ax.get_legend().get_texts()], [t.get_text() for t in ax.texts]


def test_pareto_png_zooms_labels_and_names_families(study_dir: Path) -> None:
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{study_dir}/search.db")
    fig = front_figure(study, BASELINE, FLOOR)
    try:
        ax = fig.axes[0]
        low, high = ax.get_ylim()
        assert 100 * FLOOR - 1.0 <= low <= 100 * FLOOR and 100 * 0.98 < high <= 100 * 0.98 + 1.0
        assert ax.get_xscale() == "log"
        legend, labels = _texts(fig)
        assert {"prune", "lowrank+prune+int+act"} <= set(legend)
        assert "binary" not in legend  # below the floor
        assert any("stopped" in entry for entry in legend)
        assert sorted(labels) == ["#0", "#1"]
        # The stopped trial is drawn at its values when stopped.
        offsets = [c.get_offsets() for c in ax.collections]
        assert any(len(o) and tuple(o[0]) == pytest.approx((78.08, 97.22)) for o in offsets)
    finally:
        plt.close(fig)
    everything = front_figure(study, BASELINE, None)
    try:
        legend, labels = _texts(everything)
        assert "binary" in legend and sorted(labels) == ["#0", "#1", "#2"]
        assert everything.axes[0].get_ylim()[0] < 8.8
    finally:
        plt.close(everything)


def test_wandb_gets_the_exported_front(study_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from search import wandb_log

    logged: list[dict[str, Any]] = []
    monkeypatch.setattr(wandb_log, "import_wandb", lambda: None)
    monkeypatch.setattr(wandb_log, "log_export", logged.append)
    _export(study_dir, tmp_path / "exports", "--wandb")
    (summary,) = logged
    assert [p["trial"] for p in summary["plans"]] == [0, 1]
    assert all(0.0 <= p["test_accuracy"] <= 1.0 for p in summary["plans"])
