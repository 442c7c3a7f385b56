"""Soft weight-sharing: the mixture prior's likelihood (exact and chunked, or read from a table of
nodes) and its gradients against a naive reference, the training hook, merging, and the final snap
to a sparse global codebook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import spaces.sws as sws
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


def _weights(shape: tuple[int, ...], seed: int = 3) -> torch.Tensor:
    """Weights shaped like a trained layer's: a bell with heavier tails (two zero-mean normals)."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.rand(shape, generator=gen) < 0.2
    return torch.randn(shape, generator=gen) * torch.where(wide, 0.06, 0.02)


def _fitted(w: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The components of a prior initialised on ``w`` as ``apply`` does (k-means)."""
    with torch.no_grad():
        return [t.detach() for t in MixturePrior.fit(w.flatten().numpy(), k, pi_zero=0.7).components()]


def _loss_and_grads(fn, w0, params0, *args, dtype=torch.float32, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
    w = w0.clone().to(dtype).requires_grad_()
    params = [p.clone().to(dtype).requires_grad_() for p in params0]
    loss = fn(w, *params, *args, **kw)
    loss.backward()
    return loss.detach().double(), w.grad.double(), [p.grad.double() for p in params]


def _assert_close_to_reference(got, ref, n: int) -> None:  # noqa: ANN001
    """What the table promises against the exact values: the loss within 1e-3 nats per weight;
    the weights' gradients within 2% of the largest one (1% in norm); the prior's within 1% in
    norm."""
    (loss, gw, gp), (ref_loss, ref_gw, ref_gp) = got, ref
    assert abs(loss.item() - ref_loss.item()) <= 1e-3 * n
    assert (gw - ref_gw).abs().max() <= 2e-2 * ref_gw.abs().max()
    assert (gw - ref_gw).norm() <= 1e-2 * ref_gw.norm()
    for a, b in zip(gp, ref_gp, strict=True):
        assert (a - b).norm() <= 1e-2 * b.norm()


@pytest.mark.parametrize(("k", "masked"), [(4, False), (16, False), (16, True), (64, False)])
def test_table_loss_and_gradients_match_the_exact_ones(k: int, masked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # More weights than the exact evaluation takes: the training path on any real layer.
    w0 = _weights((250, 200))
    mask = (torch.rand(w0.shape, generator=torch.Generator().manual_seed(4)) > 0.3) if masked else None
    params0 = _fitted(w0 if mask is None else w0[mask], k)
    calls = []
    apply = sws._TableNLL.apply
    monkeypatch.setattr(sws._TableNLL, "apply", lambda *a: calls.append(1) or apply(*a))
    got = _loss_and_grads(mixture_nll, w0, params0, mask)
    assert calls, "the table was not used"
    ref = _loss_and_grads(mixture_nll_reference, w0, params0, mask, dtype=torch.float64)
    _assert_close_to_reference(got, ref, w0.numel())
    if mask is not None:
        assert (got[1][~mask] == 0).all()
    # table=False is the exact evaluation, whatever the size.
    exact = _loss_and_grads(mixture_nll, w0, params0, mask, table=False)
    assert len(calls) == 1
    assert exact[0].item() == pytest.approx(ref[0].item(), rel=1e-5)
    assert torch.allclose(exact[1], ref[1], rtol=1e-3, atol=1e-6 * ref[1].abs().max().item())


def test_table_handles_equal_weights_and_far_outliers() -> None:
    params0 = _fitted(_weights((100, 100)), 8)
    for w0 in (torch.full((100, 100), 0.013), torch.cat([_weights((100, 100)).flatten(), torch.tensor([-2.0, 3.0])])):
        got = _loss_and_grads(mixture_nll, w0, params0)
        ref = _loss_and_grads(mixture_nll_reference, w0, params0, dtype=torch.float64)
        assert all(torch.isfinite(t).all() for t in (got[0], got[1], *got[2]))
        _assert_close_to_reference(got, ref, w0.numel())


def test_non_finite_weights_give_nan_instead_of_an_error() -> None:
    x = torch.cat([_weights((40_000,)), torch.tensor([math.nan])])
    loss, gw, gp = _loss_and_grads(mixture_nll, x, _fitted(_weights((1000,)), 8))
    assert loss.isnan() and gw.isnan().all() and all(g.isnan().all() for g in gp)
    prior = MixturePrior.fit(_weights((1000,)).numpy(), 8, pi_zero=0.7)
    assert prior.nll([(x, None)]).isnan()


def test_the_table_is_spaced_by_the_smallest_std_and_each_weight_lies_in_its_cell() -> None:
    x = _weights((40_000,))
    lo, hi = float(x.min()), float(x.max())
    for sd in (0.001, 0.01, 1e-6):
        grid = sws._grid(lo, hi, torch.full((5,), 2 * math.log(sd)))
        assert grid.nodes & (grid.nodes - 1) == 0 and sws._MIN_NODES <= grid.nodes <= sws._MAX_NODES
        assert grid.lo == lo and grid.step * (grid.nodes - 1) == pytest.approx(hi - lo)
        if grid.nodes < sws._MAX_NODES:
            assert grid.step <= sws._SPACING * sd < 2 * grid.step or grid.nodes == sws._MIN_NODES
        (cells,) = grid.cells((x,))
        cell = cells.long()
        assert cells.dtype == torch.int32 and 0 <= int(cell.min()) and int(cell.max()) < grid.nodes * grid.sub
        width = grid.step / grid.sub
        centre = lo + (cell // grid.sub).double() * grid.step + ((cell % grid.sub).double() - (grid.sub - 1) / 2) * width
        assert ((x.double() - centre).abs() <= 0.5 * width * (1 + 1e-2) + 1e-9).all()


def test_device_path_of_the_table_agrees_with_the_host_path() -> None:
    # What an accelerator runs (the range kept on the device, counts by scatter-add), on the CPU.
    x = _weights((40_000,))
    logvar = torch.full((5,), 2 * math.log(0.002))
    lo, hi = sws._ranges((x,), host=True)
    lo_t, hi_t = sws._ranges((x,), host=False)
    assert (lo_t.item(), hi_t.item()) == (lo, hi)
    host, device = sws._grid(lo, hi, logvar), sws._grid(lo_t, hi_t, logvar)
    assert device.nodes == sws._DEVICE_NODES and device.lo.item() == lo
    (cells,) = host.cells((x,))
    n = host.nodes * host.sub
    assert torch.equal(sws._node_counts(cells, n).float(), sws._node_counts(cells, n, scatter=True))
    (cells_t,) = device.cells((torch.cat([x, torch.tensor([math.nan, math.inf])]),))
    assert cells_t.min() >= 0 and cells_t.max() < device.nodes * device.sub
    assert sws._grid(0.0, math.nan, logvar) is None


def test_prior_parameters_gradients_by_hand_equal_autograds() -> None:
    gen = torch.Generator().manual_seed(5)
    means, logits = torch.randn(7, generator=gen), torch.randn(7, generator=gen)
    logvars = torch.tensor([-7.0, -5.0, -3.0, -1.0, 0.0, 0.5, -6.5, -2.0])  # some beyond the clamp
    params = [t.clone().requires_grad_() for t in (means, logvars, logits)]
    outs = MixturePrior.formulas(*params, 0.8, 0.03)
    upstream = [torch.randn(8, generator=gen) for _ in range(3)]
    torch.autograd.backward(outs, upstream)
    by_hand = MixturePrior.formulas_backward(*upstream, logvars, logits, 0.03)
    for p, g in zip(params, by_hand, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_prior_nll_matches_the_exact_one_with_the_prior_parameters_gradients() -> None:
    w0 = _weights((200, 150))
    prior = MixturePrior.fit(w0.flatten().numpy(), 16, pi_zero=0.7)
    w = w0.clone().requires_grad_()
    prior.nll([(w, None)]).backward()
    got = [p.grad.clone() for p in prior.parameters()]
    prior.zero_grad()
    w_ref = w0.double().requires_grad_()
    mu, lv, logpi = (t.double() for t in prior.components())
    mixture_nll_reference(w_ref, mu, lv, logpi).backward()
    assert (w.grad.double() - w_ref.grad).abs().max() <= 2e-2 * w_ref.grad.abs().max()
    for a, b in zip(got, (p.grad for p in prior.parameters()), strict=True):
        assert (a.double() - b.double()).norm() <= 1e-2 * b.double().norm()


def test_the_loss_weight_is_folded_into_the_table_and_any_upstream_gradient_is_applied() -> None:
    w0 = _weights((100, 120))
    prior = MixturePrior.fit(w0.flatten().numpy(), 8, pi_zero=0.7)

    def run(scale: float, upstream: float):  # noqa: ANN202
        w = w0.clone().requires_grad_()
        prior.zero_grad()
        loss = prior.nll([(w, None)], scale=scale)
        (loss * upstream).backward()
        return loss.detach(), w.grad.clone(), [p.grad.clone() for p in prior.parameters()]

    base_loss, base_gw, base_gp = run(1.0, 1.0)
    for scale, upstream in ((0.25, 1.0), (1.0, 3.0), (0.5, -2.0)):
        loss, gw, gp = run(scale, upstream)
        assert loss.item() == pytest.approx(scale * base_loss.item(), rel=1e-5)
        assert torch.allclose(gw, scale * upstream * base_gw, rtol=1e-5, atol=1e-8)
        for a, b in zip(gp, base_gp, strict=True):
            assert torch.allclose(a, scale * upstream * b, rtol=1e-4, atol=1e-6)


def test_a_reused_evaluation_is_held_until_the_weights_or_masks_change() -> None:
    layer = nn.Linear(200, 150)
    with torch.no_grad():
        layer.weight.copy_(_weights((150, 200)))
    w = layer.weight
    prior = MixturePrior.fit(w.detach().flatten().numpy(), 16, pi_zero=0.7)

    def step(reuse: bool, scale: float = 1.0, mask: torch.Tensor | None = None):  # noqa: ANN202
        w.grad = None
        prior.zero_grad()
        loss = prior.nll([(w, mask)], scale=scale, reuse=reuse)
        loss.backward()
        return loss.detach(), w.grad.clone(), [p.grad.clone() for p in prior.parameters()]

    loss0, g0, p0 = step(reuse=False)
    sd = float(torch.exp(0.5 * prior.components()[1].detach().min()))
    with torch.no_grad():  # what an optimizer step does: in place
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(6)) * 0.05 * sd)
    # Held, at the new loss weight: the loss and every gradient.
    loss1, g1, p1 = step(reuse=True, scale=0.5)
    assert loss1.item() == pytest.approx(0.5 * loss0.item())
    assert torch.allclose(g1, 0.5 * g0) and all(torch.allclose(a, 0.5 * b) for a, b in zip(p1, p0, strict=True))
    # After a small move the held gradient is still close to the exact one.
    mu, lv, logpi = (t.detach().double() for t in prior.components())
    w_ref = w.detach().double().requires_grad_()
    mixture_nll_reference(w_ref, mu, lv, logpi).backward()
    assert (2 * g1.double() - w_ref.grad).norm() <= 0.1 * w_ref.grad.norm()
    # A new evaluation whenever it is not asked to reuse, or the weights or the masks are others.
    fresh = step(reuse=False)
    assert not torch.equal(fresh[1], g0)
    mask = torch.ones(w.shape, dtype=torch.bool)
    mask[:10] = False
    masked = step(reuse=True, mask=mask)
    assert masked[0].item() != fresh[0].item() and (masked[1][:10] == 0).all()
    with torch.no_grad():
        mask[10] = False  # in place: a new version of the same mask
    assert (step(reuse=True, mask=mask)[1][10] == 0).all()


def test_hook_reevaluates_the_prior_the_more_often_the_faster_it_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    evaluate = MixturePrior._evaluate
    monkeypatch.setattr(MixturePrior, "_evaluate", lambda self, *a: calls.append(1) or evaluate(self, *a))
    counts = {}
    for tau in (3.0, 10.0, 30.0):
        model, applied = _applied(SWSConfig(components=8, tau=tau, warmup=0.0))
        (hook,) = applied.hooks
        calls.clear()
        for step in range(16):
            hook.loss(model, step, 16).backward()
        counts[tau] = len(calls)
    assert counts == {3.0: 2, 10.0: 8, 30.0: 16}


def test_hook_loss_is_tau_times_the_mean_nll_over_the_kept_weights() -> None:
    config = SWSConfig(components=16, tau=2.0, warmup=0.0)
    model, applied = _applied(config)
    (hook,) = applied.hooks
    mask = torch.rand(model.fc2.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.4
    model.fc2.set_mask(mask)
    loss = hook.loss(model, 0, 10)
    loss.backward()
    mu, lv, logpi = (t.detach().double() for t in hook.state.prior.components())
    w1 = model.fc1.weight.detach().double().requires_grad_()
    w2 = model.fc2.weight.detach().double().requires_grad_()
    n = w1.numel() + int(mask.sum())
    ref = 2.0 * (mixture_nll_reference(w1, mu, lv, logpi) + mixture_nll_reference(w2, mu, lv, logpi, mask)) / n
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-3)
    for got, want in ((model.fc1.weight.grad, w1.grad), (model.fc2.weight.grad, w2.grad)):
        assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()
    assert (model.fc2.weight.grad[~mask] == 0).all()


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


def test_a_broad_zero_component_starts_at_the_given_std_and_prunes_more() -> None:
    values = np.random.default_rng(0).normal(0, 0.05, 5000)
    narrow = Mixture.of(MixturePrior.fit(values, 8, pi_zero=0.999))
    broad = Mixture.of(MixturePrior.fit(values, 8, pi_zero=0.999, zero_std=1.0))
    assert np.sqrt(broad.var[0]) == pytest.approx(values.std(), rel=1e-5)
    assert np.sqrt(narrow.var[0]) < 0.5 * values.std()
    assert np.allclose(broad.mu, narrow.mu) and np.allclose(broad.var[1:], narrow.var[1:])

    # The same prior-only training: the broad zero component pulls the small weights to zero
    # (the paper's pruning effect); the central cluster's narrow one leaves most where they are.
    def zeros(zero_std: float) -> float:
        config = SWSConfig(components=8, pi_zero=0.999, tau=10.0, warmup=0.0, zero_std=zero_std)
        model, applied = _applied(config)
        (hook,) = applied.hooks
        opt = torch.optim.Adam([{"params": list(model.parameters()), "lr": 1e-3}, *hook.param_groups(model)])
        for step in range(40):
            loss = hook.loss(model, step, 40)
            opt.zero_grad()
            loss.backward()
            opt.step()
        SoftWeightSharing().finalize(model, config, applied.states[0])
        mask = model.get_submodule("fc1").mask
        return float((~mask).float().mean())

    assert zeros(1.0) > zeros(0.0) + 0.2


def test_zero_std_is_checked_and_absent_from_old_plans_means_the_central_cluster() -> None:
    with pytest.raises(UserError, match="sws.zero_std"):
        SWSConfig(zero_std=0.01)
    plan = Plan.from_dict({"steps": [{"technique": "sws", "config": {"version": 1, "components": 8}}]})
    assert plan.steps[0].config.zero_std == 0.0
