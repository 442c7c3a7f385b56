"""Which of the soft weight-sharing recipe's settings the search cannot reach, and what each costs.

Our configuration of the published soft weight-sharing recipe (``benchmarks/paper_anchors.py``
``sws_plan``: 17 components, pi_zero 0.999, the paper's tau, no warm-up, Adam at 5e-4 constant,
33 epochs) differs from every plan the search's ``sws`` step can sample in four settings: the
search's pi_zero stops at 0.99, its tau rises over a 25 % warm-up, its fine-tune is the preset's
(SGD, cosine schedule, learning rate searched) and lasts at most 2x the preset's epochs, 5x after
refinement. This applies the recipe once as configured and once per setting moved to where the
search can reach, each on the same cached baseline and split with ``python -m search.apply``, and
reports the measured bytes, ratio and test accuracy of each: the setting whose change costs the
most ratio at the same accuracy is what the search's space or schedule lacks.

Usage::

    python benchmarks/sws_ablation.py --model lenet300 --seed 0 --t10k ../shared/data/mnist-t10k \\
        --out benchmarks/sws_ablation.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:  # last: benchmarks/storage.py must not hide the storage package
    sys.path.append(str(REPO / "benchmarks"))

import paper_anchors as pa  # noqa: E402  (the recipe, as the paper-anchors benchmark runs it)
from protected_ends import apply, emit_report, report_head, run_cli  # noqa: E402  (one search.apply; the report's output)

from models.datasets import val_size  # noqa: E402
from models.errors import UserError  # noqa: E402
from models.presets import get_preset  # noqa: E402
from objectives.record import TrialRecord, write_plan_file  # noqa: E402
from spaces.plan import Plan  # noqa: E402


def _sws(plan: Plan, **changes: object) -> Plan:
    step = plan.steps[0]
    return dataclasses.replace(plan, steps=(dataclasses.replace(step, config=dataclasses.replace(step.config, **changes)),))


def _finetune(plan: Plan, finetune: dict[str, object]) -> Plan:
    return dataclasses.replace(plan, finetune=finetune)


def variants(recipe: Plan, preset_epochs: int) -> dict[str, tuple[str, Callable[[Plan], Plan]]]:
    """Each variant's label and how it changes the recipe: one setting each, then all four."""
    search_ft = {"epochs": 5 * preset_epochs}  # the preset's optimizer and schedule: what a refined plan gets

    def everything(p: Plan) -> Plan:
        return _finetune(_sws(p, pi_zero=0.99, warmup=0.25), search_ft)

    return {
        "recipe": ("the recipe as configured", lambda p: p),
        "pi_zero": ("pi_zero 0.99 (the search's highest)", lambda p: _sws(p, pi_zero=0.99)),
        "warmup": ("tau warm-up over 25 % (the search's)", lambda p: _sws(p, warmup=0.25)),
        "optimizer": ("the preset's fine-tune (SGD, cosine), same epochs",
                      lambda p: _finetune(p, {"epochs": p.finetune["epochs"]})),
        "epochs": (f"{5 * preset_epochs} epochs (a refined plan's)",
                   lambda p: _finetune(p, {**p.finetune, "epochs": 5 * preset_epochs})),
        "all": ("all four: what the search can sample and refine", everything),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python benchmarks/sws_ablation.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet300", choices=sorted(pa.PRESETS))
    p.add_argument("--seed", type=int, default=0, help="split seed of mnist-t10k (default: 0)")
    p.add_argument("--t10k", required=True, help="folder of the MNIST test set (see ../shared/data/README)")
    p.add_argument("--epochs", type=int, default=33, help="the recipe's fine-tune epochs (default: 33)")
    p.add_argument("--only", default=None, help="comma-separated variants to run (default: all)")
    p.add_argument("--store", default="runs/sws-ablation/store")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default=None, help="write the Markdown here (and the JSON beside it)")
    args = p.parse_args(argv)
    dataset = f"mnist-t10k:{Path(args.t10k).resolve()}"
    preset = get_preset(pa.PRESETS[args.model])
    folder = REPO / Path(args.store).parent / "plans"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]
    n_train = 8000 - val_size(8000, preset.val_fraction)  # train images of the 8,000 (tau is per image)
    recipe = pa.sws_plan(args.model, args.epochs, n_train)
    table = variants(recipe, preset.finetune.epochs)
    chosen = args.only.split(",") if args.only else list(table)
    for key in chosen:
        if key not in table:
            raise UserError(f"--only: unknown variant {key!r}; known: {', '.join(table)}")
    rows, results = [], {}
    for key in chosen:
        label, change = table[key]
        plan = change(recipe)
        rec = TrialRecord(plan=plan.to_dict(), families=plan.families, preset=preset.name, dataset=dataset,
                          seed=args.seed, baseline_seed=args.seed)
        plan_file = write_plan_file(folder / f"{args.model}-s{args.seed}-sws-{key}.json", rec)
        t0 = time.monotonic()
        result, cmd = apply(plan_file, int(plan.finetune.get("epochs", preset.finetune.epochs)), args.store, args.data_dir)
        seconds = time.monotonic() - t0
        results[key] = {"label": label, "result": result, "seconds": round(seconds, 1), "command": " ".join(cmd[1:])}
        rows.append(f"| {label} | {result['bytes']:,} | {result['compression_ratio']:.1f}x | "
                    f"{100 * float(result['test_accuracy']):.2f} % | {seconds:.0f} s |")
        print(rows[-1], flush=True)  # each row as it is measured: a run cut short keeps its rows
    lines = [
        *report_head("Soft weight-sharing: the recipe against what the search can reach (`benchmarks/sws_ablation.py`)",
                     "sws_ablation.py", argv,
                     f"{started}; 1-minute load average at start {load:.1f}; {pa.LABELS[args.model]} on mnist-t10k split "
                     f"seed {args.seed} ({n_train:,} training images), one cached baseline; each row one `search.apply` "
                     "(its command in the JSON beside this file)"),
        "| variant | bytes | ratio | test accuracy | wall |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]
    emit_report(lines, args.out, results)
    return 0


if __name__ == "__main__":
    run_cli(main)
