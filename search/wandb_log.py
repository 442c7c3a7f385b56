"""Weights & Biases logging (``--wandb``; honours ``WANDB_MODE=offline``).

``search.run --wandb``: one run per worker logs each finished trial (its record's values, plan,
families, bytes; its validation curve as a table ``curve`` of (epoch, val_accuracy), and at the
end every trial's curve in one table ``curves``); the run's config holds the study's
configuration and its baseline (val and test accuracy, bytes). ``search.export --wandb``: one run
``<study>-export`` logs the exported front (values, test accuracy, bytes, plan file) as a table
``front``, with its size, hypervolume and best test accuracy in the summary.
"""

from __future__ import annotations

import atexit
import json
from typing import Any

import optuna

from models.errors import UserError
from objectives import record
from objectives.record import TrialRecord


def import_wandb() -> Any:
    """The ``wandb`` module; its absence is one line naming the fix."""
    try:
        import wandb
    except ImportError as exc:
        raise UserError(f"--wandb needs wandb: {exc}; pip install 'pareto-compress[wandb]'") from None
    return wandb


CURVE_COLUMNS = ("epoch", "val_accuracy")
CURVES_COLUMNS = ("trial", "state", "epoch", "val_accuracy")


class WandbLogger:
    """An Optuna callback that logs each finished trial's record (values, plan, families, size,
    epochs; a stopped trial's values at its last epoch as ``stopped_<metric>``; the validation
    curve as a table) to one W&B run, whose config also gets the study's baseline."""

    def __init__(self, study_name: str, config: dict[str, Any], project: str = "pareto-compress",
                 baseline: dict[str, Any] | None = None) -> None:
        self.wandb = import_wandb()
        self.run = self.wandb.init(project=project, group=study_name, name=f"{study_name}-worker", config=config)
        self.has_baseline, self.closed = False, False
        self.curves: list[list[Any]] = []  # (trial, state, epoch, val_accuracy) of every logged trial
        if baseline:
            self._set_baseline(baseline)
        # A caller that never closes the logger still gets the curves table: at exit, before
        # wandb's own exit hook (registered earlier by init, so run later) finishes the run.
        atexit.register(self.close)

    def _set_baseline(self, baseline: dict[str, Any]) -> None:
        self.run.config.update({"baseline": baseline}, allow_val_change=True)
        self.has_baseline = True

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Log one trial (and, on the first, the study's baseline into the run's config)."""
        if not self.has_baseline and study.user_attrs.get("baseline"):
            self._set_baseline(study.user_attrs["baseline"])
        r = TrialRecord.from_trial(trial, study.metric_names)
        row: dict[str, Any] = {
            "trial": r.trial,
            "state": r.state,
            record.FAMILIES: r.families or "",
            record.PLAN: json.dumps(r.plan or {}, sort_keys=True),
            record.BYTES: r.bytes,
            record.EPOCHS: r.epochs,
            record.STOPPED_AT_EPOCH: r.stopped_at_epoch,
            record.WALL_SECONDS: r.wall_seconds,
            **r.values,
            **{f"stopped_{k}": v for k, v in (r.stopped_values or {}).items()},
        }
        if r.curve:  # the validation accuracy after each fine-tune epoch (a stopped trial's until its stop)
            points = [[epoch, acc] for epoch, acc in enumerate(r.curve, start=1)]
            row[record.CURVE] = self.wandb.Table(columns=list(CURVE_COLUMNS), data=points)
            self.curves += [[r.trial, r.state, epoch, acc] for epoch, acc in points]
        self.run.log({k: v for k, v in row.items() if v is not None})

    def close(self) -> None:
        """Log every trial's curve in one table (a line per trial in W&B's plots) and finish
        (once: later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        if self.curves:
            self.run.log({"curves": self.wandb.Table(columns=list(CURVES_COLUMNS), data=self.curves)})
        self.run.finish()


def log_export(summary: dict[str, Any], project: str = "pareto-compress") -> Any:
    """Log an export's front (``search.export``'s pareto.json content) to a run of its own,
    ``<study>-export`` in the study's group; return the finished run."""
    wandb = import_wandb()
    study = summary["study"]
    config = {**summary.get("config", {}), "baseline": summary.get("baseline"),
              "accuracy_floor": summary.get("accuracy_floor")}
    run = wandb.init(project=project, group=study, name=f"{study}-export", job_type="export", config=config)
    acc, ratio = summary["metric_names"][:2]
    columns = ["trial", "families", acc, "test_accuracy", ratio, "bytes", "plan_file", "refined_trial",
               "refined_test_accuracy"]
    rows = [[p["trial"], p.get("families"), p["values"].get(acc), p.get("test_accuracy"), p["values"].get(ratio),
             p.get("bytes"), p.get("plan_file"), p.get("refined_trial"), p.get("refined_test_accuracy")]
            for p in summary["plans"]]
    tests = [p["test_accuracy"] for p in summary["plans"] if p.get("test_accuracy") is not None]
    row = {"front": wandb.Table(columns=columns, data=rows), "front_size": len(rows),
           "hypervolume": summary.get("hypervolume"), "best_test_accuracy": max(tests, default=None)}
    run.log({k: v for k, v in row.items() if v is not None})
    run.finish()
    return run
