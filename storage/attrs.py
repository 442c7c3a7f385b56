"""Several trial attributes in one database transaction.

Optuna's storage API sets one attribute per call, and on an SQL storage each call is its own
session and commit (a few milliseconds of ORM work in the worker each): the record's first write
alone is about ten attributes. :func:`set_trial_attrs` writes them together where the storage is
an ``RDBStorage`` of the Optuna this project pins (its per-attribute helper run inside one
session, so the rows are exactly those the one-by-one calls write), and one by one elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.storages import RDBStorage


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

    with _create_scoped_session(rdb.scoped_session, True) as session:
        for key, value in user.items():
            rdb._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)
        for key, value in system.items():
            rdb._set_trial_attr_without_commit(session, models.TrialSystemAttributeModel, trial_id, key, value)
