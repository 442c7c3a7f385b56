"""One measured (test accuracy, compression ratio) per technique on a preset.

Each technique's moderate setting is applied to the preset's cached baseline, fine-tuned with the
preset's budget, finalized and encoded: the same path as a search trial (objectives.pipeline).
The ratio is bytes of the baseline over bytes of the artifact, both from storage.codec.

    python benchmarks/techniques.py --preset mnist-lenet300 --dataset mnist-t10k --data-dir ../shared/data

``mnist-t10k`` looks in ``--data-dir``/mnist-t10k only (or name the folder: ``mnist-t10k:DIR``).

Then, side by side, the per-epoch cost of a plain fine-tune (the baseline, no technique) and of
one technique's fine-tune (``--timing-technique``, default sws, at its moderate setting): same
model, data, batch size and budget, the two runs alternating (``--timing-rounds`` of each, the
order swapped every round) so that a shared machine's load hits both alike. Each epoch is timed
in wall-clock and in CPU seconds of this process (training plus the validation pass); the report
gives the medians and their ratio. Torch runs on ``--threads`` threads (default 1: a fair CPU
measurement on a shared machine).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch
from torch import nn

from models.train import EpochRecord, TrainHook, evaluate_split, train
from objectives.pipeline import Workbench, finetune_config, finish, prepare
from spaces.plan import Plan, Step
from spaces.registry import get_technique, list_techniques


class EpochClock(TrainHook):
    """Wall-clock and process CPU seconds of each epoch (from its creation, then from one epoch's
    end to the next: training and validation)."""

    def __init__(self) -> None:
        self.marks = [(time.perf_counter(), time.process_time())]

    def on_epoch_end(self, model: nn.Module, record: EpochRecord) -> bool:
        """Record the clocks; never stops training."""
        self.marks.append((time.perf_counter(), time.process_time()))
        return False

    def epochs(self) -> list[tuple[float, float]]:
        """(wall, CPU) seconds of each epoch."""
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.marks, self.marks[1:], strict=False)]


@dataclass
class EpochTiming:
    """Per-epoch (wall, CPU) seconds of the plain and the technique's fine-tunes, by round."""

    technique: str
    setting: str
    rounds: list[dict[str, list[tuple[float, float]]]] = field(default_factory=list)

    def epochs(self, run: str) -> list[tuple[float, float]]:
        """Every timed epoch of ``run`` (``"plain"`` or the technique's name)."""
        return [e for r in self.rounds for e in r[run]]

    def median(self, run: str, clock: int) -> float:
        """Median seconds per epoch of ``run``; ``clock`` 0 = wall, 1 = CPU."""
        return statistics.median(e[clock] for e in self.epochs(run))

    def ratio(self, clock: int) -> float:
        """Median technique epoch / median plain epoch."""
        return self.median(self.technique, clock) / self.median("plain", clock)

    def round_ratios(self, clock: int) -> list[float]:
        """The same ratio within each round (its spread shows the machine's noise)."""
        return [statistics.median(e[clock] for e in r[self.technique]) / statistics.median(e[clock] for e in r["plain"])
                for r in self.rounds]


def epoch_timing(bench: Workbench, technique: str, rounds: int, seed: int) -> EpochTiming:
    """Fine-tune the baseline plainly and with ``technique``'s moderate setting, alternating,
    ``rounds`` times each, timing every epoch (see the module doc)."""
    config = get_technique(technique).moderate()
    plans = {"plain": Plan(()), technique: Plan((Step(technique, config),))}
    setting = ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k != "version")
    timing = EpochTiming(technique, setting)
    for r in range(rounds):
        order = list(plans) if r % 2 == 0 else list(plans)[::-1]
        samples: dict[str, list[tuple[float, float]]] = {}
        for name in order:
            prepared = prepare(bench, plans[name], seed)
            clock = EpochClock()
            train(prepared.model, bench.data, finetune_config(bench, plans[name], seed), device=bench.device,
                  hooks=[*prepared.applied.hooks, clock])
            samples[name] = clock.epochs()
        timing.rounds.append(samples)
        wall = {k: statistics.median(e[0] for e in v) for k, v in samples.items()}
        print(f"round {r + 1}/{rounds}: plain {wall['plain']:.3f} s/epoch, {technique} {wall[technique]:.3f} "
              f"s/epoch (wall), ratio {wall[technique] / wall['plain']:.2f}", flush=True)
    return timing


def timing_lines(timing: EpochTiming, bench: Workbench, command: str) -> list[str]:
    """The markdown section of :func:`epoch_timing`'s measurements, under ``command``."""
    t, cfg = timing.technique, bench.preset.finetune
    n = len(timing.epochs("plain"))
    lines = [
        f"## Per-epoch cost: plain fine-tune vs {t}, {bench.preset.name} on {bench.data.name}",
        "",
        command,
        f"{len(timing.rounds)} rounds, each a plain fine-tune of the baseline and a {t} fine-tune ({timing.setting}), "
        f"alternating (order swapped every round); each run {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"{cfg.optimizer} lr {cfg.lr}; torch threads: {torch.get_num_threads()}. Seconds per epoch = training + validation, "
        f"median over the {n} epochs of each run type; CPU = this process's CPU time.",
        "",
        "| fine-tune | wall s/epoch | CPU s/epoch |",
        "|---|---:|---:|",
        f"| plain | {timing.median('plain', 0):.3f} | {timing.median('plain', 1):.3f} |",
        f"| {t} | {timing.median(t, 0):.3f} | {timing.median(t, 1):.3f} |",
    ]
    spread = [f"{min(timing.round_ratios(c)):.2f}-{max(timing.round_ratios(c)):.2f}" for c in (0, 1)]
    lines.append(f"| **ratio {t} / plain** | **{timing.ratio(0):.2f}** (rounds: {spread[0]}) | "
                 f"**{timing.ratio(1):.2f}** (rounds: {spread[1]}) |")
    return lines


def main() -> None:
    """Run every technique's moderate setting and the per-epoch timing; write markdown."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist-lenet300")
    p.add_argument("--dataset", default="mnist-t10k")
    p.add_argument("--data-dir", default="data", help="where datasets live (mnist-t10k: DATA_DIR/mnist-t10k)")
    p.add_argument("--store", default="runs")
    p.add_argument("--out", default="benchmarks/techniques.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--timing-technique", default="sws", help="the technique timed against a plain fine-tune")
    p.add_argument("--timing-rounds", type=int, default=5, help="runs of each, alternating (0: no timing)")
    p.add_argument("--skip-table", action="store_true", help="only the per-epoch timing")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    bench = Workbench.load(
        args.preset, dataset=args.dataset, data_dir=args.data_dir, store=args.store, seed=args.seed,
        device=torch.device("cpu"),
    )
    base_test = evaluate_split(bench.baseline, bench.data, "test")
    rows = [("baseline (fp32)", "-", bench.record.val_accuracy, base_test, bench.baseline_bytes, 1.0, 0.0)]
    for name in [] if args.skip_table else list_techniques():
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
    timing = epoch_timing(bench, args.timing_technique, args.timing_rounds, args.seed) if args.timing_rounds > 0 else None
    command = (f"Command: `python benchmarks/techniques.py --preset {args.preset} --dataset {args.dataset} "
               f"--data-dir {args.data_dir} --threads {args.threads} --timing-rounds {args.timing_rounds}"
               f"{' --skip-table' if args.skip_table else ''}`, {datetime.now(UTC):%Y-%m-%d}, "
               f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}.")
    lines: list[str] = []
    if not args.skip_table:
        lines += [
            f"## Every technique at its moderate setting: {args.preset} on {bench.data.name}",
            "",
            command,
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
    if timing is not None:
        lines += [""] if lines else []
        lines += timing_lines(timing, bench, command)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"written to {args.out}")

if __name__ == "__main__":
    main()
