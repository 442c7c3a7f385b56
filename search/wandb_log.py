"""Weights & Biases logging of trials (``--wandb``; honours ``WANDB_MODE=offline``)."""

from __future__ import annotations

import json
from typing import Any

import optuna

from models.errors import UserError
from objectives import record
from objectives.record import TrialRecord


class WandbLogger:
    """An Optuna callback that logs each finished trial's record (values, plan, families, size,
    epochs; a stopped trial's values at its last epoch as ``stopped_<metric>``) to one W&B run."""

    def __init__(self, study_name: str, config: dict[str, Any], project: str = "pareto-compress") -> None:
        try:
            import wandb
        except ImportError as exc:
            raise UserError(f"--wandb needs wandb: {exc}; pip install 'pareto-compress[wandb]'") from None
        self.run = wandb.init(project=project, group=study_name, name=f"{study_name}-worker", config=config)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Log one trial."""
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
        self.run.log({k: v for k, v in row.items() if v is not None})

    def close(self) -> None:
        """Finish the run."""
        self.run.finish()
