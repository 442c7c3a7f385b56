"""Weights & Biases logging of trials (``--wandb``; honours ``WANDB_MODE=offline``)."""

from __future__ import annotations

import json
from typing import Any

import optuna

from models.errors import UserError


class WandbLogger:
    """An Optuna callback that logs each finished trial (values, plan, families) to one W&B run."""

    def __init__(self, study_name: str, config: dict[str, Any], project: str = "pareto-compress") -> None:
        try:
            import wandb
        except ImportError as exc:
            raise UserError(f"--wandb needs wandb: {exc}; pip install 'pareto-compress[wandb]'") from None
        self.run = wandb.init(project=project, group=study_name, name=f"{study_name}-worker", config=config)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Log one trial."""
        row: dict[str, Any] = {
            "trial": trial.number,
            "state": trial.state.name,
            "families": trial.user_attrs.get("families", ""),
            "plan": json.dumps(trial.user_attrs.get("plan", {}), sort_keys=True),
            "bytes": trial.user_attrs.get("bytes"),
        }
        if trial.values is not None:
            names = study.metric_names or [f"value_{i}" for i in range(len(trial.values))]
            row.update(dict(zip(names, trial.values, strict=False)))
        self.run.log(row)

    def close(self) -> None:
        """Finish the run."""
        self.run.finish()
