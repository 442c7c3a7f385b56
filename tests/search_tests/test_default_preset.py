"""The preset a search without ``--preset`` runs: the default (ResNet-18 on CIFAR-10) with a GPU
or its data, else ``digits`` with one line saying so; an explicit ``--preset`` is never changed.
CUDA and the data lookup are monkeypatched; nothing is trained."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import presets
from models.errors import UserError
from models.presets import DEFAULT_PRESET, FALLBACK_PRESET, data_present, default_preset
from search import run as run_cli


def _machine(monkeypatch: pytest.MonkeyPatch, *, cuda: bool, data: bool) -> list[tuple[str, str]]:
    """CUDA and the default preset's data as given; returns the data lookups made."""
    lookups: list[tuple[str, str]] = []

    def lookup(dataset: str, data_dir: str | Path) -> bool:
        lookups.append((dataset, str(data_dir)))
        return data

    monkeypatch.setattr(presets, "cuda_available", lambda: cuda)
    monkeypatch.setattr(presets, "data_present", lookup)
    return lookups


def test_cpu_without_cifar_falls_back_to_digits_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = _machine(monkeypatch, cuda=False, data=False)
    preset, note = default_preset("somewhere")
    assert (DEFAULT_PRESET, FALLBACK_PRESET) == ("cifar10-resnet18", "digits")
    assert preset == "digits"
    assert lookups == [("cifar10", "somewhere")]
    assert note is not None and "\n" not in note
    assert "--preset digits" in note and "cifar10-resnet18" in note and "somewhere" in note


@pytest.mark.parametrize(("cuda", "data"), [(True, False), (True, True), (False, True)])
def test_a_gpu_or_the_data_keeps_the_default(monkeypatch: pytest.MonkeyPatch, cuda: bool, data: bool) -> None:
    _machine(monkeypatch, cuda=cuda, data=data)
    assert default_preset("data") == (DEFAULT_PRESET, None)


def test_a_dataset_override_keeps_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fallback's model (8x8 digits) fits its own data only.
    lookups = _machine(monkeypatch, cuda=False, data=False)
    assert default_preset("data", "mnist-t10k") == (DEFAULT_PRESET, None)
    assert lookups == []


def test_the_data_lookup_downloads_nothing(tmp_path: Path) -> None:
    assert not data_present("cifar10", tmp_path / "data")
    assert data_present("digits", tmp_path / "data")  # bundled with scikit-learn
    assert list(tmp_path.iterdir()) == []


class _Stop(UserError):
    """Raised where the baseline would load: the test ends there."""


def _run_until_the_baseline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str]) -> str:
    """search.run's main up to the baseline; returns the preset it would load."""
    loaded: list[str] = []

    def load(preset: str, **kwargs: object) -> None:
        loaded.append(preset)
        raise _Stop("stop before training")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_cli.Workbench, "load", load)
    with pytest.raises(SystemExit) as exc:
        run_cli.main(["--trials", "1", "--storage", f"sqlite:///{tmp_path}/s.db", "--store", str(tmp_path / "store"),
                      "--data-dir", str(tmp_path / "data"), *argv])
    assert exc.value.code == 2
    (preset,) = loaded
    return preset


def test_search_run_without_preset_runs_digits_on_a_cpu_machine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _machine(monkeypatch, cuda=False, data=False)
    assert _run_until_the_baseline(monkeypatch, tmp_path, []) == "digits"
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "--preset digits" in line]
    assert len(notes) == 1 and notes[0].startswith("note: no CUDA device")


@pytest.mark.parametrize(("cuda", "argv", "expected"), [
    (True, [], DEFAULT_PRESET),  # a GPU: the default stays
    (False, ["--preset", DEFAULT_PRESET], DEFAULT_PRESET),  # asked for explicitly: never changed
    (False, ["--preset", "mnist-lenet5"], "mnist-lenet5"),
])
def test_search_run_keeps_the_default_with_a_gpu_or_an_explicit_preset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    cuda: bool, argv: list[str], expected: str,
) -> None:
    _machine(monkeypatch, cuda=cuda, data=False)
    assert _run_until_the_baseline(monkeypatch, tmp_path, argv) == expected
    assert "note: no CUDA device" not in capsys.readouterr().out
