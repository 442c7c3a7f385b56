"""Tests for models.architectures: parameter counts, shapes, overrides, fx tracing, registry."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from models.errors import UnknownNameError
from models.registry import create_model, get_model_info, list_models

# Exact parameter counts with the DataSpec defaults (10 classes).
EXPECTED_PARAMS = {
    "resnet18": 11_173_962,
    "mobilenetv2": 2_296_922,
    "wrn16_4": 2_748_890,
    "lenet300": 266_610,
    "lenet5": 431_080,
    "digits_cnn": 188_394,
}
NAMES = sorted(EXPECTED_PARAMS)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _input(name: str, batch: int = 2, channels: int | None = None) -> torch.Tensor:
    spec = get_model_info(name).data_spec
    c = spec.channels if channels is None else channels
    return torch.randn(batch, c, spec.size, spec.size, generator=torch.Generator().manual_seed(0))


def _head(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_list_models_contains_all() -> None:
    assert set(NAMES) <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count(name: str) -> None:
    assert _num_params(create_model(name)) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_finite(name: str) -> None:
    model = create_model(name)
    model.eval()
    with torch.no_grad():
        out = model(_input(name))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_backward(name: str) -> None:
    model = create_model(name)
    model.train()
    loss = model(_input(name)).logsumexp(dim=1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_num_classes_changes_head(name: str) -> None:
    base = create_model(name)
    model = create_model(name, num_classes=100)
    head = _head(model)
    assert head.out_features == 100
    # Only the head grows: 90 more rows of weights and biases.
    assert _num_params(model) - _num_params(base) == 90 * (head.in_features + 1)
    model.eval()
    with torch.no_grad():
        assert model(_input(name)).shape == (2, 100)


@pytest.mark.parametrize("name", NAMES)
def test_in_channels_override(name: str) -> None:
    default = get_model_info(name).data_spec.channels
    other = 1 if default == 3 else 3
    model = create_model(name, in_channels=other)
    model.eval()
    with torch.no_grad():
        out = model(_input(name, channels=other))
    assert out.shape == (2, 10)
    with pytest.raises(RuntimeError):
        model(_input(name, channels=default))


@pytest.mark.parametrize("name", NAMES)
def test_fx_traceable(name: str) -> None:
    model = create_model(name)
    model.eval()
    traced = fx.symbolic_trace(model)
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("name", NAMES)
def test_layer_conventions(name: str) -> None:
    """Weighted layers are standard modules, convs before BN have no bias, and no inplace ReLU."""
    model = create_model(name)
    named = dict(model.named_modules())
    owned = {id(p) for m in named.values() for p in m.parameters(recurse=False)}
    assert owned == {id(p) for p in model.parameters()}
    for m in named.values():
        if type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d):
            continue
        assert not list(m.parameters(recurse=False)), f"raw parameters in {type(m).__name__}"
        if isinstance(m, nn.ReLU | nn.ReLU6):
            assert not m.inplace
    # A conv feeding a BN (per the traced graph) has no bias.
    graph = fx.symbolic_trace(model).graph
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(named[node.target], nn.BatchNorm2d):
            src = node.args[0]
            if src.op == "call_module" and isinstance(named[src.target], nn.Conv2d):
                assert named[src.target].bias is None, f"{src.target} feeds a BN but has a bias"


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_model("nope")
    message = str(info.value)
    assert "nope" in message
    for name in NAMES:
        assert name in message


def test_data_specs() -> None:
    for name in ("resnet18", "mobilenetv2", "wrn16_4"):
        spec = get_model_info(name).data_spec
        assert (spec.channels, spec.size, spec.num_classes, spec.augment) == (3, 32, 10, True)
    for name in ("lenet300", "lenet5"):
        spec = get_model_info(name).data_spec
        assert (spec.channels, spec.size, spec.num_classes, spec.augment) == (1, 28, 10, False)
    spec = get_model_info("digits_cnn").data_spec
    assert (spec.channels, spec.size, spec.num_classes, spec.augment) == (1, 8, 10, False)


def test_digits_spec_matches_data() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    pixels = torch.tensor(datasets.load_digits().data / 16.0)
    spec = get_model_info("digits_cnn").data_spec
    assert spec.mean[0] == pytest.approx(pixels.mean().item(), abs=1e-3)
    assert spec.std[0] == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-3)


def test_digits_cnn_learns_digits() -> None:
    """A few epochs of CPU training (about a second) reach > 95% held-out accuracy."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    spec = get_model_info("digits_cnn").data_spec
    x = (
        torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1) - spec.mean[0]
    ) / spec.std[0]
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test_idx, train_idx = perm[:360], perm[360:]
    model = create_model("digits_cnn")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        model.train()
        order = train_idx[torch.randperm(len(train_idx))]
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    assert acc > 0.95
