"""Codebook (weight-sharing) quantization: clustering, centroid training, global sharing, codec."""

from __future__ import annotations

import copy

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError
from models.registry import create_model
from models.train import TrainHook, evaluate_split, train
from spaces.cluster1d import Clustering1D
from spaces.codebook import (
    GLOBAL_SHARE,
    Codebook,
    CodebookConfig,
    CodebookRepr,
    CodebookState,
    cluster_values,
    drop_unused,
    layer_codebook,
)
from spaces.layers import CLinear, compress_layer
from spaces.plan import Plan, Step, apply_plan
from spaces.policy import LayerPolicy
from spaces.prune import PruneConfig, masked_layers, schedule_points
from spaces.registry import ApplyContext, get_technique, list_techniques
from storage.codec import decode, encode


def _unprotected() -> ApplyContext:
    """A fresh context each time: ``apply`` writes to it (gradual pruning sets
    ``masks_final_step``, which would make a later plan's codebook wait)."""
    return ApplyContext(policy=LayerPolicy(keep_first=False, keep_last=False))


def _lenet(config: CodebookConfig, ctx: ApplyContext | None = None) -> nn.Module:
    return _lenet_state(config, ctx)[0]


def _lenet_state(config: CodebookConfig, ctx: ApplyContext | None = None) -> tuple[nn.Module, CodebookState]:
    torch.manual_seed(0)
    model = create_model("lenet300").eval()
    state = Codebook().apply(model, config, ctx or _unprotected())
    return model, state


def _codebook_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "weight_repr", None), CodebookRepr)]


@pytest.mark.parametrize("k", [2, 16, 64])
def test_each_layer_has_exactly_k_distinct_values(k: int) -> None:
    model = _lenet(CodebookConfig(clusters=k))
    layers = _codebook_layers(model)
    assert [n for n, _ in layers] == ["fc1", "fc2", "fc3"]
    for _, m in layers:
        assert m.weight_repr.k == k
        assert m.effective_weight().detach().unique().numel() == k
        assert m.weight_repr.indices.dtype == torch.int64
        assert m.weight_repr.indices.shape == m.weight.shape


def test_protected_layers_get_int8_below_8_bits() -> None:
    torch.manual_seed(0)
    model = create_model("digits_cnn")
    Codebook().apply(model, CodebookConfig(clusters=16), ApplyContext())
    kinds = {n: m.weight_repr.kind for n, m in model.named_modules() if getattr(m, "weight_repr", None) is not None}
    assert kinds == {"conv1": "int", "conv2": "codebook", "conv3": "codebook", "fc1": "codebook", "fc2": "int"}
    assert model.conv1.weight_repr.bits == 8


def test_codebook_round_trips_through_codec_and_snaps() -> None:
    model, state = _lenet_state(CodebookConfig(clusters=8))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
        Codebook().finalize(model, CodebookConfig(clusters=8), state)
        assert torch.equal(model.fc2.weight, model.fc2.weight_repr.centroids[model.fc2.weight_repr.indices])
        decoded = decode(encode(model))
        assert torch.equal(decoded.fc2.weight_repr.indices, model.fc2.weight_repr.indices)
        assert torch.allclose(decoded(x), before, rtol=0, atol=1e-6)
    assert len(encode(decoded)) == len(encode(model))


def test_centroid_gradient_is_the_members_gradient_sum_divided_by_their_count() -> None:
    torch.manual_seed(0)
    layer = compress_layer(nn.Linear(6, 5))
    layer.weight_repr = layer_codebook(layer, CodebookConfig(clusters=3))
    rep = layer.weight_repr
    x = torch.randn(7, 6)
    w = layer.effective_weight()
    w.retain_grad()
    F.linear(x, w, layer.bias).pow(2).sum().backward()
    assert layer.weight.grad is None  # the shadow weight does not train under a codebook
    summed = torch.zeros(3).index_add_(0, rep.indices.flatten(), w.grad.flatten())
    counts = torch.bincount(rep.indices.flatten(), minlength=3).float()
    assert torch.allclose(rep.centroids.grad * counts, summed, atol=1e-6)
    assert torch.allclose(rep.centroids.grad, summed / counts, atol=1e-7)


def test_centroids_train_and_indices_stay_fixed(digits_baseline) -> None:
    base = digits_baseline
    model = base.fresh()
    plan = Plan((Step("codebook", CodebookConfig(clusters=16)),))
    applied = apply_plan(model, plan)
    hooks = applied.hooks
    layers = _codebook_layers(model)
    indices = [m.weight_repr.indices.clone() for _, m in layers]
    centroids = [m.weight_repr.centroids.detach().clone() for _, m in layers]
    train(model, base.data, base.preset.finetune.replace(epochs=1), device=torch.device("cpu"), hooks=hooks)
    for (name, m), idx, c in zip(layers, indices, centroids, strict=True):
        assert torch.equal(m.weight_repr.indices, idx), name
        assert not torch.equal(m.weight_repr.centroids.detach(), c), name
        assert torch.isfinite(m.weight_repr.centroids).all()
    applied.finalize()
    for _, m in layers:
        assert m.weight.unique().numel() <= 16


def test_global_codebook_is_one_parameter_stored_once() -> None:
    k = 64
    model = _lenet(CodebookConfig(clusters=k, scope="global"))
    layers = _codebook_layers(model)
    assert len({id(m.weight_repr.centroids) for _, m in layers}) == 1
    assert all(m.weight_repr.share == GLOBAL_SHARE for _, m in layers)
    # The same codes with the codebook copied into each layer cost (layers - 1) * k * 4 bytes more.
    untied = copy.deepcopy(model)
    for _, m in _codebook_layers(untied):
        m.weight_repr = CodebookRepr.build(m.weight_repr.centroids.detach().clone(), m.weight_repr.indices)
    extra = len(encode(untied)) - len(encode(model))
    expected = (len(layers) - 1) * k * 4
    assert expected - 50 <= extra <= expected + 100, (extra, expected)  # header JSON differs a little
    # A per-layer codebook of the same k (its own clustering) is larger by about as much.
    per_layer = len(encode(_lenet(CodebookConfig(clusters=k, scope="layer"))))
    assert 0.5 * expected < per_layer - len(encode(model)) < 1.5 * expected
    # Decoding ties the layers to one Parameter again, and the model trains it as one.
    decoded = decode(encode(model))
    shared = {id(m.weight_repr.centroids) for _, m in _codebook_layers(decoded)}
    assert len(shared) == 1
    assert sum(p.numel() for p in decoded.parameters() if p.ndim == 1 and p.numel() == k) == k
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(decoded(x), model(x), atol=1e-6)


def test_pruned_layers_cluster_only_their_kept_weights() -> None:
    if "prune" not in list_techniques():
        pytest.skip("spaces/prune.py is not registered yet")
    prune = get_technique("prune")
    torch.manual_seed(0)
    model = create_model("lenet300").eval()
    plan = Plan((Step("prune", prune.config_from_dict({"sparsity": 0.8})), Step("codebook", CodebookConfig(clusters=8))))
    applied = apply_plan(model, plan, _unprotected())
    layers = [(n, m) for n, m in _codebook_layers(model) if m.mask is not None]
    assert len(layers) == 3
    smallest_kept = {n: m.weight.detach()[m.mask].abs().min() for n, m in layers}
    applied.finalize()
    for name, m in layers:
        kept = m.effective_weight().detach()[m.mask]
        assert kept.unique().numel() == 8, name
        assert (m.effective_weight().detach()[~m.mask] == 0).all()
        # The centroids come from the kept weights only: none lies in the pruned band around zero.
        assert (m.weight_repr.centroids.detach().abs() >= smallest_kept[name]).all(), name
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(decode(encode(model))(x), model(x), atol=1e-6)
    codebook_only = len(encode(_lenet(CodebookConfig(clusters=8))))
    assert len(encode(model)) < 0.5 * codebook_only


def _multimodal_layer(modes: list[float], per_mode: int = 400) -> CLinear:
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([m + 0.004 * torch.randn(per_mode, generator=gen) for m in modes])
    layer = compress_layer(nn.Linear(len(modes) * per_mode // 8, 8))
    with torch.no_grad():
        layer.weight.copy_(values[torch.randperm(values.numel(), generator=gen)].view_as(layer.weight))
    return layer


def test_dbscan_finds_the_modes_of_multimodal_weights() -> None:
    modes = [-0.3, -0.1, 0.05, 0.2, 0.4]
    layer = _multimodal_layer(modes)
    rep = layer_codebook(layer, CodebookConfig(method="dbscan", clusters=16, dbscan_eps=0.05))
    assert rep.k == len(modes)
    assert np.allclose(rep.centroids.detach().numpy(), modes, atol=0.002)
    # More clusters than allowed: k-means of the weights with the cap.
    capped = layer_codebook(layer, CodebookConfig(method="dbscan", clusters=3, dbscan_eps=0.05))
    assert capped.k == 3


def test_dbscan_falls_back_to_kmeans_on_unimodal_weights() -> None:
    values = np.random.default_rng(0).normal(0, 0.05, 20000)
    c = cluster_values(values, CodebookConfig(method="dbscan", clusters=12, dbscan_eps=0.2))
    assert c.k == 12
    small_eps = cluster_values(values, CodebookConfig(method="dbscan", clusters=256, dbscan_eps=0.01))
    assert 2 <= small_eps.k <= 256


def test_gmm_codebook_has_k_sensible_entries() -> None:
    modes = [-0.3, -0.1, 0.05, 0.2, 0.4]
    rep = layer_codebook(_multimodal_layer(modes), CodebookConfig(method="gmm", clusters=5))
    assert np.allclose(rep.centroids.detach().numpy(), modes, atol=0.002)
    model = _lenet(CodebookConfig(method="gmm", clusters=8))
    for _, m in _codebook_layers(model):
        w = m.effective_weight().detach()
        assert m.weight_repr.k == 8
        # Nearest-mean assignment: no weight moves further than half the widest gap.
        gaps = m.weight_repr.centroids.detach().diff()
        inner = (m.weight.detach() >= m.weight_repr.centroids.min()) & (m.weight.detach() <= m.weight_repr.centroids.max())
        assert ((w - m.weight.detach()).abs()[inner] <= gaps.max() / 2 + 1e-6).all()


def test_config_validation_names_the_bad_value() -> None:
    with pytest.raises(UserError, match="codebook.clusters.*300"):
        CodebookConfig(clusters=300)
    with pytest.raises(UserError, match="codebook.method.*'median'"):
        CodebookConfig(method="median")
    with pytest.raises(UserError, match="codebook.scope"):
        CodebookConfig(scope="net")
    with pytest.raises(UserError, match="dbscan_eps"):
        CodebookConfig(dbscan_eps=0.0)


def test_dbscan_eps_is_suggested_only_for_dbscan_and_family_names_the_method() -> None:
    t = Codebook()
    for method in ("kmeans", "gmm", "dbscan"):
        trial = optuna.trial.FixedTrial({"c.method": method, "c.clusters": 16, "c.scope": "layer", "c.dbscan_eps": 0.1})
        cfg = t.suggest(trial, "c")
        assert ("c.dbscan_eps" in trial.params) == (method == "dbscan")
        assert cfg.dbscan_eps == (0.1 if method == "dbscan" else CodebookConfig.dbscan_eps)
        assert t.family_of(cfg) == method


# ------------------------------------------------------------ every centroid serves a kept weight


def _unserved(model: nn.Module) -> dict[str, list[int]]:
    """Entries of each codebook (by share key or layer path) that no kept weight uses, members
    counted over every layer holding the codebook."""
    counts: dict[str, torch.Tensor] = {}
    for name, m in _codebook_layers(model):
        rep = m.weight_repr
        kept = rep.indices[m.mask] if m.mask is not None else rep.indices.flatten()
        key = rep.share or name
        counts[key] = counts.get(key, torch.zeros(rep.k, dtype=torch.int64)) + torch.bincount(kept, minlength=rep.k)
    return {k: torch.nonzero(c == 0).flatten().tolist() for k, c in counts.items() if (c == 0).any()}


def _exact_sparsity(model: nn.Module, sparsity: float) -> bool:
    layers = masked_layers(model)
    total = sum(m.weight.numel() for m in layers)
    return bool(layers) and sum(int((~m.mask).sum()) for m in layers) == round(sparsity * total)


def test_drop_unused_removes_memberless_entries_and_renumbers() -> None:
    c = drop_unused(Clustering1D(np.array([-1.0, 0.0, 1.0, 2.0]), np.array([3, 0, 3, 0], dtype=np.int32)))
    assert c.centroids.tolist() == [-1.0, 2.0] and c.labels.tolist() == [1, 0, 1, 0]
    empty = drop_unused(Clustering1D(np.array([0.5, 1.0]), np.zeros(0, dtype=np.int64)))
    assert empty.k == 1  # a codebook keeps one entry even when every weight is pruned


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("method", ["kmeans", "gmm", "dbscan"])
def test_oneshot_prune_then_codebook_every_centroid_serves_a_kept_weight(method: str, scope: str) -> None:
    torch.manual_seed(0)
    model = create_model("lenet300").eval()
    plan = Plan((Step("prune", PruneConfig(sparsity=0.8)),
                 Step("codebook", CodebookConfig(method=method, clusters=16, scope=scope))))
    applied = apply_plan(model, plan, _unprotected())
    assert len(_codebook_layers(model)) == 3 and len(applied.hooks) == 1  # fitted at apply: no hook of its own
    assert _unserved(model) == {}
    applied.finalize()
    assert _unserved(model) == {}
    for name, m in _codebook_layers(model):
        kept = m.effective_weight().detach()[m.mask]
        used = m.weight_repr.indices[m.mask].unique()
        assert kept.unique().numel() == used.numel(), name
        assert (m.effective_weight().detach()[~m.mask] == 0).all(), name
    if scope == "global":
        assert len({id(m.weight_repr.centroids) for _, m in _codebook_layers(model)}) == 1
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(decode(encode(model))(x), model(x), atol=1e-6)


def test_gmm_means_without_members_are_removed(digits_baseline) -> None:
    # Trained weights, pruned: the digits model's conv1 (0.8 per layer) gives a GMM of 64 whose
    # nearest-mean assignment leaves a mean without members (measured with the removal off).
    model = digits_baseline.fresh()
    plan = Plan((Step("prune", PruneConfig(sparsity=0.8, scope="layer")),
                 Step("codebook", CodebookConfig(method="gmm", clusters=64))))
    apply_plan(model, plan, _unprotected()).finalize()
    assert len(_codebook_layers(model)) == 5
    assert _unserved(model) == {}


def _gradual(scope: str = "layer", method: str = "kmeans") -> Plan:
    return Plan((Step("prune", PruneConfig(sparsity=0.8, schedule="gradual")),
                 Step("codebook", CodebookConfig(method=method, clusters=16, scope=scope))))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_prune_defers_the_fit_until_the_masks_are_final(scope: str) -> None:
    torch.manual_seed(0)
    model = create_model("lenet300").eval()
    applied = apply_plan(model, _gradual(scope), _unprotected())
    assert _codebook_layers(model) == []  # full precision (masked) while the masks change
    # The centroids exist from apply on, so the optimizer built at the start of the fine-tune
    # holds the very Parameters the fit fills.
    pending = {id(p) for h in applied.hooks for g in h.param_groups(model) for p in g["params"]}
    assert len(pending) == (3 if scope == "layer" else 1)
    total = 40
    end = schedule_points(total)[0]
    fitted = None
    for step in range(total):
        with torch.no_grad():  # stand-in for training
            for m in masked_layers(model):
                m.weight.add_(1e-3 * torch.randn_like(m.weight))
        for h in applied.hooks:
            h.after_step(model, step, total)
        layers = _codebook_layers(model)
        if step + 1 < end:
            assert layers == [], step
        elif step + 1 == end:
            assert [n for n, _ in layers] == ["fc1", "fc2", "fc3"]
            assert {id(m.weight_repr.centroids) for _, m in layers} == pending
            assert _exact_sparsity(model, 0.8) and _unserved(model) == {}
            fitted = {n: (m.weight_repr.centroids, m.weight_repr.indices.clone()) for n, m in layers}
    assert fitted is not None
    applied.finalize()  # the masks did not change after the fit: nothing is refitted
    for name, m in _codebook_layers(model):
        assert m.weight_repr.centroids is fitted[name][0] and torch.equal(m.weight_repr.indices, fitted[name][1])
    assert _unserved(model) == {}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_finalize_fits_what_the_finetune_never_reached(scope: str) -> None:
    torch.manual_seed(0)
    model = create_model("lenet300").eval()
    applied = apply_plan(model, _gradual(scope), _unprotected())
    probe = applied.copy()  # the size prediction's copy
    probe.finalize()
    assert _codebook_layers(model) == []  # the original still waits for its fine-tune
    assert len(_codebook_layers(probe.model)) == 3
    assert _exact_sparsity(probe.model, 0.8) and _unserved(probe.model) == {}
    applied.finalize()  # 0 epochs
    assert _exact_sparsity(model, 0.8) and _unserved(model) == {}
    assert len(encode(model)) == len(encode(probe.model))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_finalize_refits_a_layer_whose_mask_changed_after_its_fit(scope: str) -> None:
    torch.manual_seed(0)
    model = create_model("lenet300").eval()
    plan = Plan((Step("prune", PruneConfig(sparsity=0.5)), Step("codebook", CodebookConfig(clusters=8, scope=scope))))
    applied = apply_plan(model, plan, _unprotected())
    layer = model.fc2
    rep = layer.weight_repr
    before = layer.effective_weight().detach().clone()
    # Prune every member of entry 0 in fc2 (for a global codebook, in fc2 only).
    layer.set_mask(layer.mask & (rep.indices != 0))
    applied.finalize()
    assert _unserved(model) == {}
    assert layer.weight_repr.k == (7 if scope == "layer" else 8)
    kept = layer.mask
    # The refit starts from the effective weights: kept weights keep their values.
    assert torch.equal(layer.effective_weight().detach()[kept], before[kept])
    assert (layer.effective_weight().detach()[~kept] == 0).all()
    if scope == "global":
        assert len({id(m.weight_repr.centroids) for _, m in _codebook_layers(model)}) == 1
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(decode(encode(model))(x), model(x), atol=1e-6)


class _CentroidsAtFit(TrainHook):
    """Records the centroids right after the codebooks appear (hooks run in order: this one
    after the plan's)."""

    def __init__(self) -> None:
        self.at_fit: dict[str, torch.Tensor] | None = None

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        layers = _codebook_layers(model)
        if self.at_fit is None and layers:
            self.at_fit = {n: m.weight_repr.centroids.detach().clone() for n, m in layers}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_prune_and_codebook_through_a_real_finetune(scope: str, digits_baseline) -> None:
    base = digits_baseline
    model = base.fresh()
    applied = apply_plan(model, _gradual(scope))
    kinds = {n: m.weight_repr.kind for n, m in model.named_modules() if getattr(m, "weight_repr", None) is not None}
    assert kinds == {"conv1": "int", "fc2": "int"}  # protected ends as before; the rest waits
    snapshot = _CentroidsAtFit()
    train(model, base.data, base.preset.finetune.replace(epochs=1), device=torch.device("cpu"),
          hooks=[*applied.hooks, snapshot])
    assert snapshot.at_fit is not None and set(snapshot.at_fit) == {"conv2", "conv3", "fc1"}
    for name, m in _codebook_layers(model):  # the centroids trained after the fit
        assert not torch.equal(m.weight_repr.centroids.detach(), snapshot.at_fit[name]), name
    applied.finalize()
    assert _exact_sparsity(model, 0.8)
    assert _unserved(model) == {}
    for _, m in _codebook_layers(model):
        assert (m.weight[~m.mask] == 0).all()
    x = base.data.x_val[:16].float()
    with torch.no_grad():
        assert torch.allclose(decode(encode(model)).eval()(x), model.eval()(x), atol=1e-5)


def test_gradual_prune_and_kmeans_keep_accuracy_after_the_presets_finetune(digits_baseline) -> None:
    base = digits_baseline
    model = base.fresh()
    applied = apply_plan(model, _gradual())
    train(model, base.data, base.preset.finetune, device=torch.device("cpu"), hooks=applied.hooks)
    applied.finalize()
    assert _unserved(model) == {}
    baseline_acc = evaluate_split(base.model, base.data, "test")
    acc = evaluate_split(model, base.data, "test")
    assert acc >= baseline_acc - 0.02, (acc, baseline_acc)
