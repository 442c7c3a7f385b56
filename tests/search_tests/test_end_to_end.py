"""End to end on digits: a small study -> export -> apply of a Pareto plan reproduces its ratio
exactly and its accuracy within noise; resuming continues the same study."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from models.errors import UserError
from search import apply as apply_cli
from search import export as export_cli
from search import run as run_cli
from spaces.plan import read_plan_file

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
        assert {"plan", "families", "bytes", "breakdown", "curve", "wall_seconds", "device", "seed"} <= set(t.user_attrs)
        assert sum(t.user_attrs["breakdown"].values()) == t.user_attrs["bytes"]
        assert t.values[1] == pytest.approx(study.user_attrs["baseline"]["bytes"] / t.user_attrs["bytes"])


def test_export_then_apply_reproduces_the_recorded_ratio(study_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exports"
    export_cli.main(["--study", "all", "--storage", f"sqlite:///{study_dir}/search.db", "--out", str(out), "--materialize"])
    summary = json.loads((out / "pareto.json").read_text())
    assert summary["plans"], "the front is empty"
    assert (out / "pareto.png").stat().st_size > 10_000
    assert len((out / "trials.csv").read_text().strip().splitlines()) == TRIALS + 1
    study = _study(study_dir)
    pruned = {t.number for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE}
    assert not pruned & {p["trial"] for p in summary["plans"]}, "stopped trials entered the front"
    best = max(summary["plans"], key=lambda p: p["compression_ratio"])
    assert 0.0 <= best["test_accuracy"] <= 1.0
    assert (out / f"trial-{best['trial']}.pcz").stat().st_size == best["bytes"]
    capsys.readouterr()
    apply_cli.main([str(out / best["plan_file"]), "--out", str(tmp_path / "model.pcz"), "--store", str(study_dir)])
    result = json.loads(capsys.readouterr().out)
    assert result["bytes"] == best["bytes"]
    assert result["compression_ratio"] == best["compression_ratio"]
    assert abs(result["val_accuracy"] - best["val_accuracy"]) <= 0.01
    assert (tmp_path / "model.pcz").read_bytes() == (out / f"trial-{best['trial']}.pcz").read_bytes()


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


def test_apply_refuses_a_bad_plan_file(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({"plan": {"steps": [{"technique": "nope"}]}, "preset": "digits"}))
    with pytest.raises(SystemExit):
        apply_cli.main([str(bad), "--out", str(tmp_path / "m.pcz")])
    assert "unknown technique 'nope'" in capsys.readouterr().err
    with pytest.raises(UserError):
        read_plan_file(tmp_path / "missing.json")
