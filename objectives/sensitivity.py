"""Per-layer sensitivity of a baseline, which turns one global intensity into per-layer values.

On a model with more conv/linear layers than the study's ``per_layer_max`` a plan does not
sample each layer's intensity; it samples one global value per technique plus a *skew*
(:func:`spaces.plan.suggest_skew`), resolved into per-layer values through this profile: for
every eligible layer and every technique with a direction of compression
(:attr:`spaces.registry.Technique.stronger`), the validation accuracy drop of the baseline with
*only that layer* compressed, at a few intensities.

How one point is measured: the technique's ``moderate()`` config, with the field set to the
grid value in every eligible layer (a per-layer override, so each layer is compressed within
itself), is applied to a copy of the baseline and finalized (no fine-tune; a gradual schedule
reaches its final value at ``finalize``); each eligible layer of that copy is then swapped,
alone, into the baseline and the result evaluated on the first :data:`PROFILE_IMAGES`
validation images. ``drop = accuracy(baseline) - accuracy(baseline with that layer swapped)``.
BatchNorm is not recalibrated: the profile ranks layers, it does not predict a trial's accuracy.

The grid is :data:`GRID_POINTS` values across the range of the field's distribution in the
technique's ``suggest`` (log-spaced for a log distribution). The profile is measured once per
baseline and cached as JSON beside it (``<store>/baselines/<preset>-<key>/sensitivity-<id>.json``,
the id hashing the baseline key, :data:`PROFILE_VERSION`, layers, configs and grids), written
atomically under a file lock so that concurrent workers measure it once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from optuna.distributions import BaseDistribution, json_to_distribution
from torch import nn

from models.baseline import file_lock
from models.datasets import Splits
from models.loader import DeviceLoader
from models.train import evaluate
from spaces.layers import replace_module
from spaces.plan import Plan, Step, apply_plan, from_unit, skewable, technique_fingerprint, to_unit
from spaces.policy import LayerPolicy
from spaces.registry import ApplyContext, get_technique

PROFILE_VERSION = 1
PROFILE_IMAGES = 1000  # validation images per evaluation: bounds the cost on large datasets
GRID_POINTS = 4  # intensities per field, across its distribution's range


def _dist(spec: Mapping[str, Any]) -> BaseDistribution:
    return json_to_distribution(json.dumps(spec))


def grid_of(spec: Mapping[str, Any], points: int = GRID_POINTS) -> list[float | int]:
    """``points`` values evenly spread over the distribution ``spec`` (JSON, as
    :func:`spaces.plan.technique_fingerprint` records it) in its unit coordinate (log-spaced
    for a log distribution), mildest to strongest or the reverse, duplicates (ints) removed."""
    dist = _dist(spec)
    values = [from_unit(dist, i / max(1, points - 1)) for i in range(points)]
    return sorted(set(values), key=values.index)


@dataclass(frozen=True)
class FieldCurve:
    """Accuracy drops of one technique's field: one list per layer, one drop per grid value.

    Attributes:
        direction: ``+1`` when a larger value compresses more, ``-1`` when a smaller one does.
        distribution: The field's Optuna distribution (JSON) in the technique's ``suggest``.
        config: The technique config measured (``moderate()``), as JSON.
        grid: The field's values measured.
        drops: Layer path -> accuracy drop (0..1) at each grid value.
    """

    direction: int
    distribution: Mapping[str, Any]
    config: Mapping[str, Any]
    grid: tuple[float, ...]
    drops: Mapping[str, tuple[float, ...]]

    def at(self, layer: str, t: float) -> float:
        """The layer's drop at unit coordinate ``t``, linear between grid points (flat
        outside them)."""
        dist = _dist(self.distribution)
        ts = [to_unit(dist, v) for v in self.grid]
        order = np.argsort(ts)
        return float(np.interp(t, np.asarray(ts)[order], np.asarray(self.drops[layer])[order]))


@dataclass(frozen=True)
class SensitivityProfile:
    """A baseline's per-layer accuracy drops against each technique's intensity.

    Attributes:
        ident: Hash of what was measured (baseline key, version, layers, configs, grids).
        baseline_key: The baseline's cache key.
        baseline_accuracy: The baseline's accuracy on the ``images`` evaluated.
        images: Validation images per evaluation.
        layers: The layers measured (the policy's eligible layers).
        curves: Technique -> field -> :class:`FieldCurve`.
        seconds: How long the measurement took.
    """

    ident: str
    baseline_key: str
    baseline_accuracy: float
    images: int
    layers: tuple[str, ...]
    curves: Mapping[str, Mapping[str, FieldCurve]]
    seconds: float = 0.0

    def _curve(
        self, technique: str, field: str
    ) -> tuple[FieldCurve, Callable[[float], float]] | None:
        """The curve answering for ``field`` and how a value of ``field`` maps to its unit
        coordinate. A field measured itself maps directly; another field of a measured
        technique (lowrank's ``energy``, measured through ``rank_ratio``: ``moderate()`` sets one
        mode) is read from a measured field at the same *strength* (unit coordinate oriented so
        that 1 compresses most)."""
        fields_ = self.curves.get(technique)
        if not fields_:
            return None
        if field in fields_:
            curve = fields_[field]
            dist = _dist(curve.distribution)
            return curve, lambda v: to_unit(dist, v)
        handler = get_technique(technique)
        spec = technique_fingerprint(handler)["params"].get(f"{technique}.{field}")
        if field not in handler.stronger or spec is None:
            return None
        own, direction = _dist(spec), handler.stronger[field]
        curve = next(iter(fields_.values()))

        def mapped(v: float) -> float:
            strength = to_unit(own, v) if direction > 0 else 1.0 - to_unit(own, v)
            return strength if curve.direction > 0 else 1.0 - strength

        return curve, mapped

    def covers(self, technique: str, field: str) -> bool:
        """Whether :meth:`drop` answers for ``technique``'s ``field``."""
        return self._curve(technique, field) is not None

    def drop(self, technique: str, field: str, layer: str, value: float) -> float:
        """Accuracy drop (0..1) of the baseline with only ``layer`` compressed by ``technique``
        at ``field = value``, interpolated in the distribution's unit coordinate (log for log
        distributions). A field or layer the profile does not cover is a ``KeyError``."""
        found = self._curve(technique, field)
        if found is None:
            raise KeyError(f"the sensitivity profile does not cover {technique}.{field}")
        curve, unit = found
        return curve.at(layer, unit(value))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, versioned."""
        return {
            "format": PROFILE_VERSION,
            "ident": self.ident,
            "baseline_key": self.baseline_key,
            "baseline_accuracy": self.baseline_accuracy,
            "images": self.images,
            "layers": list(self.layers),
            "seconds": self.seconds,
            "techniques": {
                name: {
                    f: {
                        "direction": c.direction,
                        "distribution": dict(c.distribution),
                        "config": dict(c.config),
                        "grid": list(c.grid),
                        "drops": {p: list(d) for p, d in c.drops.items()},
                    }
                    for f, c in fields_.items()
                }
                for name, fields_ in self.curves.items()
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensitivityProfile:
        """Inverse of :meth:`to_dict`; a wrong format is a ``ValueError``."""
        if d.get("format") != PROFILE_VERSION:
            raise ValueError(
                f"sensitivity profile format {d.get('format')!r}, expected {PROFILE_VERSION}"
            )
        curves = {
            name: {
                f: FieldCurve(
                    int(c["direction"]),
                    dict(c["distribution"]),
                    dict(c["config"]),
                    tuple(c["grid"]),
                    {p: tuple(float(x) for x in v) for p, v in c["drops"].items()},
                )
                for f, c in fields_.items()
            }
            for name, fields_ in d["techniques"].items()
        }
        return cls(
            str(d["ident"]),
            str(d["baseline_key"]),
            float(d["baseline_accuracy"]),
            int(d["images"]),
            tuple(d["layers"]),
            curves,
            float(d.get("seconds", 0.0)),
        )


def _measured_fields(
    techniques: Sequence[str], points: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """What a profile measures: technique -> field -> direction, distribution, config, grid."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in techniques:
        handler = get_technique(name)
        config = handler.moderate()
        params = technique_fingerprint(handler)["params"]
        for f, _ in skewable(handler, config):
            spec = params[f"{name}.{f}"]
            out.setdefault(name, {})[f] = {
                "direction": int(handler.stronger[f]),
                "distribution": spec,
                "config": config.to_dict(),
                "grid": grid_of(spec, points),
            }
    return out


def profile_ident(
    baseline_key: str,
    layers: Sequence[str],
    techniques: Sequence[str],
    images: int,
    points: int = GRID_POINTS,
) -> str:
    """The cache id of a profile: a hash of everything that determines its numbers."""
    ident = {
        "format": PROFILE_VERSION,
        "baseline": baseline_key,
        "layers": list(layers),
        "images": images,
        "fields": _measured_fields(techniques, points),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def measure_profile(
    baseline: nn.Module,
    data: Splits,
    *,
    baseline_key: str,
    policy: LayerPolicy,
    techniques: Sequence[str],
    device: torch.device,
    calibration: Callable[[], Iterator[torch.Tensor]] | None = None,
    images: int = PROFILE_IMAGES,
    points: int = GRID_POINTS,
) -> SensitivityProfile:
    """Measure the profile (see the module docstring): ``techniques``' skewable fields of their
    ``moderate()`` config, on ``policy``'s eligible layers of ``baseline``, evaluated on the
    first ``images`` validation images. ``baseline`` is not modified."""
    start = time.perf_counter()
    layers = [p for p, _ in policy.eligible(baseline)]
    n = min(images, len(data.x_val))
    loader = DeviceLoader(
        data.x_val[:n],
        data.y_val[:n],
        data.spec,
        1024,
        train=False,
        device=device,
        channels_last=device.type == "cuda",
    )
    work = copy.deepcopy(baseline).to(device)
    reference = evaluate(work, loader)
    curves: dict[str, dict[str, FieldCurve]] = {}
    for name, fields_ in _measured_fields(techniques, points).items():
        handler = get_technique(name)
        config = handler.config_from_dict(next(iter(fields_.values()))["config"])
        for f, spec in fields_.items():
            drops: dict[str, list[float]] = {p: [] for p in layers}
            for value in spec["grid"]:
                torch.manual_seed(0)
                compressed = copy.deepcopy(baseline).to(device)
                plan = Plan((Step(name, config, {p: {f: value} for p in layers}),), policy)
                # apply + finalize without training: a one-shot compression at the final value.
                apply_plan(
                    compressed, plan, ApplyContext(policy=policy, calibration=calibration)
                ).finalize()
                for p in layers:
                    original = work.get_submodule(p)
                    replace_module(work, p, compressed.get_submodule(p))
                    drops[p].append(reference - evaluate(work, loader))
                    replace_module(work, p, original)
            curves.setdefault(name, {})[f] = FieldCurve(
                spec["direction"],
                spec["distribution"],
                spec["config"],
                tuple(spec["grid"]),
                {p: tuple(d) for p, d in drops.items()},
            )
    return SensitivityProfile(
        profile_ident(baseline_key, layers, techniques, n, points),
        baseline_key,
        reference,
        n,
        tuple(layers),
        curves,
        time.perf_counter() - start,
    )




def load_or_measure_profile(
    baseline: nn.Module,
    data: Splits,
    *,
    baseline_key: str,
    folder: Path | None,
    policy: LayerPolicy,
    techniques: Sequence[str],
    device: torch.device,
    calibration: Callable[[], Iterator[torch.Tensor]] | None = None,
    images: int = PROFILE_IMAGES,
    points: int = GRID_POINTS,
    log: Callable[[str], None] | None = None,
) -> SensitivityProfile:
    """The profile cached in ``folder`` (the baseline's folder), or measured and written there
    (atomically, under a file lock). ``folder=None`` measures without caching. A cached file
    that cannot be read or that measured something else is measured again and replaced."""
    layers = [p for p, _ in policy.eligible(baseline)]
    n = min(images, len(data.x_val))
    ident = profile_ident(baseline_key, layers, techniques, n, points)

    def measure() -> SensitivityProfile:
        if log:
            log(
                f"measuring the sensitivity profile of {len(layers)} layers x {', '.join(techniques)} on {n} images"
            )
        profile = measure_profile(
            baseline,
            data,
            baseline_key=baseline_key,
            policy=policy,
            techniques=techniques,
            device=device,
            calibration=calibration,
            images=images,
            points=points,
        )
        if log:
            log(f"sensitivity profile measured in {profile.seconds:.1f} s")
        return profile

    if folder is None:
        return measure()
    path = folder / f"sensitivity-{ident}.json"
    with file_lock(path.with_suffix(".lock")):
        if path.exists():
            try:
                cached = SensitivityProfile.from_dict(json.loads(path.read_text()))
                if cached.ident == ident:
                    return cached
            except (ValueError, KeyError, TypeError):
                pass  # unreadable (an older format, a torn copy): measured again below
        profile = measure()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(profile.to_dict(), indent=1))
        tmp.replace(path)
        return profile
