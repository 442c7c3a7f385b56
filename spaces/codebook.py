"""Codebook weights (weight sharing, Han et al. 2016 "Deep Compression"): every weight of a layer
is one of ``k`` shared values. Each weight stores a ``ceil(log2 k)``-bit index; the layer (or, with
``scope="global"``, the whole model) stores the ``k`` fp32 centroids.

The codebook comes from exact 1-D clustering (:mod:`spaces.cluster1d`) of the kept weights:
k-means, a Gaussian mixture, or DBSCAN. During fine-tuning the indices are frozen and only the
centroids train: ``forward`` returns ``centroids[indices]``, whose backward sums the gradients of
all weights sharing a centroid, which is exactly Deep Compression's centroid fine-tuning.

Pruned layers (a ``mask`` from the sparsity stage) cluster only their kept weights; the pruned
positions cost only the codec's position stream. Layers the policy protects keep 8 bits: where
the codebook has fewer bits they get per-channel int8 (:func:`spaces.represent.protect`).

Deep Compression's order is prune and retrain, then quantize and retrain. When the sparsity stage
keeps changing its masks during the fine-tune (gradual pruning sets
``ApplyContext.masks_final_step``), a codebook fitted at ``apply`` would cluster weights that are
pruned later (measured: 6 of LeNet-300 fc1's 16 centroids served a kept weight). The codebook
then waits: the layers train in full precision (masked) until the masks are final, the
:class:`CodebookHook` fits the codebooks to the kept weights at that step, and the centroids
fine-tune for the rest. ``finalize`` fits what the fine-tune never reached and refits a layer
whose mask changed after its fit. After every fit, entries that no kept weight uses are removed
(a GMM's nearest-mean assignment, for one, can leave a mean without members), so each centroid
the artifact stores serves at least one kept weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import optuna
import torch
from torch import Tensor, nn

from models.train import TrainHook
from spaces.cluster1d import Clustering1D, dbscan_1d, gmm_1d, kmeans_1d
from spaces.layers import CConv2d, CLinear, Stream, WeightRepr, register_component
from spaces.policy import PROTECTED_BITS
from spaces.registry import ApplyContext, Technique, TechniqueConfig, check, register_technique
from spaces.represent import compressed_layers, protect, snap_weights

METHODS = ("kmeans", "gmm", "dbscan")
SCOPES = ("layer", "global")
GLOBAL_SHARE = "codebook.global"  # the codec's key of the one stored copy of a global codebook
# A DBSCAN core point needs this fraction of the clustered weights (at least _DBSCAN_MIN_SAMPLES)
# within eps: clusters must hold a noticeable share of the layer, not a handful of outliers.
_DBSCAN_MIN_FRACTION = 1e-3
_DBSCAN_MIN_SAMPLES = 4


def index_bits(k: int) -> int:
    """Bits of one index into a codebook of ``k`` entries (at least 1)."""
    return max(1, math.ceil(math.log2(max(k, 1))))


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; the backward pass multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def member_counts(labels: Tensor | np.ndarray, k: int) -> Tensor:
    """How many weights each of the ``k`` entries stands for."""
    t = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels)
    return torch.bincount(t.reshape(-1).to(torch.int64).cpu(), minlength=k)[:k].float()


@register_component
class CodebookRepr(WeightRepr):
    """``w = centroids[indices]``: frozen int64 indices (weight-shaped buffer), trained centroids.

    ``share`` names a codebook held by several layers: they all hold the same ``centroids``
    Parameter object, and the codec stores it once.

    Centroid gradients: autograd's index backward sums the gradients of the ``n_j`` weights that
    share entry ``j`` (Deep Compression's rule). With the fine-tune's SGD learning rate that sum
    moves a centroid ``n_j`` times as far as its members would move (thousands of times in a
    dense layer) and diverged in our measurements (digits, k=4: 99% -> 10% accuracy within the
    first epoch). The summed gradient is therefore divided by ``n_j`` (the ``grad_scale``
    buffer, not stored): a centroid moves by its members' mean gradient, i.e. as far as a member
    weight would, which is the sum preconditioned by the diagonal curvature of the shared
    direction. For a global codebook ``n_j`` counts the members in all layers.
    """

    kind = "codebook"

    def __init__(self, k: int, shape: list[int], share: str | None = None) -> None:
        super().__init__()
        self.share = share
        self.centroids = nn.Parameter(torch.zeros(k))
        self.register_buffer("indices", torch.zeros(shape, dtype=torch.int64))
        self.register_buffer("grad_scale", torch.ones(k), persistent=False)

    @classmethod
    def build(cls, centroids: Tensor | nn.Parameter, indices: Tensor, share: str | None = None,
              counts: Tensor | None = None) -> CodebookRepr:
        """A representation over ``indices``; an ``nn.Parameter`` ``centroids`` is held as it is
        (tied), any other tensor is copied into a fresh Parameter. ``counts`` are the members of
        each entry (default: counted in ``indices``); centroid gradients are divided by them."""
        rep = cls(int(centroids.numel()), list(indices.shape), share)
        if isinstance(centroids, nn.Parameter):
            rep.centroids = centroids
        else:
            rep.centroids = nn.Parameter(centroids.detach().float().clone())
        rep.indices = indices.to(torch.int64).clone()
        counts = member_counts(rep.indices, rep.k) if counts is None else counts.float()
        rep.grad_scale = (1.0 / counts.clamp_min(1.0)).to(rep.indices.device)
        return rep

    @property
    def k(self) -> int:
        """Number of codebook entries."""
        return int(self.centroids.numel())

    def spec(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"k": self.k, "shape": list(self.indices.shape), "share": self.share}

    def forward(self, weight: Tensor) -> Tensor:
        """``centroids[indices]`` (the shadow weight is not used while the codebook trains)."""
        c = self.centroids
        if c.requires_grad and torch.is_grad_enabled():
            c = _ScaleGrad.apply(c, self.grad_scale.to(c.device))
        return c[self.indices].to(weight.dtype)

    def export_weight(self, weight: Tensor, mask: Tensor | None) -> Stream:
        """The indices, packed at ``ceil(log2 k)`` bits (masked positions dropped)."""
        return Stream("codes", self.indices.detach().cpu(), bits=index_bits(self.k),
                      mask=None if mask is None else mask.cpu())

    def export_state(self) -> dict[str, Stream]:
        """The centroids as fp32, stored once per ``share`` key."""
        return {"centroids": Stream("float", self.centroids.detach().float().cpu(), "f32", share=self.share)}

    def load_weight(self, stored: Tensor, shape: torch.Size) -> Tensor:
        """Restore the indices from the stored codes; the shadow weight is ``centroids[codes]``.

        (The gradient scale is recounted from this layer's codes, pruned positions included: a
        decoded model fine-tunes its centroids with approximately the original scale.)"""
        self.indices = stored.reshape(shape).to(torch.int64).to(self.centroids.device)
        self.grad_scale = 1.0 / member_counts(self.indices, self.k).clamp_min(1.0).to(self.indices.device)
        return self.centroids.detach()[self.indices].float()

    def bits_per_weight(self) -> float:
        """``ceil(log2 k)``: a weight is one of ``k`` values (the usual BitOPs convention)."""
        return float(index_bits(self.k))


# ---------------------------------------------------------------------------- clustering


def kept_values(layer: CConv2d | CLinear) -> np.ndarray:
    """The layer's kept (unmasked) shadow weights as a flat float64 array."""
    w = layer.weight.detach().float().cpu().reshape(-1)
    if layer.mask is not None:
        w = w[layer.mask.detach().cpu().reshape(-1)]
    return w.numpy().astype(np.float64)


def nearest_sorted(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the ascending ``centroids`` for each value (ties to the lower)."""
    if centroids.size == 1:
        return np.zeros(values.shape, dtype=np.int64)
    mids = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(mids, values, side="left").astype(np.int64)


def cluster_values(values: np.ndarray, config: CodebookConfig) -> Clustering1D:
    """Centroids (ascending) and labels of ``values`` under ``config``'s method.

    * ``kmeans``: optimal 1-D k-means with ``config.clusters`` centroids.
    * ``gmm``: the means of a ``config.clusters``-component Gaussian mixture; each weight takes the
      *nearest* mean (not its most responsible component: a broad component would otherwise
      capture large weights on both tails and snap them to its mean, even across zero).
    * ``dbscan``: DBSCAN (``eps = dbscan_eps * std(values)``, a core point needs 0.1% of the
      values within eps) chooses k, its number of clusters (noise not counted, at most
      ``config.clusters``), and the optimal k-means places that many centroids, every value
      (noise too) taking the nearest. DBSCAN's own cluster means are poor codebooks for the
      unimodal weights of trained layers: one dense run spans most of the range, and its mean
      would replace all of it (measured on digits: 99% -> 10% accuracy). Where the weights are
      multimodal (separated modes), the k-means centroids are the DBSCAN cluster means. Fewer
      than two clusters (the usual case for dense layers at larger eps) fall back to k-means
      with ``config.clusters`` centroids.

    Whatever the method, centroids that no value takes are removed (:func:`drop_unused`).
    """
    if values.size == 0:
        return Clustering1D(np.zeros(1), np.zeros(0, dtype=np.int64))
    if config.method == "kmeans":
        found = kmeans_1d(values, config.clusters)
    elif config.method == "gmm":
        clustering, _ = gmm_1d(values, config.clusters)
        found = Clustering1D(clustering.centroids, nearest_sorted(values, clustering.centroids))
    else:
        found = _dbscan(values, config)
    return drop_unused(found)


def drop_unused(clustering: Clustering1D) -> Clustering1D:
    """``clustering`` without the centroids no label refers to, the labels renumbered (the
    ascending order is kept). Without any label the first centroid stays: a codebook needs an
    entry even for a layer whose weights are all pruned."""
    labels = np.asarray(clustering.labels, dtype=np.int64)
    used = np.bincount(labels, minlength=clustering.k)[: clustering.k] > 0
    if used.all():
        return Clustering1D(clustering.centroids, labels)
    if not used.any():
        return Clustering1D(clustering.centroids[:1], labels)
    remap = np.cumsum(used) - 1
    return Clustering1D(clustering.centroids[used], remap[labels])


def _dbscan(values: np.ndarray, config: CodebookConfig) -> Clustering1D:
    std = float(values.std())
    min_samples = max(_DBSCAN_MIN_SAMPLES, math.ceil(_DBSCAN_MIN_FRACTION * values.size))
    found = dbscan_1d(values, config.dbscan_eps * std, min_samples).k if std > 0 else 0
    return kmeans_1d(values, min(found, config.clusters) if found >= 2 else config.clusters)


def _indices_for(layer: CConv2d | CLinear, labels: np.ndarray) -> Tensor:
    """Weight-shaped int64 indices: ``labels`` at the kept positions, 0 at the pruned ones."""
    idx = torch.zeros(layer.weight.numel(), dtype=torch.int64)
    lab = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    if layer.mask is None:
        idx = lab
    else:
        idx[layer.mask.detach().cpu().reshape(-1)] = lab
    return idx.reshape(layer.weight.shape).to(layer.weight.device)


def _centroids(values: np.ndarray, into: nn.Parameter | None, device: torch.device) -> nn.Parameter:
    """``values`` as an fp32 Parameter on ``device``: ``into`` itself when given (its data
    replaced, so that an optimizer holding it trains the new values), else a fresh one."""
    t = torch.from_numpy(values).float().to(device)
    if into is None:
        return nn.Parameter(t)
    into.data = t  # the entry count may differ from the placeholder's
    into.grad = None  # a gradient of the old entries would not fit
    return into


def layer_codebook(layer: CConv2d | CLinear, config: CodebookConfig,
                   centroids: nn.Parameter | None = None) -> CodebookRepr:
    """A per-layer codebook fitted to the layer's kept weights; ``centroids``, if given, is the
    Parameter that receives the fitted values and that the codebook holds."""
    c = cluster_values(kept_values(layer), config)
    return CodebookRepr.build(_centroids(c.centroids, centroids, layer.weight.device),
                              _indices_for(layer, c.labels), counts=member_counts(c.labels, c.k))


def global_codebooks(layers: list[tuple[str, CConv2d | CLinear]], config: CodebookConfig,
                     share: str = GLOBAL_SHARE,
                     centroids: nn.Parameter | None = None) -> dict[str, CodebookRepr]:
    """One codebook fitted to the kept weights of all ``layers`` together, shared by all of them
    (one Parameter object, ``centroids`` if given; the codec stores it once under ``share``).
    Entries are counted over all the layers: an entry is kept if any layer's kept weight uses it."""
    parts = [kept_values(layer) for _, layer in layers]
    if not parts:
        return {}
    c = cluster_values(np.concatenate(parts), config)
    centroids = _centroids(c.centroids, centroids, layers[0][1].weight.device)
    counts = member_counts(c.labels, c.k)
    out, start = {}, 0
    for (path, layer), part in zip(layers, parts, strict=True):
        labels = c.labels[start : start + part.size]
        start += part.size
        out[path] = CodebookRepr.build(centroids, _indices_for(layer, labels), share=share, counts=counts)
    return out


# ---------------------------------------------------------------------------- technique


@dataclass(frozen=True)
class CodebookConfig(TechniqueConfig):
    """Codebook (weight-sharing) quantization.

    Attributes:
        method: ``"kmeans"`` (optimal 1-D k-means), ``"gmm"`` (Gaussian-mixture means) or
            ``"dbscan"`` (density clusters; see :func:`cluster_values`).
        clusters: Codebook entries k, 2..256 (indices take ``ceil(log2 k)`` bits). For DBSCAN
            the upper bound on the clusters it finds and the k of its k-means fallback.
        scope: ``"layer"`` (a codebook per layer) or ``"global"`` (one for every layer that is
            not protected, stored once).
        dbscan_eps: DBSCAN's neighbourhood radius as a fraction of the weights' standard
            deviation (used by ``method="dbscan"`` only).
    """

    method: str = "kmeans"
    clusters: int = 16
    scope: str = "layer"
    dbscan_eps: float = 0.05

    def validate(self) -> None:
        """Check names and ranges."""
        check(self.method in METHODS, f"codebook.method must be one of {METHODS}, got {self.method!r}")
        check(2 <= self.clusters <= 256, f"codebook.clusters must be in 2..256, got {self.clusters}")
        check(self.scope in SCOPES, f"codebook.scope must be one of {SCOPES}, got {self.scope!r}")
        check(0 < self.dbscan_eps <= 10, f"codebook.dbscan_eps must be in (0, 10] (a fraction of the weight std), got {self.dbscan_eps}")


@dataclass
class CodebookState:
    """What ``apply`` returns for the hook and ``finalize`` of one model.

    Attributes:
        groups: The layers (paths) sharing each codebook, by key: the layer's path (per-layer
            scope) or :data:`GLOBAL_SHARE`. Protected layers are not among them.
        centroids: Each codebook's centroid Parameter by key, made at ``apply``: a deferred fit
            writes into it, so the optimizer that received it before the fit trains it after.
        masks_final_step: ``ApplyContext.masks_final_step`` at ``apply``: the fine-tune's total
            steps -> the step after which the hook fits the codebooks. None: fitted at ``apply``.
        fitted: The mask each layer had at its codebook's fit (None: unmasked), by path; a layer
            not in it has no codebook yet and trains in full precision.
        configs: Each codebook's config by key: the step's, with the layer's per-layer
            overrides (its own ``clusters``) for a per-layer codebook.
    """

    groups: dict[str, tuple[str, ...]]
    centroids: dict[str, nn.Parameter]
    masks_final_step: Callable[[int], int] | None = None
    fitted: dict[str, Tensor | None] = field(default_factory=dict)
    configs: dict[str, CodebookConfig] = field(default_factory=dict)

    def is_fitted(self, key: str) -> bool:
        """Whether the codebook ``key`` is installed in its layers."""
        return all(p in self.fitted for p in self.groups[key])

    def mask_changed(self, model: nn.Module, key: str) -> bool:
        """Whether a layer of the fitted codebook ``key`` has another mask than at its fit."""
        for path in self.groups[key]:
            now, then = layer_at(model, path).mask, self.fitted[path]
            if now is None or then is None:
                if (now is None) != (then is None):
                    return True
            elif not torch.equal(now, then):
                return True
        return False


def layer_at(model: nn.Module, path: str) -> CConv2d | CLinear:
    """The compressed layer at ``path`` (looked up each time: robust to later module swaps)."""
    layer = model.get_submodule(path)
    if not isinstance(layer, CConv2d | CLinear):
        raise TypeError(f"{path} is a {type(layer).__name__} now; the codebook needs its compressed conv/linear layer")
    return layer


@torch.no_grad()
def fit_codebook(model: nn.Module, config: CodebookConfig, state: CodebookState, key: str) -> None:
    """Fit the codebook ``key`` to the kept weights of its layers and install it in them."""
    paths = state.groups[key]
    config = state.configs.get(key, config)
    layers = [(p, layer_at(model, p)) for p in paths]
    if key == GLOBAL_SHARE:
        reprs = global_codebooks(layers, config, centroids=state.centroids[key])
    else:
        reprs = {key: layer_codebook(layers[0][1], config, centroids=state.centroids[key])}
    for path, layer in layers:
        layer.weight_repr = reprs[path]
        layer.weight_repr.to(layer.weight.device)
        state.fitted[path] = None if layer.mask is None else layer.mask.detach().clone()


class CodebookHook(TrainHook):
    """Deferred fit: hands the not yet fitted centroid Parameters to the optimizer and fits the
    codebooks once the masks are final (``state.masks_final_step``)."""

    def __init__(self, config: CodebookConfig, state: CodebookState) -> None:
        self.config, self.state = config, state

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The centroids of codebooks not fitted yet (fitted ones are the model's parameters),
        without weight decay like the model's other 1-D parameters."""
        pending = []
        for key, paths in self.state.groups.items():
            if not self.state.is_fitted(key):
                param = self.state.centroids[key]
                param.data = param.data.to(layer_at(model, paths[0]).weight.device)
                pending.append(param)
        return [{"params": pending, "weight_decay": 0.0}] if pending else []

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Fit the codebooks not fitted yet once ``step`` reaches the masks' final step (the
        sparsity step's hook, earlier in the plan, has already updated the masks)."""
        final = self.state.masks_final_step
        if final is None or step + 1 < final(total_steps):
            return
        for key in self.state.groups:
            if not self.state.is_fitted(key):
                fit_codebook(model, self.config, self.state, key)


@register_technique
class Codebook(Technique[CodebookConfig, CodebookState]):
    """Codebook quantization by 1-D k-means, GMM or DBSCAN, with centroid fine-tuning."""

    name = "codebook"
    stage = "weights"
    family = "codebook"
    families = METHODS
    config_cls = CodebookConfig
    stronger = MappingProxyType({"clusters": -1})  # fewer entries compress more

    def family_of(self, config: CodebookConfig) -> str:
        """The clustering method (``kmeans``, ``gmm``, ``dbscan``) as the chart label."""
        return config.method

    def suggest(self, trial: optuna.Trial, prefix: str) -> CodebookConfig:
        """Method, k (log scale, 2..256), scope; DBSCAN's eps only when the method is DBSCAN."""
        method = trial.suggest_categorical(f"{prefix}.method", list(METHODS))
        clusters = trial.suggest_int(f"{prefix}.clusters", 2, 256, log=True)
        scope = trial.suggest_categorical(f"{prefix}.scope", list(SCOPES))
        eps = CodebookConfig.dbscan_eps
        if method == "dbscan":
            eps = trial.suggest_float(f"{prefix}.dbscan_eps", 0.005, 1.0, log=True)
        return CodebookConfig(method=method, clusters=clusters, scope=scope, dbscan_eps=eps)

    def per_layer(self, config: CodebookConfig) -> tuple[str, ...]:
        """A per-layer codebook may have its own number of entries."""
        return ("clusters",) if config.scope == "layer" else ()

    def apply(self, model: nn.Module, config: CodebookConfig, ctx: ApplyContext) -> CodebookState:
        """Protect the layers the policy protects (int8 if k < 256) and fit codebooks to the
        others' kept weights, now or, when an earlier step's masks keep changing
        (``ctx.masks_final_step``), once they are final (:class:`CodebookHook`). A per-layer
        codebook takes the layer's own ``clusters`` where the step overrides it."""
        protected = ctx.policy.protected_paths(model)
        paths, configs = [], {}
        for path, layer in compressed_layers(model):
            c = ctx.config_at(config, path)
            if path in protected and index_bits(c.clusters) < PROTECTED_BITS:
                protect(layer)
            else:
                paths.append(path)
                configs[path] = c
        groups: dict[str, tuple[str, ...]] = {p: (p,) for p in paths}
        if config.scope == "global":
            groups = {GLOBAL_SHARE: tuple(paths)} if paths else {}
            configs = {GLOBAL_SHARE: config} if paths else {}
        centroids = {
            key: nn.Parameter(torch.zeros(configs[key].clusters, device=layer_at(model, members[0]).weight.device))
            for key, members in groups.items()
        }
        state = CodebookState(groups, centroids, ctx.masks_final_step, configs=configs)
        if state.masks_final_step is None:
            for key in groups:
                fit_codebook(model, config, state, key)
        return state

    def hooks(self, model: nn.Module, config: CodebookConfig, state: CodebookState) -> list[TrainHook]:
        """One :class:`CodebookHook` when the fit waits for the masks; none otherwise."""
        return [CodebookHook(config, state)] if state.masks_final_step is not None else []

    def finalize(self, model: nn.Module, config: CodebookConfig, state: CodebookState) -> None:
        """Fit the codebooks the fine-tune did not reach, refit those with a layer whose mask
        changed after the fit (from the effective weights: the fine-tuned centroids), then snap
        the shadow weights onto their centroids."""
        for key in state.groups:
            if not state.is_fitted(key):
                fit_codebook(model, config, state, key)
            elif state.mask_changed(model, key):
                with torch.no_grad():
                    for path in state.groups[key]:
                        layer = layer_at(model, path)
                        layer.weight.copy_(layer.effective_weight())
                fit_codebook(model, config, state, key)
        snap_weights(model)

    def settings(self) -> list[CodebookConfig]:
        """k-means per layer with k = 64, 16, 8, 4, 2."""
        return [CodebookConfig(clusters=k) for k in (64, 16, 8, 4, 2)]

    def moderate(self) -> CodebookConfig:
        """k-means, 16 entries per layer (4-bit indices)."""
        return CodebookConfig(method="kmeans", clusters=16, scope="layer")
