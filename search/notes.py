"""What optuna-dashboard shows beside the raw attributes: a Markdown note per finished trial, a
note for the study and two charts.

The dashboard lists a trial's user attributes as JSON text, so the plan (the attribute that says
what a trial *is*) reads as one long line, the values are unnamed and the per-layer breakdown is
a dictionary. The notes say it in tables:

* **Trial note** (:func:`trial_note`): the named values against the baseline, the plan (one row
  per step: stage, technique, family, settings; per-layer overrides as a layer x field table),
  the bytes per layer, the validation curve, and how the trial ended when it did not finish
  (stopped early, infeasible, failed). Saved by :func:`save_trial_note`, the worker callback
  every worker runs after each trial (``search.worker.work``; ``search.refine`` after each
  refinement).
* **Study note** (:func:`study_note`): the baseline and the current Pareto front grouped by
  technique family. Saved with the charts by :func:`save_study_note` when a worker finishes its
  run and by ``search.export``.
* **Charts** (:func:`front_chart`, :func:`bytes_chart`, plotly): the front on a log-ratio axis
  coloured by families, stopped trials faint at their values when stopped; and the bytes per
  layer of the front's plans, stacked.

Notes and charts are study system attributes (optuna-dashboard splits them into chunks of
2,045 characters, one attribute each), so every trial's note is capped at :data:`MAX_NOTE_CHARS`
and free text from errors passes :func:`scrub`: a storage URL (and its password) never reaches
the storage through a note.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from objectives import record
from objectives.objective import is_feasible
from objectives.record import TrialRecord
from search.progress import ACCURACY_FLOOR_POINTS, front_trials
from spaces.plan import Plan
from storage.locks import study_lock

MAX_NOTE_CHARS = 6000  # three chunks of system attributes; a trial's note stays well under it
MAX_BREAKDOWN_ROWS = 16  # the largest units, the rest summed in one row
MAX_FRONT_ROWS = 60
MAX_CHART_LAYERS = 12  # bars stack this many units, the rest as "(other units)"
FRONT_CHART_ID = "pareto-front-log-ratio"
BYTES_CHART_ID = "bytes-per-layer-front"
_LOG = logging.getLogger(__name__)
_SPARK = "▁▂▃▄▅▆▇█"
# Any URL, not only the storage's: a database error quotes its URL with the user name and
# possibly the password.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S+")


# ------------------------------------------------------------------------------- formatting


def scrub(text: str) -> str:
    """``text`` with every URL replaced by ``<url>`` (no storage URL or password in a note)."""
    return _URL.sub("<url>", text)


def _one_line(exc: BaseException) -> str:
    lines = scrub(str(exc)).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _cell(value: Any) -> str:
    """A Markdown table cell: numbers compact, ``|`` escaped, one line."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_bytes(n: int | None) -> str:
    """``123,456 B (120.6 KiB)``; ``–`` when unknown."""
    if n is None:
        return "–"
    return f"{n:,} B" + (f" ({n / 1024:.1f} KiB)" if n >= 10 * 1024 else "")


def fmt_ratio(ratio: float | None) -> str:
    """``12.34×``; ``–`` when unknown."""
    return "–" if ratio is None or not math.isfinite(ratio) else f"{ratio:.2f}×"


def _acc(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def sparkline(values: Sequence[float]) -> str:
    """One block character per value, scaled between their minimum and maximum."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    return "".join(
        _SPARK[0 if span <= 0 else round((v - low) / span * (len(_SPARK) - 1))] for v in values
    )


# ---------------------------------------------------------------------------- trial sections


def plan_markdown(plan: Plan) -> str:
    """The plan as tables: one row per step (stage, technique, family, settings), the per-layer
    overrides as a layer x ``technique.field`` table, then the policy and fine-tune overrides."""
    rows = []
    for i, step in enumerate(plan.steps, 1):
        settings = ", ".join(
            f"{k}={_cell(v)}" for k, v in step.config.to_dict().items() if k != "version"
        )
        rows.append((i, step.stage, step.technique, step.family, settings or "–"))
    parts = [
        _table(["#", "stage", "technique", "family", "settings"], rows)
        if rows
        else "No compression steps (the fp32 baseline, fine-tuned)."
    ]
    columns = [
        (s.technique, f)
        for s in plan.steps
        for f in sorted({f for o in s.layers.values() for f in o})
    ]
    if columns:
        layers = list(dict.fromkeys(p for s in plan.steps for p in s.layers))
        by_step = {s.technique: s.layers for s in plan.steps}
        table = [
            [f"`{p}`", *[by_step[t].get(p, {}).get(f, "–") for t, f in columns]] for p in layers
        ]
        parts.append(
            "**Per-layer overrides** (a protected layer stays protected)\n\n"
            + _table(["layer", *[f"{t}.{f}" for t, f in columns]], table)
        )
    policy = ", ".join(f"{k}={_cell(v)}" for k, v in plan.policy.to_dict().items())
    finetune = ", ".join(f"{k}={_cell(v)}" for k, v in plan.finetune.items()) or "the preset's"
    parts.append(f"- Layer policy: {policy}\n- Fine-tune: {finetune}")
    return "\n\n".join(parts)


def breakdown_markdown(breakdown: Mapping[str, int], max_rows: int = MAX_BREAKDOWN_ROWS) -> str:
    """Bytes per unit of the artifact (``(header)`` included) with their share and a bar, in
    model order; past ``max_rows`` the smallest units are summed in one row."""
    total = sum(breakdown.values())
    if not breakdown or total <= 0:
        return "No size breakdown recorded."
    keep = set(
        sorted(breakdown, key=lambda k: -breakdown[k])[
            : max_rows - 1 if len(breakdown) > max_rows else max_rows
        ]
    )
    rows: list[tuple[str, str, str, str]] = []
    for unit, n in breakdown.items():
        if unit in keep:
            share = n / total
            rows.append(
                (
                    f"`{unit}`",
                    f"{n:,}",
                    f"{100 * share:.1f}%",
                    "█" * max(1 if n else 0, round(20 * share)),
                )
            )
    rest = [n for unit, n in breakdown.items() if unit not in keep]
    if rest:
        share = sum(rest) / total
        rows.append(
            (
                f"({len(rest)} other units)",
                f"{sum(rest):,}",
                f"{100 * share:.1f}%",
                "█" * round(20 * share),
            )
        )
    return _table(["unit", "bytes", "share", ""], rows)


def curve_markdown(
    curve: Sequence[float], stopped_at: int | None = None, max_rows: int = 12
) -> str:
    """The validation accuracy after each epoch: a sparkline and a table (every k-th epoch past
    ``max_rows``, the last always), marking the epoch a stopped trial stopped after."""
    if not curve:
        return "No epoch finished."
    step = max(1, math.ceil(len(curve) / max_rows))
    shown = sorted({*range(0, len(curve), step), len(curve) - 1})
    rows = []
    for i in shown:
        delta = f"{curve[i] - curve[i - 1]:+.4f}" if i > 0 else ""
        mark = "stopped here" if stopped_at is not None and i + 1 == stopped_at else ""
        rows.append((i + 1, f"{curve[i]:.4f}", delta, mark))
    return (
        f"`{sparkline(curve)}` {curve[0]:.4f} → {curve[-1]:.4f} over {len(curve)} epoch{'s' * (len(curve) != 1)} "
        f"(best {max(curve):.4f})\n\n" + _table(["epoch", "val accuracy", "change", ""], rows)
    )


def _values_table(rec: TrialRecord, baseline: Mapping[str, Any]) -> str:
    acc = rec.values.get("val_accuracy")
    ratio = rec.values.get("compression_ratio")
    when = ""
    if acc is None and rec.stopped_values:  # a stopped trial has no values, only those at the stop
        acc, ratio = (
            rec.stopped_values.get("val_accuracy"),
            rec.stopped_values.get("compression_ratio"),
        )
        when = f" (at epoch {rec.stopped_at_epoch})"
    base_bytes = rec.baseline_bytes or baseline.get("bytes")
    if ratio is None and rec.bytes and base_bytes:
        ratio = base_bytes / rec.bytes
    header = ["", "val accuracy", "compression ratio", "bytes"]
    this: list[Any] = ["**this trial**", _acc(acc) + when, fmt_ratio(ratio), fmt_bytes(rec.bytes)]
    base: list[Any] = ["baseline", _acc(baseline.get("val_accuracy")), "1×", fmt_bytes(base_bytes)]
    extra = {k: v for k, v in rec.values.items() if k not in ("val_accuracy", "compression_ratio")}
    for name, value in extra.items():  # bitops, when the study has a third objective
        header.append(name)
        this.append(f"{value:.4g}")
        base.append("–")
    rows = [this, base]
    if acc is not None and baseline.get("val_accuracy") is not None:
        rows.append(
            ["change", f"{100 * (acc - baseline['val_accuracy']):+.2f} points", "", ""]
            + [""] * len(extra)
        )
    return _table(header, rows)


def _ending(rec: TrialRecord) -> str | None:
    """Why a trial did not finish normally: stopped early, infeasible or failed."""
    if rec.stopped_at_epoch is not None:
        v = rec.stopped_values or {}
        return (
            f"**Stopped early** after epoch {rec.stopped_at_epoch}: val accuracy "
            f"{_acc(v.get('val_accuracy'))} at ratio {fmt_ratio(v.get('compression_ratio'))}. A finished trial "
            "with an equal or higher ratio already beat the accuracy this one could still reach (its "
            "accuracy now plus the gain similar trials made after this epoch); see search/early_stopping.py. "
            "It never enters the front."
        )
    if rec.infeasible:
        limits = f" (constraint values {', '.join(f'{c:.4g}' for c in rec.constraints or [])}; <= 0 is feasible)"
        return f"**Infeasible**: {scrub(rec.infeasible)}{limits if rec.constraints else ''}. It never enters the front."
    if rec.state == "FAIL":
        reason = scrub(rec.fail_reason or "no reason recorded (the worker died?)").strip()
        if len(reason) > 800:
            reason = "…" + reason[-800:]
        return "**Failed**:\n\n```\n" + reason.replace("```", "'''") + "\n```"
    return None


def trial_note(
    trial: FrozenTrial, baseline: Mapping[str, Any], metric_names: Sequence[str] | None = None
) -> str:
    """The Markdown note of a finished trial (module docstring), at most :data:`MAX_NOTE_CHARS`
    characters; ``baseline`` is the study's ``baseline`` user attribute."""
    rec = TrialRecord.from_trial(trial, metric_names)
    plan: Plan | None = None
    plan_error = ""
    try:
        plan = rec.to_plan()
    except Exception as exc:  # a malformed or missing plan: the note says so instead of failing
        plan_error = scrub(str(exc))
    families = rec.families or (plan.families if plan is not None else "?")
    title = f"### Trial {trial.number}: {families} ({trial.state.name.lower()})"
    parts = [title]
    if rec.refine_of is not None:
        parts.append(
            f"Refinement of trial {rec.refine_of}: its plan re-trained for {rec.fidelity_epochs} epochs "
            f"(round {rec.refine_round})."
        )
    if rec.retry_of is not None:
        parts.append(f"Retry of failed trial {rec.retry_of} (attempt {(rec.retries or 0) + 1}).")
    ending = _ending(rec)
    if ending:
        parts.append(ending)
    parts.append(_values_table(rec, baseline))
    parts.append(
        "#### Plan\n\n"
        + (plan_markdown(plan) if plan is not None else f"No readable plan: {plan_error}")
    )
    if rec.breakdown:
        parts.append(
            f"#### Bytes by unit: {fmt_bytes(sum(rec.breakdown.values()))}\n\n"
            + breakdown_markdown(rec.breakdown)
        )
    elif rec.predicted_bytes is not None:
        parts.append(f"Predicted size before fine-tuning: {fmt_bytes(rec.predicted_bytes)}.")
    if rec.curve or (
        trial.state != TrialState.FAIL and not rec.infeasible
    ):  # infeasible: never trained
        parts.append("#### Validation curve\n\n" + curve_markdown(rec.curve, rec.stopped_at_epoch))
    facts = [f"seed {rec.seed}"]
    if rec.wall_seconds is not None:
        facts.append(f"{rec.wall_seconds:.1f} s")
    if rec.device:
        facts.append(f"on {rec.device}")
    if rec.artifact_id:
        facts.append(
            "artifacts: the compressed model (.pcz) and its plan file (search.apply rebuilds it)"
        )
    parts.append("_" + ", ".join(facts) + "._")
    return _cap("\n\n".join(parts))


def _cap(text: str, limit: int = MAX_NOTE_CHARS) -> str:
    if len(text) <= limit:
        return text
    tail = "\n\n_(note shortened; the full record is in the user attributes)_"
    return text[: limit - len(tail)].rsplit("\n", 1)[0] + tail


# ---------------------------------------------------------------------------- study note


def _families(trial: FrozenTrial) -> str:
    fam = trial.user_attrs.get(record.FAMILIES)
    if isinstance(fam, str) and fam:
        return fam
    try:
        return TrialRecord.from_trial(trial).to_plan().families
    except Exception:  # a trial without a readable plan is still plotted
        return "?"


def _size(trial: FrozenTrial) -> int | None:
    size = trial.user_attrs.get(record.BYTES)
    return size if isinstance(size, int) else None


def _breakdown(trial: FrozenTrial) -> dict[str, int]:
    raw = record.attrs_of(trial).get(record.BREAKDOWN)
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, int)}


def study_note(study_name: str, baseline: Mapping[str, Any], trials: Sequence[FrozenTrial]) -> str:
    """The study's Markdown note: the baseline, the trials by state and the current Pareto front
    (search trials: COMPLETE, feasible, full budget) as a table grouped by technique families."""
    by = {s: sum(1 for t in trials if t.state == s) for s in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    infeasible = sum(1 for t in complete if not is_feasible(t))
    front = front_trials(trials)
    acc = baseline.get("val_accuracy")
    floor = None if acc is None else acc - ACCURACY_FLOOR_POINTS / 100.0
    parts = [
        f"## {study_name}",
        _table(
            ["baseline", "model", "dataset", "val accuracy", "test accuracy", "bytes"],
            [
                (
                    "fp32",
                    baseline.get("model", "?"),
                    baseline.get("dataset", "?"),
                    _acc(acc),
                    _acc(baseline.get("test_accuracy")),
                    fmt_bytes(baseline.get("bytes")),
                )
            ],
        ),
        f"Trials: {by[TrialState.COMPLETE]} complete ({infeasible} infeasible), {by[TrialState.PRUNED]} stopped "
        f"early, {by[TrialState.FAIL]} failed, {by[TrialState.RUNNING]} running. Each trial's note shows its "
        "plan, bytes by unit and validation curve.",
    ]
    if not front:
        parts.append("No Pareto front yet (no complete, feasible search trial).")
        return _cap("\n\n".join(parts), 3 * MAX_NOTE_CHARS)
    rows = []
    ordered = sorted(front, key=lambda t: (_families(t), t.values[1]))
    for t in ordered[:MAX_FRONT_ROWS]:
        low = " (below the floor)" if floor is not None and t.values[0] < floor else ""
        rows.append(
            (
                f"#{t.number}",
                _families(t),
                f"{t.values[0]:.4f}{low}",
                fmt_ratio(t.values[1]),
                f"{_size(t):,}" if _size(t) is not None else "–",
            )
        )
    n_fams = len({_families(t) for t in front})
    parts.append(
        f"### Pareto front: {len(front)} plan{'s' * (len(front) != 1)}, {n_fams} "
        f"famil{'ies' if n_fams != 1 else 'y'} (sorted by families, then ratio)\n\n"
        + _table(["trial", "families", "val accuracy", "ratio", "bytes"], rows)
    )
    if len(front) > MAX_FRONT_ROWS:
        parts.append(f"_{len(front) - MAX_FRONT_ROWS} more front plans: python -m search.export._")
    if floor is not None:
        parts.append(
            f"_search.export leaves out plans below {floor:.4f} (the baseline minus "
            f"{ACCURACY_FLOOR_POINTS:g} points)._"
        )
    return _cap("\n\n".join(parts), 3 * MAX_NOTE_CHARS)


# ---------------------------------------------------------------------------------- charts


def _palette(n: int) -> list[str]:
    import plotly.colors

    colors = list(plotly.colors.qualitative.Plotly) + list(plotly.colors.qualitative.Dark24)
    return [colors[i % len(colors)] for i in range(n)]


def _stopped_point(trial: FrozenTrial) -> tuple[float, float] | None:
    values = trial.user_attrs.get(record.STOPPED_VALUES) or {}
    acc, ratio = values.get("val_accuracy"), values.get("compression_ratio")
    return None if acc is None or ratio is None or ratio <= 0 else (float(acc), float(ratio))


def _title(text: str) -> dict[str, Any]:
    # Top left, below the dashboard's mode bar (top right, over the plot).
    return {
        "text": text,
        "x": 0.01,
        "xanchor": "left",
        "yref": "container",
        "y": 1.0,
        "yanchor": "top",
        "pad": {"t": 34},
        "font": {"size": 14},
    }


def front_chart(study_name: str, baseline: Mapping[str, Any], trials: Sequence[FrozenTrial]) -> Any:
    """A plotly figure: the Pareto front on a log compression-ratio axis, one colour per
    technique-family combination (``lowrank+prune+int+act``), the other feasible search trials
    in grey, stopped trials faint at their values when stopped, the baseline's accuracy dashed."""
    import plotly.graph_objects as go

    front = front_trials(trials)
    on_front = {t.number for t in front}
    others = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.values is not None
        and is_feasible(t)
        and t.number not in on_front
        and t.values[1] > 0
    ]
    stopped = [(t, p) for t in trials if t.state == TrialState.PRUNED and (p := _stopped_point(t))]
    fig = go.Figure()

    def hover(t: FrozenTrial, acc: float, ratio: float, note: str = "") -> str:
        size = _size(t)
        return (
            f"#{t.number} {_families(t)}<br>val {acc:.4f}, ratio {ratio:.2f}×"
            + (f", {size:,} B" if size else "")
            + note
        )

    if others:
        fig.add_trace(
            go.Scatter(
                x=[t.values[1] for t in others],
                y=[t.values[0] for t in others],
                mode="markers",
                name="other feasible trials",
                marker={"color": "#b0b0b0", "size": 6},
                hovertext=[hover(t, t.values[0], t.values[1]) for t in others],
                hoverinfo="text",
            )
        )
    if stopped:
        fig.add_trace(
            go.Scatter(
                x=[p[1] for _, p in stopped],
                y=[p[0] for _, p in stopped],
                mode="markers",
                name="stopped early (at the stop)",
                opacity=0.35,
                marker={"color": "#808080", "size": 7, "symbol": "circle-open"},
                hovertext=[hover(t, *p, " (stopped)") for t, p in stopped],
                hoverinfo="text",
            )
        )
    if front:
        fig.add_trace(
            go.Scatter(
                x=[t.values[1] for t in front],
                y=[t.values[0] for t in front],
                mode="lines",
                line={"color": "black", "width": 1},
                name="front",
                hoverinfo="skip",
            )
        )
    fams = sorted({_families(t) for t in front})
    for fam, color in zip(fams, _palette(len(fams)), strict=True):
        pts = [t for t in front if _families(t) == fam]
        fig.add_trace(
            go.Scatter(
                x=[t.values[1] for t in pts],
                y=[t.values[0] for t in pts],
                mode="markers+text",
                name=fam,
                text=[f"#{t.number}" for t in pts],
                textposition="top center",
                textfont={"size": 9},
                marker={"color": color, "size": 11, "line": {"width": 1}},
                hovertext=[hover(t, t.values[0], t.values[1]) for t in pts],
                hoverinfo="text",
            )
        )
    acc = baseline.get("val_accuracy")
    if acc is not None:
        fig.add_hline(
            y=acc,
            line={"color": "red", "dash": "dash", "width": 1},
            annotation_text=f"baseline {acc:.4f}",
            annotation_position="bottom right",
        )
    shown = [t.values[0] for t in (*front, *others)] + [p[0] for _, p in stopped]
    top = max([*shown, *([acc] if acc is not None else [])], default=1.0)
    # Zoom on the useful band, as pareto.png does: from the accuracy floor (baseline - 10 points).
    low = acc - ACCURACY_FLOOR_POINTS / 100.0 if acc is not None else min(shown, default=0.0)
    pad = max(0.0025, 0.04 * (top - low))
    fig.update_layout(
        template="none",
        title=_title(f"Pareto front of {study_name}: {len(front)} plans, ratio on a log axis"),
        xaxis={"type": "log", "title": {"text": "compression ratio (measured bytes, log scale)"}},
        yaxis={
            "title": {"text": "validation accuracy"},
            "tickformat": ".1%",
            "range": [max(0.0, low - pad), min(1.0 + pad, top + 2 * pad)],
        },  # room for labels on top
        legend={"font": {"size": 10}},
        margin={"l": 70, "r": 20, "t": 80, "b": 50},
    )
    return fig


def bytes_chart(study_name: str, baseline: Mapping[str, Any], trials: Sequence[FrozenTrial]) -> Any:
    """A plotly figure: the bytes of each unit (layer) of the front's artifacts, one stacked bar
    per front plan ordered by ratio; the largest :data:`MAX_CHART_LAYERS` units by name, the rest
    summed. A menu switches between bytes and shares."""
    import plotly.graph_objects as go

    front = [t for t in front_trials(trials) if _breakdown(t)]
    fig = go.Figure()
    labels = [f"#{t.number} ({t.values[1]:.1f}×)" for t in front]
    totals: dict[str, int] = {}
    for t in front:
        for unit, n in _breakdown(t).items():
            totals[unit] = totals.get(unit, 0) + n
    big = set(sorted(totals, key=lambda u: -totals[u])[:MAX_CHART_LAYERS])
    units = [u for u in totals if u in big]  # model order, as the breakdowns list them
    series = {u: [_breakdown(t).get(u, 0) for t in front] for u in units}
    if len(totals) > len(big):
        series[f"({len(totals) - len(big)} other units)"] = [
            sum(n for u, n in _breakdown(t).items() if u not in big) for t in front
        ]
    for (unit, ys), color in zip(series.items(), _palette(len(series)), strict=True):
        fig.add_trace(
            go.Bar(
                x=labels,
                y=ys,
                name=unit,
                marker={"color": color},
                hovertext=[
                    f"{_families(t)}<br>{unit}: {y:,} B" for t, y in zip(front, ys, strict=True)
                ],
                hoverinfo="text",
            )
        )
    base = baseline.get("bytes")
    fig.update_layout(
        template="none",
        barmode="stack",
        title=_title(
            "Bytes per unit of the front's plans" + (f" (baseline {base:,} B)" if base else "")
        ),
        xaxis={"title": {"text": "front plan (ratio)"}, "type": "category"},
        yaxis={"title": {"text": "bytes"}},
        legend={"font": {"size": 10}},
        margin={"l": 70, "r": 20, "t": 80, "b": 70},
        # Bytes or shares, under the legend (the top right is the dashboard's mode bar).
        updatemenus=[
            {
                "type": "buttons",
                "direction": "left",
                "x": 1.02,
                "y": 0.0,
                "xanchor": "left",
                "yanchor": "bottom",
                "font": {"size": 10},
                "buttons": [
                    {
                        "label": "bytes",
                        "method": "relayout",
                        "args": [{"barnorm": "", "yaxis.title.text": "bytes"}],
                    },
                    {
                        "label": "share",
                        "method": "relayout",
                        "args": [
                            {"barnorm": "percent", "yaxis.title.text": "share of the artifact (%)"}
                        ],
                    },
                ],
            }
        ],
    )
    return fig


# ------------------------------------------------------------------------------------ saving


@dataclass(frozen=True)
class _TrialRef:
    """What ``optuna_dashboard.save_note`` reads from a trial (``storage``, ``study``,
    ``_trial_id``). Callbacks get a FrozenTrial, which it does not take, and building an
    ``optuna.Trial`` of a finished trial would run the sampler's ``before_trial`` on it."""

    study: optuna.Study
    storage: Any
    _trial_id: int


def _baseline(study: optuna.Study) -> dict[str, Any]:
    base = study.user_attrs.get("baseline")
    return dict(base) if isinstance(base, dict) else {}


def save_trial_note(study: optuna.Study, frozen: FrozenTrial) -> None:
    """Worker callback ``(study, frozen_trial)``: save the trial's note (:func:`trial_note`).
    Best effort: a note that cannot be written never stops a worker."""
    import optuna_dashboard

    try:
        body = trial_note(frozen, _baseline(study), study.metric_names)
        optuna_dashboard.save_note(
            cast(Any, _TrialRef(study, study._storage, frozen._trial_id)), body
        )
    except Exception as exc:  # the dashboard's extras never fail a worker
        _LOG.warning("trial %d: no dashboard note (%s)", frozen.number, _one_line(exc))


def save_study_note(study: optuna.Study, log: Callable[[str], None] | None = None) -> bool:
    """Refresh the study's note (:func:`study_note`) and its two charts, under the study's lock
    (two workers finishing together would interleave the note's chunks). Best effort: a failure
    is one line to ``log`` and False."""
    import optuna_dashboard

    try:
        trials = study.get_trials(deepcopy=False)
        baseline = _baseline(study)
        body = study_note(study.study_name, baseline, trials)
        figures = {
            FRONT_CHART_ID: front_chart(study.study_name, baseline, trials),
            BYTES_CHART_ID: bytes_chart(study.study_name, baseline, trials),
        }
        with study_lock(study._storage, study.study_name)():
            optuna_dashboard.save_note(study, body)
            for graph_id, fig in figures.items():
                optuna_dashboard.save_plotly_graph_object(study, fig, graph_object_id=graph_id)
        return True
    except Exception as exc:  # the dashboard's extras never fail a search or an export
        if log is not None:
            log(f"note: the dashboard's study note was not refreshed ({_one_line(exc)})")
        return False
