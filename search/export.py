"""``python -m search.export``: the Pareto-optimal plans of a study as files.

Writes ``pareto.json`` (the study's configuration, baseline and hypervolume, and the trial
record of every Pareto plan with its test accuracy and plan file name), one
``plan-trial-<n>.json`` per Pareto plan (its trial record, :mod:`objectives.record`: what
``search.apply`` reads), ``trials.csv`` (every trial; a stopped trial shows its values at the
epoch it stopped after) and ``pareto.png`` (the front coloured by weight representation). Export
is the only place the test split is read: for each Pareto plan, from its stored artifact.
Stopped (pruned) and infeasible trials never enter the front. ``--materialize`` also writes the
artifacts.

Refinement (``search.refine``): the front is that of the search trials; refinement trials never
enter it. A front plan whose trial was refined carries, beside its search values, ``refined_*``
fields for its refinement at the highest fidelity: in ``pareto.json`` ``refined_trial``,
``refined_epochs``, ``refined_values``, ``refined_bytes``, ``refined_test_accuracy`` and
``refined_plan_file`` (``plan-trial-<refined trial>.json``, the refined trial's record: what
``search.apply`` reads to rebuild the refined artifact byte for byte; ``--materialize`` writes
that artifact too); in ``trials.csv`` every search trial's ``refined_trial``, ``refined_epochs``
and ``refined_<metric>`` columns, and every row's ``refine_of`` and ``fidelity_epochs``
(refinement trials are rows of their own).
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path
from typing import Any, BinaryIO

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from models.datasets import load_dataset
from models.errors import UserError, check_folder, cli_main
from models.presets import get_preset
from models.train import evaluate_split
from objectives.objective import is_feasible
from objectives.record import FIDELITY_EPOCHS, TrialRecord, write_plan_file
from search.progress import front_trials, study_hypervolume
from search.refine import best_refinements
from search.studies import find_study_name, stored_config
from search.worker import add_study_args
from storage.codec import CorruptArtifactError, decode
from storage.studies import (
    DEFAULT_STORAGE,
    default_store,
    load_study,
    open_artifact_store,
    open_storage,
)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, values, size, family, whether it is on the front. A stopped
    (PRUNED) trial's value columns hold its values at the epoch it stopped after."""
    trials = study.get_trials(deepcopy=False)
    front = {t.number for t in front_trials(trials)}
    names = study.metric_names or ["val_accuracy", "compression_ratio"]
    refined = best_refinements(trials)
    rows = []
    for t in trials:
        r = TrialRecord.from_trial(t, names)
        values = r.values or r.stopped_values or {}
        row: dict[str, Any] = {"number": t.number, "state": r.state}
        row.update({n: values.get(n, math.nan) for n in names})
        row.update(
            families=r.families, bytes=r.bytes, feasible=is_feasible(t), pareto=t.number in front,
            epochs=r.epochs, stopped_at_epoch=r.stopped_at_epoch, wall_seconds=r.wall_seconds,
            seed=r.seed, device=r.device, params=json.dumps(t.params, sort_keys=True),
            plan=json.dumps(r.plan, sort_keys=True), refine_of=r.refine_of, fidelity_epochs=r.fidelity_epochs,
        )
        best = refined.get(t.number)
        row.update(refined_trial=best.number if best else None,
                   refined_epochs=best.user_attrs[FIDELITY_EPOCHS] if best else None)
        row.update({f"refined_{n}": best.values[i] if best else math.nan for i, n in enumerate(names)})
        rows.append(row)
    return pd.DataFrame(rows)


def _weights_family(trial: FrozenTrial) -> str:
    """The label the front is coloured by: the weight representation, ``+sparse`` if pruned."""
    return TrialRecord.from_trial(trial).to_plan().weights_family


def plot_front(study: optuna.Study, baseline: dict[str, Any], path: Path | BinaryIO) -> None:
    """Scatter of every feasible trial (grey) and the front coloured by technique family, as a
    PNG written to ``path`` (a file name or a binary stream)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.values and is_feasible(t)]
    front = front_trials(trials)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    ax.scatter([t.values[1] for t in trials], [100 * t.values[0] for t in trials], s=12, c="#bbbbbb", label="trials")
    labels = {t.number: _weights_family(t) for t in front}
    fams = sorted(set(labels.values()))
    cmap = plt.get_cmap("tab10")
    for i, fam in enumerate(fams):
        pts = [t for t in front if labels[t.number] == fam]
        ax.scatter([t.values[1] for t in pts], [100 * t.values[0] for t in pts], s=50, color=cmap(i % 10),
                   edgecolor="black", label=fam, zorder=3)
    ax.plot([t.values[1] for t in front], [100 * t.values[0] for t in front], color="black", lw=0.8, zorder=2)
    ax.axhline(100 * baseline["val_accuracy"], color="red", ls="--", lw=0.8, label="baseline (val)")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (measured bytes, log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{study.study_name}: Pareto front ({len(front)} of {len(trials)} feasible trials)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _artifact_bytes(artifact_id: str | None, store: Any) -> bytes | None:
    if artifact_id is None:
        return None
    try:
        with store.open_reader(artifact_id) as fh:
            return fh.read()
    except Exception:  # a missing artifact falls back to rebuilding the plan
        return None


def _artifact_and_model(record: TrialRecord, store: Any, *, data_dir: str, store_root: str) -> tuple[bytes, Any]:
    """A trial's artifact from the store (rebuilt from its plan when missing) and its model."""
    from search.apply import rebuild

    blob = _artifact_bytes(record.artifact_id, store)
    if blob is None:
        _, outcome = rebuild(record.to_plan(), record, data_dir=data_dir, store=store_root)
        return outcome.artifact, outcome.model
    try:
        return blob, decode(blob)
    except CorruptArtifactError as exc:
        raise UserError(f"artifact of trial {record.trial} is corrupt ({exc}); re-run it or delete the study's artifacts") from None


def _nothing_to_export(study: optuna.Study) -> str:
    """Why a study has no front, in one line: its trials by state and the infeasible ones."""
    trials = study.get_trials(deepcopy=False)
    if not trials:
        return f"study {study.study_name!r} has no trials yet; run some with python -m search.run or search.worker"
    states = ", ".join(f"{n} {s.name.lower()}" for s in TrialState if (n := sum(t.state == s for t in trials)))
    infeasible = sum(t.state == TrialState.COMPLETE and not is_feasible(t) for t in trials)
    hint = ("every complete trial broke a constraint (--max-bytes, --min-ratio, --max-accuracy-drop): "
            "start a study with looser ones (--name)" if infeasible else "run more trials with python -m search.run or search.worker")
    return (f"study {study.study_name!r} has no feasible complete trial to export ({len(trials)} trials: {states}"
            f"{f'; {infeasible} infeasible' if infeasible else ''}); {hint}")


def export(study: optuna.Study, out: Path, *, data_dir: str, store_root: str, materialize: bool) -> dict[str, Any]:
    """Write the export files for ``study`` into ``out``; return the pareto.json content.

    Everything is computed before the first file is written, so a study with nothing to export
    or a corrupt artifact leaves no half-written export behind."""
    config = stored_config(study)
    baseline = study.user_attrs.get("baseline", {})
    front = front_trials(study.get_trials(deepcopy=False))
    if not front:
        raise UserError(_nothing_to_export(study))
    store = open_artifact_store(str(Path(store_root) / "artifacts"))
    preset = get_preset(config.preset)
    data = load_dataset(config.dataset or preset.dataset, data_dir, val_fraction=preset.val_fraction, seed=config.seed)
    files: dict[Path, TrialRecord | bytes] = {}  # written at the end, in this order
    names = study.metric_names or ["val_accuracy", "compression_ratio"]
    # Trials of studies made before the record held these fields take them from the study.
    defaults = dict(preset=config.preset, dataset=config.dataset, baseline_seed=config.seed,
                    baseline_bytes=baseline.get("bytes"), baseline_key=baseline.get("key"))
    refined = best_refinements(study.get_trials(deepcopy=False))
    plans = []
    for t in front:
        entry: dict[str, Any] = {}
        for trial, prefix in [(t, ""), (refined.get(t.number), "refined_")]:
            if trial is None:
                continue
            record = TrialRecord.from_trial(trial, names, defaults)
            record.to_plan()  # a malformed plan is refused in one line before anything loads
            blob, model = _artifact_and_model(record, store, data_dir=data_dir, store_root=store_root)
            record = record.model_copy(update={"test_accuracy": evaluate_split(model, data, "test")})
            plan_file = out / f"plan-trial-{trial.number}.json"
            files[plan_file] = record
            if materialize:
                files[out / f"trial-{trial.number}.pcz"] = blob
            if not prefix:
                entry.update({**record.to_json_dict(), "plan_file": plan_file.name})
            else:
                entry.update(refined_trial=trial.number, refined_epochs=record.fidelity_epochs, refined_values=record.values,
                             refined_bytes=record.bytes, refined_test_accuracy=record.test_accuracy,
                             refined_plan_file=plan_file.name)
        plans.append(entry)
    summary = {
        "study": study.study_name,
        "config": config.to_dict(),
        "baseline": baseline,
        "metric_names": names,
        "hypervolume": study_hypervolume(study.get_trials(deepcopy=False), baseline.get("val_accuracy", 0.0)),
        "plans": plans,
    }
    csv = trials_frame(study).to_csv(index=False)
    png = io.BytesIO()
    plot_front(study, baseline, png)
    out.mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            write_plan_file(path, content)
    (out / "pareto.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    (out / "trials.csv").write_text(csv)
    (out / "pareto.png").write_bytes(png.getvalue())
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m search.export``."""
    p = argparse.ArgumentParser(prog="python -m search.export", description=__doc__)
    add_study_args(p)
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"study storage URL (default: {DEFAULT_STORAGE})")
    p.add_argument("--store", default=None, help="root of baselines/ and artifacts/ (default: beside the SQLite file, else runs)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="exports", help="output folder (default: exports)")
    p.add_argument("--materialize", action="store_true", help="also write each Pareto plan's artifact (.pcz)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    check_folder(args.out, "--out")  # now, not after the test accuracies are computed
    check_folder(args.data_dir, "--data-dir", write=False)
    if args.store is not None:
        check_folder(args.store, "--store", write=False)
    storage = open_storage(args.storage, heartbeat=False, create=False)
    study = load_study(args.name or find_study_name(storage, args.study, args.preset), storage)
    summary = export(study, Path(args.out), data_dir=args.data_dir,
                     store_root=args.store or default_store(args.storage), materialize=args.materialize)
    print(f"{len(summary['plans'])} Pareto plans -> {args.out}/pareto.json, trials.csv, pareto.png")
    acc, ratio = summary["metric_names"][:2]
    for p in summary["plans"]:
        print(f"  trial {p['trial']:>4}  {p['families']:<28} val {p['values'][acc]:.4f} "
              f"test {p['test_accuracy']:.4f} ratio {p['values'][ratio]:.2f}  {p['plan_file']}")
        if "refined_trial" in p:
            print(f"  {'refined':>10} {p['refined_epochs']:>3} epochs{'':<18} val {p['refined_values'][acc]:.4f} "
                  f"test {p['refined_test_accuracy']:.4f} ratio {p['refined_values'][ratio]:.2f}  {p['refined_plan_file']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
