"""User-facing errors.

Every error a user can cause (a bad name, a missing file, an invalid plan) is raised as a
:class:`UserError` whose message is one line naming the bad value and the fix. The CLIs catch it,
print ``error: <message>`` and exit with status 2: no traceback from deep inside.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """An error caused by user input; its message is one line that names the value and the fix."""


class UnknownNameError(UserError, KeyError):
    """A name looked up in a registry (model, dataset, preset, technique) is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class DataNotFoundError(UserError, FileNotFoundError):
    """A dataset's files are missing and could not be downloaded."""


def _kind(path: Path, what: str) -> str | None:
    """``"folder"``, ``"file"`` (anything else that exists) or None when ``path`` is absent."""
    try:
        return "folder" if path.is_dir() else "file" if path.exists() else None
    except PermissionError:
        raise UserError(f"{what} {path}: permission denied (a folder above it cannot be searched)") from None
    except OSError as exc:  # a name too long, a loop of links: the path itself is unusable
        raise UserError(f"{what} {path}: {exc.strerror or exc}") from None


def _folder_problem(path: Path, what: str, write: bool) -> tuple[Path, str] | None:
    """Why folder ``path`` cannot be used or created (the culprit and the reason), or None."""
    kind = _kind(path, what)
    if kind == "file":
        return path, "is a file, not a folder"
    if kind == "folder":
        if write and not os.access(path, os.W_OK | os.X_OK):
            return path, "is not writable"
        return None
    # Absent: it would be created inside its nearest existing ancestor, which must allow that.
    for parent in path.absolute().parents:
        kind = _kind(parent, what)
        if kind == "file":
            return parent, "is a file, not a folder"
        if kind == "folder":
            return (parent, "is not writable") if write and not os.access(parent, os.W_OK | os.X_OK) else None
    return None


def check_folder(path: str | Path, what: str, *, write: bool = True) -> Path:
    """Refuse a folder a command would use (``what`` names it: ``"--store"``) before any work,
    creating nothing: it must be a folder, or absent with a folder above it to create it in;
    with ``write``, one this process may write to.

    Raises:
        UserError: one line naming the path and the reason.
    """
    p = Path(path).expanduser()
    if not str(path).strip():
        raise UserError(f"{what} is empty; pass a folder")
    problem = _folder_problem(p, what, write)
    if problem is not None:
        culprit, reason = problem
        where = f"{p} {reason}" if culprit == p else f"{p} cannot be created: {culprit} {reason}"
        raise UserError(f"{what} {where}; pass another folder")
    return p


def check_output_file(path: str | Path, what: str) -> Path:
    """Refuse a file a command would write (``what`` names it: ``"--out"``) before any work,
    creating nothing: not a folder, writable if it exists, in a folder that is or can be made.

    Raises:
        UserError: one line naming the path and the reason.
    """
    p = Path(path).expanduser()
    if not str(path).strip():
        raise UserError(f"{what} is empty; pass a file path")
    kind = _kind(p, what)
    if kind == "folder":
        raise UserError(f"{what} {p} is a folder; pass a file path (e.g. {p / 'model.pcz'})")
    if kind == "file" and not os.access(p, os.W_OK):
        raise UserError(f"{what} {p} is not writable; pass another path")
    problem = _folder_problem(p.parent, what, write=True)
    if problem is not None:
        culprit, reason = problem
        raise UserError(f"{what} {p} cannot be written: {culprit} {reason}; pass another path")
    return p


def cli_main(func: F) -> F:
    """Wrap a CLI ``main`` so that a :class:`UserError` ends in one line and exit status 2.

    A file-system error about a path (an ``OSError`` with a ``filename``: a disk full, a folder
    removed while the command ran) ends the same way: the commands check their paths before
    they start, so this is the last line of defence, never the usual path.
    """

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as exc:
            if exc.filename is None:  # not about a path: a programming error keeps its traceback
                raise
            print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
