"""objectives.size: bytes, compression ratio, size breakdown and BitOPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.registry import create_model
from objectives.size import bitops, layer_macs, measure
from spaces.actquant import ActQuantConfig
from spaces.intk import IntConfig
from spaces.plan import Plan, Step, apply_plan
from spaces.policy import LayerPolicy
from spaces.registry import ApplyContext
from storage.codec import encode

UNPROTECTED = LayerPolicy(keep_first=False, keep_last=False)
LENET300_MACS = 784 * 300 + 300 * 100 + 100 * 10


def _compress(model: nn.Module, steps: tuple[Step, ...], policy: LayerPolicy, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    plan = Plan(steps, policy=policy)
    calib = lambda: iter([torch.randn(16, *shape[1:]) for _ in range(2)])  # noqa: E731
    applied = apply_plan(model, plan, ApplyContext(policy=policy, calibration=calib))
    applied.finalize()
    return model.eval()


def _lenet300() -> nn.Module:
    torch.manual_seed(0)
    return create_model("lenet300").eval()


def test_ratio_of_a_model_to_itself_is_one() -> None:
    model = _lenet300()
    size = measure(model)
    assert size.artifact == encode(model)
    assert size.ratio(size.bytes) == 1.0
    with pytest.raises(ValueError, match="baseline bytes"):
        size.ratio(0)


def test_int4_lenet300_ratio_is_the_byte_quotient() -> None:
    baseline = _lenet300()
    model = _compress(_lenet300(), (Step("int", IntConfig(bits=4)),), UNPROTECTED, (1, 1, 28, 28))
    ratio = measure(model).ratio(measure(baseline).bytes)
    assert ratio == len(encode(baseline)) / len(encode(model))
    assert 6.0 < ratio < 8.0, ratio


def test_breakdown_sums_to_the_artifact_size() -> None:
    model = _compress(_lenet300(), (Step("int", IntConfig(bits=4)),), LayerPolicy(), (1, 1, 28, 28))
    size = measure(model)
    parts = size.breakdown
    assert set(parts) == {"fc1", "fc2", "fc3", "(header)"}
    assert sum(parts.values()) == size.bytes == len(encode(model))


def test_bitops_of_one_linear_layer() -> None:
    shape = (1, 10)
    assert bitops(nn.Sequential(nn.Linear(10, 5)), shape) == 50 * 32 * 32
    quantized = _compress(
        nn.Sequential(nn.Linear(10, 5)),
        (Step("int", IntConfig(bits=4)), Step("actquant", ActQuantConfig(format="int8"))),
        UNPROTECTED, shape,
    )
    assert bitops(quantized, shape) == 50 * 4 * 8


def test_bitops_of_lenet300_count_every_layer_and_the_policy() -> None:
    shape = (1, 1, 28, 28)
    assert sum(layer_macs(_lenet300(), shape).values()) == LENET300_MACS
    assert bitops(_lenet300(), shape) == LENET300_MACS * 32 * 32
    # Default policy: fc1 holds 88% of the weights, so it is not protected (max_share): int4
    # weights and int8 inputs alike (one layer policy for weights and activations); fc3 is
    # protected and keeps int8 weights.
    model = _compress(
        _lenet300(), (Step("int", IntConfig(bits=4)), Step("actquant", ActQuantConfig(format="int8"))),
        LayerPolicy(), shape,
    )
    assert bitops(model, shape) == 784 * 300 * 4 * 8 + 300 * 100 * 4 * 8 + 100 * 10 * 8 * 8
    assert bitops(model, (4, 1, 28, 28)) == bitops(model, shape)  # per example


def test_macs_of_grouped_and_depthwise_convs() -> None:
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 8 * 4*4 outputs * 9
        nn.Conv2d(8, 4, 3, padding=1, groups=2),  # 4 * 16 outputs * (8/2 * 9)
        nn.Conv2d(4, 6, 1, stride=2),  # 6 * 2*2 outputs * 4
    )
    macs = layer_macs(model, (2, 8, 4, 4))
    assert macs == {"0": 8 * 16 * 9, "1": 4 * 16 * 36, "2": 6 * 4 * 4}


def test_sparse_bitops_scale_by_density() -> None:
    model = _compress(_lenet300(), (Step("int", IntConfig(bits=4)),), UNPROTECTED, (1, 1, 28, 28))
    for m in model.modules():
        if hasattr(m, "set_mask"):
            mask = torch.zeros_like(m.weight, dtype=torch.bool)
            mask.view(-1)[::4] = True
            m.set_mask(mask)
    dense = bitops(model, (1, 1, 28, 28))
    assert bitops(model, (1, 1, 28, 28), sparse=True) == pytest.approx(dense / 4, rel=1e-3)
