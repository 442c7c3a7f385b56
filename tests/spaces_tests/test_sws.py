"""Soft weight-sharing: the mixture prior's likelihood, its chunked gradients, the training hook,
merging, and the final snap to a sparse global codebook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from models.errors import UserError
from models.registry import create_model
from spaces.codebook import CodebookRepr
from spaces.plan import AppliedPlan, Plan, Step, apply_plan
from spaces.registry import ApplyContext
from spaces.sws import (
    SHARE,
    Mixture,
    MixturePrior,
    SoftWeightSharing,
    SWSConfig,
    SWSHook,
    mixture_nll,
    mixture_nll_reference,
)
from storage.codec import decode, encode


def _mixture(k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mu = torch.cat([torch.zeros(1), torch.linspace(-0.3, 0.3, k - 1)]).double()
    logvar = (torch.rand(k, generator=gen) * 2 - 6).double()
    logpi = torch.log_softmax(torch.randn(k, generator=gen), 0).double()
    return mu, logvar, logpi


def _naive_nll(w: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, logpi: torch.Tensor) -> float:
    """-sum_i log sum_j pi_j N(w_i | mu_j, var_j), one weight and component at a time."""
    total = 0.0
    for x in w.flatten().tolist():
        p = sum(
            math.exp(lp) * math.exp(-((x - m) ** 2) / (2 * math.exp(lv))) / math.sqrt(2 * math.pi * math.exp(lv))
            for m, lv, lp in zip(mu.tolist(), logvar.tolist(), logpi.tolist(), strict=True)
        )
        total -= math.log(p)
    return total


def test_prior_nll_equals_a_naive_reference() -> None:
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.2
    mu, logvar, logpi = _mixture()
    expected = _naive_nll(w, mu, logvar, logpi)
    assert mixture_nll_reference(w, mu, logvar, logpi).item() == pytest.approx(expected, rel=1e-9)
    assert mixture_nll(w.float(), mu.float(), logvar.float(), logpi.float(), chunk=5).item() == pytest.approx(expected, rel=1e-5)
    mask = w.abs() > 0.1
    assert mixture_nll(w.float(), mu.float(), logvar.float(), logpi.float(), mask, chunk=5).item() == pytest.approx(
        _naive_nll(w[mask], mu, logvar, logpi), rel=1e-5
    )


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_loss_and_gradients_match_the_unchunked_ones(masked: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(37, 11, generator=gen) * 0.2
    mask = (torch.rand(37, 11, generator=gen) > 0.3) if masked else None
    params0 = [t.float() for t in _mixture(k=6)]

    def run(fn, **kw):  # noqa: ANN001, ANN202
        w = w0.clone().requires_grad_()
        params = [p.clone().requires_grad_() for p in params0]
        loss = fn(w, *params, mask, **kw)
        loss.backward()
        return loss.detach(), w.grad, [p.grad for p in params]

    ref_loss, ref_gw, ref_gp = run(mixture_nll_reference)
    for chunk in (7, 64, 10_000):
        loss, gw, gp = run(mixture_nll, chunk=chunk)
        assert torch.allclose(loss, ref_loss, rtol=1e-5)
        assert torch.allclose(gw, ref_gw, rtol=1e-4, atol=1e-5)
        for a, b in zip(gp, ref_gp, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    if mask is not None:
        assert (ref_gw[~mask] == 0).all()


def _applied(config: SWSConfig, model_name: str = "lenet300") -> tuple[nn.Module, AppliedPlan]:
    torch.manual_seed(0)
    model = create_model(model_name)
    return model, apply_plan(model, Plan((Step("sws", config),)), ApplyContext())


def test_hook_param_groups_have_their_own_learning_rates_and_the_prior_is_not_in_the_model() -> None:
    config = SWSConfig(components=8, lr_means=1e-4, lr_logvar=2e-3, lr_mixing=7e-3)
    model, applied = _applied(config)
    (hook,) = applied.hooks
    assert isinstance(hook, SWSHook)
    groups = hook.param_groups(model)
    assert [g["lr"] for g in groups] == [1e-4, 2e-3, 7e-3]
    assert all(g["weight_decay"] == 0.0 for g in groups)
    prior_params = {id(p) for g in groups for p in g["params"]}
    assert len(prior_params) == 3
    assert not prior_params & {id(p) for p in model.parameters()}
    assert not any(isinstance(m, MixturePrior) for m in model.modules())
    # Each group gets a gradient from the complexity loss.
    hook.loss(model, 10, 10).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for g in groups for p in g["params"])
    assert model.fc2.weight.grad is not None


def test_complexity_weight_warms_up_linearly() -> None:
    model, applied = _applied(SWSConfig(components=4, tau=2.0, warmup=0.5))
    (hook,) = applied.hooks
    assert hook.tau(0, 100) == pytest.approx(2.0 / 50)
    assert hook.tau(24, 100) == pytest.approx(1.0)
    assert hook.tau(49, 100) == hook.tau(99, 100) == 2.0
    assert SWSHook(hook.state, SWSConfig(warmup=0.0)).tau(0, 100) == SWSConfig().tau


def test_prior_starts_at_the_kmeans_of_the_weights() -> None:
    values = np.random.default_rng(0).normal(0, 0.05, 5000)
    prior = MixturePrior.fit(values, 8, pi_zero=0.8)
    mix = Mixture.of(prior)
    assert mix.mu.size == 8 and mix.mu[0] == 0
    assert mix.pi[0] == pytest.approx(0.8) and mix.pi.sum() == pytest.approx(1.0)
    assert np.all(np.diff(mix.mu[1:]) > 0)
    assert prior.scale == pytest.approx(values.std())


def test_merge_combines_close_components_and_keeps_zero_at_zero() -> None:
    mix = Mixture(mu=np.array([0.0, 0.01, 0.2, 0.21, 0.6]), var=np.full(5, 0.05**2),
                  pi=np.array([0.6, 0.1, 0.1, 0.1, 0.1]))
    merged = mix.merged(0.5)
    assert merged.mu.size == 3
    assert merged.mu[0] == 0.0 and merged.pi[0] == pytest.approx(0.7)
    i = int(np.argmin(np.abs(merged.mu - 0.205)))
    assert merged.mu[i] == pytest.approx(0.205) and merged.pi[i] == pytest.approx(0.2)
    assert merged.var[i] == pytest.approx(0.05**2 + 0.005**2)  # moment matching
    assert merged.pi.sum() == pytest.approx(1.0)
    assert mix.merged(0.0).mu.size == 5


def test_snap_takes_the_more_likely_of_the_two_bracketing_components() -> None:
    mix = Mixture(mu=np.array([0.0, -0.05, 0.1]), var=np.array([0.01, 0.0001, 0.05]) ** 2,
                  pi=np.array([0.5, 0.25, 0.25]))
    got = mix.assign(np.array([0.0, -0.05, -0.3, 0.1, 0.5, 0.004]))
    # -0.3 is far from everything; the broad component at +0.1 would be the most likely overall,
    # but a weight never crosses zero: it takes the component at -0.05.
    assert got.tolist() == [0, 1, 1, 2, 2, 0]


def test_finalize_gives_sparse_weights_and_a_global_codebook_of_nonzero_means() -> None:
    config = SWSConfig(components=8, pi_zero=0.9)
    model, applied = _applied(config)
    x = torch.randn(4, 1, 28, 28)
    SoftWeightSharing().finalize(model, config, applied.states[0])
    reprs = {n: m.weight_repr for n, m in model.named_modules() if getattr(m, "weight_repr", None) is not None}
    assert reprs["fc3"].kind == "int"  # protected (the classifier)
    shared = [r for r in reprs.values() if isinstance(r, CodebookRepr)]
    assert {n for n, r in reprs.items() if isinstance(r, CodebookRepr)} == {"fc1", "fc2"}
    assert len({id(r.centroids) for r in shared}) == 1 and all(r.share == SHARE for r in shared)
    centroids = shared[0].centroids.detach()
    assert 2 <= centroids.numel() <= config.components - 1
    assert (centroids != 0).all() and (centroids.diff() > 0).all()
    for name in ("fc1", "fc2"):
        layer = model.get_submodule(name)
        w = layer.weight.detach()
        assert 0.05 < (~layer.mask).float().mean() < 0.95, name  # sparse, not empty
        assert (w[~layer.mask] == 0).all() and (w[layer.mask] != 0).all()
        assert torch.isin(w[layer.mask], centroids).all()
    with torch.no_grad():
        assert torch.allclose(decode(encode(model))(x), model(x), atol=1e-6)
    # Sparse positions + short indices: smaller than a dense codebook of the same k.
    from spaces.codebook import Codebook, CodebookConfig
    torch.manual_seed(0)
    dense = create_model("lenet300")
    Codebook().apply(dense, CodebookConfig(clusters=config.components - 1), ApplyContext())
    assert len(encode(model)) < len(encode(dense))


def test_finalize_keeps_an_earlier_mask() -> None:
    config = SWSConfig(components=8)
    model, applied = _applied(config)
    mask = torch.rand(model.fc2.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    model.fc2.set_mask(mask)
    SoftWeightSharing().finalize(model, config, applied.states[0])
    assert not (model.fc2.mask & ~mask).any()
    assert model.fc2.mask.sum() < mask.sum()


def test_short_training_pulls_weights_towards_the_prior() -> None:
    config = SWSConfig(components=8, tau=5.0, warmup=0.0, lr_means=1e-3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    (hook,) = apply_plan(model, Plan((Step("sws", config),)), ApplyContext()).hooks
    opt = torch.optim.SGD([{"params": list(model.parameters()), "lr": 0.05}, *hook.param_groups(model)], lr=0.05)
    first = None
    for step in range(10):
        loss = hook.loss(model, step, 10)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_config_validation_names_the_bad_value() -> None:
    with pytest.raises(UserError, match="sws.components.*100"):
        SWSConfig(components=100)
    with pytest.raises(UserError, match="sws.pi_zero"):
        SWSConfig(pi_zero=1.0)
    with pytest.raises(UserError, match="sws.tau"):
        SWSConfig(tau=-1.0)
