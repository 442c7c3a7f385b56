"""The trial record: what one trial is, in one typed schema, and the plan file that holds it.

A trial's user attributes hold the record's fields, one attribute per field (so optuna-dashboard
lists them one by one), written by :func:`write` as they become known: the plan first, before
anything can fail, so that a failed trial still shows what it ran. :meth:`TrialRecord.from_trial`
reads them back from a ``FrozenTrial``, with the trial's number, state and values. The **plan
file** (the trial's plan artifact, what ``search.export`` writes and what ``search.apply`` reads)
is the record's JSON (:func:`write_plan_file`, :func:`read_plan_file`); a bare plan
(``{"steps": ...}``) is read as a record that holds only its plan.

Every attribute key is defined here and nowhere else: other modules read attributes through the
constants below (``record.CURVE``, ...).

The record carries a reproducibility :class:`Manifest`: the versions of Python, torch, optuna,
numpy and pareto-compress, a hash of the project's code (every module of its packages; the
package version alone does not change when the code does) and a hash of the dataset's contents
(the tensors of its splits, computed once per worker).
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from models.datasets import Splits
from models.errors import UserError
from spaces.plan import Plan
from spaces.validate import describe_error, validate_plan
from storage.attrs import set_trial_attrs

# ------------------------------------------------------------------ trial user-attribute keys

PLAN = "plan"
FAMILIES = "families"
PRESET = "preset"
DATASET = "dataset"
SEED = "seed"
BASELINE_SEED = "baseline_seed"
BASELINE_KEY = "baseline_key"
BASELINE_BYTES = "baseline_bytes"
PREDICTED_BYTES = "predicted_bytes"
BYTES = "bytes"
BREAKDOWN = "breakdown"
CURVE = "curve"
EPOCHS = "epochs"
STOPPED_AT_EPOCH = "stopped_at_epoch"
STOPPED_VALUES = "stopped_values"
CONSTRAINTS = "constraints"
INFEASIBLE = "infeasible"
WALL_SECONDS = "wall_seconds"
DEVICE = "device"
MANIFEST = "manifest"
ARTIFACT_ID = "artifact_id"
PLAN_ARTIFACT_ID = "plan_artifact_id"
# Refinement trials (search/refine.py): set when the trial is enqueued, before it runs.
REFINE_OF = "refine_of"
FIDELITY_EPOCHS = "fidelity_epochs"
REFINE_ROUND = "refine_round"
# Who ran the trial and how it ended when it failed (search/trials.py).
WORKER = "worker"
SAMPLER_SEED = "sampler_seed"
FAIL_REASON = "fail_reason"
RETRY_OF = "retry_of"
RETRIES = "retries"

# The plan, the manifest and the per-unit breakdown are long JSON objects: as user attributes
# optuna-dashboard shows each
# as one unbreakable line, which made the trial page four times wider than the window (the trial's
# note shows the plan as tables instead). They are stored as system attributes "record:<key>";
# readers take them from there or, for studies recorded before, from the user attributes.
SYSTEM_KEYS = frozenset({"plan", "manifest", "breakdown"})
SYSTEM_PREFIX = "record:"

ATTR_KEYS = (
    PLAN, FAMILIES, PRESET, DATASET, SEED, BASELINE_SEED, BASELINE_KEY, BASELINE_BYTES,
    PREDICTED_BYTES, BYTES, BREAKDOWN, CURVE, EPOCHS, STOPPED_AT_EPOCH, STOPPED_VALUES,
    CONSTRAINTS, INFEASIBLE, WALL_SECONDS, DEVICE, MANIFEST, ARTIFACT_ID, PLAN_ARTIFACT_ID,
    REFINE_OF, FIDELITY_EPOCHS, REFINE_ROUND, WORKER, SAMPLER_SEED, FAIL_REASON, RETRY_OF, RETRIES,
)
# Names of a trial's values by position when the study names none (acc, ratio[, bitops]).
METRIC_NAMES = ("val_accuracy", "compression_ratio", "bitops")


# ------------------------------------------------------------------------------ the schema


class Manifest(BaseModel):
    """What a trial's numbers depend on besides its plan: library versions, code and data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    versions: dict[str, str]
    code_hash: str
    dataset_hash: str | None = None


class TrialRecord(BaseModel):
    """One trial: its plan, what rebuilds its model, and what it measured.

    Fields stored as trial user attributes are named by :data:`ATTR_KEYS`; ``trial``, ``state``
    and ``values`` come from the trial itself, ``test_accuracy`` from export only.

    Attributes:
        trial: The trial's number.
        state: Its Optuna state (``COMPLETE``, ``PRUNED``, ...).
        plan: The plan's JSON (:meth:`spaces.plan.Plan.to_dict`).
        families: Technique families, e.g. ``prune+kmeans``.
        preset, dataset: What the baseline was trained on (the dataset's canonical name).
        seed: The trial's seed (the plan's apply and fine-tune); ``baseline_seed`` the
            baseline's and the validation split's.
        baseline_key, baseline_bytes: The cached baseline and its encoded size.
        predicted_bytes: The artifact size predicted before fine-tuning.
        bytes, breakdown: The artifact's measured size and its per-layer breakdown.
        curve: Validation accuracy after each fine-tune epoch.
        epochs: Fine-tune epochs run.
        stopped_at_epoch: Set when early stopping ended the trial (recorded PRUNED) after that
            epoch; ``stopped_values`` then holds its (accuracy, ratio) at that point.
        values: The trial's objective values by metric name (COMPLETE trials).
        test_accuracy: Test accuracy of the artifact (written by export only).
        constraints: Constraint values (<= 0 is feasible); ``infeasible`` says why not.
        wall_seconds, device: Time the trial took, and where.
        manifest: Library versions, code and dataset hashes.
        artifact_id, plan_artifact_id: The trial's artifacts in the study's artifact store.
        refine_of: Set on a refinement trial (``search.refine``): the number of the search
            trial whose plan it re-trains, with its seed; ``fidelity_epochs`` the fine-tune
            epochs it trains (also the plan's ``finetune.epochs``), ``refine_round`` the
            successive-halving round (0 first) that enqueued it.
        worker, sampler_seed: ``host:pid`` of the worker that ran the trial and its sampler's
            seed (each worker process draws its own unless ``--sampler-seed`` fixes it).
        fail_reason: Why a FAIL trial failed (its exception, or "interrupted by SIGTERM").
        retry_of, retries: Set on a re-queued plan: the failed trial it redoes, and how many
            attempts came before it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    trial: int | None = None
    state: str | None = None
    plan: dict[str, Any] | None = None
    families: str | None = None
    preset: str | None = None
    dataset: str | None = None
    seed: int = 0
    baseline_seed: int = 0
    baseline_key: str | None = None
    baseline_bytes: int | None = None
    predicted_bytes: int | None = None
    bytes: int | None = None
    breakdown: dict[str, int] = Field(default_factory=dict)
    curve: list[float] = Field(default_factory=list)
    epochs: int | None = None
    stopped_at_epoch: int | None = None
    stopped_values: dict[str, float] | None = None
    values: dict[str, float] = Field(default_factory=dict)
    test_accuracy: float | None = None
    constraints: list[float] | None = None
    infeasible: str | None = None
    wall_seconds: float | None = None
    device: str | None = None
    manifest: Manifest | None = None
    artifact_id: str | None = None
    plan_artifact_id: str | None = None
    refine_of: int | None = None
    fidelity_epochs: int | None = None
    refine_round: int | None = None
    worker: str | None = None
    sampler_seed: int | None = None
    fail_reason: str | None = None
    retry_of: int | None = None
    retries: int | None = None

    @classmethod
    def parse(cls, d: Mapping[str, Any], where: str = "") -> TrialRecord:
        """Validate a record's JSON form (strict JSON types); a bad field is one line naming
        ``where`` (if given) and the field's JSON path."""
        prefix = f"{where}: " if where else ""
        try:
            return cls.model_validate_json(json.dumps(dict(d)), strict=True)
        except ValidationError as exc:
            error = exc.errors()[0]
            known = f"; known: {', '.join(cls.model_fields)}" if error["type"] == "extra_forbidden" and len(error["loc"]) == 1 else ""
            raise UserError(prefix + describe_error(error) + known) from None
        except (TypeError, ValueError) as exc:  # json.dumps: not JSON values
            raise UserError(f"{prefix}not JSON ({exc})") from None

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], *, where: str = "trial", **known: Any) -> TrialRecord:
        """The record of a trial's user attributes (other attributes are ignored) and the
        fields in ``known`` (e.g. ``trial=3, values={...}``)."""
        return cls.parse({**{k: attrs[k] for k in ATTR_KEYS if k in attrs}, **known}, where)

    @classmethod
    def from_trial(cls, trial: optuna.trial.FrozenTrial, metric_names: Sequence[str] | None = None,
                   defaults: Mapping[str, Any] | None = None) -> TrialRecord:
        """The record of a finished (or running) trial. ``defaults`` fill fields its attributes
        lack (studies recorded before a field existed: the study's preset, for instance)."""
        names = list(metric_names or METRIC_NAMES)
        values = dict(zip(names, trial.values, strict=False)) if trial.values is not None else {}
        attrs = {**{k: v for k, v in (defaults or {}).items() if v is not None}, **attrs_of(trial)}
        return cls.from_attrs(attrs, where=f"trial {trial.number}", trial=trial.number,
                              state=trial.state.name, values=values)

    def to_plan(self) -> Plan:
        """The plan (refused in one line when the record holds none or a malformed one)."""
        if self.plan is None:
            raise UserError(f"trial {self.trial} records no plan")
        return Plan.from_dict(self.plan)

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON form (unset fields left out): the plan file's content."""
        return self.model_dump(mode="json", exclude_none=True)


# --------------------------------------------------------------------------- trial attributes


@functools.cache
def _adapter(key: str) -> TypeAdapter[Any]:
    annotation = TrialRecord.model_fields[key].annotation
    if annotation is None:  # pydantic leaves it None only for a field declared without a type
        raise TypeError(f"TrialRecord field {key!r} has no type annotation to check values against")
    return TypeAdapter(annotation)


def write(trial: optuna.Trial, **fields: Any) -> None:
    """Set record fields on a running trial (one attribute each: user attributes, but the plan
    and the manifest as system attributes, see :data:`SYSTEM_KEYS`; all in one transaction on an
    SQL storage, :func:`storage.attrs.set_trial_attrs`), checked against the schema:
    an unknown field or a value of the wrong type is a programming error (TypeError)."""
    user: dict[str, Any] = {}
    system: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in ATTR_KEYS:
            raise TypeError(f"{key!r} is not a trial attribute of the record; known: {', '.join(ATTR_KEYS)}")
        adapter = _adapter(key)
        try:
            stored = adapter.dump_python(adapter.validate_python(value), mode="json")
        except ValidationError as exc:
            raise TypeError(f"record field {describe_error(exc.errors()[0], key)}") from None
        if key in SYSTEM_KEYS:
            system[SYSTEM_PREFIX + key] = stored
        else:
            user[key] = stored
    # One transaction for all of them: a trial's first write is about ten attributes.
    set_trial_attrs(trial.storage, trial._trial_id, user=user, system=system)
    cached = getattr(trial, "_cached_frozen_trial", None)  # what Trial.user_attrs reads, as set_user_attr keeps it
    if cached is not None:
        cached.user_attrs.update(user)


def attrs_of(trial: optuna.Trial | optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial's record attributes by key: its user attributes and the record's system ones
    (:data:`SYSTEM_KEYS`), for a running ``Trial`` (read from its storage) or a ``FrozenTrial``."""
    frozen = trial if isinstance(trial, optuna.trial.FrozenTrial) else trial.storage.get_trial(trial._trial_id)
    system = {k[len(SYSTEM_PREFIX):]: v for k, v in frozen.system_attrs.items() if k.startswith(SYSTEM_PREFIX)}
    return {**frozen.user_attrs, **system}


# ---------------------------------------------------------------------------------- manifest


def library_versions() -> dict[str, str]:
    """Versions of Python, torch, optuna, numpy and pareto-compress here."""
    import numpy
    import torch

    from models.baseline import code_version

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "numpy": numpy.__version__,
        "pareto-compress": code_version(),
    }


PACKAGES = ("models", "spaces", "storage", "objectives", "search")


@functools.cache
def code_hash() -> str:
    """SHA-256 over the path and content of every module of the project's packages (computed
    once per process: a worker runs the code it imported)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def dataset_hash(data: Splits) -> str:
    """SHA-256 over the shape, dtype and bytes of every tensor of ``data``'s splits (a worker's
    objective computes it once, with the rest of its shared record fields)."""
    h = hashlib.sha256()
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        t = getattr(data, name).detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\0".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def manifest(data: Splits | None = None) -> Manifest:
    """The manifest of this process (and of ``data``, when given)."""
    return Manifest(versions=library_versions(), code_hash=code_hash(),
                    dataset_hash=dataset_hash(data) if data is not None else None)


# -------------------------------------------------------------------------------- plan files

# Plan files written before the record existed held the values at the top level.
_LEGACY_VALUE_KEYS = ("val_accuracy", "compression_ratio", "bitops")


def write_plan_file(path: str | Path, rec: TrialRecord) -> Path:
    """Write ``rec`` as a plan file (pretty, sorted JSON); return the path."""
    p = Path(path)
    p.write_text(json.dumps(rec.to_json_dict(), indent=2, sort_keys=True) + "\n")
    return p


def read_plan_file(path: str | Path) -> tuple[Plan, TrialRecord]:
    """Read a plan file: a record as export writes it, or a bare plan (``{"steps": ...}``,
    returned as a record holding only the plan). Every problem is one line naming the file and
    the JSON path of the bad value, before anything is loaded."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"plan file {p} is a folder; pass a plan-trial-<n>.json file from python -m search.export")
    if not p.is_file():
        raise UserError(f"plan file {p} does not exist")
    try:
        d = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"plan file {p} is not a JSON text file (not UTF-8: binary?)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"plan file {p} is not valid JSON: {exc}") from None
    try:
        if not isinstance(d, dict) or not ({"plan", "steps"} & set(d)):
            raise UserError('expected a plan record ({"plan": {...}, "preset": ...}) or a bare plan '
                            f'({{"steps": [...]}}), got {json.dumps(d)[:60]}')
        if "plan" in d:
            validate_plan(d["plan"], path="plan")
            if "values" not in d:
                legacy = {k: d.pop(k) for k in _LEGACY_VALUE_KEYS if k in d}
                if legacy:
                    d["values"] = legacy
            rec = TrialRecord.parse(d)
        else:
            validate_plan(d)
            rec = TrialRecord(plan=d)
        return rec.to_plan(), rec
    except UserError as exc:
        raise UserError(f"plan file {p}: {exc}") from None
