"""Tests of models.presets: every preset binds a registered model to a known dataset."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from models.datasets import list_datasets, load_dataset
from models.errors import UnknownNameError
from models.presets import DEFAULT_PRESET, PRESETS, Preset, get_preset, list_presets
from models.registry import create_model, get_model_info, list_models
from models.train import TrainConfig

DESIGNED = {
    "cifar10-resnet18": ("resnet18", "cifar10"),
    "cifar10-mobilenetv2": ("mobilenetv2", "cifar10"),
    "cifar10-wrn16-4": ("wrn16_4", "cifar10"),
    "cifar10-resnet-mini": ("resnet_mini", "cifar10"),
    "mnist-lenet300": ("lenet300", "mnist"),
    "mnist-lenet5": ("lenet5", "mnist"),
    "digits": ("digits_cnn", "digits"),
}


def test_the_designed_presets_exist() -> None:
    assert set(DESIGNED) <= set(list_presets())
    assert list_presets() == sorted(PRESETS)
    for name, (model, dataset) in DESIGNED.items():
        p = get_preset(name)
        assert (p.name, p.model, p.dataset) == (name, model, dataset)


def test_default_preset() -> None:
    assert DEFAULT_PRESET == "cifar10-resnet18"
    assert get_preset(DEFAULT_PRESET).model == "resnet18"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_model_and_dataset_are_known(name: str) -> None:
    p = get_preset(name)
    assert p.name == name
    assert p.model in list_models()
    assert p.dataset in list_datasets()
    assert isinstance(p.baseline, TrainConfig) and isinstance(p.finetune, TrainConfig)
    assert p.finetune.epochs < p.baseline.epochs
    assert 0.0 < p.val_fraction <= 0.5
    assert p.description


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_model_builds_for_its_input(name: str) -> None:
    spec = get_model_info(get_preset(name).model).data_spec
    model = create_model(get_preset(name).model).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, spec.channels, spec.size, spec.size))
    assert out.shape == (2, spec.num_classes)


def test_digits_preset_fits_its_data() -> None:
    p = get_preset("digits")
    data = load_dataset(p.dataset, val_fraction=p.val_fraction)
    spec = get_model_info(p.model).data_spec
    assert (spec.channels, spec.size, spec.num_classes) == (
        data.spec.channels, data.spec.size, data.spec.num_classes,
    )


def test_resnet_mini_preset_is_the_quick_cifar_recipe() -> None:
    # benchmarks/gpu.py times a 20-trial study of it: same recipe as cifar10-resnet18, shorter.
    mini, full = get_preset("cifar10-resnet-mini"), get_preset("cifar10-resnet18")
    assert mini.baseline.epochs < full.baseline.epochs and mini.finetune.epochs < full.finetune.epochs
    assert mini.baseline.replace(epochs=full.baseline.epochs) == full.baseline
    assert mini.finetune.replace(epochs=full.finetune.epochs) == full.finetune


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(UnknownNameError) as info:
        get_preset("nope")
    msg = str(info.value)
    assert msg.startswith("unknown preset 'nope'")
    for name in PRESETS:
        assert name in msg
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_is_json_and_round_trips_configs(name: str) -> None:
    p = get_preset(name)
    d = json.loads(json.dumps(p.to_dict()))
    assert (d["name"], d["model"], d["dataset"]) == (p.name, p.model, p.dataset)
    assert TrainConfig.from_dict(d["baseline"]) == p.baseline
    assert TrainConfig.from_dict(d["finetune"]) == p.finetune
    assert d["val_fraction"] == p.val_fraction


def test_presets_are_frozen() -> None:
    p = get_preset("digits")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.model = "resnet18"  # type: ignore[misc]
    shorter = dataclasses.replace(p, baseline=p.baseline.replace(epochs=1))
    assert isinstance(shorter, Preset) and shorter.baseline.epochs == 1 and get_preset("digits").baseline.epochs > 1
