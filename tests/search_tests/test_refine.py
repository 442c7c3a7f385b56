"""search.refine: which plans (hypervolume contribution), successive-halving rounds, refinement
trials in the same study (marked, not counted, never stopped), export of the refined values and
search.apply reproducing a refined artifact byte for byte. One tiny digits study: 4 search
trials, then 4 plans refined at 1 epoch and the best 2 at 2 epochs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState, create_trial

from objectives import record
from objectives.objective import Objective, is_refinement
from objectives.pipeline import Workbench
from objectives.record import TrialRecord, read_plan_file
from search import apply as apply_cli
from search import export as export_cli
from search import refine as refine_cli
from search import run as run_cli
from search.progress import front_trials, study_hypervolume
from search.refine import (
    Round,
    best_refinements,
    choose,
    contributions,
    final_epochs,
    rank,
    schedule,
    study_hv,
)
from search.studies import study_space
from search.trials import counted

TRIALS, TOP, FACTOR = 4, 4, 0.5  # digits fine-tunes 4 epochs: F = 2, rounds of 4 plans x 1 epoch, 2 x 2
NAME = "quantization-digits"


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # One thread: the digits CNN gains nothing from two, and loses much when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("refine")
    run_cli.main(["--study", "quantization", "--trials", str(TRIALS), "--preset", "digits",
                  "--storage", f"sqlite:///{root}/search.db", "--quiet",
                  "--refine", str(TOP), "--refine-factor", str(FACTOR)])
    yield root
    torch.set_num_threads(threads)


def _study(root: Path) -> optuna.Study:
    return optuna.load_study(study_name=NAME, storage=f"sqlite:///{root}/search.db")


def test_schedule_halves_the_plans_and_grows_the_epochs_to_factor_times_the_preset() -> None:
    assert final_epochs(5, 4) == 20 and final_epochs(0.5, 4) == 2 and final_epochs(0.01, 4) == 1
    assert schedule(8, 2, 20) == [Round(0, 8, 5), Round(1, 4, 10), Round(2, 2, 20)]
    assert schedule(5, 2, 20) == [Round(0, 5, 10), Round(1, 2, 20)]
    assert schedule(9, 3, 9) == [Round(0, 9, 3), Round(1, 3, 9)]
    assert schedule(2, 2, 2) == [Round(0, 2, 2)]
    assert schedule(3, 2, 20) == [Round(0, 3, 20)]
    assert schedule(1, 2, 20) == [Round(0, 1, 20)]
    assert schedule(4, 2, 2) == [Round(0, 4, 1), Round(1, 2, 2)]


def test_choice_by_hypervolume_contribution_then_by_rank() -> None:
    base = 0.95  # reference: accuracy 0.85, ratio 1 (log 0)
    points = {"A": (0.95, 2.0), "B": (0.94, 8.0), "Bp": (0.9395, 8.1), "C": (0.90, 32.0),
              "F": (0.80, 64.0),  # on the front, below the reference accuracy: contributes nothing
              "E": (0.92, 4.0),  # dominated by B: second rank
              "G": (0.91, 3.0)}  # dominated by E: third rank
    study = optuna.create_study(directions=["maximize", "maximize"])
    number = {}
    for name, (acc, ratio) in points.items():
        number[name] = len(study.trials)
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[acc, ratio], user_attrs={record.CONSTRAINTS: [0.0]}))
    # Never candidates: a refinement trial, an infeasible trial, a stopped trial.
    study.add_trial(create_trial(state=TrialState.COMPLETE, values=[0.99, 100.0],
                                 user_attrs={record.REFINE_OF: number["B"], record.FIDELITY_EPOCHS: 8}))
    study.add_trial(create_trial(state=TrialState.COMPLETE, values=[0.99, 100.0], user_attrs={record.CONSTRAINTS: [1.0]}))
    study.add_trial(create_trial(state=TrialState.PRUNED))
    trials = study.trials

    # The project's front and hypervolume; a contribution is HV(front) - HV(front without it).
    front = front_trials(trials)
    assert {t.number for t in front} == {number[n] for n in ("A", "B", "Bp", "C", "F")}
    hv = study_hypervolume(trials, base)
    assert study_hv([(t.values[0], t.values[1]) for t in front], base) == pytest.approx(hv)
    by_hand = {t.number: hv - study_hypervolume([u for u in front if u is not t], base) for t in front}
    got = dict(zip([t.number for t in front], contributions([(t.values[0], t.values[1]) for t in front], base), strict=True))
    assert got == pytest.approx(by_hand)
    assert by_hand[number["F"]] == 0.0 and by_hand[number["C"]] > by_hand[number["A"]] > by_hand[number["B"]] > by_hand[number["Bp"]] > 0

    names = {v: k for k, v in number.items()}
    assert [names[t.number] for t in choose(trials, 2, base)] == ["C", "A"]
    # Fewer front trials than asked for: filled from the dominated ones by rank.
    assert [names[t.number] for t in choose(trials, 10, base)] == ["C", "A", "B", "Bp", "F", "E", "G"]
    assert rank([], base) == []

    # Export shows the finished refinement at the highest fidelity.
    for state, epochs in [(TrialState.COMPLETE, 4), (TrialState.COMPLETE, 8), (TrialState.FAIL, 16)]:
        study.add_trial(create_trial(state=state, values=[0.95, 8.0] if state == TrialState.COMPLETE else None,
                                     user_attrs={record.REFINE_OF: number["C"], record.FIDELITY_EPOCHS: epochs}))
    best = best_refinements(study.trials)
    assert best[number["C"]].user_attrs[record.FIDELITY_EPOCHS] == 8 and best[number["B"]].values == [0.99, 100.0]


def test_rounds_run_as_marked_trials_of_the_same_study_outside_the_budget(study_dir: Path) -> None:
    study = _study(study_dir)
    trials = study.trials
    search = [t for t in trials if not is_refinement(t)]
    refined = [t for t in trials if is_refinement(t)]
    assert len(search) == TRIALS and counted(study) == TRIALS
    assert all(t.state == TrialState.COMPLETE for t in trials)
    base = study.user_attrs["baseline"]["val_accuracy"]
    rounds = {r: [t for t in refined if t.user_attrs[record.REFINE_ROUND] == r] for r in (0, 1)}
    assert len(refined) == len(rounds[0]) + len(rounds[1]) == TOP + TOP // 2
    # Round 0: the 4 most promising search trials (here all of them) at F/2 = 1 epoch.
    assert [t.user_attrs[record.REFINE_OF] for t in rounds[0]] == [t.number for t in choose(trials, TOP, base)]
    # Round 1: the best 2 by the round-0 refined values, at F = 2 epochs.
    order = rank([(t.values[0], t.values[1]) for t in rounds[0]], base)
    assert [t.user_attrs[record.REFINE_OF] for t in rounds[1]] == [rounds[0][i].user_attrs[record.REFINE_OF] for i in order[:2]]
    for r, epochs in [(0, 1), (1, 2)]:
        for t in rounds[r]:
            parent = trials[t.user_attrs[record.REFINE_OF]]
            rec, prec = TrialRecord.from_trial(t, study.metric_names), TrialRecord.from_trial(parent, study.metric_names)
            assert (rec.refine_of, rec.fidelity_epochs, rec.refine_round) == (parent.number, epochs, r)
            assert t.params == parent.params and rec.seed == prec.seed and rec.families == prec.families
            assert rec.plan == {**prec.plan, "finetune": {**prec.plan["finetune"], "epochs": epochs}}
            assert rec.epochs == epochs == len(rec.curve) and rec.stopped_at_epoch is None
            assert rec.artifact_id and rec.plan_artifact_id and sum(rec.breakdown.values()) == rec.bytes
    # Refinement trials are neither on the search front nor counted as search trials.
    assert not {t.number for t in front_trials(trials)} & {t.number for t in refined}


def test_refining_again_reuses_the_finished_refinements(study_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = len(_study(study_dir).trials)
    refine_cli.main(["--name", NAME, "--storage", f"sqlite:///{study_dir}/search.db", "--top", str(TOP),
                     "--factor", str(FACTOR), "--quiet"])
    out = capsys.readouterr().out
    assert "round 0: 4 plans at 1 epochs" in out and "round 1: 2 plans at 2 epochs" in out
    assert len(_study(study_dir).trials) == before


def test_a_refinement_enqueued_by_hand_runs_in_any_optimize_and_is_never_stopped(study_dir: Path) -> None:
    storage = optuna.storages.InMemoryStorage()  # the test's own copy: the module's study stays as refine left it
    optuna.copy_study(from_study_name=NAME, from_storage=f"sqlite:///{study_dir}/search.db", to_storage=storage)
    study = optuna.load_study(study_name=NAME, storage=storage)
    parent = choose(study.trials, 1, study.user_attrs["baseline"]["val_accuracy"])[0]
    study.enqueue_trial(parent.params, user_attrs={record.REFINE_OF: parent.number, record.FIDELITY_EPOCHS: 3,
                                                   record.REFINE_ROUND: 0})

    def no_stopping(trial: optuna.Trial, ratio: float, epochs: int) -> None:
        raise AssertionError("a refinement trial was given an early-stopping hook")

    bench = Workbench.load("digits", store=study_dir, seed=0, device=torch.device("cpu"))
    study.optimize(Objective(bench, study_space(study), stopper=no_stopping), n_trials=1)
    t = study.trials[-1]
    rec, prec = TrialRecord.from_trial(t), TrialRecord.from_trial(parent)
    assert t.state == TrialState.COMPLETE and t.params == parent.params
    assert (rec.refine_of, rec.fidelity_epochs, rec.epochs, len(rec.curve), rec.seed) == (parent.number, 3, 3, 3, prec.seed)
    assert rec.to_plan().finetune["epochs"] == 3 and counted(study) == TRIALS


def test_export_shows_refined_values_and_apply_reproduces_the_refined_bytes(
    study_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "exports"
    export_cli.main(["--name", NAME, "--storage", f"sqlite:///{study_dir}/search.db", "--out", str(out), "--materialize"])
    summary = json.loads((out / "pareto.json").read_text())
    study = _study(study_dir)
    best = best_refinements(study.trials)
    names = study.metric_names
    shown = [p for p in summary["plans"] if "refined_trial" in p]
    assert shown, "no exported plan shows its refinement"
    for p in summary["plans"]:
        r = best.get(p["trial"])
        assert ("refined_trial" in p) == (r is not None)
        if r is None:
            continue
        assert p["refined_trial"] == r.number and p["refined_epochs"] == r.user_attrs[record.FIDELITY_EPOCHS]
        assert p["refined_values"] == dict(zip(names, r.values, strict=True)) and p["values"] == dict(zip(names, study.trials[p["trial"]].values, strict=True))
        assert 0.0 <= p["refined_test_accuracy"] <= 1.0
        assert (out / f"trial-{r.number}.pcz").stat().st_size == p["refined_bytes"]
    csv = pd.read_csv(out / "trials.csv")
    assert len(csv) == len(study.trials)
    assert csv["refine_of"].notna().sum() == sum(is_refinement(t) for t in study.trials)
    for parent, r in best.items():
        row = csv[csv["number"] == parent].iloc[0]
        assert row["refined_trial"] == r.number and row["refined_val_accuracy"] == r.values[0]
        assert row["refined_compression_ratio"] == r.values[1] and not math.isnan(row["val_accuracy"])

    # The refined plan file names its epochs; search.apply of it rebuilds the refined bytes.
    p = max(shown, key=lambda p: p["refined_epochs"])
    plan, rec = read_plan_file(out / p["refined_plan_file"])
    assert plan.finetune["epochs"] == p["refined_epochs"] == rec.fidelity_epochs and rec.refine_of == p["trial"]
    capsys.readouterr()
    apply_cli.main([str(out / p["refined_plan_file"]), "--out", str(tmp_path / "model.pcz"), "--store", str(study_dir)])
    result = json.loads(capsys.readouterr().out)
    assert result["bytes"] == p["refined_bytes"] == result["recorded_bytes"]
    assert result["compression_ratio"] == p["refined_values"]["compression_ratio"]
    assert (tmp_path / "model.pcz").read_bytes() == (out / f"trial-{p['refined_trial']}.pcz").read_bytes()


@pytest.mark.parametrize(("cli", "argv", "needle"), [
    (refine_cli, ["--top", "0"], "--top must be >= 1, got 0"),
    (refine_cli, ["--eta", "1"], "--eta must be >= 2, got 1"),
    (refine_cli, ["--factor", "0"], "--factor must be a number > 0"),
    (run_cli, ["--refine", "-1"], "--refine must be >= 0"),
    (run_cli, ["--refine", "2", "--refine-factor", "nan"], "--refine-factor must be a number > 0"),
])
def test_bad_refine_options_are_one_line_errors(cli: object, argv: list[str], needle: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--storage", f"sqlite:///{tmp_path}/x.db"])  # type: ignore[attr-defined]
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "x.db").exists()
