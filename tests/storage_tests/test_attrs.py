"""storage.attrs: several attributes in one transaction, the same rows as one call each."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage

from storage.attrs import set_trial_attrs

USER = {"plan": {"steps": [{"technique": "prune"}]}, "seed": 3, "families": ["prune"]}
SYSTEM = {"record:manifest": {"torch": "2.13.0"}, "record:breakdown": {"fc1": 10}}


def _storage(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> optuna.storages.BaseStorage:
    if kind == "memory":
        return optuna.storages.InMemoryStorage()
    url = f"sqlite:///{tmp_path / 'a.db'}" if kind == "sqlite" else str(request.getfixturevalue("pg_url"))
    return optuna.storages.get_storage(url)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "memory"])
def test_attributes_written_together_equal_those_written_one_by_one(kind: str, request: pytest.FixtureRequest,
                                                                    tmp_path: Path) -> None:
    storage = _storage(kind, request, tmp_path)
    study = optuna.create_study(storage=storage, directions=["maximize", "maximize"])
    together, alone = study.ask(), study.ask()
    set_trial_attrs(study._storage, together._trial_id, user=USER, system=SYSTEM)
    for key, value in USER.items():
        study._storage.set_trial_user_attr(alone._trial_id, key, value)
    for key, value in SYSTEM.items():
        study._storage.set_trial_system_attr(alone._trial_id, key, value)
    a, b = study._storage.get_trial(together._trial_id), study._storage.get_trial(alone._trial_id)
    assert a.user_attrs == b.user_attrs == USER
    assert {k: a.system_attrs[k] for k in SYSTEM} == {k: b.system_attrs[k] for k in SYSTEM} == SYSTEM
    # Writing again replaces values (an upsert), as set_trial_user_attr does.
    set_trial_attrs(study._storage, together._trial_id, user={"seed": 4, "new": [1]})
    assert study._storage.get_trial(together._trial_id).user_attrs == {**USER, "seed": 4, "new": [1]}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_sql_storage_writes_them_in_one_transaction_or_not_at_all(kind: str, request: pytest.FixtureRequest,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    storage = _storage(kind, request, tmp_path)
    study = optuna.create_study(storage=storage, directions=["maximize", "maximize"])
    trial = study.ask()

    def one_by_one(*args: object, **kwargs: object) -> None:
        raise AssertionError("one transaction per attribute")

    monkeypatch.setattr(RDBStorage, "set_trial_user_attr", one_by_one)
    monkeypatch.setattr(RDBStorage, "set_trial_system_attr", one_by_one)
    set_trial_attrs(study._storage, trial._trial_id, user=USER, system=SYSTEM)
    assert study._storage.get_trial(trial._trial_id).user_attrs == USER
    # A value the database cannot take (not JSON) fails the whole write: nothing of it is stored.
    with pytest.raises(TypeError):
        set_trial_attrs(study._storage, trial._trial_id, user={"later": 1, "bad": object()})
    assert "later" not in study._storage.get_trial(trial._trial_id).user_attrs
    study.tell(trial, [0.5, 2.0])
    with pytest.raises(RuntimeError, match="finished"):
        set_trial_attrs(study._storage, trial._trial_id, user={"late": 1, "later": 2})
