"""Several trial attributes in one database transaction.

Optuna's storage API sets one attribute per call, and on an SQL storage each call is its own
session: it loads the trial, checks that it is still running, upserts the row and commits (a few
milliseconds of ORM work in the worker each); the record's first write alone is about ten
attributes. :func:`set_trial_attrs` writes them together where the storage is an ``RDBStorage``
of the Optuna this project pins (``optuna<6``): one check and one multi-row upsert per attribute
table on PostgreSQL and SQLite (the rows Optuna's own upsert writes), Optuna's per-attribute
helper inside one session on other databases, and one call each on other storages.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any, cast

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState


def _rdb(storage: optuna.storages.BaseStorage) -> RDBStorage | None:
    """The ``RDBStorage`` behind ``storage`` (optuna wraps it in a cache), if it is one."""
    backend = getattr(storage, "_backend", storage)
    if isinstance(backend, RDBStorage) and hasattr(backend, "_set_trial_attr_without_commit"):
        return backend
    return None


def set_trial_attrs(storage: optuna.storages.BaseStorage, trial_id: int, *,
                    user: Mapping[str, Any] | None = None, system: Mapping[str, Any] | None = None) -> None:
    """Set the ``user`` and ``system`` attributes of a running trial, in one transaction on an
    SQL storage: either all of them are written or none (the error is the storage's own)."""
    user, system = dict(user or {}), dict(system or {})
    rdb = _rdb(storage)
    if rdb is None or len(user) + len(system) < 2:
        for key, value in user.items():
            storage.set_trial_user_attr(trial_id, key, value)
        for key, value in system.items():
            storage.set_trial_system_attr(trial_id, key, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    tables = ((models.TrialUserAttributeModel, user), (models.TrialSystemAttributeModel, system))
    with _create_scoped_session(rdb.scoped_session, True) as session:
        insert = _upsert_dialect(rdb)
        if insert is None:
            for model_cls, attrs in tables:
                for key, value in attrs.items():
                    rdb._set_trial_attr_without_commit(session, model_cls, trial_id, key, value)
            return
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        rdb.check_trial_is_updatable(trial_id, cast(TrialState, trial.state))
        for model_cls, attrs in tables:
            if not attrs:
                continue
            rows = [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
            stmt = insert(model_cls).values(rows)
            session.execute(stmt.on_conflict_do_update(index_elements=[model_cls.trial_id, model_cls.key],
                                                       set_={"value_json": stmt.excluded.value_json}))


def _upsert_dialect(rdb: RDBStorage) -> Any:
    """The ``insert`` of the storage's SQL dialect where it has ``ON CONFLICT DO UPDATE``."""
    if rdb.engine.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    if rdb.engine.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0):
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    return None
