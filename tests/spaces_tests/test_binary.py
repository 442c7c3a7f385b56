"""Binary weights: two magnitudes per channel, 1-bit codes, scales, STE and clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.errors import UserError
from models.registry import create_model
from spaces.binary import BinaryConfig, BinaryRepr, ClipShadowWeights, sign_ste
from spaces.intk import IntRepr
from spaces.layers import CLinear
from spaces.plan import Plan, Step, apply_plan
from spaces.prune import PruneConfig
from spaces.registry import ApplyContext
from storage.codec import decode, encode, encode_with_report


def _binary_model(config: BinaryConfig, *before: Step) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("lenet300").eval()
    plan = Plan((*before, Step("binary", config)))
    applied = apply_plan(model, plan, ApplyContext())
    applied.finalize()
    return model.eval()


@pytest.mark.parametrize("scale", ["channel", "tensor"])
def test_effective_weights_take_two_values_per_scale(scale: str) -> None:
    model = decode(encode(_binary_model(BinaryConfig(scale))))
    w = model.fc2.effective_weight().detach()
    rows = w if scale == "channel" else w.reshape(1, -1)
    for row in rows:
        assert row.unique().numel() == 2 and row.abs().unique().numel() == 1
    assert w.abs().unique().numel() == (100 if scale == "channel" else 1)
    # The protected last layer gets int8 instead of 1 bit; fc1 holds 88% of the weights, so the
    # policy (max_share) does not protect it.
    rep = model.fc3.weight_repr
    assert isinstance(rep, IntRepr) and rep.bits == 8
    assert not isinstance(model.fc1.weight_repr, IntRepr)


def test_alpha_is_the_mean_magnitude_of_each_channel() -> None:
    torch.manual_seed(0)
    original = create_model("lenet300").fc2.weight.detach()
    rep = _binary_model(BinaryConfig()).fc2.weight_repr
    assert isinstance(rep, BinaryRepr)
    assert torch.allclose(rep.alpha, original.abs().mean(1))


def test_codes_take_one_bit_per_weight() -> None:
    _, report = encode_with_report(_binary_model(BinaryConfig()))
    n, out = 100 * 300, 100
    # 1-bit sign codes (zstd may shrink them) + fp32 alpha per channel + fp32 bias.
    assert report["fc2"] <= math.ceil(n / 8) + 4 * out + 4 * out
    assert report["fc2"] >= 4 * out + 4 * out  # the floats are stored raw


def test_masked_layers_binarise_only_kept_weights() -> None:
    prune = Step("prune", PruneConfig(sparsity=0.5, scope="layer"))
    model = _binary_model(BinaryConfig(), prune)
    layer = model.fc2
    assert isinstance(layer, CLinear) and layer.mask is not None
    torch.manual_seed(0)
    original = create_model("lenet300").fc2.weight.detach()
    kept = layer.mask
    expected_alpha = (original.abs() * kept).sum(1) / kept.sum(1)
    assert torch.allclose(layer.weight_repr.alpha, expected_alpha)
    w = layer.effective_weight().detach()
    assert (w[~kept] == 0).all()
    decoded = decode(encode(model))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(decoded(x), model(x), rtol=1e-5, atol=1e-6)
    _, report = encode_with_report(model)
    # Positions (a bitmap at most) + 1-bit codes of the kept weights only + alpha and bias.
    bitmap, codes = math.ceil(100 * 300 / 8), math.ceil(int(kept.sum()) / 8)
    assert report["fc2"] <= bitmap + codes + 800


def test_straight_through_estimator_cancels_the_gradient_beyond_clip() -> None:
    w = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    out = sign_ste(w, clip=1.0)
    assert torch.equal(out.detach(), torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    out.sum().backward()
    assert torch.equal(w.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_training_alpha_follows_the_weights_and_the_hook_clips_them() -> None:
    torch.manual_seed(0)
    model = create_model("lenet300")
    plan = Plan((Step("binary", BinaryConfig()),))
    applied = apply_plan(model, plan, ApplyContext())
    hooks = applied.hooks
    assert any(isinstance(h, ClipShadowWeights) for h in hooks)
    layer, rep = model.fc2, model.fc2.weight_repr
    assert isinstance(rep, BinaryRepr)
    assert rep.clip == pytest.approx(float(layer.weight.detach().abs().max()))
    with torch.no_grad():
        layer.weight.mul_(3.0)
    model.train()
    layer.effective_weight()
    assert torch.allclose(rep.alpha, layer.weight.detach().abs().mean(1))
    for h in hooks:
        h.after_step(model, 0, 1)
    assert float(layer.weight.detach().abs().max()) <= rep.clip


def test_invalid_scale_names_the_bad_value() -> None:
    with pytest.raises(UserError, match="binary.scale .*'row'"):
        BinaryConfig("row")
