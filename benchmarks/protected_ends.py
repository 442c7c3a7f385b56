"""What protecting the first and last layers costs a published recipe, side by side.

The search's default layer policy keeps the first and last conv/linear layer at 8 bits or more,
unpruned (``spaces/policy.py``); the published recipes compress every layer. This applies each
recipe of ``benchmarks/paper_anchors.py`` twice to the same cached baseline, split and epochs:
as published (every layer) and under the default policy, with ``python -m search.apply``, and
reports the measured bytes, ratio and test accuracy of both. The difference is what a plan that
cannot open the ends (``plan.protect_ends``, ``spaces/plan.py``) leaves on the table.

Usage::

    python benchmarks/protected_ends.py --model lenet5 --seed 0 --t10k ../shared/data/mnist-t10k \\
        --recipes sws --out benchmarks/protected_ends.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import paper_anchors as pa  # noqa: E402  (the recipes, as the paper-anchors benchmark runs them)

from models.datasets import val_size  # noqa: E402
from models.errors import UserError  # noqa: E402
from models.presets import get_preset  # noqa: E402
from objectives.record import TrialRecord, write_plan_file  # noqa: E402
from spaces.policy import LayerPolicy  # noqa: E402


def apply(plan_file: Path, epochs: int, store: str, data_dir: str) -> tuple[dict[str, object], list[str]]:
    """``search.apply`` of ``plan_file``: its JSON result and the command."""
    cmd = [sys.executable, "-m", "search.apply", str(plan_file), "--epochs", str(epochs),
           "--out", str(plan_file.with_suffix(".pcz")), "--store", store, "--data-dir", data_dir]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout[out.stdout.index("{"):]), cmd


def emit_report(lines: list[str], out: str | None, results: dict[str, object]) -> None:
    """Print the Markdown ``lines``; with ``out``, write them there and ``results`` as JSON beside."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
        Path(out).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python benchmarks/protected_ends.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet5", choices=sorted(pa.PRESETS))
    p.add_argument("--seed", type=int, default=0, help="split seed of mnist-t10k (default: 0)")
    p.add_argument("--t10k", required=True, help="folder of the MNIST test set (see ../shared/data/README)")
    p.add_argument("--recipes", default="sws,deep_compression")
    p.add_argument("--epochs", type=int, default=33, help="fine-tune epochs of each recipe (default: 33)")
    p.add_argument("--store", default="runs/protected-ends/store")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default=None, help="write the Markdown here (and the JSON beside it)")
    args = p.parse_args(argv)
    dataset = f"mnist-t10k:{Path(args.t10k).resolve()}"
    preset = pa.PRESETS[args.model]
    folder = REPO / Path(args.store).parent / "plans"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]
    n_train = 8000 - val_size(8000, get_preset(preset).val_fraction)  # train images of the 8,000 (tau is per image)
    plans = pa.recipe_plans(args.model, args.epochs, n_train)
    rows, results = [], {}
    for key in args.recipes.split(","):
        if key not in plans:
            raise UserError(f"--recipes: unknown recipe {key!r}; known: {', '.join(plans)}")
        for label, policy in (("every layer (as published)", pa.ALL_LAYERS), ("ends protected (default)", LayerPolicy())):
            plan = dataclasses.replace(plans[key], policy=policy)
            rec = TrialRecord(plan=plan.to_dict(), families=plan.families, preset=preset, dataset=dataset,
                              seed=args.seed, baseline_seed=args.seed)
            tag = "open" if policy == pa.ALL_LAYERS else "protected"
            plan_file = write_plan_file(folder / f"{args.model}-s{args.seed}-{key}-{tag}.json", rec)
            result, cmd = apply(plan_file, args.epochs, args.store, args.data_dir)
            results[f"{key}/{tag}"] = {"result": result, "command": " ".join(cmd[1:])}
            rows.append(f"| {pa.RECIPES[key]} | {label} | {result['bytes']:,} | {result['compression_ratio']:.1f}x | "
                        f"{100 * float(result['test_accuracy']):.2f} % |")
    lines = [
        *report_head("Protected ends against a published recipe (`benchmarks/protected_ends.py`)", "protected_ends.py", argv,
                     f"{started}; 1-minute load average at start {load:.1f}; {pa.LABELS[args.model]} on mnist-t10k split "
                     f"seed {args.seed}, one cached baseline, {args.epochs} fine-tune epochs each; each row one `search.apply`"),
        "| recipe | layers | bytes | ratio | test accuracy |",
        "|---|---|---:|---:|---:|",
        *rows,
    ]
    emit_report(lines, args.out, results)
    return 0


def run_cli(entry: Callable[[], int]) -> None:
    """Run a benchmark's ``entry``: its exit code, or one line for a user's error."""
    try:
        raise SystemExit(entry())
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None


def report_head(title: str, script: str, argv: list[str] | None, detail: str) -> list[str]:
    """A report's title, its command line and one line of circumstances."""
    return ["# " + title, "", f"- command: `python benchmarks/{script} {' '.join(argv if argv is not None else sys.argv[1:])}`",
            f"- {detail}", ""]


if __name__ == "__main__":
    run_cli(main)
