"""A plan with per-layer overrides goes through the whole product unchanged: the search samples
it (here: enqueued with fixed per-layer values), the trial records it, export writes its plan file,
and ``search.apply`` of that file rebuilds the trial's artifact byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from objectives.record import TrialRecord, read_plan_file, write_plan_file
from search import apply as apply_cli
from search import run as run_cli
from storage.codec import decode
from storage.studies import open_artifact_store

# Three per-layer plans on the digits CNN (eligible layers conv2, conv3, fc1; the first takes the
# step's value): gradual pruning followed by per-layer k-means codebooks fitted to the kept
# weights, one-shot pruning with per-layer integer bits, and the same with the protected ends
# (conv1, fc2) opened, so that they get per-layer values too.
PLANS = [
    {
        "plan.protect_ends": True, "plan.per_layer": True, "stage.structure": "none", "stage.sparsity": "prune",
        "prune.sparsity": 0.5, "prune.scope": "layer", "prune.schedule": "gradual",
        "prune.conv3.sparsity": 0.7, "prune.fc1.sparsity": 0.9,
        "stage.weights": "codebook", "codebook.method": "kmeans", "codebook.clusters": 16,
        "codebook.scope": "layer", "codebook.conv3.clusters": 8, "codebook.fc1.clusters": 4,
        "stage.activations": "none",
    },
    {
        "plan.protect_ends": True, "plan.per_layer": True, "stage.structure": "none", "stage.sparsity": "prune",
        "prune.sparsity": 0.3, "prune.scope": "layer", "prune.schedule": "oneshot",
        "prune.conv3.sparsity": 0.6, "prune.fc1.sparsity": 0.95,
        "stage.weights": "int", "int.bits": 8, "int.conv3.bits": 4, "int.fc1.bits": 2,
        "stage.activations": "none",
    },
    {
        "plan.protect_ends": False, "plan.per_layer": True, "stage.structure": "none", "stage.sparsity": "prune",
        "prune.sparsity": 0.5, "prune.scope": "layer", "prune.schedule": "oneshot",
        "prune.conv2.sparsity": 0.6, "prune.conv3.sparsity": 0.7, "prune.fc1.sparsity": 0.9, "prune.fc2.sparsity": 0.25,
        "stage.weights": "int", "int.bits": 6, "int.conv2.bits": 5, "int.conv3.bits": 4, "int.fc1.bits": 3,
        "int.fc2.bits": 4, "stage.activations": "none",
    },
]
OPEN_ENDS = [False, False, True]
EXPECTED = [
    {"prune": {"conv3": {"sparsity": 0.7}, "fc1": {"sparsity": 0.9}},
     "codebook": {"conv3": {"clusters": 8}, "fc1": {"clusters": 4}}},
    {"prune": {"conv3": {"sparsity": 0.6}, "fc1": {"sparsity": 0.95}},
     "int": {"conv3": {"bits": 4}, "fc1": {"bits": 2}}},
    {"prune": {"conv1": {"sparsity": 0.5}, "fc1": {"sparsity": 0.9}, "fc2": {"sparsity": 0.25}},
     "int": {"conv1": {"bits": 6}, "fc2": {"bits": 4}}},
]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("per-layer")
    url = f"sqlite:///{root}/search.db"
    common = ["--study", "all", "--preset", "digits", "--storage", url, "--quiet", "--no-early-stopping"]
    run_cli.main([*common, "--trials", "1"])
    study = optuna.load_study(study_name="all-digits", storage=url)
    for params in PLANS:
        study.enqueue_trial(params)
    run_cli.main([*common, "--trials", str(1 + len(PLANS))])
    return root


def test_per_layer_plans_are_recorded_exported_and_reapplied_byte_identically(
    study_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = optuna.load_study(study_name="all-digits", storage=f"sqlite:///{study_dir}/search.db")
    store = open_artifact_store(str(study_dir / "artifacts"))
    trials = study.trials[1:]
    assert len(trials) == len(PLANS)
    for trial, expected, opened in zip(trials, EXPECTED, OPEN_ENDS, strict=True):
        assert trial.state == optuna.trial.TrialState.COMPLETE, trial.state
        record = TrialRecord.from_trial(trial, study.metric_names)
        policy = record.to_plan().policy
        assert (policy.keep_first, policy.keep_last) == (not opened, not opened)
        # The record holds the resolved per-layer values the trial ran.
        steps = {s.technique: s.layers for s in record.to_plan().steps}
        for technique, layers in expected.items():
            for path, override in layers.items():
                assert steps[technique][path] == override, (technique, path, steps[technique])
        # The plan file export writes (the record's JSON) reads back to the same plan.
        plan_file = write_plan_file(tmp_path / f"plan-trial-{trial.number}.json", record)
        plan, rec = read_plan_file(plan_file)
        assert plan.to_dict() == TrialRecord.from_trial(trial).plan
        assert rec == record
        with store.open_reader(record.artifact_id) as fh:
            recorded = fh.read()
        assert len(recorded) == record.bytes
        # ... and the artifact holds them: each layer's mask keeps its own share of weights.
        masks = dict(decode(recorded).named_buffers())
        for path, override in expected["prune"].items():
            pruned = float((masks[f"{path}.mask"] == 0).float().mean())
            assert pruned == pytest.approx(override["sparsity"], abs=0.005), path
        capsys.readouterr()
        out = tmp_path / f"model-{trial.number}.pcz"
        apply_cli.main([str(plan_file), "--out", str(out), "--store", str(study_dir)])
        result = json.loads(capsys.readouterr().out)
        assert result["bytes"] == record.bytes
        assert out.read_bytes() == recorded
