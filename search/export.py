"""``python -m search.export``: the Pareto-optimal plans of a study as files.

Writes ``pareto.json`` (the study's configuration, baseline and hypervolume, and the trial
record of every Pareto plan with its test accuracy and plan file name), one
``plan-trial-<n>.json`` per Pareto plan (its trial record, :mod:`objectives.record`: what
``search.apply`` reads), ``trials.csv`` (every trial; a stopped trial, ``stopped`` true, shows its
values at the epoch it stopped after) and ``pareto.png`` (the front coloured by technique
families and labelled with trial numbers, stopped trials faint at their values when stopped,
accuracy zoomed on the floor and above, ratio on a log axis). The test accuracy of each Pareto
plan is read here, from its stored artifact. Stopped (pruned) and infeasible trials never enter
the front. ``--materialize`` also writes the artifacts; ``--onnx`` writes each plan's model as
``trial-<n>.onnx`` (uint8 images in, logits out: :mod:`storage.onnx_export`), refined ones too.

**Accuracy floor.** Plans below the hypervolume's reference accuracy (the baseline's validation
accuracy minus ``--accuracy-floor`` points, default :data:`search.progress.ACCURACY_FLOOR_POINTS`)
are left out of the exported front (``pareto.json``'s plans, the plan files, the console list,
``pareto.png``): a chance-level plan of huge ratio is Pareto-optimal but useless. They stay in
``trials.csv`` (``pareto`` true); ``pareto.json`` names them under ``accuracy_floor``.
``--accuracy-floor 100`` keeps every plan.

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
from objectives import record
from objectives.objective import is_feasible
from objectives.record import FIDELITY_EPOCHS, TrialRecord, write_plan_file
from search.notes import save_study_note
from search.progress import ACCURACY_FLOOR_POINTS, front_trials, study_hypervolume
from search.refine import best_refinements
from search.studies import find_study_name, stored_config
from search.worker import add_study_args
from storage.codec import CorruptArtifactError, decode
from storage.onnx_export import onnx_bytes, require_onnx
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
        # A stopped trial is PRUNED (Optuna keeps no values): its columns hold its values at the
        # epoch it stopped after, and ``stopped`` marks them as such.
        row: dict[str, Any] = {"number": t.number, "state": r.state, "stopped": r.stopped_at_epoch is not None}
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


def _families(trial: FrozenTrial) -> str:
    """The label the front is coloured by: the plan's technique families (``lowrank+prune+int+act``;
    ``fp32`` for none), recorded with the trial or read from its plan."""
    r = TrialRecord.from_trial(trial)
    return r.families or r.to_plan().families


def accuracy_floor(baseline: dict[str, Any], points: float) -> float | None:
    """The lowest validation accuracy an exported plan may have: the baseline's minus ``points``
    (the hypervolume's reference at the default); None when the study records no baseline."""
    acc = baseline.get("val_accuracy")
    return None if acc is None else acc - points / 100.0


def _stopped_point(trial: FrozenTrial) -> tuple[float, float] | None:
    """(accuracy, ratio) of a stopped trial at the epoch it stopped after, if recorded."""
    values = trial.user_attrs.get(record.STOPPED_VALUES) or {}
    acc, ratio = values.get("val_accuracy"), values.get("compression_ratio")
    return None if acc is None or ratio is None else (acc, ratio)


def front_figure(study: optuna.Study, baseline: dict[str, Any], floor: float | None = None) -> Any:
    """The matplotlib figure of ``pareto.png``: the front above ``floor`` coloured by technique
    families and labelled with trial numbers, the other feasible trials in grey, stopped trials
    faint at their values when stopped; accuracy from the floor to a little above the best, the
    ratio on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    def above(acc: float) -> bool:
        return floor is None or acc >= floor

    everything = study.get_trials(deepcopy=False)
    trials = [t for t in everything if t.state == TrialState.COMPLETE and t.values and is_feasible(t)]
    front = [t for t in front_trials(trials) if above(t.values[0])]
    on_front = {t.number for t in front}
    others = [t for t in trials if t.number not in on_front and above(t.values[0])]
    stopped = [(t, p) for t in everything if t.state == TrialState.PRUNED and (p := _stopped_point(t)) and above(p[0])]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    ax.scatter([t.values[1] for t in others], [100 * t.values[0] for t in others], s=12, c="#b0b0b0",
               label="other feasible trials", zorder=1)
    if stopped:
        ax.scatter([p[1] for _, p in stopped], [100 * p[0] for _, p in stopped], s=16, facecolors="none",
                   edgecolors="#808080", alpha=0.6, linewidths=0.8, label="stopped early (values at the stop)", zorder=1)
    labels = {t.number: _families(t) for t in front}
    fams = sorted(set(labels.values()))
    cmap = plt.get_cmap("tab10" if len(fams) <= 10 else "tab20")
    for i, fam in enumerate(fams):
        pts = [t for t in front if labels[t.number] == fam]
        ax.scatter([t.values[1] for t in pts], [100 * t.values[0] for t in pts], s=50, color=cmap(i % cmap.N),
                   edgecolor="black", label=fam, zorder=3)
    for t in front:
        ax.annotate(f"#{t.number}", (t.values[1], 100 * t.values[0]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7, zorder=4)
    ax.plot([t.values[1] for t in front], [100 * t.values[0] for t in front], color="black", lw=0.8, zorder=2)
    base = baseline.get("val_accuracy")
    if base is not None:
        ax.axhline(100 * base, color="red", ls="--", lw=0.8, label="baseline (val)")
    if floor is not None and floor > 0:
        ax.axhline(100 * floor, color="#555555", ls=":", lw=0.8, label="accuracy floor (not exported below)")
    # Zoom on the useful band: the floor (or the lowest point shown) to a little above the best.
    shown = [100 * t.values[0] for t in (*front, *others)] + [100 * p[0] for _, p in stopped]
    top = max([*shown, *([100 * base] if base is not None else [])], default=100.0)
    low = 100 * floor if floor is not None and floor > 0 else min(shown, default=0.0)
    pad = max(0.25, 0.04 * (top - low))
    ax.set_ylim(max(0.0, low - pad), min(100.0 + pad, top + pad))
    ax.set_xscale("log")
    # Ratios as 2x, 5x, 10x, 20x ... rather than powers of ten.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if v > 0 and f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlabel("compression ratio (measured bytes, log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{study.study_name}: Pareto front ({len(front)} plans; {len(trials)} feasible, "
                 f"{len(stopped)} stopped trials shown)")
    ax.legend(fontsize=7, loc="lower left", ncol=2 if len(fams) > 6 else 1)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_front(study: optuna.Study, baseline: dict[str, Any], path: Path | BinaryIO, floor: float | None = None) -> None:
    """:func:`front_figure` as a PNG written to ``path`` (a file name or a binary stream)."""
    import matplotlib.pyplot as plt

    fig = front_figure(study, baseline, floor)
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


def export(study: optuna.Study, out: Path, *, data_dir: str, store_root: str, materialize: bool,
           floor_points: float = ACCURACY_FLOOR_POINTS, onnx: bool = False) -> dict[str, Any]:
    """Write the export files for ``study`` into ``out``; return the pareto.json content.

    Pareto plans more than ``floor_points`` accuracy points below the baseline are left out
    (module doc). Everything is computed before the first file is written, so a study with
    nothing to export or a corrupt artifact leaves no half-written export behind."""
    config = stored_config(study)
    baseline = study.user_attrs.get("baseline", {})
    trials = study.get_trials(deepcopy=False)
    full = front_trials(trials)
    if not full:
        raise UserError(_nothing_to_export(study))
    floor = accuracy_floor(baseline, floor_points)
    # The front of the trials at or above the floor is the full front without the plans below
    # it (a plan above the floor is dominated only by plans more accurate still).
    front = full if floor is None else front_trials([t for t in trials if t.values and t.values[0] >= floor])
    kept = {t.number for t in front}
    below = [t for t in full if t.number not in kept]
    if not front:
        best = max(t.values[0] for t in below)
        raise UserError(f"every Pareto plan of study {study.study_name!r} is below the accuracy floor {floor:.4f} "
                        f"(baseline val {baseline['val_accuracy']:.4f} - {floor_points:g} points; best plan {best:.4f}); "
                        "pass --accuracy-floor 100 to export them anyway")
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
            if onnx:  # the artifact's model and input spec (an artifact without one: the study's data)
                deployed = decode(blob)
                files[out / f"trial-{trial.number}.onnx"] = onnx_bytes(deployed, getattr(deployed, "input_spec", None) or data.spec)[0]
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
        "accuracy_floor": {"points": floor_points, "val_accuracy": floor, "left_out": [t.number for t in below]},
        "plans": plans,
    }
    csv = trials_frame(study).to_csv(index=False)
    png = io.BytesIO()
    plot_front(study, baseline, png, floor)
    out.mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            write_plan_file(path, content)
    (out / "pareto.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    (out / "trials.csv").write_text(csv)
    (out / "pareto.png").write_bytes(png.getvalue())
    save_study_note(study, print)  # the dashboard's study note and charts show this front too
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
    p.add_argument("--onnx", action="store_true",
                   help="also write each Pareto plan's model as trial-<n>.onnx (uint8 images in, logits out)")
    p.add_argument("--accuracy-floor", type=float, default=ACCURACY_FLOOR_POINTS, metavar="POINTS",
                   help=f"leave out Pareto plans more than POINTS accuracy points below the baseline, as the hypervolume "
                        f"does (default: {ACCURACY_FLOOR_POINTS:g}; 100 keeps every plan)")
    p.add_argument("--wandb", action="store_true",
                   help="log the exported front (values, test accuracy, bytes) to Weights & Biases (WANDB_MODE=offline works)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if not (math.isfinite(args.accuracy_floor) and args.accuracy_floor >= 0):
        raise UserError(f"--accuracy-floor must be >= 0 accuracy points below the baseline (100 keeps every plan), "
                        f"got {args.accuracy_floor}")
    if args.wandb:
        from search.wandb_log import import_wandb

        import_wandb()  # a missing wandb is one line now, not after the export
    if args.onnx:
        require_onnx()  # a missing onnx package is one line now, not after the export
    check_folder(args.out, "--out")  # now, not after the test accuracies are computed
    check_folder(args.data_dir, "--data-dir", write=False)
    if args.store is not None:
        check_folder(args.store, "--store", write=False)
    storage = open_storage(args.storage, heartbeat=False, create=False)
    study = load_study(args.name or find_study_name(storage, args.study, args.preset), storage)
    summary = export(study, Path(args.out), data_dir=args.data_dir,
                     store_root=args.store or default_store(args.storage), materialize=args.materialize,
                     floor_points=args.accuracy_floor, onnx=args.onnx)
    print(f"{len(summary['plans'])} Pareto plans -> {args.out}/pareto.json, trials.csv, pareto.png")
    floor = summary["accuracy_floor"]
    if floor["left_out"]:
        print(f"  left out {len(floor['left_out'])} below the accuracy floor {floor['val_accuracy']:.4f} (baseline - "
              f"{floor['points']:g} points): trials {', '.join(map(str, floor['left_out']))}; --accuracy-floor 100 keeps them")
    acc, ratio = summary["metric_names"][:2]
    for p in summary["plans"]:
        print(f"  trial {p['trial']:>4}  {p['families']:<28} val {p['values'][acc]:.4f} "
              f"test {p['test_accuracy']:.4f} ratio {p['values'][ratio]:.2f}  {p['plan_file']}")
        if "refined_trial" in p:
            print(f"  {'refined':>10} {p['refined_epochs']:>3} epochs{'':<18} val {p['refined_values'][acc]:.4f} "
                  f"test {p['refined_test_accuracy']:.4f} ratio {p['refined_values'][ratio]:.2f}  {p['refined_plan_file']}")
    if args.wandb:
        from search.wandb_log import log_export

        log_export(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
