"""User-facing errors.

Every error a user can cause (a bad name, a missing file, an invalid plan) is raised as a
:class:`UserError` whose message is one line naming the bad value and the fix. The CLIs catch it,
print ``error: <message>`` and exit with status 2: no traceback from deep inside.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from functools import wraps
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


def cli_main(func: F) -> F:
    """Wrap a CLI ``main`` so that a :class:`UserError` ends in one line and exit status 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
