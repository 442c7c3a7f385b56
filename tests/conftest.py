"""Shared fixtures: the digits data and its trained baseline, made once per test session; a
fresh PostgreSQL database (this machine's, trust auth), dropped afterwards."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from models.baseline import BaselineRecord, load_or_train_baseline
from models.datasets import Splits, load_dataset
from models.presets import Preset, get_preset


@dataclass
class DigitsBaseline:
    """The digits preset, its data, a trained baseline and its record."""

    preset: Preset
    data: Splits
    model: nn.Module
    record: BaselineRecord

    def fresh(self) -> nn.Module:
        """A deep copy of the baseline (tests modify models in place)."""
        return copy.deepcopy(self.model)


@pytest.fixture(scope="session")
def digits_baseline(tmp_path_factory: pytest.TempPathFactory) -> DigitsBaseline:
    """The digits baseline, trained once (about two seconds on a CPU)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    preset = get_preset("digits")
    data = load_dataset(preset.dataset, val_fraction=preset.val_fraction, seed=0)
    model, record = load_or_train_baseline(
        preset, data, seed=0, store=tmp_path_factory.mktemp("store"), device=torch.device("cpu")
    )
    return DigitsBaseline(preset, data, model, record)


PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database (no password; trust auth), dropped after the
    test; the test is skipped where PostgreSQL at 127.0.0.1:5432 cannot be used."""
    import sqlalchemy

    name = f"pc_{uuid.uuid4().hex[:12]}"
    try:
        admin = sqlalchemy.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    except Exception as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not usable: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
