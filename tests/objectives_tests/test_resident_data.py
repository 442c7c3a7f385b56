"""Data moves to the device once per worker: trials build every loader from the resident splits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import optuna
import torch

from models.baseline import save_state
from models.datasets import load_dataset
from models.loader import DeviceLoader, is_resident, place, transfer_stats
from models.train import evaluate_split, recalibrate_batchnorm
from objectives.objective import Objective
from objectives.pipeline import Workbench, calibration
from spaces.plan import get_study_space

CPU = torch.device("cpu")
# Cheap plans (no k-means/GMM codebooks): the test is about data movement, not techniques.
PLANS = [
    {"stage.structure": "none", "stage.sparsity": "prune", "stage.weights": "int", "stage.activations": "none"},
    {"stage.structure": "structured", "stage.sparsity": "none", "stage.weights": "float",
     "stage.activations": "none"},
    {"stage.structure": "none", "stage.sparsity": "prune", "stage.weights": "fp32",
     "stage.activations": "actquant"},
]


def _seed_store(store: Path, base) -> None:  # base: the conftest's DigitsBaseline
    """Put the session's digits baseline where Workbench.load looks, so that it loads, not trains."""
    folder = store / "baselines" / f"digits-{base.record.key}"
    folder.mkdir(parents=True)
    save_state(base.model, folder / "model.safetensors")
    (folder / "baseline.json").write_text(json.dumps(base.record.to_dict()))


def test_trials_copy_no_data_after_the_first(tmp_path: Path, digits_baseline) -> None:
    _seed_store(tmp_path, digits_baseline)
    bench = Workbench.load("digits", store=str(tmp_path), device=CPU)
    assert bench.record == digits_baseline.record  # loaded from the store
    assert bench.data.device == CPU
    assert all(is_resident(t, CPU) for t in (bench.data.x_train, bench.data.y_val, bench.data.x_test))
    # One fine-tune epoch keeps the three trials short.
    objective = Objective(bench, get_study_space("all"), finetune_space={"epochs": (1, 1)})
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for params in PLANS:
        study.enqueue_trial(params)
    copies = []
    for _ in range(3):
        before = transfer_stats()
        study.optimize(objective, n_trials=1)
        after = transfer_stats()
        copies.append((after[0] - before[0], after[1] - before[1]))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [t.params["stage.weights"] for t in study.trials] == ["int", "float", "fp32"]
    assert copies[1:] == [(0, 0), (0, 0)], copies
    # A workbench given host splits moves them once, when it is made (six tensors), and its
    # trials then copy nothing either.
    host = load_dataset("digits", val_fraction=bench.preset.val_fraction, seed=0)
    before = transfer_stats()
    host_objective = Objective(dataclasses.replace(bench, data=host), get_study_space("all"),
                               finetune_space={"epochs": (1, 1)})
    assert transfer_stats()[0] - before[0] == 6
    study.enqueue_trial(PLANS[0])
    before = transfer_stats()
    study.optimize(host_objective, n_trials=1)
    assert transfer_stats()[0] - before[0] == 0


def test_loaders_from_host_data_are_counted() -> None:
    host = load_dataset("digits", val_fraction=0.15, seed=0)
    assert host.device is None
    copies, nbytes = transfer_stats()
    DeviceLoader(host.x_train, host.y_train, host.spec, 64, train=True, device=CPU)
    assert transfer_stats() == (copies + 2, nbytes + host.x_train.nbytes + host.y_train.nbytes)
    # The same host tensors again: on a GPU that is another copy, so it is counted again.
    evaluate_split(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), host, "val", CPU)
    assert transfer_stats()[0] == copies + 4


def test_resident_splits_are_placed_once_and_reused() -> None:
    host = load_dataset("digits", val_fraction=0.15, seed=0)
    copies, nbytes = transfer_stats()
    data = host.to(CPU)
    total = sum(t.nbytes for t in (host.x_train, host.y_train, host.x_val, host.y_val, host.x_test, host.y_test))
    assert transfer_stats() == (copies + 6, nbytes + total)
    assert data.to(CPU) is data and place(data.x_val, CPU) is data.x_val
    assert torch.equal(data.x_train, host.x_train) and torch.equal(data.y_test, host.y_test)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(144, 10)
    )
    before = transfer_stats()
    loader = DeviceLoader(data.x_train, data.y_train, data.spec, 64, train=True, device=CPU)
    assert loader.x is data.x_train
    evaluate_split(model, data, "test", CPU)
    recalibrate_batchnorm(model, data, batches=2)
    assert len(list(calibration(data, CPU, batches=2)())) == 2
    assert transfer_stats() == before
