"""End to end on digits: a small study -> export -> apply of a Pareto plan reproduces its ratio
exactly and its accuracy within noise; resuming continues the same study."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from models.errors import UserError
from objectives.pipeline import Workbench
from objectives.record import TrialRecord, read_plan_file
from search import apply as apply_cli
from search import export as export_cli
from search import run as run_cli

TRIALS = 14


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study")
    run_cli.main(["--study", "all", "--trials", str(TRIALS - 4), "--preset", "digits",
                  "--storage", f"sqlite:///{root}/search.db", "--quiet"])
    # Running again continues the same study up to the new total.
    run_cli.main(["--study", "all", "--trials", str(TRIALS), "--preset", "digits",
                  "--storage", f"sqlite:///{root}/search.db", "--quiet"])
    return root


def _study(root: Path) -> optuna.Study:
    return optuna.load_study(study_name="all-digits", storage=f"sqlite:///{root}/search.db")


def test_study_records_plans_metrics_and_baseline(study_dir: Path) -> None:
    study = _study(study_dir)
    states = [t.state for t in study.trials]
    finished = [s for s in states if s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == TRIALS
    assert study.metric_names == ["val_accuracy", "compression_ratio"]
    assert study.user_attrs["preset"] == "digits"
    assert study.user_attrs["baseline"]["bytes"] > 100_000
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in complete:
        r = TrialRecord.from_trial(t, study.metric_names)
        assert r.plan is not None and r.families and r.device and r.wall_seconds is not None and r.curve
        assert (r.preset, r.dataset, r.seed, r.baseline_seed) == ("digits", "digits", t.number, 0)
        assert r.baseline_bytes == study.user_attrs["baseline"]["bytes"]
        assert r.manifest is not None and r.manifest.dataset_hash and r.manifest.code_hash
        assert sum(r.breakdown.values()) == r.bytes
        assert r.values["compression_ratio"] == t.values[1] == pytest.approx(r.baseline_bytes / r.bytes)


def test_export_then_apply_reproduces_the_recorded_ratio(study_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exports"
    export_cli.main(["--study", "all", "--storage", f"sqlite:///{study_dir}/search.db", "--out", str(out), "--materialize",
                     "--onnx"])
    summary = json.loads((out / "pareto.json").read_text())
    assert summary["plans"], "the front is empty"
    assert (out / "pareto.png").stat().st_size > 10_000
    assert len((out / "trials.csv").read_text().strip().splitlines()) == TRIALS + 1
    study = _study(study_dir)
    pruned = {t.number for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE}
    assert not pruned & {p["trial"] for p in summary["plans"]}, "stopped trials entered the front"
    best = max(summary["plans"], key=lambda p: p["values"]["compression_ratio"])
    assert 0.0 <= best["test_accuracy"] <= 1.0
    assert (out / f"trial-{best['trial']}.pcz").stat().st_size == best["bytes"]
    # The plan file is the trial's record, plus the test accuracy.
    plan, rec = read_plan_file(out / best["plan_file"])
    trial = study.trials[best["trial"]]
    assert rec == TrialRecord.from_trial(trial, study.metric_names).model_copy(update={"test_accuracy": best["test_accuracy"]})
    assert plan.to_dict() == TrialRecord.from_trial(trial).plan
    capsys.readouterr()
    apply_cli.main([str(out / best["plan_file"]), "--out", str(tmp_path / "model.pcz"), "--store", str(study_dir)])
    result = json.loads(capsys.readouterr().out)
    assert result["bytes"] == best["bytes"] == result["recorded_bytes"]
    assert result["compression_ratio"] == best["values"]["compression_ratio"] == result["recorded_compression_ratio"]
    assert abs(result["val_accuracy"] - best["values"]["val_accuracy"]) <= 0.01
    assert (tmp_path / "model.pcz").read_bytes() == (out / f"trial-{best['trial']}.pcz").read_bytes()
    # Export's ONNX model of the plan runs in onnxruntime on uint8 images as stored, and predicts
    # what the decoded artifact predicts.
    import numpy as np
    import onnxruntime

    from models.datasets import load_dataset
    from storage.codec import load_artifact

    data = load_dataset("digits", "data", val_fraction=0.15, seed=0)
    images = data.x_test.numpy()
    session = onnxruntime.InferenceSession(str(out / f"trial-{best['trial']}.onnx"))
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    model = load_artifact(out / f"trial-{best['trial']}.pcz")
    assert (logits.argmax(1) == model.predict_uint8(images).numpy()).mean() >= 0.999
    assert np.mean(logits.argmax(1) == data.y_test.numpy()) == pytest.approx(best["test_accuracy"], abs=1e-9)


def test_resuming_with_other_options_is_refused(study_dir: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli.main(["--study", "all", "--trials", str(TRIALS), "--preset", "digits", "--sampler", "random",
                      "--storage", f"sqlite:///{study_dir}/search.db", "--quiet"])
    assert exc.value.code == 2


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys) -> None:
    for argv, needle in [
        (["--study", "nope"], "unknown study 'nope'"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--objectives", "ratio"], "--objectives"),
        (["--storage", "mongodb://x"], "storage URL"),
        (["--trials", "0"], "--trials"),
    ]:
        with pytest.raises(SystemExit) as exc:
            run_cli.main([*argv, "--storage" if "--storage" not in argv else "--quiet",
                          f"sqlite:///{tmp_path}/x.db" if "--storage" not in argv else "--quiet"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


BAD_PLAN_FILES = [
    ({"plan": {"steps": [{"technique": "nope"}]}, "preset": "digits"}, "plan.steps[0].technique: unknown technique 'nope'"),
    ({"plan": {"steps": [{"technique": "int", "config": {"bits": "4"}}]}, "preset": "digits"},
     'plan.steps[0].config.bits: expected int, got "4"'),
    ({"plan": {"steps": 5}, "preset": "digits"}, "plan.steps: expected a list, got 5"),
    ({"plan": {"steps": []}, "preset": "digits", "seed": "3"}, 'seed: expected int, got "3"'),
    ({"steps": [{"config": {}}]}, 'steps[0]: missing "technique"'),
    ({"steps": [], "finetune": {"epochs": "abc"}}, 'finetune.epochs: expected int, got "abc"'),
    ([1, 2], "expected a plan record"),
    ({"plan": {"steps": []}, "preset": "mnist-lenet5"}, "preset 'mnist-lenet5', not --preset 'digits'"),
]


@pytest.mark.parametrize(("content", "needle"), BAD_PLAN_FILES)
def test_apply_refuses_a_bad_plan_file_before_loading_anything(
    content: object, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was loaded for a bad plan file")

    monkeypatch.setattr(Workbench, "load", no_loading)
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as exc:
        apply_cli.main([str(bad), "--out", str(tmp_path / "m.pcz"), "--preset", "digits"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err and str(bad) in err, err
    assert not (tmp_path / "m.pcz").exists()


def test_apply_refuses_binary_missing_and_preset_less_plan_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Workbench, "load", lambda *a, **k: pytest.fail("data was loaded"))
    binary = tmp_path / "plan.bin"
    binary.write_bytes(bytes(range(256)))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"steps": []}))
    for path, needle in [(binary, "not a JSON text file"), (tmp_path / "missing.json", "does not exist"),
                         (bare, "names no preset")]:
        with pytest.raises(SystemExit) as exc:
            apply_cli.main([str(path), "--out", str(tmp_path / "m.pcz")])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    with pytest.raises(UserError):
        read_plan_file(tmp_path / "missing.json")
