"""Low-rank factorisation: rank choice, SVD factors, which layers are left alone, the codec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.errors import UserError
from models.registry import create_model
from spaces.intk import IntConfig, IntRepr
from spaces.layers import CConv2d, CLinear
from spaces.lowrank import (
    LowRankConfig,
    LowRankConv2d,
    LowRankLinear,
    factorize,
    rank_for,
    singular_values,
)
from spaces.plan import Plan, Step, apply_plan
from spaces.policy import LayerPolicy
from spaces.registry import ApplyContext, get_technique
from storage.codec import decode, encode


def _apply(model: nn.Module, config: LowRankConfig, policy: LayerPolicy | None = None) -> nn.Module:
    get_technique("lowrank").apply(model, config, ApplyContext(policy=policy or LayerPolicy()))
    return model


def test_rank_from_ratio_rounds_up_and_stays_in_range() -> None:
    s = torch.linspace(10, 1, 10)
    assert rank_for(s, "ratio", 0.5, 0.9) == 5
    assert rank_for(s, "ratio", 0.25, 0.9) == 3  # ceil(2.5)
    assert rank_for(s, "ratio", 0.3, 0.9) == 3  # not 4 from 0.3 * 10 = 3.0000000000000004
    assert rank_for(s, "ratio", 0.01, 0.9) == 1
    assert rank_for(s, "ratio", 1.0, 0.9) == 10


def test_rank_from_energy_is_the_smallest_reaching_it() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 1.0])  # energies 9, 4, 1, 1 of 15
    assert rank_for(s, "energy", 0.5, 0.6) == 1  # 9/15 = 0.6 reaches 0.6
    assert rank_for(s, "energy", 0.5, 0.61) == 2
    assert rank_for(s, "energy", 0.5, 14 / 15) == 3
    assert rank_for(s, "energy", 0.5, 0.99) == 4
    assert rank_for(s, "energy", 0.5, 1.0) == 4


def test_reconstruction_error_decreases_with_rank() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    errors = []
    for r in range(1, 31):
        lr = factorize(layer, r)
        errors.append(float((lr.second.weight @ lr.first.weight - layer.weight).detach().norm()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    # Eckart-Young: the rank-r error is the norm of the discarded singular values.
    s = singular_values(layer)
    assert errors[9] == pytest.approx(float(s[10:].norm()), rel=1e-4)


@pytest.mark.parametrize("stride,padding,dilation,bias", [(1, 1, 1, False), (2, 2, 2, True)])
def test_full_rank_conv_reproduces_the_layer(stride: int, padding: int, dilation: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    lr = factorize(conv, min(10, 6 * 9))
    assert isinstance(lr, LowRankConv2d)
    assert lr.first.stride == conv.stride and lr.first.padding == conv.padding
    assert lr.second.kernel_size == (1, 1) and (lr.second.bias is not None) == bias
    x = torch.randn(2, 6, 12, 12)
    assert (lr(x) - conv(x)).abs().max() <= 1e-4


def test_full_rank_linear_reproduces_the_layer() -> None:
    torch.manual_seed(0)
    fc = nn.Linear(20, 12)
    lr = factorize(fc, 12)
    assert isinstance(lr, LowRankLinear) and lr.first.bias is None
    x = torch.randn(5, 20)
    assert (lr(x) - fc(x)).abs().max() <= 1e-4


def test_layers_that_would_not_shrink_are_left_alone() -> None:
    # lenet300: fc3 is protected (fc1 holds 88% of the weights: not protected); fc2 is 100x300, so rank 75 costs 75 * 400 = 30000
    # weights, exactly as many as the layer: it stays; rank 50 shrinks it.
    model = _apply(create_model("lenet300"), LowRankConfig(rank_ratio=0.75))
    assert type(model.fc2) is nn.Linear
    model = _apply(create_model("lenet300"), LowRankConfig(rank_ratio=0.5))
    assert isinstance(model.fc2, LowRankLinear) and model.fc2.first.out_features == 50
    assert type(model.fc3) is nn.Linear  # protected
    assert isinstance(model.fc1, LowRankLinear)  # 784x300: rank 150 shrinks it


def test_depthwise_and_grouped_convs_are_untouched() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise
        nn.Conv2d(16, 32, 3, padding=1, groups=2),  # grouped
        nn.Conv2d(32, 32, 3, padding=1),
        nn.Conv2d(32, 10, 1),
    )
    _apply(model, LowRankConfig(rank_ratio=0.25))
    assert [type(m).__name__ for m in model] == ["Conv2d", "Conv2d", "Conv2d", "LowRankConv2d", "Conv2d"]


def test_applying_twice_does_not_nest_containers() -> None:
    model = _apply(create_model("lenet300"), LowRankConfig(rank_ratio=0.25))
    _apply(model, LowRankConfig(rank_ratio=0.25))
    assert type(model.fc2.first) is nn.Linear and type(model.fc2.second) is nn.Linear


def test_energy_mode_finds_the_rank_of_a_low_rank_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.Linear(64, 64), nn.Linear(64, 10))
    with torch.no_grad():  # rank 4 plus a little noise
        model[1].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) + 1e-3 * torch.randn(64, 64))
    _apply(model, LowRankConfig(mode="energy", energy=0.999))
    assert isinstance(model[1], LowRankLinear) and model[1].first.out_features == 4


def test_codec_round_trip_with_a_later_int_step() -> None:
    torch.manual_seed(0)
    model = create_model("digits_cnn").eval()
    plan = Plan((Step("lowrank", LowRankConfig(rank_ratio=0.5)), Step("int", IntConfig(bits=4))))
    applied = apply_plan(model, plan, ApplyContext())
    applied.finalize()
    model.eval()
    assert isinstance(model.conv2, LowRankConv2d) and isinstance(model.conv2.first, CConv2d)
    assert isinstance(model.fc1.second, CLinear) and isinstance(model.fc1.second.weight_repr, IntRepr)
    decoded = decode(encode(model))
    assert isinstance(decoded.conv2, LowRankConv2d) and isinstance(decoded.conv2.second, CConv2d)
    assert isinstance(decoded.fc1.first.weight_repr, IntRepr) and decoded.fc1.first.weight_repr.bits == 4
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        out, again = model(x), decoded(x)
    assert (again - out).norm() / out.norm() <= 1e-5
    lowrank_only = create_model("digits_cnn")
    _apply(lowrank_only, LowRankConfig(rank_ratio=0.5))
    assert len(encode(model)) < len(encode(lowrank_only)) < len(encode(create_model("digits_cnn")))


@pytest.mark.parametrize(
    "kwargs", [{"mode": "svd"}, {"rank_ratio": 0.0}, {"rank_ratio": 1.5}, {"energy": 0.0}, {"rank_ratio": True}]
)
def test_invalid_config_names_the_bad_value(kwargs: dict[str, object]) -> None:
    key = next(iter(kwargs))
    with pytest.raises(UserError, match=f"lowrank.{key}"):
        LowRankConfig(**kwargs)  # type: ignore[arg-type]
