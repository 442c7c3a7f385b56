"""One measured (test accuracy, compression ratio) per technique on a preset.

Each technique's moderate setting is applied to the preset's cached baseline, fine-tuned with the
preset's budget, finalized and encoded: the same path as a search trial (objectives.pipeline).
The ratio is bytes of the baseline over bytes of the artifact, both from storage.codec.

    python benchmarks/techniques.py --preset mnist-lenet300 --dataset mnist-t10k --data-dir ../shared/data

``mnist-t10k`` looks in ``--data-dir``/mnist-t10k only (or name the folder: ``mnist-t10k:DIR``).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import UTC, datetime

import torch

from models.train import evaluate_split
from objectives.pipeline import Workbench, finish, prepare
from spaces.plan import Plan, Step
from spaces.registry import get_technique, list_techniques


def main() -> None:
    """Run every technique's moderate setting and write a markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist-lenet300")
    p.add_argument("--dataset", default="mnist-t10k")
    p.add_argument("--data-dir", default="data", help="where datasets live (mnist-t10k: DATA_DIR/mnist-t10k)")
    p.add_argument("--store", default="runs")
    p.add_argument("--out", default="benchmarks/techniques.md")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    bench = Workbench.load(
        args.preset, dataset=args.dataset, data_dir=args.data_dir, store=args.store, seed=args.seed,
        device=torch.device("cpu"),
    )
    base_test = evaluate_split(bench.baseline, bench.data, "test")
    rows = [("baseline (fp32)", "-", bench.record.val_accuracy, base_test, bench.baseline_bytes, 1.0, 0.0)]
    for name in list_techniques():
        technique = get_technique(name)
        config = technique.moderate()
        plan = Plan((Step(name, config),))
        start = time.perf_counter()
        outcome = finish(bench, prepare(bench, plan, args.seed))
        test = evaluate_split(outcome.model, bench.data, "test")
        setting = ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k != "version")
        rows.append((f"{name} ({plan.families})", setting, outcome.val_accuracy, test, outcome.bytes, outcome.ratio,
                     time.perf_counter() - start))
        print(f"{name:<10} test {test:.4f} ratio {outcome.ratio:6.2f}", flush=True)
    lines = [
        f"## Every technique at its moderate setting: {args.preset} on {bench.data.name}",
        "",
        f"Command: `python benchmarks/techniques.py --preset {args.preset} --dataset {args.dataset} "
        f"--data-dir {args.data_dir}`, "
        f"{datetime.now(UTC):%Y-%m-%d}, {platform.processor() or platform.machine()} CPU, torch {torch.__version__}.",
        f"Data: {bench.data.summary()}. Baseline: {bench.preset.baseline.epochs} epochs; each technique: "
        f"apply, {bench.preset.finetune.epochs}-epoch fine-tune, finalize, encode (the search trial's path). "
        "Ratio = baseline bytes / artifact bytes, both measured by storage.codec.",
        "",
        "| technique | setting | val acc | test acc | Δ test (pts) | bytes | ratio | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, setting, val, test, nbytes, ratio, secs in rows:
        lines.append(f"| {label} | {setting} | {val:.4f} | {test:.4f} | {100 * (test - base_test):+.2f} | "
                     f"{nbytes:,} | {ratio:.2f} | {secs:.1f} |")
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
