"""Tests of benchmarks/paper_anchors.py: its pure parts only (selection at <= +x points of test
error, the recipes' plans, the epoch budget, the goals, the report's rows). The studies it runs
take hours; `--quick` is the smoke run by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from models.errors import UserError
from spaces.plan import Plan

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "paper_anchors.py"


def load_script():
    """benchmarks/paper_anchors.py as a module (benchmarks/ is a folder of scripts)."""
    if "paper_anchors" in sys.modules:
        return sys.modules["paper_anchors"]
    spec = importlib.util.spec_from_file_location("paper_anchors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_anchors"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


pa = load_script()


def _plan(trial, acc, ratio, test, refined=None):
    entry = {
        "trial": trial,
        "families": "prune+kmeans",
        "values": {"val_accuracy": acc, "compression_ratio": ratio},
        "test_accuracy": test,
        "plan_file": f"plan-trial-{trial}.json",
        "epochs": 3,
    }
    if refined is not None:
        r_trial, r_ratio, r_test = refined
        entry.update(
            refined_trial=r_trial,
            refined_epochs=15,
            refined_bytes=1000,
            refined_values={"val_accuracy": acc, "compression_ratio": r_ratio},
            refined_test_accuracy=r_test,
            refined_plan_file=f"plan-trial-{r_trial}.json",
        )
    return entry


# Baseline test accuracy 0.9850 (1.50% error); error changes: trial 1 +0.05, trial 2 +0.40,
# trial 3 +0.90 (refined: +0.45 at a lower ratio), trial 4 +2.0, trial 5 better than the baseline.
PARETO = {
    "metric_names": ["val_accuracy", "compression_ratio"],
    "baseline": {"val_accuracy": 0.99, "test_accuracy": 0.9850, "bytes": 1_066_440},
    "plans": [
        _plan(1, 0.990, 12.0, 0.9845),
        _plan(2, 0.985, 55.0, 0.9810),
        _plan(3, 0.980, 90.0, 0.9760, refined=(9, 80.0, 0.9805)),
        _plan(4, 0.970, 300.0, 0.9650),
        _plan(5, 0.991, 4.0, 0.9900),
    ],
}


def test_candidates_take_the_refined_values_where_refinement_ran() -> None:
    cands = {c.trial: c for c in pa.front_candidates(PARETO)}
    assert set(cands) == {1, 2, 9, 4, 5}  # trial 3 counts as its refinement, trial 9
    assert cands[9].refined and cands[9].ratio == 80.0 and cands[9].test_accuracy == 0.9805
    assert cands[9].plan_file == "plan-trial-9.json" and cands[9].epochs == 15
    assert not cands[2].refined and cands[2].plan_file == "plan-trial-2.json"
    assert cands[2].delta_points(0.9850) == pytest.approx(0.40)
    assert cands[5].delta_points(0.9850) == pytest.approx(-0.50)


def test_highest_ratio_within_each_criterion() -> None:
    chosen = pa.anchors(PARETO)
    assert set(chosen) == {"0.1", "0.5", "1"}
    assert chosen["0.1"]["trial"] == 1 and chosen["0.1"]["ratio"] == 12.0  # 5 is better but smaller
    assert (
        chosen["0.5"]["trial"] == 9 and chosen["0.5"]["refined"]
    )  # 80x at +0.45 beats 55x at +0.40
    assert chosen["0.5"]["delta_points"] == pytest.approx(0.45)
    assert (
        chosen["1"]["trial"] == 9
    )  # the search value (90x, +0.90) is not a candidate: it was refined
    tight = pa.anchors(PARETO, (0.0,))
    assert tight["0"]["trial"] == 5  # better than the baseline counts
    assert pa.best_within(pa.front_candidates(PARETO)[3:4], 0.9850, 1.0) is None  # trial 4 is +2.0


def test_choosing_on_validation_ignores_the_test_split_and_reports_it_beside() -> None:
    # Baseline val 0.99: trial 2 is +0.5 val points (test +0.40), the refined trial 9 +1.0 val
    # points (test +0.45), trial 4 +2.0. On validation +0.5 picks 2 (55x), not 9 (80x), which the
    # test-split criterion picks.
    chosen = pa.val_anchors(PARETO)
    assert chosen["0.5"]["trial"] == 2 and chosen["0.5"]["ratio"] == 55.0
    assert chosen["0.5"]["delta_points"] == pytest.approx(0.40)
    assert chosen["0.5"]["val_delta_points"] == pytest.approx(0.5)
    assert chosen["1"]["trial"] == 9 and chosen["1"]["refined"]
    assert chosen["0.1"]["trial"] == 1  # 0.990: the baseline's validation accuracy
    assert pa.val_anchors(PARETO, (-0.2,))["-0.2"] is None  # none beats the baseline by 0.2 on val
    lines = pa.validation_rows([{"name": "s", "val_anchors": chosen}])
    assert "| s | <= +0.5 pt | 55.0x (+0.40; +0.50) | trial 2, prune+kmeans |" in lines


def test_the_boundary_is_inclusive_despite_float_rounding() -> None:
    # 0.9850 - 0.9800 is 0.005000000000000004 in binary floats: +0.5 points must still qualify.
    cands = [pa.Candidate(7, 40.0, 0.9800, "sws", "p.json", False)]
    assert pa.best_within(cands, 0.9850, 0.5) is not None
    assert pa.best_within(cands, 0.9850, 0.45) is None


def test_ties_prefer_accuracy_then_the_earlier_trial() -> None:
    cands = [
        pa.Candidate(4, 50.0, 0.98, "a", "4.json", False),
        pa.Candidate(2, 50.0, 0.98, "b", "2.json", False),
        pa.Candidate(3, 50.0, 0.982, "c", "3.json", False),
    ]
    assert pa.best_within(cands, 0.985, 1.0).trial == 3
    assert pa.best_within(cands[:2], 0.985, 1.0).trial == 2


@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
def test_recipe_plans_are_valid_plans_that_compress_every_layer(model: str) -> None:
    plans = pa.recipe_plans(model, epochs=33, train_examples=7200)
    assert set(plans) == {"deep_compression", "sws"}
    for plan in plans.values():
        again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))  # the plan file round trip
        assert again == plan
        assert not plan.policy.keep_first and not plan.policy.keep_last
        assert plan.finetune["epochs"] == 33
    layers = pa.DEEP_COMPRESSION[model]
    dc = plans["deep_compression"]
    assert [s.technique for s in dc.steps] == ["prune", "codebook"]
    prune, codebook = dc.steps
    assert prune.config.scope == "layer" and prune.config.schedule == "gradual"
    assert {p: o["sparsity"] for p, o in prune.layers.items()} == {
        p: pytest.approx(1 - kept) for p, (kept, _) in layers.items()
    }
    assert codebook.config.method == "kmeans" and codebook.config.scope == "layer"
    assert {p: o["clusters"] for p, o in codebook.layers.items()} == {
        p: 2**bits for p, (_, bits) in layers.items()
    }
    sws = plans["sws"].steps[0]
    assert sws.technique == "sws" and sws.config.components == 17 and sws.config.pi_zero == 0.999
    assert sws.config.warmup == 0.0
    assert (
        plans["sws"].finetune["optimizer"] == "adamw"
        and plans["sws"].finetune["weight_decay"] == 0.0
    )


def test_deep_compression_follows_the_paper_tables() -> None:
    assert pa.DEEP_COMPRESSION["lenet300"] == {"fc1": (0.08, 6), "fc2": (0.09, 6), "fc3": (0.26, 6)}
    kept = pa.deep_compression_plan("lenet300", 3).steps[0].config.sparsity
    # 8% of 235,200 + 9% of 30,000 + 26% of 1,000 weights kept: 7.9% overall (the paper's "8%").
    assert 1 - kept == pytest.approx(
        (0.08 * 235_200 + 0.09 * 30_000 + 0.26 * 1_000) / 266_200, abs=1e-4
    )


def test_sws_tau_converts_per_example_to_per_weight_weighting() -> None:
    # The paper weighs the prior by tau / N (training examples); spaces.sws by tau' / n (weights).
    assert pa.sws_tau(5e-3, 266_200, 7_200) == pytest.approx(5e-3 * 266_200 / 7_200, rel=1e-5)
    assert pa.sws_tau(5e-3, 100, 100) == 5e-3
    sws = pa.sws_plan("lenet300", 3, train_examples=60_000).steps[0]
    assert sws.config.tau == pytest.approx(5e-3 * 266_200 / 60_000, rel=1e-5)
    with pytest.raises(UserError):
        pa.sws_tau(5e-3, 0, 10)


def test_recipe_epochs_cover_the_most_one_search_plan_gets() -> None:
    full = pa.epochs_per_plan(3, tune_finetune=True, refine=8, factor=5.0, eta=2)
    assert full["refine_rounds"] == [4, 8, 15] and full["refine_trials"] == [8, 4, 2]
    assert (
        full["recipe"] == 6 + 4 + 8 + 15 and full["refine_epochs_total"] == 8 * 4 + 4 * 8 + 2 * 15
    )
    off = pa.epochs_per_plan(3, tune_finetune=False, refine=0, factor=5.0, eta=2)
    assert off["recipe"] == 3 and off["refine_epochs_total"] == 0


def test_trial_cost_separates_the_fixed_part_from_the_epochs() -> None:
    # 12 s per trial plus 2 s per epoch: a 15-epoch refinement costs 42 s, not 15 x the mean rate.
    points = [(1, 14.0), (3, 18.0), (6, 24.0), (2, 16.0)]
    overhead, per_epoch = pa.trial_cost(points)
    assert overhead == pytest.approx(12.0) and per_epoch == pytest.approx(2.0)
    budget = pa.epochs_per_plan(3, True, 8, 5.0, 2)  # rounds: 8 x 4, 4 x 8, 2 x 15 epochs
    assert pa.refine_seconds((12.0, 2.0), budget) == pytest.approx(8 * 20 + 4 * 28 + 2 * 42)
    assert pa.trial_cost([(3, 30.0), (3, 36.0)]) == (0.0, pytest.approx(11.0))  # one epoch count
    assert pa.trial_cost([(1, 30.0), (5, 10.0)]) == (
        0.0,
        pytest.approx(40.0 / 6),
    )  # no positive fit
    assert pa.trial_cost([]) is None and pa.refine_seconds(None, budget) == 0.0
    # The refinement is estimated with the front's cost where it is the higher (it is what runs).
    assert pa.refine_estimate_of({"trial_cost": (12.0, 2.0), "front_cost": (12.0, 10.0)}, budget) == pytest.approx(
        pa.refine_seconds((12.0, 10.0), budget))
    assert pa.refine_estimate_of({"trial_cost": (12.0, 2.0), "front_cost": None}, budget) == pytest.approx(
        pa.refine_seconds((12.0, 2.0), budget))


def test_goals() -> None:
    assert pa.mnist_goal("lenet300", [75.0, 72.0, 66.0])["met"]
    assert not pa.mnist_goal("lenet300", [90.0, 90.0, 60.0])["met"]  # a seed at or below 64x
    assert not pa.mnist_goal("lenet5", [210.0, None, 250.0])["met"]  # a seed with no plan within
    dc = {"ratio": 30.0, "delta_points": 0.3}
    sws = {"ratio": 50.0, "delta_points": 0.8}  # outside +0.5: does not count
    g = pa.fashion_goal(46.0, {"deep_compression": dc, "sws": sws})
    assert g["better_recipe_ratio"] == 30.0 and g["factor"] == pytest.approx(46 / 30) and g["met"]
    none = pa.fashion_goal(46.0, {"deep_compression": None, "sws": sws})
    assert not none["met"] and none["note"]


def _study_record(part, model, seed, chosen_ratio):
    chosen = {"0.1": None, "0.5": None, "1": None}
    if chosen_ratio is not None:
        chosen = {
            k: {
                "trial": 3,
                "ratio": chosen_ratio,
                "test_accuracy": 0.98,
                "families": "sws",
                "plan_file": "plan-trial-3.json",
                "refined": True,
                "epochs": 15,
                "delta_points": 0.3,
            }
            for k in chosen
        }
    recipe = {"ratio": 30.0, "delta_points": 0.3, "recipe": "x", "plan_file": "r.json", "epochs": 9}
    return {
        "part": part,
        "model": model,
        "seed": seed,
        "name": f"anchors-{part}-{model}-s{seed}",
        "anchors": chosen,
        "recipes": {"deep_compression": recipe, "sws": {**recipe, "delta_points": 2.0}},
        "baseline": {"val_accuracy": 0.99, "test_accuracy": 0.983},
        "trials": 10,
        "front_plans": 4,
        "refined_plans": 2,
        "refine_estimate_seconds": 25.0,
        "search_seconds": 100.0,
        "refine_seconds": 20.0,
        "budget_seconds": 2400.0,
        "pareto": "runs/x/exports/anchors/pareto.json",
        "commands": [{"command": "python -m search.run", "seconds": 5.0}],
    }


def test_report_rows_and_sections() -> None:
    studies = [
        _study_record("mnist", "lenet300", s, r) for s, r in ((0, 71.0), (1, 80.0), (2, None))
    ]
    studies.append(_study_record("fashion", "lenet5", 0, 60.0))
    rows = pa.mnist_rows(studies, [0, 1, 2])
    row = next(r for r in rows if "<= +0.5 pt" in r)
    assert row.startswith(
        "| LeNet-300-100 | <= +0.5 pt | 71.0x (+0.30) | 80.0x (+0.30) | — (none within) |"
    )
    assert "30.0x (3/3)" in row and "— (0/3; best +2.00)" in row  # the two recipes
    assert "40x (1.64 -> 1.58%)" in row and "64x (1.89 -> 1.94%)" in row
    assert row.endswith("| — |")  # no mean when a seed has no plan within
    fashion = pa.fashion_rows(studies)
    assert any("<= +0.5 pt" in r and "2.00x" in r for r in fashion)  # 60x over the 30x recipe
    report = {
        "configuration": "quick",
        "seeds": [0, 1, 2],
        "command": "python benchmarks/paper_anchors.py --quick",
        "started": "t0",
        "finished": "t1",
        "wall_seconds": 60.0,
        "machine": "m",
        "hours_per_model": 0.1,
        "fashion_hours": 2.0,
        "chunk": 6,
        "max_trials": 6,
        "tune_finetune": True,
        "refinement": {"ran": False, "top": 0, "factor": 1.0, "eta": 2, "why": "--refine 0"},
        "epoch_budget": pa.epochs_per_plan(3, True, 0, 1.0, 2),
        "studies": studies,
        "sws_tau_paper": 5e-3,
        "goals": pa.goals(studies, [0, 1, 2]),
    }
    md = pa.render_markdown(report)
    assert "SMOKE RUN" in md and "not evaluated" in md  # a smoke run states no verdict
    assert "### MNIST" in md and "### Fashion-MNIST" in md and "python -m search.run" in md
    assert "refinement: **not run** (--refine 0)" in md
    assert "`r.json`, 30.0x, +0.30 pt, 9 epochs" in md  # the recipes' plan files
    assert "| 100 | 20 (25) | 2400 |" in md  # search, refinement (estimated) and budget seconds


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--parts", "mnist", "--report-only"], "--t10k DIR"),
        (["--parts", "cifar"], "--parts"),
        (["--t10k", "nowhere-at-all", "--parts", "mnist"], "no such folder"),
        (["--parts", "fashion", "--chunk", "0"], "--chunk must be >= 1"),
    ],
)
def test_command_line_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        pa.main([*argv, "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not any(tmp_path.iterdir())  # refused before anything ran
