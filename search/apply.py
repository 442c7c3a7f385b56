"""``python -m search.apply PLAN.json --out model.pcz``: rebuild the compressed model of one plan
(optionally fine-tuning longer), write its artifact, print its accuracy and ratio.

With the study's budget (no ``--epochs``) the artifact is byte-identical to the trial's, so the
ratio equals the recorded one exactly. The plan file is a trial record
(:mod:`objectives.record`), or a bare plan (``{"steps": ...}``) with ``--preset``; it is checked
before any data or model is loaded. ``--onnx`` also writes the model as ONNX beside the artifact
(``model.pcz`` -> ``model.onnx``: uint8 images in, logits out; :mod:`storage.onnx_export`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from models.errors import UnknownNameError, UserError, check_folder, check_output_file, cli_main
from models.presets import get_preset
from models.registry import create_model
from models.train import evaluate_split, resolve_device
from objectives.pipeline import Outcome, Workbench, finetune_config, finish, prepare
from objectives.record import TrialRecord, read_plan_file
from spaces.plan import Plan, compressible_layers
from storage.codec import decode
from storage.onnx_export import require_onnx, to_onnx


def resolve_preset(record: TrialRecord, preset: str | None, source: str = "the plan file") -> str:
    """The preset to rebuild on: the record's, or ``preset`` when the record names none; a
    ``preset`` that contradicts the record is refused, naming both."""
    if preset is not None and record.preset is not None and preset != record.preset:
        raise UserError(f"{source} was made on preset {record.preset!r}, not --preset {preset!r}; "
                        f"drop --preset (or pass --preset {record.preset})")
    chosen = preset or record.preset
    if chosen is None:
        raise UserError(f"{source} names no preset (a bare plan); pass --preset")
    return chosen


def check_plan_fits(plan: Plan, preset: str, source: str = "the plan file") -> None:
    """Refuse, before any data loads, a plan that cannot be applied to ``preset``'s model: an
    unknown preset, or per-layer overrides naming a layer the model lacks (a plan of another
    model). Steps after a structure step see rewritten layers; ``apply_plan`` checks those."""
    try:
        p = get_preset(preset)
    except UnknownNameError as exc:
        exc.args = (f"{source}: preset: {exc}",)
        raise
    if not any(step.layers for step in plan.steps):
        return
    known = compressible_layers(create_model(p.model))  # an untrained model: no data, no baseline
    for i, step in enumerate(plan.steps):
        if step.stage == "structure":
            break
        for path in step.layers:
            if path not in known:
                raise UserError(
                    f"{source}: steps[{i}].layers.{path}: preset {preset!r} (model {p.model}) has no such layer, "
                    f"so the plan is not one of this preset; its layers: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}"
                )


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad options and paths in one line before the plan file is read or anything is
    loaded or created: where the artifact goes is checked now, not after the fine-tune."""
    if args.epochs is not None and args.epochs < 0:
        raise UserError(f"--epochs must be >= 0 (0: no fine-tune), got {args.epochs}")
    plan_path = Path(args.plan)
    if plan_path.is_dir():
        raise UserError(f"plan file {plan_path} is a folder; pass a plan-trial-<n>.json file from python -m search.export")
    out = check_output_file(args.out, "--out")
    if plan_path.exists() and out.exists() and out.samefile(plan_path):
        raise UserError(f"--out {out} is the plan file itself; pass another path (e.g. model.pcz)")
    if args.onnx:
        require_onnx()
        if out.suffix == ".onnx":
            raise UserError(f"--out {out} ends in .onnx, the file --onnx writes beside it; pass the artifact path (e.g. model.pcz)")
        check_output_file(out.with_suffix(".onnx"), "--onnx")
    check_folder(args.store, "--store")  # the baseline may be trained and cached there
    check_folder(args.data_dir, "--data-dir", write=False)


def rebuild(plan: Plan, record: TrialRecord, *, preset: str | None = None, data_dir: str = "data",
            store: str = "runs", device: torch.device | None = None, epochs: int | None = None,
            log: Callable[[str], None] | None = None) -> tuple[Workbench, Outcome]:
    """Apply ``plan`` to its preset's cached baseline and fine-tune it, as the trial did (same
    dataset, baseline seed and trial seed). ``log`` gets a line per step and per fine-tune epoch
    (epoch k/n, validation accuracy, seconds)."""
    bench = Workbench.load(resolve_preset(record, preset), dataset=record.dataset, data_dir=data_dir,
                           store=store, seed=record.baseline_seed, device=device, log=log)
    prepared = prepare(bench, plan, record.seed)
    if log is not None:
        n = finetune_config(bench, plan, record.seed, epochs).epochs
        log(f"{plan.families}: applied to the {bench.preset.name} baseline in {prepared.seconds:.1f}s "
            f"(predicted {prepared.predicted_bytes} B); fine-tuning {n} epoch{'s' if n != 1 else ''}")
    outcome = finish(bench, prepared, epochs=epochs, log=log)
    if log is not None:
        log(f"done in {outcome.seconds:.1f}s: val {outcome.val_accuracy:.4f}, {outcome.bytes} B, ratio {outcome.ratio:.2f}")
    return bench, outcome


def _progress(line: str) -> None:
    # stderr: stdout holds the JSON summary, which scripts parse.
    print(line, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m search.apply``."""
    p = argparse.ArgumentParser(prog="python -m search.apply", description=__doc__)
    p.add_argument("plan", help="a plan file from python -m search.export (or a bare plan JSON with --preset)")
    p.add_argument("--out", required=True, help="where to write the compressed artifact (.pcz)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tune this many epochs instead of the study's budget")
    p.add_argument("--preset", default=None, help="preset, when the plan file names none")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--store", default="runs", help="root of the baseline cache (default: runs)")
    p.add_argument("--device", default=None)
    p.add_argument("--onnx", action="store_true",
                   help="also write the model as ONNX beside the artifact (model.pcz -> model.onnx; uint8 images in)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    check_args(args)
    plan, record = read_plan_file(args.plan)
    source = f"plan file {args.plan}"
    check_plan_fits(plan, resolve_preset(record, args.preset, source), source)  # before any data loads
    for field in ("seed", "baseline_seed"):  # numpy refuses negative seeds, deep inside the rebuild
        if (getattr(record, field) or 0) < 0:
            raise UserError(f"{source}: {field}: must be >= 0, got {getattr(record, field)}")
    device = resolve_device(args.device)  # a bad --device is one line, before any training
    bench, outcome = rebuild(plan, record, preset=args.preset, data_dir=args.data_dir, store=args.store,
                             device=device, epochs=args.epochs, log=_progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(outcome.artifact)
    test = evaluate_split(outcome.model, bench.data, "test", bench.device)
    summary = {
        "families": plan.families,
        "val_accuracy": outcome.val_accuracy,
        "test_accuracy": test,
        "bytes": outcome.bytes,
        "compression_ratio": outcome.ratio,
        "artifact": str(out),
    }
    if record.bytes is not None:
        summary["recorded_bytes"] = record.bytes
        summary["recorded_compression_ratio"] = record.values.get("compression_ratio")
    if args.onnx:  # from the artifact, as a user would load it; each layer's storage in the file
        summary["onnx"] = str(out.with_suffix(".onnx"))
        summary["onnx_layers"] = to_onnx(decode(outcome.artifact), None, out.with_suffix(".onnx"))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
