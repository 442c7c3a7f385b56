"""Tests of models.baseline: the cache (miss, hit, keys) and the safetensors weight files."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import models.baseline as baseline
from models.baseline import (
    BaselineRecord,
    baseline_key,
    load_or_train_baseline,
    load_state,
    save_state,
)
from models.datasets import Splits, load_dataset
from models.errors import UserError
from models.presets import Preset, get_preset
from models.registry import create_model
from models.train import evaluate_split

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def preset() -> Preset:
    p = get_preset("digits")
    return dataclasses.replace(p, baseline=p.baseline.replace(epochs=2))


@pytest.fixture(scope="module")
def digits(preset: Preset) -> Splits:
    return load_dataset("digits", val_fraction=preset.val_fraction, seed=0)


def _no_training(*args: object, **kwargs: object) -> None:
    raise AssertionError("the cache was missed: train() was called")


def test_miss_then_hit(tmp_path: Path, preset: Preset, digits: Splits, monkeypatch: pytest.MonkeyPatch) -> None:
    log1: list[str] = []
    model1, rec1 = load_or_train_baseline(preset, digits, seed=0, store=tmp_path, device=CPU, log=log1.append)
    key = baseline_key(preset, digits, 0)
    folder = tmp_path / "baselines" / f"digits-{key}"
    assert (folder / "model.safetensors").is_file() and (folder / "baseline.json").is_file()
    assert [p.name for p in (tmp_path / "baselines").iterdir() if p.is_dir()] == [folder.name]
    assert any(line.startswith("training baseline digits") for line in log1)
    assert sum(line.startswith("epoch ") for line in log1) == 2

    # The record describes what was trained.
    assert rec1.key == key and rec1.preset == "digits" and rec1.model == "digits_cnn"
    assert rec1.dataset == "digits" and rec1.seed == 0 and len(rec1.curve) == 2
    assert rec1.num_parameters == sum(p.numel() for p in model1.parameters())
    assert rec1.train_config["epochs"] == 2 and rec1.train_config["seed"] == 0
    assert (rec1.num_classes, rec1.in_channels) == (10, 1)
    assert rec1.test_accuracy == pytest.approx(evaluate_split(model1, digits, "test", CPU))
    assert rec1.val_accuracy == pytest.approx(evaluate_split(model1, digits, "val", CPU))
    on_disk = json.loads((folder / "baseline.json").read_text())
    assert BaselineRecord.from_dict(on_disk) == rec1
    assert on_disk["format"] == baseline.FORMAT_VERSION

    # Second call: a hit. Training is forbidden.
    monkeypatch.setattr(baseline, "train", _no_training)
    log2: list[str] = []
    model2, rec2 = load_or_train_baseline(preset, digits, seed=0, store=tmp_path, device=CPU, log=log2.append)
    assert rec2 == rec1
    assert any("loaded from" in line for line in log2)
    assert not any(line.startswith(("training", "epoch")) for line in log2)
    assert not model2.training
    s1, s2 = model1.state_dict(), model2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k].cpu(), s2[k].cpu()), k
    assert evaluate_split(model2, digits, "test", CPU) == pytest.approx(rec1.test_accuracy)


def test_retrain_ignores_the_cache(tmp_path: Path, preset: Preset, digits: Splits) -> None:
    tiny = dataclasses.replace(preset, baseline=preset.baseline.replace(epochs=1))
    _, rec1 = load_or_train_baseline(tiny, digits, seed=0, store=tmp_path, device=CPU)
    log: list[str] = []
    _, rec2 = load_or_train_baseline(tiny, digits, seed=0, store=tmp_path, device=CPU, retrain=True, log=log.append)
    assert any(line.startswith("training baseline") for line in log)
    assert rec2.key == rec1.key and rec2.curve == rec1.curve  # seeded: the same run again


def test_keys_depend_on_seed_budget_and_data(preset: Preset, digits: Splits) -> None:
    k0 = baseline_key(preset, digits, 0)
    assert k0 == baseline_key(preset, digits, 0)
    assert len(k0) == 16 and all(c in "0123456789abcdef" for c in k0)
    assert baseline_key(preset, digits, 1) != k0
    longer = dataclasses.replace(preset, baseline=preset.baseline.replace(epochs=3))
    assert baseline_key(longer, digits, 0) != k0
    other_split = load_dataset("digits", val_fraction=0.2, seed=0)
    assert baseline_key(preset, other_split, 0) != k0


def test_different_seed_is_a_different_entry(
    tmp_path: Path, preset: Preset, digits: Splits, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = dataclasses.replace(preset, baseline=preset.baseline.replace(epochs=1))
    _, rec0 = load_or_train_baseline(tiny, digits, seed=0, store=tmp_path, device=CPU)
    _, rec1 = load_or_train_baseline(tiny, digits, seed=1, store=tmp_path, device=CPU)
    assert rec0.key != rec1.key and rec1.seed == 1
    folders = sorted(p.name for p in (tmp_path / "baselines").iterdir() if p.is_dir())
    assert folders == sorted([f"digits-{rec0.key}", f"digits-{rec1.key}"])
    monkeypatch.setattr(baseline, "train", _no_training)
    _, again = load_or_train_baseline(tiny, digits, seed=1, store=tmp_path, device=CPU)
    assert again == rec1


# --- weight files ----------------------------------------------------------------------------------


def _digits_model(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return create_model("digits_cnn", num_classes=num_classes, in_channels=1)


def test_weights_file_is_safetensors_not_pickle(tmp_path: Path) -> None:
    model = _digits_model()
    path = tmp_path / "w.safetensors"
    save_state(model, path, {"preset": "digits"})
    raw = path.read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"  # neither a pickle nor a torch.save zip
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert 8 + header_len <= len(raw)
    header = json.loads(raw[8 : 8 + header_len])
    assert header.pop("__metadata__") == {"preset": "digits"}
    state = model.state_dict()
    assert set(header) == set(state)
    for name, entry in header.items():
        assert entry["shape"] == list(state[name].shape)
        start, end = entry["data_offsets"]
        assert end - start == state[name].numel() * state[name].element_size()
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed away

    loaded = load_state(_digits_model(), path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_state_refuses_a_wrong_shape(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_state(_digits_model(num_classes=10), path)
    with pytest.raises(UserError, match=r"fc2\.weight") as info:
        load_state(_digits_model(num_classes=5), path)
    assert "(10, 128)" in str(info.value) and "(5, 128)" in str(info.value)
    assert "\n" not in str(info.value)


def test_load_state_refuses_missing_and_extra_tensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_state(_digits_model(), path)
    with pytest.raises(UserError, match="missing"):
        load_state(create_model("lenet300"), path)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a safetensors file at all", b"\x80\x04\x95garbage", struct.pack("<Q", 10**9) + b"{}"],
)
def test_load_state_refuses_a_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match="cannot read weights"):
        load_state(_digits_model(), path)


def test_load_state_refuses_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_state(_digits_model(), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="cannot read weights"):
        load_state(_digits_model(), path)


def test_load_state_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read weights"):
        load_state(_digits_model(), tmp_path / "absent.safetensors")


def test_corrupt_cached_weights_are_a_user_error(tmp_path: Path, preset: Preset, digits: Splits) -> None:
    tiny = dataclasses.replace(preset, baseline=preset.baseline.replace(epochs=1))
    load_or_train_baseline(tiny, digits, seed=0, store=tmp_path, device=CPU)
    (weights,) = (tmp_path / "baselines").glob("digits-*/model.safetensors")
    weights.write_bytes(b"junk")
    with pytest.raises(UserError, match="delete it to retrain"):
        load_or_train_baseline(tiny, digits, seed=0, store=tmp_path, device=CPU)
