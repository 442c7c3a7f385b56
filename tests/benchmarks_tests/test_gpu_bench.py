"""Tests of benchmarks/gpu.py: its tiny configuration runs end to end and reports every figure."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu.py"

THROUGHPUT = [
    "train_img_s_project",
    "train_img_s_project_median_epoch",
    "train_img_s_torchvision_pil",
    "train_img_s_torchvision_tensor",
    "train_speedup_vs_torchvision_pil",
    "train_speedup_vs_torchvision_tensor",
    "search_trials_per_hour_jobs1_wall",
    "search_trials_per_hour_jobs1_trials",
    "search_trials_per_hour_jobs2_wall",
    "search_trials_per_hour_jobs2_trials",
    "search_speedup_jobs2_vs_jobs1_wall",
    "search_speedup_jobs2_vs_jobs1_trials",
    "search_baseline_train_seconds",
]
TRANSFERS = [
    "h2d_bytes_workbench_load",
    "h2d_copies_workbench_load",
    "h2d_bytes_first_trial",
    "h2d_copies_first_trial",
    "h2d_bytes_per_later_trial",
    "h2d_copies_per_later_trial",
]


def load_script():
    """benchmarks/gpu.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    if "gpu_bench" in sys.modules:
        return sys.modules["gpu_bench"]
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    figures = report["figures"]
    assert report["configuration"] == "tiny"
    for name in THROUGHPUT:
        value = figures[name]["value"]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, value)
    runs = report["search"]["runs"]
    assert [r["jobs"] for r in runs] == [1, 2]
    assert all(r["finished"] == 2 and not r["baseline_trained_in_study"] for r in runs)
    if report["transfers"]["available"]:
        # Counts, not rates: 0 is a valid outcome (a trial that reuses the resident data moves none).
        for name in TRANSFERS:
            value = figures[name]["value"]
            assert isinstance(value, (int, float)) and value >= 0, (name, value)
        assert figures["h2d_copies_workbench_load"]["value"] > 0  # the splits are placed once there
    else:
        assert not any(name in figures for name in TRANSFERS)
    for name, figure in figures.items():
        assert figure["what"] and figure["unit"], name
        assert name in proc.stdout  # the printed table lists it
    assert "baseline training NOT included" in figures["search_trials_per_hour_jobs1_wall"]["what"]


def test_full_configuration_refuses_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    gpu = load_script()
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        gpu.main([])
    assert info.value.code == 2
    assert "no CUDA device: use --tiny" in capsys.readouterr().err


def test_synthetic_data_is_cifar_shaped() -> None:
    gpu = load_script()
    x, y = gpu.synthetic_cifar(20, 32, seed=0)
    assert x.dtype.name == "uint8" and x.shape == (20, 3, 32, 32)
    assert y.dtype.name == "int64" and y.min() >= 0 and y.max() < 10
    again, _ = gpu.synthetic_cifar(20, 32, seed=0)
    assert (x == again).all()
