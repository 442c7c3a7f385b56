"""Study storage: SQL URLs (SQLite by default, PostgreSQL/MySQL on clusters), a heartbeat so a
dead worker's trial is failed and retried, and the artifact store beside it."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage

from models.errors import UserError, check_folder
from storage.locks import engine_kwargs, redact, url_lock

DEFAULT_STORAGE = "sqlite:///runs/search.db"
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
_SCHEMES = ("sqlite", "postgresql", "mysql")


def _check_url(url: str) -> None:
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in _SCHEMES:
        raise UserError(
            f"storage URL {redact(url)!r} is not valid; use sqlite:///runs/search.db, "
            "postgresql+psycopg://USER@HOST:5432/DB or mysql+pymysql://USER@HOST/DB"
        )
    if scheme == "sqlite" and url.rstrip("/") in ("sqlite:", "sqlite:/"):
        # SQLAlchemy reads these as an in-memory database: every trial would be lost at exit.
        raise UserError(f"storage URL {url!r} names no database file; use e.g. sqlite:///runs/search.db")


def check_storage(url: str, *, create: bool = True, write: bool = True) -> Path | None:
    """Refuse a storage URL that cannot be opened, creating nothing: its shape, and for SQLite
    the database file (``create``: it may be absent, in a folder that is or can be made;
    ``write``: it must be writable). Returns the SQLite file (None for other URLs).

    Raises:
        UserError: one line naming the URL, the path and the reason.
    """
    _check_url(url)
    path = sqlite_path(url)
    if path is None:
        return None
    what = f"--storage {url}:"
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a database file; name one in it, e.g. sqlite:///{path / 'search.db'}")
    if path.exists():
        if write and not os.access(path, os.W_OK):
            raise UserError(f"{what} database file {path} is not writable; pass a storage you can write to")
        return path
    if not create:
        raise UserError(f"{what} no database file {path}; pass the --storage URL of python -m search.run "
                        "(or start a study with it)")
    check_folder(path.parent, f"{what} folder", write=True)
    return path


def new_paths(url: str) -> list[Path]:
    """What :func:`open_storage` will create for ``url``: the SQLite file and its absent folders,
    outermost first (empty for other URLs or an existing file); see :func:`remove_new`."""
    path = sqlite_path(url)
    if path is None or path.exists():
        return []
    return [p for p in reversed([path, *path.absolute().parents]) if not p.exists()]


def remove_new(paths: list[Path], storage: RDBStorage) -> None:
    """Undo :func:`open_storage` after a command failed before it stored a study: remove the
    paths :func:`new_paths` listed (a SQLite file that holds a study, perhaps another process's,
    is kept)."""
    if not paths or optuna.get_all_study_summaries(storage):
        return
    storage.engine.dispose()
    top = paths[0]
    if top.is_dir():
        shutil.rmtree(top, ignore_errors=True)  # created by this command: everything under it is ours
    else:
        top.unlink(missing_ok=True)
        # SQLite's side files and the lock files named after the database (storage.locks).
        for side in [*(top.with_name(top.name + s) for s in ("-journal", "-wal", "-shm")), *top.parent.glob(f"{top.name}.*.lock")]:
            side.unlink(missing_ok=True)


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other URLs or in-memory)."""
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
        return None
    return Path(url[len("sqlite:///") :])


def open_storage(url: str = DEFAULT_STORAGE, *, heartbeat: bool = True, create: bool = True,
                 on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], object] | None = None) -> RDBStorage:
    """An RDB storage for ``url``; creates the SQLite folder; one clear error for a bad URL.

    With ``heartbeat``, a trial whose worker stops beating for ``GRACE_SECONDS`` is marked FAIL
    and handed to ``on_stale`` (the search's workers pass :func:`search.trials.retry`, which
    re-queues its plan), so a dead worker loses no trial.
    The tables are created under a lock (:mod:`storage.locks`); a server database that does not
    answer is an error within ``CONNECT_TIMEOUT_SECONDS``; errors show the URL without password.
    Without ``create``, an absent SQLite file is refused (commands that read an existing study:
    a mistyped path must not leave an empty database behind). A storage that writes trials
    (``heartbeat``) must be writable.
    """
    path = check_storage(url, create=create, write=heartbeat)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    shown = redact(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            kwargs: dict[str, Any] = {}
            if heartbeat:
                beat, grace = heartbeat_schedule()
                kwargs = {
                    "heartbeat_interval": beat,
                    "grace_period": grace,
                    "heartbeat_stale_trial_callback": on_stale,
                }
            # Workers started together on an empty database would race creating the tables.
            with url_lock(url, "schema", path):
                return RDBStorage(url, engine_kwargs=engine_kwargs(url), **kwargs)
    except ImportError as exc:
        raise UserError(f"storage URL {shown!r} needs a database driver: {exc}; pip install 'pareto-compress[postgres]'") from None
    except Exception as exc:  # SQLAlchemy raises many types for an unreachable database
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open storage {shown!r}: {_without(reason, url)}") from None


def heartbeat_schedule() -> tuple[int, int]:
    """(beat interval, grace period) in seconds: ``HEARTBEAT_SECONDS``/``GRACE_SECONDS`` unless
    ``$PARETO_HEARTBEAT_SECONDS``/``$PARETO_GRACE_SECONDS`` say otherwise (a cluster whose
    workers are preempted often may want a shorter grace; tests use seconds)."""
    out = []
    for env, default in (("PARETO_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS), ("PARETO_GRACE_SECONDS", GRACE_SECONDS)):
        raw = os.environ.get(env)
        if raw is None:
            out.append(default)
            continue
        if not raw.isdigit() or int(raw) < 1:
            raise UserError(f"{env}={raw!r} is not a positive number of seconds; unset it or give e.g. {env}={default}")
        out.append(int(raw))
    beat, grace = out
    if grace <= beat:
        raise UserError(f"PARETO_GRACE_SECONDS ({grace}) must exceed PARETO_HEARTBEAT_SECONDS ({beat}): "
                        "a live worker would be failed between two beats")
    return beat, grace


def _without(text: str, url: str) -> str:
    """``text`` (a driver's message) without the URL's password."""
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:
        return text
    return text.replace(str(password), "***") if password else text


def default_store(storage_url: str) -> str:
    """Root of baselines and artifacts: beside a SQLite file, else ``runs``."""
    path = sqlite_path(storage_url)
    return str(path.parent) if path is not None else "runs"


def open_artifact_store(folder: str | Path) -> FileSystemArtifactStore:
    """A file artifact store in ``folder`` (a shared directory on clusters), created if absent."""
    # Writable or not: export only reads it; the commands that write check --store first.
    path = check_folder(folder, "artifact store", write=False)
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
