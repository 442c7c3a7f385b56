"""Study storage: SQL URLs (SQLite by default, PostgreSQL/MySQL on clusters), a heartbeat so a
dead worker's trial is failed and retried, and the artifact store beside it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from models.errors import UserError

DEFAULT_STORAGE = "sqlite:///runs/search.db"
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
_SCHEMES = ("sqlite", "postgresql", "mysql")


def _check_url(url: str) -> None:
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in _SCHEMES:
        raise UserError(
            f"storage URL {url!r} is not valid; use sqlite:///runs/search.db, "
            "postgresql+psycopg://USER@HOST:5432/DB or mysql+pymysql://USER@HOST/DB"
        )


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other URLs or in-memory)."""
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
        return None
    return Path(url[len("sqlite:///") :])


def open_storage(url: str = DEFAULT_STORAGE, *, heartbeat: bool = True) -> RDBStorage:
    """An RDB storage for ``url``; creates the SQLite folder; one clear error for a bad URL.

    With ``heartbeat``, a trial whose worker stops beating for ``GRACE_SECONDS`` is marked FAIL
    and re-enqueued once (RetryHeartbeatStaleTrialCallback), so a dead worker loses no trial.
    """
    _check_url(url)
    path = sqlite_path(url)
    engine_kwargs: dict[str, Any] = {}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several local workers share the file
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            kwargs: dict[str, Any] = {}
            if heartbeat:
                kwargs = {
                    "heartbeat_interval": HEARTBEAT_SECONDS,
                    "grace_period": GRACE_SECONDS,
                    "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=1),
                }
            return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except ImportError as exc:
        raise UserError(f"storage URL {url!r} needs a database driver: {exc}; pip install 'pareto-compress[postgres]'") from None
    except Exception as exc:  # SQLAlchemy raises many types for an unreachable database
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open storage {url!r}: {reason}") from None


def default_store(storage_url: str) -> str:
    """Root of baselines and artifacts: beside a SQLite file, else ``runs``."""
    path = sqlite_path(storage_url)
    return str(path.parent) if path is not None else "runs"


def open_artifact_store(folder: str | Path) -> FileSystemArtifactStore:
    """A file artifact store in ``folder`` (a shared directory on clusters), created if absent."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def load_study(name: str, storage: RDBStorage) -> optuna.Study:
    """Load an existing study; a missing one is an error listing the studies there."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise UserError(
            f"no study {name!r} in this storage; existing: {', '.join(names) or 'none'} "
            "(create one with python -m search.run)"
        ) from None
