"""Shared fixtures: the digits data and its trained baseline, made once per test session."""

from __future__ import annotations

import copy
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
