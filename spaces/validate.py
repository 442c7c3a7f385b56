"""Validation of a plan's JSON form before it is parsed: every type error a hand-edited plan file
can hold is refused in one line that names its JSON path and the expected type, e.g.
``steps[1].config.bits: expected int, got "4"``.

Types come from the code, never from a second list: each technique's config dataclass (through
the registry), :class:`spaces.policy.LayerPolicy`, and the fine-tune overrides (the fields of
:class:`models.train.TrainConfig` but ``seed``). Their type hints are checked by pydantic in
strict JSON mode, which is what a JSON file needs: ``16.5`` or ``true`` is no int, ``"4"`` is no
number, an int is a valid float, an array is a valid tuple. Ranges are not checked here: each
config's ``validate()`` does that when it is built, naming the value; the fine-tune overrides,
which no config holds until the fine-tune starts, are checked here by building a ``TrainConfig``
(``finetune.epochs must be >= 0, got -1``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Mapping, Sequence
from typing import Any, NotRequired

from pydantic import ConfigDict, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from models.errors import UnknownNameError, UserError
from models.train import TrainConfig
from spaces.policy import LayerPolicy
from spaces.registry import get_technique

# Keys of a plan's JSON object and of one step (Plan.to_dict / Step.to_dict).
PLAN_KEYS = ("finetune", "policy", "steps", "version")
STEP_KEYS = ("config", "layers", "technique")

_EXPECTED = {
    "int_type": "int", "int_from_float": "int", "int_parsing": "int",
    "float_type": "float", "float_parsing": "float",
    "bool_type": "bool", "bool_parsing": "bool",
    "string_type": "str",
    "list_type": "a list", "tuple_type": "a list", "set_type": "a list",
    "dict_type": "an object", "typed_dict_type": "an object", "model_type": "an object",
    "dataclass_type": "an object",
    "none_required": "null",
    "finite_number": "a finite number",
}
_INT: TypeAdapter[int] = TypeAdapter(int)


def validate_plan(d: object, *, path: str = "") -> None:
    """Refuse a malformed plan (its JSON form, as :meth:`spaces.plan.Plan.to_dict` writes it).

    Args:
        d: The parsed JSON.
        path: JSON path of ``d`` inside a larger document (``"plan"`` in a plan file), prefixed
            to every message.

    Raises:
        UserError: one line ``<json path>: <what is wrong>`` for the first problem found; an
            unknown technique name keeps the registry's :class:`UnknownNameError` (listing the
            known ones), with the path prefixed.
    """
    if not isinstance(d, dict):
        raise UserError(f"{path or 'plan'}: expected an object with \"steps\", got {_show(d)}")
    _refuse_unknown(d, PLAN_KEYS, path)
    if "version" in d:
        _check(_INT, d["version"], _join(path, "version"))
    if "steps" not in d:
        raise UserError(f"{_join(path, 'steps')}: missing; a plan is {{\"steps\": [...], \"policy\": {{...}}, "
                        "\"finetune\": {...}}")
    steps = d["steps"]
    if not isinstance(steps, list | tuple):
        raise UserError(f"{_join(path, 'steps')}: expected a list, got {_show(steps)}")
    for i, step in enumerate(steps):
        _validate_step(step, f"{_join(path, 'steps')}[{i}]")
    if "policy" in d:
        _check_fields(d["policy"], LayerPolicy, _join(path, "policy"))
    if "finetune" in d:  # overrides of the preset's TrainConfig; the seed belongs to the trial
        where = _join(path, "finetune")
        _check_fields(d["finetune"], TrainConfig, where, exclude=("seed",))
        # Their ranges too: nothing else builds the TrainConfig before the fine-tune, which
        # comes after the data and the baseline are loaded. The defaults are all in range.
        try:
            TrainConfig(**d["finetune"])
        except UserError as exc:
            raise UserError(f"{where}.{exc}") from None


def _validate_step(step: object, where: str) -> None:
    if not isinstance(step, dict):
        raise UserError(f"{where}: expected an object {{\"technique\": ..., \"config\": {{...}}}}, got {_show(step)}")
    _refuse_unknown(step, STEP_KEYS, where)
    if "technique" not in step:
        raise UserError(f'{where}: missing "technique"')
    name = step["technique"]
    if not isinstance(name, str):
        raise UserError(f"{where}.technique: expected str, got {_show(name)}")
    try:
        technique = get_technique(name)
    except UnknownNameError as exc:
        exc.args = (f"{where}.technique: {exc}",)
        raise
    if "config" in step:
        config = step["config"]
        if isinstance(config, dict) and "version" in config:  # TechniqueConfig.to_dict adds it
            _check(_INT, config["version"], f"{where}.config.version")
            config = {k: v for k, v in config.items() if k != "version"}
        _check_fields(config, technique.config_cls, f"{where}.config", extra_known=("version",))
    if "layers" in step:  # per-layer overrides: layer path -> partial config
        layers = step["layers"]
        if not isinstance(layers, dict):
            raise UserError(f"{where}.layers: expected an object (layer path -> partial config), got {_show(layers)}")
        for layer, override in layers.items():
            _check_fields(override, technique.config_cls, _join(f"{where}.layers", layer))


def _check_fields(value: object, cls: type, where: str, *, exclude: Sequence[str] = (),
                  extra_known: Sequence[str] = ()) -> None:
    """``value`` must be an object whose keys are fields of the dataclass ``cls`` (but
    ``exclude``), each of its field's type."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected an object, got {_show(value)}")
    adapter, known = _fields_adapter(cls, tuple(exclude))
    _refuse_unknown(value, (*known, *extra_known), where)
    _check(adapter, value, where)


@functools.cache
def _fields_adapter(cls: type, exclude: tuple[str, ...]) -> tuple[TypeAdapter[Any], tuple[str, ...]]:
    # A TypedDict of the dataclass's fields (each optional: the dataclass has defaults) rather
    # than the dataclass itself: validating must not build the config, whose __post_init__ runs
    # the range checks that Plan.from_dict runs anyway, in their own words.
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in dataclasses.fields(cls) if f.name not in exclude)
    td = TypedDict(f"{cls.__name__}Fields", {n: NotRequired[hints[n]] for n in names})  # type: ignore[misc]
    td.__pydantic_config__ = ConfigDict(strict=True, extra="forbid")  # type: ignore[attr-defined]
    return TypeAdapter(td), names


def _check(adapter: TypeAdapter[Any], value: object, where: str) -> None:
    """Validate ``value`` in strict JSON mode; the first error as one line with its path."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected JSON values, got {_show(value)}") from None
    try:
        adapter.validate_json(text, strict=True)
    except ValidationError as exc:
        raise UserError(describe_error(exc.errors()[0], where)) from None


def describe_error(error: Mapping[str, Any], where: str = "") -> str:
    """One line for one pydantic error: ``<json path>: expected <type>, got <value>``."""
    loc = [p for p in error.get("loc", ()) if isinstance(p, int | str)]
    path = where
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, part)
    kind, got = error.get("type", ""), _show(error.get("input"))
    if kind == "missing":
        head, _, last = path.rpartition(".")
        return f'{head or "(top)"}: missing "{last}"'
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind in ("literal_error", "enum"):
        return f"{path}: expected one of {error.get('ctx', {}).get('expected')}, got {got}"
    if kind in _EXPECTED:
        return f"{path}: expected {_EXPECTED[kind]}, got {got}"
    return f"{path}: {error.get('msg', 'invalid')}, got {got}"


def _refuse_unknown(d: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = [k for k in d if k not in known]
    if unknown:
        raise UserError(f"{_join(where, str(unknown[0]))}: unknown key; known: {', '.join(sorted(known))}")


def _join(path: str, key: str) -> str:
    key = key if key.isidentifier() else json.dumps(key)
    return f"{path}.{key}" if path else key


def _show(value: object, limit: int = 60) -> str:
    """``value`` as it reads in JSON (``"4"``, ``16.5``, ``true``), shortened."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

