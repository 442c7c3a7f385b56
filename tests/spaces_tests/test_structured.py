"""Structured filter pruning: real channel removal, consistent across residuals, depthwise convs
and flatten -> linear, reproduced by the codec, composable with the later stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.errors import UserError
from models.registry import create_model, get_model_info
from spaces.intk import IntConfig
from spaces.layers import compress_layer, prunable_layers, replace_module
from spaces.plan import Plan, Step, apply_plan
from spaces.policy import LayerPolicy
from spaces.prune import PruneConfig
from spaces.registry import ApplyContext, get_technique
from spaces.structured import (
    ChannelGroup,
    StructuredConfig,
    channel_groups,
    kept_channels,
    prune_channels,
)
from storage.codec import decode, encode

RATIO = 0.5


def _inputs(model_name: str, n: int = 2) -> torch.Tensor:
    spec = get_model_info(model_name).data_spec
    return torch.randn(n, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(0))


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every conv and linear layer for ``x`` (forward hooks)."""
    total = 0

    def hook(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("model_name", ["digits_cnn", "lenet5", "resnet_mini", "mobilenetv2", "wrn16_4"])
def test_channels_really_shrink_and_codec_reproduces(model_name: str) -> None:
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    x = _inputs(model_name)
    layers_before = {p: tuple(m.weight.shape) for p, m in prunable_layers(model)}
    first, last = next(iter(layers_before)), list(layers_before)[-1]
    protected = LayerPolicy().protected_paths(model)
    assert first in protected  # small stems stay protected under the default policy
    params0, bytes0, macs0 = _params(model), len(encode(model)), _macs(model, x)

    get_technique("structured").apply(model, StructuredConfig(ratio=RATIO), ApplyContext())

    # Most weights sit in layers pruned on both sides: about (1 - ratio)^2 of them remain.
    params_frac, bytes_frac = _params(model) / params0, len(encode(model)) / bytes0
    assert 0.2 <= params_frac <= 0.35, params_frac
    assert abs(bytes_frac - params_frac) < 0.02, (bytes_frac, params_frac)
    assert _macs(model, x) < 0.6 * macs0  # the protected first conv keeps its MACs
    assert all(type(m) in (nn.Conv2d, nn.Linear) for _, m in prunable_layers(model))
    # The model input and output never change; a protected first layer keeps its shape too.
    layers_after = {p: tuple(m.weight.shape) for p, m in prunable_layers(model)}
    assert layers_after[first][1:] == layers_before[first][1:]
    assert layers_after[last][0] == layers_before[last][0]
    if first in protected:
        assert layers_after[first] == layers_before[first]
    with torch.no_grad():
        out = model(x)
        again = decode(encode(model))(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert torch.allclose(again, out, rtol=1e-5, atol=1e-6)


def _silence(model: nn.Module, group: ChannelGroup, idx: torch.Tensor) -> None:
    """Make channels ``idx`` of ``group`` exactly zero everywhere (zero filters, BN mean/shift 0)."""
    with torch.no_grad():
        for p in group.producers:
            m = model.get_submodule(p)
            m.weight[idx] = 0
            if m.bias is not None:
                m.bias[idx] = 0
        for p in group.passthrough:
            m = model.get_submodule(p)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean[idx] = 0
                m.bias[idx] = 0


@pytest.mark.parametrize(
    ("model_name", "producer"),
    [
        ("digits_cnn", "conv3"),  # flatten -> linear columns
        ("lenet5", "conv2"),  # conv with bias -> pool -> flatten -> linear
        ("resnet_mini", "layer3.0.conv2"),  # residual group with a projection shortcut
        ("mobilenetv2", "layers.1.conv1"),  # expansion -> BN -> depthwise -> BN -> projection
        ("wrn16_4", "block2.0.conv2"),  # pre-activation stage channels
    ],
)
def test_removing_dead_channels_keeps_logits(model_name: str, producer: str) -> None:
    # Channels that contribute exactly nothing are the ones pruned (zero norm), and removing them
    # must leave the function unchanged: every consumer lost exactly the matching inputs.
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # non-trivial statistics
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    group = next(g for g in channel_groups(model) if producer in g.producers)
    assert not group.blocked
    ratio = 0.5
    dead = torch.randperm(group.channels)[: group.channels - kept_channels(group.channels, ratio)]
    _silence(model, group, dead)
    x = _inputs(model_name)
    with torch.no_grad():
        reference = model(x)
    report = prune_channels(model, ratio, eligible=set(group.producers))
    assert set(report) == set(group.producers)
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-5)
    kept = model.get_submodule(producer).weight
    assert kept.shape[0] == kept_channels(group.channels, ratio)
    assert kept.flatten(1).abs().sum(1).min() > 0  # none of the dead ones survived


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.b = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.relu(self.bn(self.a(x))))


def test_kept_channels_are_the_top_norm_ones() -> None:
    model = _Tiny()
    # Filter L1 norms 5, 1, 4, 2, 6, 3.
    w = torch.tensor([[2.5, 2.5], [1.0, 0.0], [2.0, 2.0], [1.0, 1.0], [3.0, 3.0], [0.0, 3.0]])
    with torch.no_grad():
        model.a.weight.copy_(w.view(6, 2, 1, 1))
        model.bn.running_mean.copy_(torch.arange(6.0))
    b_before = model.b.weight.detach().clone()
    x = torch.randn(1, 2, 4, 4)
    prune_channels(model, 0.5, "l1", example_input=x)
    keep = torch.tensor([0, 2, 4])
    assert torch.equal(model.a.weight.view(3, 2), w[keep])
    assert torch.equal(model.bn.running_mean, keep.float())
    assert torch.equal(model.b.weight, b_before[:, keep])
    assert model.b.weight.shape == (3, 3, 1, 1) and model.b.in_channels == 3 and model.b.out_channels == 3


@pytest.mark.parametrize(("criterion", "keep"), [("l1", [0, 2, 5]), ("l2", [0, 2, 4])])
def test_criterion_picks_the_norm(criterion: str, keep: list[int]) -> None:
    # Filter 4 is concentrated (L1 2.5, L2 2.5), filter 5 spread out (L1 3, L2 2.12).
    w = torch.tensor([[5.0, 0], [0.1, 0.1], [4.0, 0], [0.2, 0.2], [0, 2.5], [1.5, 1.5]])
    model = _Tiny()
    with torch.no_grad():
        model.a.weight.copy_(w.view(6, 2, 1, 1))
    prune_channels(model, 0.5, criterion, example_input=torch.randn(1, 2, 4, 4))
    assert torch.equal(model.a.weight.view(3, 2), w[keep])


def test_rounding_keeps_at_least_one_and_multiples_of_eight() -> None:
    assert kept_channels(64, 0.3) == 48 and kept_channels(128, 0.3) == 88
    assert kept_channels(20, 0.3) == 14 and kept_channels(3, 0.9) == 1 and kept_channels(32, 0.9) == 8
    assert all(kept_channels(c, 0.9) >= 1 for c in range(1, 100))
    counts = [kept_channels(96, r / 100) for r in range(0, 91)]
    assert counts == sorted(counts, reverse=True)


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, padding=1)
        self.mid = nn.Conv2d(32, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(self.mid(torch.cat([self.a(h), self.b(h)], 1)))


def test_unknown_ops_leave_their_channels_alone() -> None:
    model = _Concat()
    report = prune_channels(model, 0.5, example_input=torch.randn(1, 3, 8, 8))
    assert set(report) == {"stem", "mid"}  # not a/b (concatenated), not head (model output)
    assert model.a.out_channels == 16 and model.a.in_channels == 4 and model.mid.in_channels == 32
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4, 8, 8)


def test_unprotected_first_layer_may_lose_outputs_but_never_inputs() -> None:
    model = create_model("digits_cnn").eval()
    ctx = ApplyContext(policy=LayerPolicy(keep_first=False))
    get_technique("structured").apply(model, StructuredConfig(ratio=0.5), ctx)
    assert model.conv1.weight.shape == (16, 1, 3, 3)
    assert model(_inputs("digits_cnn")).shape == (2, 10)


def test_uncoupled_prunes_only_single_producer_groups() -> None:
    model = create_model("resnet_mini").eval()
    get_technique("structured").apply(model, StructuredConfig(ratio=0.5, coupled=False), ApplyContext())
    assert model.layer2[0].conv1.out_channels == 16 and model.layer2[0].conv2.out_channels == 32


def test_config_validation_names_the_bad_value() -> None:
    with pytest.raises(UserError, match="ratio"):
        StructuredConfig(ratio=0.95)
    with pytest.raises(UserError, match="criterion"):
        StructuredConfig(criterion="l0")
    model = create_model("lenet5")
    replace_module(model, "conv2", compress_layer(model.conv2))
    with pytest.raises(UserError, match="first in a plan"):
        prune_channels(model, 0.3)


def test_composes_with_prune_and_int() -> None:
    torch.manual_seed(0)
    x = _inputs("resnet_mini", 4)
    sizes = {}
    for steps in [
        (Step("int", IntConfig(bits=4)),),
        (
            Step("structured", StructuredConfig(ratio=0.3)),
            Step("prune", PruneConfig(sparsity=0.5)),
            Step("int", IntConfig(bits=4)),
        ),
    ]:
        model = create_model("resnet_mini").eval()
        plan = Plan(steps)
        applied = apply_plan(model, plan)
        applied.finalize()
        data = encode(model)
        sizes[len(steps)] = len(data)
        with torch.no_grad():
            out, again = model(x), decode(data)(x)
        assert torch.isfinite(out).all()
        assert (again - out).norm() / out.norm() <= 1e-5
    assert sizes[3] < 0.5 * sizes[1]
