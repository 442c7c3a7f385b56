"""Unstructured magnitude pruning: exact sparsity, protection, masks during training, the
gradual schedule, the codec, config validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.errors import UserError
from models.registry import create_model
from models.train import train
from spaces.layers import CConv2d, CLinear
from spaces.plan import Plan, Step, apply_plan
from spaces.policy import LayerPolicy
from spaces.prune import (
    PruneConfig,
    PruneHook,
    PruneState,
    gradual_sparsity,
    magnitude_masks,
    masked_layers,
    schedule_points,
    sparsity_of,
)
from spaces.registry import ApplyContext, get_technique
from storage.codec import decode, encode

PRUNE = get_technique("prune")


def _pruned(model_name: str, config: PruneConfig, policy: LayerPolicy | None = None) -> nn.Module:
    return _pruned_with_state(model_name, config, policy)[0]


def _pruned_with_state(model_name: str, config: PruneConfig, policy: LayerPolicy | None = None) -> tuple[nn.Module, PruneState]:
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    state = PRUNE.apply(model, config, ApplyContext(policy=policy or LayerPolicy()))
    return model, state


def _pruned_count(m: nn.Module) -> int:
    return int((~m.mask).sum())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_exact_sparsity_on_eligible_layers_and_protected_untouched(scope: str) -> None:
    torch.manual_seed(0)
    reference = create_model("resnet_mini")
    model = _pruned("resnet_mini", PruneConfig(sparsity=0.6, scope=scope))
    eligible = dict(LayerPolicy().eligible(model))
    assert set(eligible) == {n for n, m in model.named_modules() if m in masked_layers(model)}
    total = sum(m.weight.numel() for m in eligible.values())
    assert sum(_pruned_count(m) for m in eligible.values()) == round(0.6 * total)
    if scope == "layer":
        for m in eligible.values():
            assert _pruned_count(m) == round(0.6 * m.weight.numel())
    for m in eligible.values():  # pruned shadow weights are zero, kept ones are the largest
        assert (m.weight[~m.mask] == 0).all()
    for path in LayerPolicy().protected_paths(model):
        layer = model.get_submodule(path)
        assert not isinstance(layer, CConv2d | CLinear) or layer.mask is None
        assert torch.equal(layer.weight, reference.get_submodule(path).weight)


def test_global_threshold_is_one_magnitude_across_layers() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    with torch.no_grad():
        a.weight.copy_(torch.arange(16.0).view(4, 4))
        b.weight.copy_(torch.arange(16.0, 32.0).view(4, 4))
    ka, kb = magnitude_masks([a, b], 0.5, "global")
    assert not ka.any() and kb.all()
    la, lb = magnitude_masks([a, b], 0.5, "layer")
    assert int(la.sum()) == int(lb.sum()) == 8


def test_exact_count_despite_ties() -> None:
    layer = nn.Linear(10, 10)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    (keep,) = magnitude_masks([layer], 0.37, "global")
    assert int((~keep).sum()) == 37


def test_pruned_weights_stay_zero_while_training(digits_baseline) -> None:
    base = digits_baseline
    model = base.fresh()
    config = PruneConfig(sparsity=0.8)
    applied = apply_plan(model, Plan((Step("prune", config),)), ApplyContext())
    hooks = applied.hooks
    before = {id(m): m.mask.clone() for m in masked_layers(model)}
    train(model, base.data, base.preset.finetune.replace(epochs=1), device=torch.device("cpu"), hooks=hooks)
    layers = masked_layers(model)
    assert layers and all(torch.equal(m.mask, before[id(m)]) for m in layers)
    assert all((m.weight[~m.mask] == 0).all() for m in layers)
    assert sparsity_of(layers) == pytest.approx(0.8, abs=1e-4)


def test_gradual_schedule_is_cubic_monotone_and_reaches_target() -> None:
    end = 60
    values = [gradual_sparsity(0.9, t, end) for t in range(0, 100)]
    assert values[0] == 0.0
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert values[end] == values[-1] == 0.9
    assert values[end - 1] < 0.9
    assert gradual_sparsity(0.9, 30, 60) == pytest.approx(0.9 * (1 - 0.5**3))
    assert gradual_sparsity(0.5, 0, 0) == 0.5


def test_gradual_hook_prunes_on_schedule() -> None:
    config = PruneConfig(sparsity=0.8, schedule="gradual")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    state = PRUNE.apply(model, config, ApplyContext(policy=LayerPolicy(max_share=1.0)))  # protect both ends
    layers = masked_layers(model)
    assert len(layers) == 1 and sparsity_of(layers) == 0.0  # all-ones masks right after apply
    total = 100
    end, interval = schedule_points(total)
    assert end == 75 and 1 < interval < end
    hook, seen = PruneHook(config, state), []
    for step in range(total):
        with torch.no_grad():  # stand-in for training: perturb every weight a little
            for m in layers:
                m.weight.add_(1e-3 * torch.randn_like(m.weight))
        hook.after_step(model, step, total)
        seen.append(sparsity_of(layers))
        assert all((m.weight[~m.mask] == 0).all() for m in layers)
    assert all(a <= b for a, b in zip(seen, seen[1:], strict=False))
    for step, s in enumerate(seen):  # the value of the latest update (every interval steps)
        done = step + 1
        last = end if done >= end else done - done % interval
        assert s == pytest.approx(gradual_sparsity(0.8, last, end), abs=0.5 / 4096), step
    assert seen[interval - 2] == 0.0 < seen[interval - 1] and seen[end // 2] < 0.8 * 0.9
    assert seen[end - 1] == pytest.approx(0.8, abs=0.5 / 4096)
    assert seen[-1] == pytest.approx(0.8, abs=0.5 / 4096)


def test_gradual_apply_tells_later_steps_when_the_masks_are_final() -> None:
    ctx = ApplyContext()
    PRUNE.apply(create_model("lenet300"), PruneConfig(sparsity=0.8), ctx)
    assert ctx.masks_final_step is None  # oneshot: the masks are final at apply
    PRUNE.apply(create_model("lenet300"), PruneConfig(sparsity=0.8, schedule="gradual"), ctx)
    assert ctx.masks_final_step is not None
    for total in (1, 7, 100, 12345):
        assert ctx.masks_final_step(total) == schedule_points(total)[0]


def test_finalize_reaches_target_without_finetune() -> None:
    config = PruneConfig(sparsity=0.7, scope="layer", schedule="gradual")
    model, state = _pruned_with_state("lenet300", config)
    PRUNE.finalize(model, config, state)
    for m in masked_layers(model):
        assert _pruned_count(m) == round(0.7 * m.weight.numel())


def test_codec_size_and_mask_round_trip() -> None:
    dense = len(encode(create_model("lenet300")))
    policy = LayerPolicy(keep_first=False)  # LeNet-300's first layer holds 88% of its weights
    model = _pruned("lenet300", PruneConfig(sparsity=0.9), policy)
    size = len(encode(model))
    assert size < 0.25 * dense, (size, dense)
    decoded = decode(encode(model))
    masks = {n: m.mask for n, m in model.named_modules() if m in masked_layers(model)}
    assert masks
    for name, mask in masks.items():
        assert torch.equal(decoded.get_submodule(name).mask, mask)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(decoded(x), model(x), atol=1e-6)


def test_mask_survives_a_later_weight_representation() -> None:
    plan = Plan((Step("prune", PruneConfig(sparsity=0.8)), Step("int", get_technique("int").moderate())))
    torch.manual_seed(0)
    model = create_model("lenet300").eval()
    applied = apply_plan(model, plan, ApplyContext())
    applied.finalize()
    layers = masked_layers(model)
    assert layers and all((m.effective_weight()[~m.mask] == 0).all() for m in layers)
    decoded = decode(encode(model))
    for name, m in model.named_modules():
        if m in layers:
            assert torch.equal(decoded.get_submodule(name).mask, m.mask)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [({"sparsity": 1.2}, "1.2"), ({"sparsity": -0.1}, "-0.1"), ({"scope": "net"}, "net"), ({"schedule": "cubic"}, "cubic")],
)
def test_invalid_config_names_the_value(kwargs: dict, bad: str) -> None:
    with pytest.raises(UserError, match=bad):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("schedule", ["oneshot", "gradual"])
def test_per_layer_sparsity_is_reached_exactly_in_each_overridden_layer(schedule: str) -> None:
    config = PruneConfig(sparsity=0.5, scope="global", schedule=schedule)
    plan = Plan((Step("prune", config, {"fc1": {"sparsity": 0.92}, "fc2": {"sparsity": 0.6}}),),
                LayerPolicy(keep_first=False, keep_last=False))
    torch.manual_seed(0)
    model = create_model("lenet300")
    applied = apply_plan(model, plan)
    applied.finalize()
    for name, target in (("fc1", 0.92), ("fc2", 0.6), ("fc3", 0.5)):
        m = model.get_submodule(name)
        assert _pruned_count(m) == round(target * m.weight.numel()), name
