"""Named studies: the configuration a study is created with, stored on the study itself so that
every worker that joins it (from any machine) runs the same search."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import Any

import optuna

from models.baseline import code_version
from models.errors import UserError
from objectives.objective import OBJECTIVES, Constraints
from objectives.pipeline import Workbench
from spaces.plan import NONE, PER_LAYER_MAX, STAGES, StudySpace, get_study_space, space_changes
from storage.locks import study_lock

CONFIG_ATTR = "config"
SPACE_ATTR = "space"  # the concrete space the study was created with (StudySpace.record)


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a study's trials (recorded as the study's ``config`` attribute)."""

    space: str = "all"
    preset: str = "cifar10-resnet18"
    dataset: str | None = None
    seed: int = 0
    objectives: tuple[str, ...] = ("acc", "ratio")
    sampler: str = "tpe"
    early_stopping: bool = True
    max_bytes: int | None = None
    min_ratio: float | None = None
    max_accuracy_drop: float | None = None
    finetune_space: dict[str, list[float]] = field(default_factory=dict)
    per_layer_max: int = PER_LAYER_MAX

    def __post_init__(self) -> None:
        get_study_space(self.space)  # raises on an unknown name

    @property
    def constraints(self) -> Constraints:
        """The declared constraints."""
        return Constraints(self.max_bytes, self.min_ratio, self.max_accuracy_drop)

    @property
    def has_constraints(self) -> bool:
        """Whether any constraint is declared."""
        return any(v is not None for v in (self.max_bytes, self.min_ratio, self.max_accuracy_drop))

    def default_name(self) -> str:
        """``<space>-<preset>``, the Optuna study name unless one is given."""
        return f"{self.space}-{self.preset}" + (f"-{self.dataset}" if self.dataset else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = asdict(self)
        d["objectives"] = list(self.objectives)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["objectives"] = tuple(d.get("objectives", ("acc", "ratio")))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def directions(objectives: tuple[str, ...]) -> list[str]:
    """Optuna directions of the objectives."""
    return [OBJECTIVES[o][1] for o in objectives]


def create_or_load(name: str, storage: optuna.storages.BaseStorage, config: StudyConfig, bench: Workbench,
                   sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create the study (recording config, baseline and metric names) or load it, refusing to
    resume a study that was created with a different configuration. Under the storage's lock:
    workers started together must not see a half-recorded study."""
    with study_lock(storage, f"create:{name}")():
        return _create_or_load(name, storage, config, bench, sampler)


def _create_or_load(name: str, storage: optuna.storages.BaseStorage, config: StudyConfig, bench: Workbench,
                    sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    study = optuna.create_study(
        study_name=name, storage=storage, directions=directions(config.objectives), sampler=sampler, load_if_exists=True
    )
    existing = study.user_attrs.get(CONFIG_ATTR)
    if existing is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVES[o][0] for o in config.objectives])
        study.set_user_attr(CONFIG_ATTR, config.to_dict())
        study.set_user_attr("preset", config.preset)
        study.set_user_attr("baseline", {
            "val_accuracy": bench.record.val_accuracy,
            "test_accuracy": bench.record.test_accuracy,
            "bytes": bench.baseline_bytes,
            "key": bench.record.key,
            "model": bench.record.model,
            "dataset": bench.record.dataset,
        })
        study.set_user_attr("code_version", code_version())
        study.set_user_attr(SPACE_ATTR, get_study_space(config.space, config.per_layer_max).record())
    elif not same_study(StudyConfig.from_dict(existing), config):
        old = StudyConfig.from_dict(existing).to_dict()
        diff = {k: (old[k], v) for k, v in config.to_dict().items() if old.get(k) != v}
        raise UserError(
            f"study {name!r} exists with another configuration {diff} (stored, given); "
            "resume it with the same options, or pass --name to start a new study"
        )
    return study


# finetune_space keys that the options give since a version of this code: a study recorded before
# lacks them and resumes as it was recorded (its stored configuration is what every worker runs).
NEWER_FINETUNE_KEYS = MappingProxyType({"adamw_lr": "the fine-tune's optimizer (SGD or AdamW)"})


def same_study(stored: StudyConfig, given: StudyConfig) -> bool:
    """Whether options that make ``given`` may resume the study recorded with ``stored``: equal,
    or equal but for :data:`NEWER_FINETUNE_KEYS` that the stored study predates."""
    kept = {k: v for k, v in given.finetune_space.items() if k in stored.finetune_space or k not in NEWER_FINETUNE_KEYS}
    return replace(given, finetune_space=kept) == stored


def newer_finetune_keys(stored: StudyConfig, given: StudyConfig) -> list[str]:
    """What the options search that a study recorded before them lacks (it resumes without them,
    :func:`same_study`), described as :data:`NEWER_FINETUNE_KEYS` does."""
    return [v for k, v in NEWER_FINETUNE_KEYS.items() if k in given.finetune_space and k not in stored.finetune_space]


def study_space(study: optuna.Study) -> StudySpace:
    """The space a study samples: the one recorded when it was created, so that a worker whose
    code registers more techniques keeps sampling it (new techniques go to new studies).

    A technique of the recorded space that this code lacks, or whose config version or
    parameters changed, is refused in one line that names the change. A study created before
    spaces were recorded gets one now, its stage choices read back from its trials.
    """
    record = study.user_attrs.get(SPACE_ATTR)
    if record is None:
        record = _legacy_space(study).record()
        study.set_user_attr(SPACE_ATTR, record)
    changes = space_changes(record)
    if changes:
        raise UserError(
            f"study {study.study_name!r} was created with other technique code ({'; '.join(changes)}); "
            f"resume it with the code version it was made with ({study.user_attrs.get('code_version', 'unknown')}), "
            "or start a new study with --name"
        )
    return StudySpace.from_record(record)


def new_techniques(study: optuna.Study, space: StudySpace) -> list[str]:
    """Techniques this code offers for the study's named space that its recorded space lacks."""
    now = get_study_space(stored_config(study).space).technique_names()
    return [n for n in now if n not in space.technique_names()]


def _legacy_space(study: optuna.Study) -> StudySpace:
    """Today's space of the study's name, with each stage's choices as its trials recorded them
    (Optuna refuses a categorical whose choices changed)."""
    space = get_study_space(stored_config(study).space)
    stages = dict(space.stages)
    for trial in study.get_trials(deepcopy=False):
        for stage in STAGES:
            dist = trial.distributions.get(f"stage.{stage}")
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                stages[stage] = tuple(str(c) for c in dist.choices)
    return StudySpace(space.name, {s: o for s, o in stages.items() if o != (NONE,)}, space.description)


def stored_config(study: optuna.Study) -> StudyConfig:
    """The configuration a study was created with."""
    d = study.user_attrs.get(CONFIG_ATTR)
    if d is None:
        raise UserError(f"study {study.study_name!r} was not created by pareto-compress (no config attribute)")
    return StudyConfig.from_dict(d)


def find_study_name(storage: optuna.storages.BaseStorage, space: str, preset: str | None) -> str:
    """The study of ``space`` (and ``preset``) in ``storage``; ambiguous or missing is an error."""
    summaries = optuna.get_all_study_summaries(storage)
    matches = [
        s.study_name for s in summaries
        if (c := s.user_attrs.get(CONFIG_ATTR)) and c.get("space") == space and (preset is None or c.get("preset") == preset)
    ]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(s.study_name for s in summaries) or "none"
    if not matches:
        raise UserError(f"no study of space {space!r} in this storage (studies: {names}); start one with python -m search.run")
    raise UserError(f"several studies of space {space!r}: {', '.join(matches)}; pick one with --name or --preset")
