"""Static checks as part of the suite: ruff over the repository, mypy over the packages whose
types the contracts rely on (spaces, storage, objectives)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    proc = _run("ruff", "check", ".")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_mypy_is_clean_on_the_contract_packages() -> None:
    proc = _run("mypy", "spaces", "storage", "objectives")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
