"""search.studies: a study keeps the space it was created with."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

from models.errors import UserError
from search.studies import (
    CONFIG_ATTR,
    SPACE_ATTR,
    StudyConfig,
    create_or_load,
    new_techniques,
    newer_finetune_keys,
    same_study,
    stored_config,
    study_space,
)
from spaces.plan import get_study_space, suggest_plan


def _study(config: StudyConfig, record: dict | None) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_user_attr(CONFIG_ATTR, config.to_dict())
    if record is not None:
        study.set_user_attr(SPACE_ATTR, record)
    return study


def test_the_recorded_space_is_what_workers_sample() -> None:
    record = get_study_space("all").record()
    record["stages"]["weights"] = ["fp32", "int"]  # as if created when only int existed
    space = study_space(_study(StudyConfig(preset="digits"), record))
    assert space.options("weights") == ("fp32", "int")
    assert "sws" in new_techniques(_study(StudyConfig(preset="digits"), record), space)


def test_a_changed_technique_is_refused_in_one_line() -> None:
    record = get_study_space("all").record()
    params = record["techniques"]["int"]["params"]
    # A parameter of another kind (an integer become a float) cannot resume: its trials' values
    # and the code's disagree.
    params["int.bits"] = {"name": "FloatDistribution", "attributes": {"low": 2.0, "high": 8.0, "step": None, "log": False}}
    with pytest.raises(UserError) as info:
        study_space(_study(StudyConfig(preset="digits"), record))
    message = str(info.value)
    assert "parameter int.bits changed" in message and "--name" in message and "\n" not in message


def test_a_numeric_range_the_code_changed_resumes_on_the_recorded_range() -> None:
    record = get_study_space("all").record()
    params = record["techniques"]["int"]["params"]
    assert params["int.bits"]["name"] == "IntDistribution"
    params["int.bits"] = {**params["int.bits"], "attributes": {**params["int.bits"]["attributes"], "low": 3, "high": 3}}
    space = study_space(_study(StudyConfig(preset="digits"), record))  # not refused
    fixed = dataclasses.replace(space, stages={"weights": ("int",)})
    study = optuna.create_study()
    for _ in range(3):
        trial = study.ask()
        plan = suggest_plan(trial, fixed)
        assert trial.distributions["int.bits"].low == trial.distributions["int.bits"].high == 3
        assert plan.steps[0].config.bits == 3


def test_a_study_made_before_spaces_were_recorded_gets_its_trials_choices() -> None:
    study = _study(StudyConfig(preset="digits"), None)
    old = ("fp32", "float", "int", "binary", "codebook", "sws")  # the order of the first release
    study.add_trial(optuna.trial.create_trial(
        params={"stage.weights": "int"}, distributions={"stage.weights": optuna.distributions.CategoricalDistribution(old)},
        values=[0.9, 4.0]))
    space = study_space(study)
    assert space.options("weights") == old and space.per_layer_max == 0
    assert study.user_attrs[SPACE_ATTR]["stages"]["weights"] == list(old)  # recorded now


def test_a_study_older_than_the_optimizer_dimension_resumes_as_recorded() -> None:
    old_space = {"epochs": [1, 6], "lr": [0.001, 0.1], "distill_weight": [0.0, 0.9], "distill_temperature": [1.0, 8.0]}
    stored = StudyConfig(preset="digits", finetune_space=old_space)
    given = dataclasses.replace(stored, finetune_space={**old_space, "adamw_lr": [1e-4, 5e-3]})
    assert same_study(stored, given)  # today's --tune-finetune on a study made before adamw_lr
    assert not same_study(given, stored)  # the other way round, the stored study samples more
    assert not same_study(stored, dataclasses.replace(given, seed=1))  # any other change is refused
    assert not same_study(stored, dataclasses.replace(given, finetune_space={**given.finetune_space, "lr": [0.01, 0.1]}))
    assert newer_finetune_keys(stored, given) == ["the fine-tune's optimizer (SGD or AdamW)"]  # search.run's note
    assert newer_finetune_keys(given, given) == [] and newer_finetune_keys(stored, stored) == []
    study = _study(stored, None)
    loaded = create_or_load(study.study_name, study._storage, given, None, optuna.samplers.RandomSampler())  # type: ignore[arg-type]
    assert stored_config(loaded) == stored  # what the workers and search.run go on with
    with pytest.raises(UserError, match="another configuration"):
        create_or_load(study.study_name, study._storage, dataclasses.replace(given, seed=1), None,  # type: ignore[arg-type]
                       optuna.samplers.RandomSampler())
