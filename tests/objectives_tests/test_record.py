"""objectives.record: one trial record, written by the objective, read back from the trial, written
to and read from the plan file unchanged; its manifest; its attribute keys."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import numpy
import optuna
import pytest
import torch
from optuna.trial import TrialState

from models.errors import UserError
from objectives import record
from objectives.objective import Objective
from objectives.pipeline import Workbench
from objectives.record import TrialRecord, read_plan_file, write_plan_file
from spaces.plan import Plan, get_study_space
from storage.codec import encode
from storage.studies import open_artifact_store

ROOT = Path(__file__).resolve().parents[2]
FROM_THE_TRIAL = {"trial", "state", "values"}  # fields that are not user attributes
FROM_EXPORT = {"test_accuracy"}


def _bench(digits_baseline) -> Workbench:  # noqa: ANN001 (conftest fixture type)
    d = digits_baseline
    return Workbench(d.preset, d.data, d.fresh(), d.record, len(encode(d.model)), torch.device("cpu"), 0)


@pytest.fixture(scope="module")
def finished(digits_baseline, tmp_path_factory: pytest.TempPathFactory) -> tuple[optuna.Study, Objective, Path]:  # noqa: ANN001
    """Two real one-epoch trials of the quantization space, with an artifact store."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = tmp_path_factory.mktemp("record")
    objective = Objective(_bench(digits_baseline), get_study_space("quantization"), finetune_space={"epochs": (1, 1)},
                          artifact_store=open_artifact_store(str(root / "artifacts")), seed=2)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_accuracy", "compression_ratio"])
    study.optimize(objective, n_trials=2)
    return study, objective, root


def test_trial_to_record_to_plan_file_and_back(finished: tuple[optuna.Study, Objective, Path], tmp_path: Path) -> None:
    study, objective, _ = finished
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        rec = TrialRecord.from_trial(t, study.metric_names)
        bench = objective.bench
        assert (rec.trial, rec.state, rec.seed) == (t.number, "COMPLETE", objective.trial_seed(t))
        assert (rec.preset, rec.dataset, rec.baseline_seed) == ("digits", "digits", 0)
        assert (rec.baseline_key, rec.baseline_bytes) == (bench.record.key, bench.baseline_bytes)
        assert rec.values == {"val_accuracy": t.values[0], "compression_ratio": t.values[1]}
        assert rec.bytes == sum(rec.breakdown.values()) and rec.predicted_bytes and rec.predicted_bytes > 0
        assert rec.epochs == len(rec.curve) == 1 and rec.stopped_at_epoch is None
        assert rec.families == rec.to_plan().families and rec.constraints == [0.0]
        assert rec.device and rec.device.startswith("cpu") and rec.wall_seconds and rec.wall_seconds > 0
        assert rec.artifact_id and rec.plan_artifact_id
        path = write_plan_file(tmp_path / f"plan-{t.number}.json", rec.model_copy(update={"test_accuracy": 0.5}))
        plan, back = read_plan_file(path)
        assert back == rec.model_copy(update={"test_accuracy": 0.5})
        assert plan == Plan.from_dict(record.attrs_of(t)[record.PLAN]) == rec.to_plan()


def test_the_trials_plan_artifact_is_its_record(finished: tuple[optuna.Study, Objective, Path], tmp_path: Path) -> None:
    study, _, root = finished
    store = open_artifact_store(str(root / "artifacts"))
    t = study.trials[0]
    rec = TrialRecord.from_trial(t, study.metric_names)
    with store.open_reader(rec.plan_artifact_id) as fh:
        (tmp_path / "artifact.json").write_bytes(fh.read())
    _, stored = read_plan_file(tmp_path / "artifact.json")
    # Written before the trial ended: no state, no artifact ids yet; everything else the same.
    assert stored == rec.model_copy(update={"state": None, "artifact_id": None, "plan_artifact_id": None})


def test_the_manifest_names_versions_and_hashes(finished: tuple[optuna.Study, Objective, Path]) -> None:
    study, objective, _ = finished
    manifests = {json.dumps(TrialRecord.from_trial(t).manifest.model_dump(), sort_keys=True) for t in study.trials}
    assert len(manifests) == 1  # computed once per worker
    m = TrialRecord.from_trial(study.trials[0]).manifest
    assert m is not None
    assert (m.versions["torch"], m.versions["optuna"], m.versions["numpy"]) == (torch.__version__, optuna.__version__, numpy.__version__)
    assert re.fullmatch(r"[0-9a-f]{64}", m.code_hash) and m.code_hash == record.code_hash()
    assert m.dataset_hash == record.dataset_hash(objective.bench.data)
    assert re.fullmatch(r"[0-9a-f]{64}", m.dataset_hash)


def test_the_dataset_hash_follows_the_contents(digits_baseline) -> None:  # noqa: ANN001
    data = digits_baseline.data
    same = dataclasses.replace(data, x_train=data.x_train.clone())
    assert record.dataset_hash(same) == record.dataset_hash(data)
    changed_x = data.x_train.clone()
    changed_x.view(-1)[0] ^= 1
    assert record.dataset_hash(dataclasses.replace(data, x_train=changed_x)) != record.dataset_hash(data)
    assert record.dataset_hash(dataclasses.replace(data, y_test=data.y_test[:-1])) != record.dataset_hash(data)


def test_a_failed_trial_still_shows_its_plan(digits_baseline, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import objectives.objective as objective_module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(objective_module, "prepare", broken)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.optimize(Objective(_bench(digits_baseline), get_study_space("binary")), n_trials=1, catch=(RuntimeError,))
    t = study.trials[0]
    rec = TrialRecord.from_trial(t)
    assert t.state == TrialState.FAIL and rec.state == "FAIL" and rec.values == {}
    assert rec.to_plan().families == "binary" and rec.manifest is not None and rec.bytes is None


def test_attribute_keys_are_the_records_stored_fields() -> None:
    assert set(record.ATTR_KEYS) == set(TrialRecord.model_fields) - FROM_THE_TRIAL - FROM_EXPORT
    assert len(set(record.ATTR_KEYS)) == len(record.ATTR_KEYS)


def test_no_other_module_spells_an_attribute_key() -> None:
    keys = "|".join(record.ATTR_KEYS)
    # Study attributes (study.set_user_attr("preset", ...)) are not the trial record's.
    pattern = re.compile(rf"""(?<!study\.)(set_user_attr\(\s*["']|user_attrs(\.get\(|\[)\s*["'])({keys})["']""")
    offenders = []
    for package in ("objectives", "search"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "record.py":
                continue
            offenders += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                          if pattern.search(line)]
    assert offenders == []


def test_write_checks_names_and_types() -> None:
    study = optuna.create_study()
    trial = study.ask()
    record.write(trial, curve=[0.5, 1], bytes=10)
    assert trial.user_attrs[record.CURVE] == [0.5, 1.0]
    with pytest.raises(TypeError, match="'curves' is not a trial attribute"):
        record.write(trial, curves=[0.5])
    with pytest.raises(TypeError, match="bytes"):
        record.write(trial, bytes="ten")


def test_a_bad_record_is_one_line_naming_the_trial_and_field() -> None:
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(values=[1.0], user_attrs={record.PLAN: {"steps": []}, record.EPOCHS: "4"}))
    with pytest.raises(UserError, match=r'^trial 0: epochs: expected int, got "4"$'):
        TrialRecord.from_trial(study.trials[0])


def test_bare_and_older_plan_files_are_read(tmp_path: Path) -> None:
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"steps": [{"technique": "int", "config": {"bits": 4}}]}))
    plan, rec = read_plan_file(bare)
    assert plan.families == "int" and rec.preset is None and rec.plan == json.loads(bare.read_text())
    # The shape export wrote before the record: values at the top level.
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"plan": {"steps": []}, "preset": "digits", "dataset": None, "baseline_seed": 0, "seed": 7,
                               "baseline_bytes": 100, "trial": 7, "bytes": 50, "val_accuracy": 0.9,
                               "compression_ratio": 2.0, "test_accuracy": 0.88}))
    _, rec = read_plan_file(old)
    assert rec.values == {"val_accuracy": 0.9, "compression_ratio": 2.0}
    assert (rec.preset, rec.seed, rec.bytes, rec.test_accuracy) == ("digits", 7, 50, 0.88)


@pytest.mark.parametrize(("content", "message"), [
    ({"plan": {"steps": []}, "seed": 1.5}, "seed: expected int, got 1.5"),
    ({"plan": {"steps": []}, "sede": 1}, "sede: unknown key; known: "),
    ({"plan": {"steps": {}}}, "plan.steps: expected a list, got {}"),
    ({"plan": {"steps": []}, "manifest": {"versions": {}}}, 'manifest: missing "code_hash"'),
    ({"nothing": 1}, "expected a plan record"),
])
def test_a_bad_plan_file_is_one_line(content: object, message: str, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError) as exc:
        read_plan_file(path)
    assert str(exc.value).startswith(f"plan file {path}: {message}"), str(exc.value)
