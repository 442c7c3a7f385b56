"""search.early_stopping: the headroom estimate and the StopHook's decisions, on synthetic
studies (finished trials added directly, the running one from ``study.ask()``; no training)."""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState, create_trial

from models.train import EpochRecord
from objectives import record
from objectives.objective import CurveRecorder, Objective, is_exportable
from objectives.pipeline import Workbench
from search import run as run_cli
from search.early_stopping import ParetoStopper, StopHook, StopRule, gains_after, headroom
from search.progress import front_trials, study_stats
from search.studies import StudyConfig
from spaces.plan import get_study_space
from storage.codec import encode
from storage.studies import open_artifact_store

MIN = 3  # min_curves of the rule under test
# A finished curve of this shape gains 0.05 from epoch 1 and 0.02 from epoch 2 to its end.
CURVE = [0.85, 0.88, 0.90]


def test_headroom_is_a_quantile_of_the_gains_near_the_level() -> None:
    rule = StopRule(min_curves=3, window=0.05, quantile=0.5)
    points = [(0.50, 0.30), (0.52, 0.10), (0.48, 0.20), (0.90, 0.01), (0.70, 0.4)]
    assert headroom(points, 0.50, rule) == pytest.approx(0.20)  # median of 0.10, 0.20, 0.30
    assert headroom(points, 0.50, StopRule(min_curves=3, window=0.05, quantile=1.0)) == pytest.approx(0.30)
    assert headroom(points, 0.90, rule) is None  # one curve near 0.90: too few
    assert headroom([], 0.5, rule) is None


def test_gains_run_to_the_recorded_value() -> None:
    t = _finished(0.93, 2.0, curve=[0.80, 0.90])
    assert gains_after([t], 1) == [(0.80, pytest.approx(0.13))]
    assert gains_after([t], 2) == [(0.90, pytest.approx(0.03))]
    assert gains_after([t], 3) == []


def _finished(acc: float, ratio: float, family: str = "int", curve: list[float] | None = None,
              state: TrialState = TrialState.COMPLETE, **attrs: object) -> optuna.trial.FrozenTrial:
    user_attrs: dict[str, object] = {record.FAMILIES: family, record.CURVE: curve or CURVE, record.CONSTRAINTS: [0.0], **attrs}
    return create_trial(state=state, values=[acc, ratio] if state == TrialState.COMPLETE else None,
                        user_attrs=user_attrs)


def _study(*trials: optuna.trial.FrozenTrial) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"])
    for t in trials:
        study.add_trial(t)
    return study


def _hook(study: optuna.Study, ratio: float = 4.0, margin: float = 0.0) -> StopHook:
    return StopHook(StopRule(min_curves=MIN, window=0.1, quantile=1.0, margin=margin), study.ask(), ratio)


def _epoch(hook: StopHook | CurveRecorder, epoch: int, acc: float) -> bool:
    return hook.on_epoch_end(None, EpochRecord(epoch=epoch, train_loss=0.0, val_accuracy=acc, seconds=0.0))  # type: ignore[arg-type]


def _curves(n: int, family: str = "int", acc: float = 0.90, ratio: float = 1.0) -> list[optuna.trial.FrozenTrial]:
    """``n`` finished trials with full curves that do not dominate anything (low ratio)."""
    return [_finished(acc, ratio, family) for _ in range(n)]


def test_never_stops_before_min_curves_near_its_accuracy() -> None:
    # A far better trial at a higher ratio exists, but only MIN-1 curves (at 0.85 after epoch 1).
    study = _study(_finished(0.99, 8.0), *_curves(MIN - 2))
    hook = _hook(study)
    assert not _epoch(hook, 1, 0.80)
    assert not _epoch(hook, 2, 0.80)


def test_stops_once_min_curves_are_near() -> None:
    study = _study(_finished(0.99, 8.0), *_curves(MIN - 1))  # MIN curves in all
    assert _epoch(_hook(study), 1, 0.80)  # 0.99 > 0.80 + 0.05


def test_curves_at_other_accuracies_do_not_count() -> None:
    # The curves were at 0.85 after epoch 1; a trial at 0.50 has no evidence of its headroom.
    study = _study(_finished(0.99, 8.0), *_curves(2 * MIN))
    assert not _epoch(_hook(study), 1, 0.50)


def test_stops_only_beyond_accuracy_plus_headroom_plus_margin() -> None:
    study = _study(_finished(0.95, 8.0, curve=[0.95]), *_curves(MIN))
    # Headroom after epoch 1 is 0.05: 0.95 > acc + 0.05 stops exactly when acc < 0.90.
    assert not _epoch(_hook(study), 1, 0.91)
    assert _epoch(_hook(study), 1, 0.89)
    # After epoch 2 the headroom is 0.02.
    hook = _hook(study)
    assert not _epoch(hook, 1, 0.91)
    assert _epoch(hook, 2, 0.92)
    # A margin makes it more conservative.
    assert not _epoch(_hook(study, margin=0.1), 1, 0.80)
    assert _epoch(_hook(study, margin=0.1), 1, 0.79)


def test_a_better_trial_with_a_lower_ratio_does_not_stop() -> None:
    study = _study(_finished(0.99, 3.9), *_curves(MIN))
    hook = _hook(study, ratio=4.0)
    assert not _epoch(hook, 1, 0.80)
    # An equal ratio counts.
    study.add_trial(_finished(0.99, 4.0))
    assert _epoch(_hook(study, ratio=4.0), 1, 0.80)


def test_an_infeasible_dominating_trial_does_not_stop() -> None:
    study = _study(_finished(0.99, 8.0, constraints=[1.0]), *_curves(MIN))
    assert not _epoch(_hook(study), 1, 0.80)


def test_pruned_and_partial_trials_are_not_references() -> None:
    partial = [
        _finished(0.99, 8.0, state=TrialState.PRUNED),
        _finished(0.99, 8.0, stopped_at_epoch=1),  # COMPLETE with partial values (a study made with --stopped-as)
    ]
    assert not _epoch(_hook(_study(*partial, *_curves(MIN))), 1, 0.80)
    # A full-budget trial is a reference (its one-epoch curve is no evidence near 0.80).
    assert _epoch(_hook(_study(*partial, _finished(0.99, 8.0, curve=[0.99]), *_curves(MIN))), 1, 0.80)


def test_partial_curves_do_not_count_towards_headroom() -> None:
    partial = [_finished(0.85, 1.0, stopped_at_epoch=1) for _ in range(2 * MIN)]
    study = _study(_finished(0.99, 8.0), *_curves(MIN - 2), *partial)
    assert not _epoch(_hook(study), 1, 0.80)


def test_curve_is_recorded_each_epoch() -> None:
    study = _study()
    recorder = CurveRecorder(study.ask())
    for epoch, acc in enumerate([0.3, 0.5, 0.6], start=1):
        assert not _epoch(recorder, epoch, acc)  # type: ignore[arg-type]
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))[0]
        assert record.TrialRecord.from_trial(running).curve == [0.3, 0.5, 0.6][:epoch]


def test_stopper_makes_no_hook_for_a_single_epoch() -> None:
    study = _study()
    stopper = ParetoStopper(StopRule(min_curves=MIN))
    trial = study.ask()
    assert stopper.hook(trial, 4.0, 1) is None
    hook = stopper.hook(trial, 4.0, 3)
    assert isinstance(hook, StopHook) and hook.rule.min_curves == MIN
    assert ParetoStopper().rule == StopRule()


# ------------------------------------------------------------------ how a stopped trial is recorded


class _AlwaysStop(StopHook):
    """Records the curve like StopHook, then stops after the first epoch (the decision is not under test)."""

    def on_epoch_end(self, model: torch.nn.Module, record: EpochRecord) -> bool:
        super().on_epoch_end(model, record)
        return True


def _stop_after_first_epoch(trial: optuna.Trial, ratio: float, epochs: int) -> StopHook:
    return _AlwaysStop(StopRule(), trial, ratio)


def _bench(digits_baseline) -> Workbench:  # noqa: ANN001 (conftest fixture type)
    d = digits_baseline
    return Workbench(d.preset, d.data, d.fresh(), d.record, len(encode(d.model)), torch.device("cpu"), 0)


def test_a_stopped_trial_is_pruned_and_keeps_its_last_values(digits_baseline, tmp_path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective = Objective(
        _bench(digits_baseline), get_study_space("quantization"), stopper=_stop_after_first_epoch,
        artifact_store=open_artifact_store(str(tmp_path / "artifacts")),
    )
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.PRUNED and t.values is None
    r = record.TrialRecord.from_trial(t)
    assert r.stopped_at_epoch == 1 and r.epochs == 1 and len(r.curve) == 1
    assert r.artifact_id is None  # never exported, so no artifact
    assert r.stopped_values is not None and set(r.stopped_values) == {"val_accuracy", "compression_ratio"}
    assert r.stopped_values["compression_ratio"] == pytest.approx(objective.bench.baseline_bytes / r.bytes)
    assert 0.0 <= r.stopped_values["val_accuracy"] <= 1.0
    assert not is_exportable(t) and front_trials(study.trials) == []
    stats = study_stats(study, digits_baseline.record.val_accuracy)
    assert (stats.done, stats.stopped, stats.front, stats.hypervolume) == (1, 1, 0, 0.0)


def test_stopped_as_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    # Studies created with the removed option still load (the key is ignored) and resume.
    assert StudyConfig.from_dict({"space": "all", "stopped_as": "complete"}) == StudyConfig()
    assert "stopped_as" not in StudyConfig().to_dict()
    with pytest.raises(SystemExit) as exc:
        run_cli.build_parser().parse_args(["--stopped-as", "complete"])
    assert exc.value.code == 2 and "--stopped-as" in capsys.readouterr().err
