"""The shared technique suite: every registered technique must pass it.

Adding a technique means adding one module to ``spaces/`` that registers itself; discovery
finds it and this file picks it up through the registry.
"""

from __future__ import annotations

import copy
import json

import optuna
import pytest
import torch
from torch import nn

from models.errors import UnknownNameError
from models.registry import create_model, get_model_info
from models.train import evaluate_split, train
from spaces.plan import Plan, Step, apply_plan
from spaces.registry import ApplyContext, get_technique, list_techniques
from storage.codec import decode, encode

TECHNIQUES = list_techniques()
MODELS = ["lenet300", "resnet_mini"]


def _inputs(model_name: str, n: int = 8) -> torch.Tensor:
    spec = get_model_info(model_name).data_spec
    return torch.randn(n, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(0))


def _ctx(model_name: str) -> ApplyContext:
    return ApplyContext(calibration=lambda: iter([_inputs(model_name, 32) for _ in range(3)]))


def _compressed(model_name: str, technique: str, config: object, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(model_name).eval()
    plan = Plan((Step(technique, config),))  # type: ignore[arg-type]
    applied = apply_plan(model, plan, _ctx(model_name))
    applied.finalize()
    return model.eval()


def test_registry_lists_every_stage() -> None:
    assert set(TECHNIQUES) >= {"int"}
    with pytest.raises(UnknownNameError, match="known: .*int"):
        get_technique("nope")


@pytest.mark.parametrize("name", TECHNIQUES)
def test_config_round_trips_through_dict_and_json(name: str) -> None:
    t = get_technique(name)
    for cfg in [*t.settings(), t.moderate()]:
        d = json.loads(json.dumps(cfg.to_dict()))
        assert d["version"] == cfg.VERSION
        assert t.config_from_dict(d) == cfg


@pytest.mark.parametrize("name", TECHNIQUES)
def test_config_round_trips_through_trial_params(name: str) -> None:
    t = get_technique(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(5):
        trial = study.ask()
        cfg = t.suggest(trial, "w")
        assert all(k.startswith("w.") for k in trial.params), trial.params
        assert t.suggest(optuna.trial.FixedTrial(trial.params), "w") == cfg
        study.tell(trial, 0.0)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("name", TECHNIQUES)
def test_apply_keeps_shapes_and_codec_reproduces_logits(name: str, model_name: str) -> None:
    t = get_technique(name)
    x = _inputs(model_name)
    reference = create_model(model_name).eval()(x)
    model = _compressed(model_name, name, t.moderate())
    with torch.no_grad():
        out = model(x)
        assert out.shape == reference.shape
        assert torch.isfinite(out).all()
        decoded = decode(encode(model))
        again = decoded(x)
    rel = (again - out).norm() / out.norm().clamp_min(1e-12)
    assert rel <= 1e-5, f"{name} on {model_name}: decoded logits differ (rel {rel:.2e})"


@pytest.mark.parametrize("name", TECHNIQUES)
def test_measured_size_shrinks_as_setting_tightens(name: str) -> None:
    t = get_technique(name)
    sizes = [len(encode(_compressed("lenet300", name, cfg))) for cfg in t.settings()]
    assert len(sizes) >= 2
    if t.stage == "activations":
        # Activation quantization changes accuracy and BitOPs, not the weights' bytes: the sizes
        # differ only by a few bytes of clipping values and header per layer.
        baseline = len(encode(create_model("lenet300")))
        assert max(sizes) - min(sizes) <= 256 and abs(sizes[0] - baseline) <= 256, (sizes, baseline)
        return
    assert all(a >= b for a, b in zip(sizes, sizes[1:], strict=False)), sizes
    assert sizes[0] > sizes[-1], sizes
    baseline = len(encode(create_model("lenet300")))
    if t.stage != "activations":  # activation quantization changes accuracy and BitOPs, not bytes
        assert sizes[-1] < baseline


@pytest.mark.parametrize("name", TECHNIQUES)
def test_moderate_setting_keeps_accuracy_after_finetune(name: str, digits_baseline) -> None:
    t = get_technique(name)
    base = digits_baseline
    model = base.fresh()
    plan = Plan((Step(name, t.moderate()),))
    data = base.data
    calib = lambda: iter([data.x_train[i : i + 128].float() for i in range(0, 384, 128)])  # noqa: E731
    applied = apply_plan(model, plan, ApplyContext(calibration=lambda: (
        (xb - 255 * torch.tensor(data.spec.mean).view(1, -1, 1, 1)) / (255 * torch.tensor(data.spec.std).view(1, -1, 1, 1))
        for xb in calib()
    )))
    train(model, data, base.preset.finetune, device=torch.device("cpu"), hooks=applied.hooks)
    applied.finalize()
    baseline_acc = evaluate_split(base.model, data, "test")
    acc = evaluate_split(model, data, "test")
    assert acc >= baseline_acc - 0.02, f"{name} {t.moderate()}: {acc:.4f} vs baseline {baseline_acc:.4f}"
    decoded = decode(encode(model))
    assert abs(evaluate_split(decoded, data, "test") - acc) < 1e-9
    # The compressed artifact is really smaller (activation quantization aside).
    if t.stage != "activations":
        assert len(encode(model)) < len(encode(copy.deepcopy(base.model)))
