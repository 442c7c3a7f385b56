"""``python -m models.baseline`` in a subprocess: bad input ends in one line and exit status 2.

Nothing here downloads: where a dataset would be fetched, the child process makes torchvision's
download fail first, as it does on a machine without network access.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.datasets import list_datasets, load_dataset
from models.errors import DataNotFoundError, UnknownNameError
from models.presets import list_presets
from models.registry import create_model, list_models

TIMEOUT = 300  # generous: each call takes seconds, but CI machines can be busy

# Runs models.baseline's main with torchvision's download made to fail like an offline machine.
OFFLINE_MAIN = """
import sys
from urllib.error import URLError
import models.datasets

def _offline():
    raise URLError("network unavailable (test)")

models.datasets.import_torchvision = _offline
from models.baseline import main
main(sys.argv[1:])
"""


def _run(args: list[str], cwd: Path, offline_main: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", OFFLINE_MAIN, *args] if offline_main else [sys.executable, "-m", "models.baseline", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_help_exits_zero(tmp_path: Path) -> None:
    proc = _run(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--preset" in proc.stdout and "--dataset" in proc.stdout and "--store" in proc.stdout
    flat = "".join(proc.stdout.split())  # argparse may wrap a name at its hyphen
    for name in list_presets():
        assert name in flat


def test_unknown_preset(tmp_path: Path) -> None:
    line = _one_error_line(_run(["--preset", "nope"], tmp_path))
    assert line.startswith("error: unknown preset 'nope'")
    for name in list_presets():
        assert name in line


def test_unknown_dataset(tmp_path: Path) -> None:
    line = _one_error_line(_run(["--dataset", "nope"], tmp_path))
    assert line.startswith("error: unknown dataset 'nope'")
    for name in list_datasets():
        assert name in line


def test_missing_npz_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.npz"
    line = _one_error_line(_run(["--dataset", f"npz:{missing}"], tmp_path))
    assert str(missing) in line


def test_missing_mnist_t10k_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_error_line(_run(["--dataset", f"mnist-t10k:{empty}"], tmp_path))
    assert str(empty) in line and "t10k-images-idx3-ubyte" in line


def test_unknown_device(tmp_path: Path) -> None:
    line = _one_error_line(_run(["--device", "nope", "--store", str(tmp_path)], tmp_path))
    assert "'nope'" in line and "cpu" in line
    assert not (tmp_path / "baselines").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path: Path) -> None:
    line = _one_error_line(_run(["--device", "cuda", "--store", str(tmp_path)], tmp_path))
    assert "'cuda'" in line and "CUDA is not available" in line


def test_missing_cifar_offline(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    line = _one_error_line(_run(["--dataset", "cifar10", "--data-dir", str(data_dir)], tmp_path, offline_main=True))
    assert "CIFAR-10 not found" in line and str(data_dir) in line
    assert "network unavailable (test)" in line  # why the download failed
    assert "cifar-10-python.tar.gz" in line  # and how to get the files


def test_missing_mnist_preset_offline(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    line = _one_error_line(
        _run(["--preset", "mnist-lenet300", "--data-dir", str(data_dir)], tmp_path, offline_main=True)
    )
    assert "MNIST not found" in line and str(data_dir) in line and "mnist-t10k" in line


def test_digits_cli_trains_then_loads(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = _run(["--preset", "digits", "--store", str(store), "--device", "cpu"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "training baseline digits" in first.stdout
    record = json.loads(first.stdout[first.stdout.index("{") :])
    assert record["preset"] == "digits" and record["test_accuracy"] > 0.95
    second = _run(["--preset", "digits", "--store", str(store), "--device", "cpu"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "loaded from" in second.stdout and "training baseline" not in second.stdout
    assert json.loads(second.stdout[second.stdout.index("{") :]) == record
    assert not (tmp_path / "data").exists()  # digits is bundled: nothing was downloaded


# --- the same errors in-process --------------------------------------------------------------------


def test_load_dataset_without_download_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(info.value)
    assert str(tmp_path) in msg and "cifar-10-python.tar.gz" in msg and "\n" not in msg
    assert not any(tmp_path.iterdir())  # nothing was written


def test_unknown_model_lists_known_models() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_model("nope")
    assert str(info.value).startswith("unknown model 'nope'")
    for name in list_models():
        assert name in str(info.value)
