"""fp16 / fp8 weights: exact values after decode, stored bytes, scales, family labels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.errors import UserError
from models.registry import create_model
from spaces.floats import FloatConfig, FloatRepr
from spaces.layers import CLinear
from spaces.plan import Plan, Step, apply_plan
from spaces.registry import ApplyContext
from storage.codec import decode, encode, encode_with_report

LAYERS = {"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100)}  # lenet300 (out, in)


def _float_model(fmt: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("lenet300").eval()
    plan = Plan((Step("float", FloatConfig(fmt)),))
    applied = apply_plan(model, plan, ApplyContext())
    applied.finalize()
    return model.eval()


def test_fp16_weights_are_exact_after_decode() -> None:
    torch.manual_seed(0)
    original = create_model("lenet300")
    decoded = decode(encode(_float_model("fp16")))
    for name in LAYERS:
        layer = getattr(decoded, name)
        assert isinstance(layer, CLinear) and isinstance(layer.weight_repr, FloatRepr)
        expected = getattr(original, name).weight.detach().half().float()
        assert torch.equal(layer.weight.detach(), expected)
        assert torch.equal(layer.effective_weight().detach(), expected)


@pytest.mark.parametrize("fmt,fmax,dtype", [("fp8_e4m3", 448.0, torch.float8_e4m3fn), ("fp8_e5m2", 57344.0, torch.float8_e5m2)])
def test_fp8_values_are_scaled_channel_maxima_and_representable(fmt: str, fmax: float, dtype: torch.dtype) -> None:
    decoded = decode(encode(_float_model(fmt)))
    for name in LAYERS:  # protected layers keep fp8: it has 8 bits
        layer = getattr(decoded, name)
        rep = layer.weight_repr
        assert isinstance(rep, FloatRepr) and rep.format == fmt
        values = layer.weight.detach() / rep.scale[:, None]
        assert torch.allclose(values.abs().amax(1), torch.full((values.shape[0],), fmax), rtol=1e-6)
        assert torch.allclose(values.to(dtype).float(), values, rtol=1e-6, atol=0)


def test_stored_bytes_are_two_per_weight_for_fp16_and_one_plus_scales_for_fp8() -> None:
    data16, report16 = encode_with_report(_float_model("fp16"))
    data8, report8 = encode_with_report(_float_model("fp8_e4m3"))
    for name, (out, inp) in LAYERS.items():
        assert report16[name] == 2 * out * inp + 4 * out  # fp16 weights + fp32 bias
        assert report8[name] == out * inp + 4 * out + 4 * out  # fp8 weights + fp32 scales + bias
    weights = sum(o * i for o, i in LAYERS.values())
    scales = 4 * sum(o for o, _ in LAYERS.values())
    header_delta = report8["(header)"] - report16["(header)"]
    assert 0 <= header_delta < 64  # the scales' stream entries
    assert len(data16) - len(data8) == weights - scales - header_delta


def test_straight_through_gradient_and_rounding() -> None:
    w = torch.tensor([[0.1, -0.3333, 1e-3]], requires_grad=True)
    for fmt in ("fp16", "fp8_e4m3"):
        rep = FloatRepr.fit(w.detach(), fmt)
        out = rep(w)
        assert not torch.equal(out.detach(), w.detach())  # really rounded
        (out * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
        assert torch.equal(w.grad, torch.tensor([[1.0, 2.0, 3.0]]))
        w.grad = None


def test_fp8_clamps_out_of_range_weights_instead_of_nan() -> None:
    rep = FloatRepr.fit(torch.tensor([[1.0, -0.5]]), "fp8_e4m3")
    out = rep(torch.tensor([[3.0, -0.5]]))  # grew past the fitted channel maximum
    assert torch.isfinite(out).all() and out[0, 0] == 1.0


def test_family_follows_the_format() -> None:
    assert Plan((Step("float", FloatConfig("fp16")),)).families == "fp16"
    assert Plan((Step("float", FloatConfig("fp8_e5m2")),)).families == "fp8"


def test_unknown_format_names_the_bad_value() -> None:
    with pytest.raises(UserError, match="float.format .*'fp4'"):
        FloatConfig("fp4")
