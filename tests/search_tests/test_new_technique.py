"""A technique is the unit of change: a new module dropped into a copy of ``spaces/`` is listed,
sampled in ``all``, encoded, decoded and exported under its own family with no other file
edited, and a study created before it existed resumes without a failed trial."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

import spaces

TERNARY = textwrap.dedent(
    '''
    """Ternary weights (-a, 0, +a per channel): symmetric 2-bit integer levels."""

    from __future__ import annotations

    from dataclasses import dataclass

    import optuna
    from torch import nn

    from spaces.intk import IntRepr
    from spaces.registry import ApplyContext, Technique, TechniqueConfig, register_technique
    from spaces.represent import set_weight_repr, snap_weights


    @dataclass(frozen=True)
    class TernaryConfig(TechniqueConfig):
        per_channel: bool = True


    @register_technique
    class Ternary(Technique[TernaryConfig, None]):
        name = "ternary"
        stage = "weights"
        family = "ternary"
        config_cls = TernaryConfig

        def suggest(self, trial: optuna.Trial, prefix: str) -> TernaryConfig:
            return TernaryConfig(per_channel=trial.suggest_categorical(f"{prefix}.per_channel", [True, False]))

        def apply(self, model: nn.Module, config: TernaryConfig, ctx: ApplyContext) -> None:
            set_weight_repr(model, ctx, lambda _p, layer: IntRepr.fit(
                layer.weight.detach(), 2, True, config.per_channel, True, layer.mask), 2)

        def finalize(self, model: nn.Module, config: TernaryConfig, state: None) -> None:
            snap_weights(model)

        def settings(self) -> list[TernaryConfig]:
            return [TernaryConfig(True), TernaryConfig(False)]

        def moderate(self) -> TernaryConfig:
            return TernaryConfig()
    '''
)

CHECK_ARTIFACT = textwrap.dedent(
    """
    import sys, optuna, torch
    from optuna.artifacts import FileSystemArtifactStore
    from storage.codec import decode
    study = optuna.load_study(study_name="with-ternary", storage=sys.argv[1])
    store = FileSystemArtifactStore(sys.argv[2])
    (trial,) = [t for t in study.trials if t.params.get("stage.weights") == "ternary"]
    with store.open_reader(trial.user_attrs["artifact_id"]) as fh:
        model = decode(fh.read())
    rep = model.get_submodule("conv2").weight_repr  # a middle layer: not protected
    print(rep.kind, rep.bits, int(model.get_submodule("conv2").weight.detach().unique().numel()))
    """
)


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_dropped_in_technique_is_searched_exported_and_old_studies_resume(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/search.db"
    common = ["--preset", "digits", "--storage", db, "--quiet", "--sampler", "random"]
    # 1. A study created by today's code (every plan over --max-bytes: recorded without training).
    _run(["-m", "search.run", "--study", "all", "--trials", "2", "--max-bytes", "1", *common], tmp_path)

    # 2. The same code plus one module in a copy of the package: nothing else edited.
    pkg = tmp_path / "pkg"
    shutil.copytree(Path(spaces.__file__).parent, pkg / "spaces", ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "spaces" / "ternary.py").write_text(TERNARY)
    env = {**os.environ, "PYTHONPATH": str(pkg)}
    listed = _run(["-c", "import spaces, spaces.registry as r; print(spaces.__file__); print(r.list_techniques())"],
                  tmp_path, env).stdout
    assert str(pkg) in listed and "'ternary'" in listed

    # 3. The old study resumes on its recorded space: no failed trial, ternary never sampled.
    resumed = _run(["-m", "search.run", "--study", "all", "--trials", "4", "--max-bytes", "1", *common], tmp_path, env)
    assert "ternary" in resumed.stdout  # the note that it goes to a new study
    old = optuna.load_study(study_name="all-digits", storage=db)
    assert [t.state.name for t in old.trials].count("FAIL") == 0 and len(old.trials) == 4
    assert all(t.params.get("stage.weights") != "ternary" for t in old.trials)

    # 4. A new study samples it (enqueued so that the test does not depend on the sampler's luck).
    new = optuna.create_study(study_name="with-ternary", storage=db, directions=["maximize", "maximize"])
    new.enqueue_trial({"stage.structure": "none", "stage.sparsity": "none", "stage.weights": "ternary",
                       "stage.activations": "none"})
    _run(["-m", "search.run", "--study", "all", "--trials", "1", "--name", "with-ternary", *common], tmp_path, env)
    new = optuna.load_study(study_name="with-ternary", storage=db)
    assert "ternary" in new.user_attrs["space"]["stages"]["weights"]
    assert [t.state.name for t in new.trials] == ["COMPLETE"]
    kind = _run(["-c", CHECK_ARTIFACT, db, str(tmp_path / "artifacts")], tmp_path, env).stdout.split()
    assert kind[:2] == ["int", "2"] and int(kind[2]) <= 3 * 64  # levels -a, 0, +a per channel

    # 5. Export labels it with its own family.
    out = tmp_path / "exports"
    _run(["-m", "search.export", "--name", "with-ternary", "--storage", db, "--out", str(out)], tmp_path, env)
    with (out / "trials.csv").open() as fh:
        families = {row["families"] for row in csv.DictReader(fh)}
    assert "ternary" in families
    summary = json.loads((out / "pareto.json").read_text())
    assert summary["plans"]
