"""search.notes: the Markdown of trial and study notes and the plotly charts, built from
hand-made trials (no training). The notes as optuna-dashboard serves them, on a real study, are
in test_dashboard.py."""

from __future__ import annotations

import json
import re
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState, create_trial

from objectives import record
from search import notes

BASELINE = {
    "val_accuracy": 0.97,
    "test_accuracy": 0.965,
    "bytes": 120_000,
    "model": "digits_cnn",
    "dataset": "digits",
}
PLAN = {
    "version": 1,
    "steps": [
        {"technique": "lowrank", "config": {"rank_ratio": 0.5}},
        {
            "technique": "prune",
            "config": {"sparsity": 0.9, "schedule": "gradual"},
            "layers": {"conv2": {"sparsity": 0.8}, "fc1": {"sparsity": 0.95}},
        },
        {
            "technique": "int",
            "config": {"bits": 4},
            "layers": {"conv2": {"bits": 6}, "fc1": {"bits": 3}},
        },
        {"technique": "actquant", "config": {}},
    ],
    "policy": {},
    "finetune": {"epochs": 3},
}
FAMILIES = "lowrank+prune+int+act"
BREAKDOWN = {"(header)": 300, "conv1": 500, "conv2": 3000, "fc1": 5000, "fc2": 1200}


def _trial(
    number: int,
    state: TrialState = TrialState.COMPLETE,
    values: list[float] | None = None,
    **attrs: Any,
) -> FrozenTrial:
    t = create_trial(
        state=state,
        values=values,
        user_attrs={record.PLAN: PLAN, record.FAMILIES: FAMILIES, **attrs},
    )
    t.number = number
    return t


def _complete(number: int = 7, acc: float = 0.95, ratio: float = 12.0, **attrs: Any) -> FrozenTrial:
    fields = {
        "bytes": 10_000,
        "breakdown": BREAKDOWN,
        "curve": [0.9, 0.93, 0.95],
        "baseline_bytes": 120_000,
        **attrs,
    }
    return _trial(number, values=[acc, ratio], **fields)


def test_trial_note_names_values_and_tabulates_plan_overrides_bytes_and_curve() -> None:
    note = notes.trial_note(_complete(), BASELINE, ["val_accuracy", "compression_ratio"])
    assert note.startswith(f"### Trial 7: {FAMILIES} (complete)")
    assert "| val accuracy | compression ratio | bytes |" in note
    assert "| **this trial** | 0.9500 | 12.00× | 10,000 B |" in note
    assert "| baseline | 0.9700 | 1× | 120,000 B (117.2 KiB) |" in note
    assert "| change | -2.00 points |" in note
    # One row per step, in plan order, with its settings.
    rows = [
        line
        for line in note.splitlines()
        if re.match(r"\| \d \| (structure|sparsity|weights|activations) \|", line)
    ]
    assert [r.split(" | ")[1:4] for r in rows] == [
        ["structure", "lowrank", "lowrank"],
        ["sparsity", "prune", "prune"],
        ["weights", "int", "int"],
        ["activations", "actquant", "act"],
    ]
    assert "sparsity=0.9, scope=global, schedule=gradual" in rows[1]
    # Per-layer overrides: one row per layer, one column per technique field.
    assert "| layer | prune.sparsity | int.bits |" in note
    assert "| `conv2` | 0.8 | 6 |" in note and "| `fc1` | 0.95 | 3 |" in note
    assert "- Fine-tune: epochs=3\n" in note
    # Bytes by unit, shares summing to the artifact.
    assert "#### Bytes by unit: 10,000 B" in note
    assert "| `fc1` | 5,000 | 50.0% | ██████████ |" in note
    assert "| 3 | 0.9500 | +0.0200 |" in note and "`▁▅█`" in note
    assert len(note) <= notes.MAX_NOTE_CHARS


def test_notes_of_a_stopped_an_infeasible_and_a_failed_trial_say_why() -> None:
    stopped = _trial(
        3,
        TrialState.PRUNED,
        stopped_at_epoch=2,
        curve=[0.4, 0.5],
        stopped_values={"val_accuracy": 0.5, "compression_ratio": 30.0},
    )
    note = notes.trial_note(stopped, BASELINE)
    assert "**Stopped early** after epoch 2: val accuracy 0.5000 at ratio 30.00×" in note
    assert "| **this trial** | 0.5000 (at epoch 2) | 30.00× |" in note
    assert "| 2 | 0.5000 | +0.1000 | stopped here |" in note

    infeasible = _trial(
        4,
        values=[0.3, 1.0],
        infeasible="compression ratio 1.00 < --min-ratio 1.5",
        constraints=[0.5],
        predicted_bytes=120_000,
    )
    note = notes.trial_note(infeasible, BASELINE)
    assert (
        "**Infeasible**: compression ratio 1.00 < --min-ratio 1.5 (constraint values 0.5; <= 0 is feasible)"
        in note
    )
    assert "Predicted size before fine-tuning: 120,000 B" in note

    url = "postgresql+psycopg://search:hunter2@db.example:5432/studies"
    failed = _trial(
        5, TrialState.FAIL, fail_reason=f"OperationalError: connection to {url} refused"
    )
    note = notes.trial_note(failed, BASELINE)
    assert "**Failed**:" in note and "OperationalError: connection to <url> refused" in note
    assert "hunter2" not in note and "postgresql" not in note


def test_a_malformed_plan_and_a_huge_breakdown_still_give_a_short_note() -> None:
    t = _complete(breakdown={f"layer{i}.weight": 100 + i for i in range(400)})
    t.user_attrs[record.PLAN] = {"steps": [{"technique": "nope"}]}
    note = notes.trial_note(t, BASELINE)
    assert "No readable plan" in note
    assert "(385 other units)" in note  # 15 largest units, then one row for the rest
    assert len(note) <= notes.MAX_NOTE_CHARS


def test_study_note_has_the_baseline_and_the_front_by_family() -> None:
    trials = [
        _complete(1, 0.96, 4.0),
        _complete(2, 0.90, 30.0, families="prune+int"),
        _complete(3, 0.80, 2.0),  # dominated
        _trial(
            4, TrialState.PRUNED, stopped_values={"val_accuracy": 0.6, "compression_ratio": 50.0}
        ),
    ]
    trials[1].user_attrs[record.FAMILIES] = "prune+int"
    note = notes.study_note("s", BASELINE, trials)
    assert "| fp32 | digits_cnn | digits | 0.9700 | 0.9650 | 120,000 B (117.2 KiB) |" in note
    assert "Trials: 3 complete (0 infeasible), 1 stopped early, 0 failed" in note
    assert "### Pareto front: 2 plans, 2 families" in note
    front_rows = [line for line in note.splitlines() if line.startswith("| #")]
    assert front_rows == [
        f"| #1 | {FAMILIES} | 0.9600 | 4.00× | 10,000 |",
        "| #2 | prune+int | 0.9000 | 30.00× | 10,000 |",
    ]


def test_charts_log_ratio_axis_families_stopped_trials_and_stacked_bytes() -> None:
    trials = [
        _complete(1, 0.96, 4.0),
        _complete(2, 0.90, 30.0),
        _complete(3, 0.80, 2.0),
        _trial(
            4, TrialState.PRUNED, stopped_values={"val_accuracy": 0.6, "compression_ratio": 50.0}
        ),
    ]
    trials[1].user_attrs[record.FAMILIES] = "prune+int"
    trials[1].user_attrs[record.BREAKDOWN] = {"(header)": 300, "fc1": 9700}
    front = json.loads(notes.front_chart("s", BASELINE, trials).to_json())
    assert front["layout"]["xaxis"]["type"] == "log"
    by_name = {t["name"]: t for t in front["data"]}
    assert by_name[FAMILIES]["x"] == [4.0] and by_name["prune+int"]["x"] == [30.0]
    assert by_name["other feasible trials"]["x"] == [2.0]
    faint = by_name["stopped early (at the stop)"]
    assert faint["x"] == [50.0] and faint["y"] == [0.6] and faint["opacity"] < 0.5

    bars = json.loads(notes.bytes_chart("s", BASELINE, trials).to_json())
    assert bars["layout"]["barmode"] == "stack"
    stacks = [t for t in bars["data"] if t["type"] == "bar"]
    assert [t["name"] for t in stacks] == ["(header)", "conv1", "conv2", "fc1", "fc2"]
    assert stacks[0]["x"] == ["#1 (4.0×)", "#2 (30.0×)"]
    for column, trial in enumerate(trials[:2]):  # each bar adds up to the trial's breakdown
        assert sum(t["y"][column] for t in stacks) == sum(
            trial.user_attrs[record.BREAKDOWN].values()
        )


def _stored_note(study: optuna.Study, trial_id: int | None) -> str:
    from optuna_dashboard._note import get_note_from_system_attrs

    return get_note_from_system_attrs(
        study._storage.get_study_system_attrs(study._study_id), trial_id
    )["body"]


def test_save_trial_note_is_a_callback_that_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_user_attr("baseline", BASELINE)
    trial = study.ask()
    record.write(trial, plan=PLAN, families=FAMILIES, bytes=10_000, breakdown=BREAKDOWN)
    frozen = study.tell(trial, [0.95, 12.0])
    notes.save_trial_note(study, frozen)
    assert _stored_note(study, frozen._trial_id).startswith(f"### Trial 0: {FAMILIES}")
    # A record that does not parse: no note, one warning, no exception for the worker.
    bad = study.ask()
    bad.set_user_attr(record.BYTES, "many")
    notes.save_trial_note(study, study.tell(bad, [0.5, 2.0]))
    assert _stored_note(study, bad._trial_id) == ""
    assert "trial 1: no dashboard note" in caplog.text
    assert notes.save_study_note(study)
    assert _stored_note(study, None).startswith(f"## {study.study_name}")
