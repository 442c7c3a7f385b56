"""Soft weight-sharing (Ullrich, Meeds & Welling 2017, "Soft Weight-Sharing for Neural Network
Compression").

During the fine-tune the full-precision weights train freely under an extra loss: the negative
log-likelihood of the weights under a learned Gaussian-mixture prior,

    p(w) = sum_j pi_j N(w | mu_j, sigma_j^2),   j = 0..k-1,

whose component 0 sits at zero with a *fixed* mixing weight ``pi_zero`` (it is what turns weights
into zeros), and whose other means, variances and mixing weights are learned with the network.
The prior is training-only state: it lives in the technique's training hook, never in the model.
``finalize`` merges components that have come together, snaps every weight to the mean of its most
likely component (the zero component to exactly 0) and installs the final representation: a mask
of the non-zero weights (stored as sparse positions) and one global codebook of the non-zero means
(:class:`spaces.codebook.CodebookRepr`, short indices at the kept positions).

Our choices where the paper leaves room or assumes a long retraining:

* ``pi_zero`` defaults to 0.7, not the paper's 0.999: with a few epochs of fine-tuning the weights
  cannot migrate to zero, and a prior that insists on 99.9% zeros prunes at the final snap what
  training never moved (accuracy collapses).
* Initialisation: the optimal 1-D k-means of the weights with k clusters; the cluster nearest zero
  becomes the zero component, the others give the initial means, variances and mixing logits
  (proportional to their sizes).
* The prior works in units of ``s``, the standard deviation of its weights at ``apply``: means are
  stored as ``mu / s`` and log-variances as ``log(sigma^2 / s^2)``, so its learning rates mean the
  same on every model. Variance collapse is prevented by clamping each standard deviation to
  [0.05 s, s] (instead of the paper's Gamma hyperpriors, which need a long run to act).
* Learning rates of the prior (the paper's, for Adam): means 5e-4, log-variances 3e-3, mixing
  logits 3e-3; the network keeps the fine-tune's optimizer and learning rate.
* The complexity loss is ``tau(step) * (-log p(w)) / n`` with ``n`` the number of weights under
  the prior (a per-weight average; the paper divides by the number of training examples, which a
  training hook does not see), ``tau(step)`` rising linearly from 0 over the first ``warmup``
  fraction of the fine-tune. On digits (186k weights under the prior, SGD at lr 0.01, 4 epochs)
  tau up to 30 kept test accuracy at the baseline's while lowering the size; tau = 100 cost 2
  points. The std floor of 0.05 s also keeps the prior's pull on a weight, ``tau/n * (w - mu) /
  sigma^2``, within SGD's stable step size (a floor of 0.02 s made tau = 100 oscillate).
* The negative log-likelihood ``f(w) = -log p(w)`` is a function of one variable, so it is
  evaluated exactly (all components) on a table of evenly spaced nodes spanning the weights,
  at most 0.15 of the smallest component std apart, with its first two derivatives; each weight's
  gradient is looked up in the cell of the table it falls in (``f'`` expanded about the node),
  and the loss and the prior's gradients are sums over the nodes weighted by how many weights
  each holds. Per weight that is a handful of passes (range, cell, histogram, look-up) instead of
  ~15 over a (weights x components) array, which is never formed; the gradients are within about
  1% of the exact ones. Up to 8192 weights the evaluation is exact (chunked).
* In training a full evaluation is reused for a few steps: its loss and gradients, the weights'
  as they were at their values then (on LeNet-300 a full evaluation costs about as much as the
  rest of a step). The number of steps follows how fast the prior's parameters move: at most 8,
  and 24 / (tau x their learning rates relative to the defaults), so every step from tau = 24
  on. On LeNet-300 / MNIST, against evaluating every step, test accuracy stayed within 0.05
  points and the bytes within 0.1% at the moderate setting (tau 3: 8 steps) and at tau 0.1, 6
  and 10 (tau 30: every step); at k = 32, tau = 1 the bytes moved 1.1%, which a change of the
  table's spacing alone does there too (which components merge flips).
* Snapping considers, for each weight, only the two components whose means bracket it (zero
  counted as a mean): a broad component must not capture a large weight on the far side of zero.

Layers the policy protects are not under the prior (they are neither pruned nor shared): they get
per-channel int8 at ``apply``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import torch
from torch import Tensor, nn

from models.train import TrainHook
from spaces.cluster1d import kmeans_1d
from spaces.codebook import CodebookRepr, kept_values, member_counts
from spaces.layers import CConv2d, CLinear
from spaces.registry import ApplyContext, Technique, TechniqueConfig, check, register_technique
from spaces.represent import compressed_layers, protect, snap_weights

SHARE = "sws.codebook"  # the codec's key of the one stored copy of the final codebook
_LOG_2PI = math.log(2 * math.pi)
_MIN_STD, _MAX_STD = 0.05, 1.0  # clamp of every component's std, in units of s
_CHUNK_ENTRIES = 1 << 21  # (weights x components) entries evaluated at once (8 MB in fp32)
# The table the likelihood is read from (see _table and _grid): nodes at most _SPACING of the
# smallest component std apart (on LeNet-300, 2048 nodes over a range of about 15 s), _SUB cells
# per node; on accelerators a fixed _DEVICE_NODES. Up to _EXACT_BELOW weights the exact
# evaluation is as cheap.
_SPACING, _SUB = 0.15, 8
_MIN_NODES, _MAX_NODES, _DEVICE_NODES = 256, 1 << 16, 1 << 14
_EXACT_BELOW = 8192
# In training the prior is evaluated in full at most every _REFRESH steps, and more often the
# faster its parameters move: every _PULL / (tau x their learning rates relative to the defaults)
# steps. The steps between reuse the held evaluation (see MixturePrior.nll and SWSHook.loss).
_REFRESH, _PULL = 8, 24.0


# ------------------------------------------------------------------------ mixture likelihood


def _constants(mu: Tensor, logvar: Tensor, logpi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 ``mu``, ``1 / var`` and ``log pi - log(2 pi var) / 2`` (all (k,))."""
    mu, logvar = mu.detach().float(), logvar.detach().float()
    return mu, torch.exp(-logvar), logpi.detach().float() - 0.5 * (_LOG_2PI + logvar)


def _chunk_log_joint(x: Tensor, mu: Tensor, inv_var: Tensor, const: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``log pi_j + log N(x | mu_j, var_j)`` for a chunk (n, k), ``(x - mu_j) / var_j`` and
    ``x - mu_j``."""
    diff = x[:, None] - mu
    scaled = diff * inv_var
    return torch.addcmul(const, diff, scaled, value=-0.5), scaled, diff


def _chunk_size(k: int, chunk: int | None) -> int:
    return chunk if chunk is not None else max(1024, _CHUNK_ENTRIES // max(k, 1))


class _MixtureNLL(torch.autograd.Function):
    """``-sum_i log sum_j pi_j N(x_i | mu_j, var_j)`` over a flat ``x``, ``chunk`` values at a time.

    Only the inputs are saved; the backward recomputes each chunk's responsibilities, so the
    memory beyond the inputs is one chunk's (n, k) temporaries.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, mu: Tensor, logvar: Tensor, logpi: Tensor, chunk: int) -> Tensor:
        m, inv_var, const = _constants(mu, logvar, logpi)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        with torch.no_grad():
            for start in range(0, x.numel(), chunk):
                lp, _, _ = _chunk_log_joint(x[start : start + chunk].detach().float(), m, inv_var, const)
                total += torch.logsumexp(lp, 1).sum(dtype=torch.float64)
        ctx.save_for_backward(x, mu, logvar, logpi)
        ctx.chunk = chunk
        return (-total).to(torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mu, logvar, logpi = ctx.saved_tensors
        m, inv_var, const = _constants(mu, logvar, logpi)
        g_x = torch.empty(x.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[0] else None
        g_mu, g_lv, g_pi = (torch.zeros_like(m) for _ in range(3))
        with torch.no_grad():
            for start in range(0, x.numel(), ctx.chunk):
                stop = min(start + ctx.chunk, x.numel())
                lp, scaled, diff = _chunk_log_joint(x[start:stop].detach().float(), m, inv_var, const)
                r = torch.softmax(lp, 1)  # responsibilities
                rs = r * scaled
                g_mu -= rs.sum(0)
                g_lv += 0.5 * (r - rs * diff).sum(0)
                g_pi -= r.sum(0)
                if g_x is not None:
                    torch.sum(rs, 1, out=g_x[start:stop])
        g = grad.float()
        out_x = None if g_x is None else (g_x * g).to(x.dtype)
        return out_x, (g_mu * g).to(mu.dtype), (g_lv * g).to(logvar.dtype), (g_pi * g).to(logpi.dtype), None


def _node_counts(idx: Tensor, cells: int, scatter: bool | None = None) -> Tensor:
    """How many entries of ``idx`` (int32, in ``[0, cells)``) fall in each cell: by ``bincount``
    (int64; the default on the CPU) or by a scatter-add (float32; the default elsewhere)."""
    if not (idx.device.type != "cpu" if scatter is None else scatter):
        return torch.bincount(idx, minlength=cells)
    # CUDA's bincount reads the largest index back to the host (a synchronisation); an atomic
    # scatter-add does not. Float32 counts are exact up to 2**24 weights in one cell.
    ones = torch.ones((), dtype=torch.float32, device=idx.device).expand(idx.numel())
    return torch.zeros(cells, dtype=torch.float32, device=idx.device).index_add_(0, idx, ones)


@dataclass(frozen=True)
class _Grid:
    """``nodes`` points ``lo + g * step``, each node's interval ``+- step / 2`` tiled by ``sub``
    cells (node g's cells are ``g * sub .. g * sub + sub - 1``). ``lo`` and ``step`` are floats on
    the host path, 0-d tensors on the device path."""

    nodes: int
    sub: int
    lo: float | Tensor
    step: float | Tensor

    def cells(self, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Each entry's cell (int32; on the host path the map is one pass)."""
        lo, step, sub = self.lo, self.step, self.sub
        if not isinstance(step, Tensor):
            offset = torch.tensor(sub / 2 - lo * sub / step)
            return tuple(torch.add(offset, x, alpha=sub / step).int() for x in xs)
        # Clamped: non-finite weights must not index outside the table (they cannot be seen here
        # without a synchronisation).
        return tuple(x.sub(lo).mul_(sub / step).add_(sub / 2).nan_to_num_(0.0).clamp_(0, self.nodes * sub - 1).int()
                     for x in xs)


def _ranges(xs: tuple[Tensor, ...], host: bool) -> tuple[float | Tensor, float | Tensor]:
    """The smallest and largest of all ``xs`` (floats on the host path: read back for free)."""
    ranges = [torch.aminmax(x) for x in xs]
    if host:
        return min(float(r[0]) for r in ranges), max(float(r[1]) for r in ranges)
    return torch.stack([r[0] for r in ranges]).min(), torch.stack([r[1] for r in ranges]).max()


def _grid(lo: float | Tensor, hi: float | Tensor, logvar: Tensor) -> _Grid | None:
    """Nodes spanning ``[lo, hi]`` for the components' log-variances ``logvar`` (None for a
    non-finite range).

    On the host path (floats; the CPU, where reading the range back is free) the node count is
    the power of two that spaces the nodes at most about ``_SPACING`` of the smallest std apart
    (within ``[_MIN_NODES, _MAX_NODES]``). The device path reads nothing back (a synchronisation)
    and uses ``_DEVICE_NODES``.
    """
    if isinstance(lo, Tensor) and isinstance(hi, Tensor):
        span = torch.maximum(hi - lo, 1e-3 * torch.maximum(lo.abs(), hi.abs())).clamp_min(1e-30)
        return _Grid(_DEVICE_NODES, _SUB, lo, span / (_DEVICE_NODES - 1))
    assert not isinstance(lo, Tensor) and not isinstance(hi, Tensor)
    if not math.isfinite(hi - lo):
        return None
    # The floor relative to the weights' magnitude keeps the rounding of x * inv within a
    # fraction of a cell (the cells reach half a node beyond both ends).
    span_f = max(hi - lo, 1e-3 * max(abs(lo), abs(hi)), 1e-30)
    want = span_f / (_SPACING * math.exp(0.5 * float(logvar.min()))) + 1
    nodes = _MAX_NODES if not want < _MAX_NODES else max(_MIN_NODES, 1 << math.ceil(math.log2(want)))
    return _Grid(nodes, _SUB, lo, span_f / (nodes - 1))


def _ramp(n: int, device: torch.device, centred: bool = False) -> Tensor:
    """``0 .. n-1`` (or centred on 0: the centres of n cells from their node, in cell widths).
    Made afresh on each full evaluation: a few KB, against a module-level cache of
    device tensors that would outlive every model."""
    return torch.arange(n, dtype=torch.float32, device=device) - ((n - 1) / 2 if centred else 0.0)


@dataclass
class _Table:
    """``-sum_i log p(x_i)`` over flat weights (see :func:`_table`), its gradients by ``mu``,
    ``logvar`` and ``logpi`` (each (k,)) and, per cell, the weights' gradient (empty when not
    asked for)."""

    loss: Tensor
    g_mu: Tensor
    g_logvar: Tensor
    g_logpi: Tensor
    g_cell: Tensor


def _table(grid: _Grid, cells: tuple[Tensor, ...], mu: Tensor, logvar: Tensor, logpi: Tensor,
           weights_grad: bool = True) -> _Table:
    """``-sum_i log p(x_i)`` over the weights in ``cells`` of ``grid`` and its gradients (no
    autograd).

    The per-weight negative log-likelihood ``f(x) = -log sum_j pi_j N(x | mu_j, var_j)`` is a
    function of one variable. It is evaluated exactly (all components), with its first two
    derivatives, at the grid's nodes ``c_g`` (:func:`_grid`), each weight falling in one of the
    ``sub`` cells that tile its nearest node's interval. Then

    * a weight's gradient is ``f'`` at its cell's centre, expanded to first order about the node:
      ``f'(c_g) + f''(c_g) (centre - c_g)``, off by at most about ``f''`` times half a cell width
      plus ``f'''`` times half a node spacing squared;
    * the loss and the prior's gradients are sums over the nodes, each weighted by how many
      weights it holds (the weights' first-order terms ``f'(c_g) (x - c_g)`` average out over a
      node).

    Per weight that is a min/max, an affine map, a histogram and one table look-up: six passes
    over the weights instead of ~15 over (weights x components), and nothing of size
    (weights x components) is formed.
    """
    nodes, sub = grid.nodes, grid.sub
    mu, logvar = mu.detach().float(), logvar.detach().float()
    inv_var = logvar.neg().exp()
    const = torch.add(logpi.detach().float(), logvar, alpha=-0.5).sub_(0.5 * _LOG_2PI)
    device = mu.device
    counts = _node_counts(cells[0], nodes * sub)
    for cell in cells[1:]:
        counts = counts + _node_counts(cell, nodes * sub)
    # Negated, the loss and the prior's gradients are single products.
    counts = counts.view(nodes, sub).sum(1, dtype=torch.float32).neg_()
    if isinstance(grid.step, Tensor):
        c = _ramp(nodes, device) * grid.step + grid.lo
    else:
        c = torch.linspace(grid.lo, grid.lo + (nodes - 1) * grid.step, nodes, device=device)
    # (k, G): the reductions over the components run along the contiguous nodes.
    d = c - mu[:, None]
    s = d * inv_var[:, None]  # (c - mu) / var
    lp = torch.addcmul(const[:, None], d, s, value=-0.5)  # log pi_j + log N(c | mu_j, var_j)
    top = lp.amax(0)
    # Clamped so that no responsibility (nor its products below) is a denormal float: they are
    # ~100x slower on x86, and a component e^-60 times less likely than another is nil.
    e = (lp - top).clamp_(min=-60.0).exp_()
    z = e.sum(0)
    # Rows r, r s and r (1 - (c - mu)^2 / var): the derivatives of -f by log pi and by mu, and
    # of 2 f by log var, at each node.
    rows = torch.empty((3, *e.shape), dtype=e.dtype, device=device)
    r = torch.div(e, z, out=rows[0])
    rs = torch.mul(r, s, out=rows[1])
    rm = torch.addcmul(r, rs, d, value=-1.0, out=rows[2])
    g_cell = counts.new_zeros(0)
    if weights_grad:
        f1 = rs.sum(0)  # f'
        f2 = torch.addcmul(inv_var @ rm, f1, f1)  # f'' = sum r / var - sum r s^2 + f'^2
        # g_cell[g * sub + j] = f'(c_g) + f''(c_g) * (centre of cell j - c_g)
        g_cell = torch.addcmul(f1[:, None], f2[:, None], _ramp(sub, device, centred=True) * (grid.step / sub)).view(-1)
    g = rows.view(3 * e.shape[0], -1) @ counts
    k = e.shape[0]
    return _Table(torch.dot(counts, top.add_(z.log_())), g[k : 2 * k], g[2 * k :].mul_(-0.5), g[:k], g_cell)


def _is_one(r: float | Tensor) -> bool:
    """Whether ``r`` is exactly 1, where that is known for free (not on an accelerator)."""
    if not isinstance(r, Tensor):
        return r == 1.0
    return r.device.type == "cpu" and r.numel() == 1 and float(r) == 1.0


def _times(gs: tuple[Tensor, ...], r: float | Tensor) -> tuple[Tensor, ...]:
    """``gs`` times ``r``. Training adds the loss as it is (``r == 1`` in the backward): then
    each full pass over the weights' gradients is skipped (on the CPU the check is free; an
    accelerator would synchronise, so it multiplies)."""
    return gs if _is_one(r) else tuple(g * r for g in gs)


class _TableNLL(torch.autograd.Function):
    """``-sum_i log p(x_i)`` over the flat weight tensors ``xs`` from :func:`_table` (the
    gradients are computed in the forward; the backward returns them)."""

    @staticmethod
    def forward(ctx: Any, mu: Tensor, logvar: Tensor, logpi: Tensor, *xs: Tensor) -> Tensor:
        xs = tuple(x.detach().float() for x in xs)
        grid = _grid(*_ranges(xs, xs[0].device.type == "cpu"), logvar.detach())
        if grid is None:  # non-finite weights: the loss and every gradient are NaN
            ctx.g, ctx.g_xs = (torch.full_like(mu, math.nan),) * 3, tuple(torch.full_like(x, math.nan) for x in xs)
            return torch.tensor(math.nan)
        cells = grid.cells(xs)
        t = _table(grid, cells, mu, logvar, logpi, any(ctx.needs_input_grad[3:]))
        ctx.g = (t.g_mu, t.g_logvar, t.g_logpi)
        ctx.g_xs = tuple(t.g_cell.index_select(0, cell) for cell in cells) if t.g_cell.numel() else ()
        return t.loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        g_xs, ctx.g_xs = ctx.g_xs, ()
        return (*_times(ctx.g, grad), *(_times(g_xs, grad) or (None,) * len(ctx.needs_input_grad[3:])))


@dataclass
class _Held:
    """A full evaluation of a :class:`MixturePrior` at loss weight ``scale`` that later steps
    reuse: the loss, the weights' gradients (flat, full size, zero off the masks) and those of the
    prior's parameters (means, log-variances, logits). ``key`` (shapes, devices, the masks'
    versions) and ``refs`` (weak references to the weights and masks) identify what it was made
    for."""

    key: tuple[Any, ...]
    refs: tuple[tuple[weakref.ref[Tensor], weakref.ref[Tensor] | None], ...]
    scale: float | Tensor
    loss: Tensor
    g_ws: tuple[Tensor, ...]
    grads: tuple[Tensor, Tensor, Tensor]

    def made_for(self, weights: list[tuple[Tensor, Tensor | None]]) -> bool:
        """Whether ``weights`` are the very tensors (and masks) it was made for."""
        return len(weights) == len(self.refs) and all(
            rw() is w and (rm() is m if rm is not None else m is None) for (rw, rm), (w, m) in zip(self.refs, weights, strict=True)
        )


class _HeldNLL(torch.autograd.Function):
    """``ratio`` times the held evaluation ``held`` of a :class:`MixturePrior`: its loss and the
    gradients of the prior's parameters (``means``, ``logvars``, ``logits``) and of the weights
    ``ws`` (flat, full size). Nothing is computed per weight beyond autograd's accumulation."""

    @staticmethod
    def forward(ctx: Any, held: _Held, ratio: float | Tensor, means: Tensor, logvars: Tensor, logits: Tensor,
                *ws: Tensor) -> Tensor:
        ctx.held, ctx.ratio = held, ratio
        return held.loss * ratio

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # The loss weight is folded into the held gradients; it changes only during tau's warm-up.
        r = grad if _is_one(ctx.ratio) else ctx.ratio * grad
        return (None, None, *_times(ctx.held.grads, r), *_times(ctx.held.g_ws, r))


def _nonempty(xs: list[Tensor]) -> list[Tensor]:
    """The non-empty ``xs``; on an accelerator as one flat copy (cheaper there than a handful of
    kernels per layer; on the CPU the copy and its gradient's would be two more passes)."""
    xs = [x for x in xs if x.numel()]
    return [torch.cat(xs)] if len(xs) > 1 and xs[0].device.type != "cpu" else xs


def _nll(xs: list[Tensor], mu: Tensor, logvar: Tensor, logpi: Tensor, chunk: int | None, table: bool) -> Tensor:
    """The summed NLL of the flat weight tensors ``xs``: from the table, or exact (small inputs, or
    ``table=False``)."""
    xs = _nonempty(xs)
    if not xs:
        return mu.new_zeros(())
    if table and sum(x.numel() for x in xs) > _EXACT_BELOW:
        return _TableNLL.apply(mu, logvar, logpi, *xs)
    x = xs[0] if len(xs) == 1 else torch.cat(xs)
    return _MixtureNLL.apply(x, mu, logvar, logpi, _chunk_size(mu.numel(), chunk))


def _kept_flat(w: Tensor, mask: Tensor | None) -> Tensor:
    flat = w.reshape(-1)
    return flat if mask is None else flat[mask.reshape(-1)]


def mixture_nll(w: Tensor, mu: Tensor, logvar: Tensor, logpi: Tensor, mask: Tensor | None = None,
                chunk: int | None = None, table: bool = True) -> Tensor:
    """Negative log-likelihood (summed) of the entries of ``w`` (those in ``mask``) under the
    mixture with means ``mu``, log-variances ``logvar`` and log mixing weights ``logpi`` (all
    (k,)).

    With ``table`` and more than 8192 entries it is read from a table over their range
    (:func:`_table`: the weights' gradients within about 1% of the exact ones, the loss and the
    prior's gradients closer); otherwise it is exact, evaluated ``chunk`` weights at a time
    (default: about 2M weight-component pairs)."""
    return _nll([_kept_flat(w, mask)], mu, logvar, logpi, chunk, table)


def mixture_nll_reference(w: Tensor, mu: Tensor, logvar: Tensor, logpi: Tensor,
                          mask: Tensor | None = None) -> Tensor:
    """The same as :func:`mixture_nll`, computed naively with a full (weights x components)
    tensor (for tests and small inputs)."""
    x = w.reshape(-1) if mask is None else w.reshape(-1)[mask.reshape(-1)]
    var = torch.exp(logvar)
    lp = logpi - 0.5 * (_LOG_2PI + logvar) - (x[:, None] - mu) ** 2 / (2 * var)
    return -torch.logsumexp(lp, 1).sum()


# ------------------------------------------------------------------------------------ prior


class MixturePrior(nn.Module):
    """The Gaussian-mixture prior, in units of ``scale`` (see the module doc).

    Component 0 is the zero component (mean 0, mixing weight ``pi_zero``, learned variance);
    components 1..k-1 have learned means, log-variances and mixing logits.
    """

    def __init__(self, means: Tensor, logvars: Tensor, logits: Tensor, pi_zero: float, scale: float) -> None:
        super().__init__()
        self.means = nn.Parameter(means.float().clone())  # (k-1,), units of scale
        self.logvars = nn.Parameter(logvars.float().clone())  # (k,), log(var / scale^2)
        self.logits = nn.Parameter(logits.float().clone())  # (k-1,)
        self.pi_zero, self.scale = float(pi_zero), float(scale)
        self._held: _Held | None = None  # the last full evaluation (see nll)

    @classmethod
    def fit(cls, values: np.ndarray, components: int, pi_zero: float, zero_std: float = 0.0) -> MixturePrior:
        """Initialise from the optimal 1-D k-means of ``values`` (the prior's weights); the zero
        component's std is ``zero_std`` (units of the weights' std) when > 0, else its cluster's."""
        scale = float(values.std()) if values.size > 1 and values.std() > 0 else 1.0
        x = values / scale
        c = kmeans_1d(x, components) if x.size else None
        if c is None or c.k < 2:  # degenerate input: spread the means evenly
            centroids = np.linspace(-2.0, 2.0, components)
            counts, var = np.ones(components), np.full(components, 0.1)
        else:
            centroids, labels = c.centroids, c.labels.astype(np.int64)
            counts = np.bincount(labels, minlength=c.k).astype(np.float64)
            sq = np.bincount(labels, weights=(x - centroids[labels]) ** 2, minlength=c.k)
            var = sq / np.maximum(counts, 1)
        zero = int(np.argmin(np.abs(centroids)))
        others = np.arange(centroids.size) != zero
        logvar = np.log(np.clip(var, _MIN_STD**2, _MAX_STD**2))
        zero_logvar = 2 * math.log(zero_std) if zero_std > 0 else logvar[zero]
        logvars = np.concatenate([[zero_logvar], logvar[others]])
        logits = np.log(np.maximum(counts[others], 1.0))
        return cls(torch.from_numpy(centroids[others]), torch.from_numpy(logvars),
                   torch.from_numpy(logits), pi_zero, scale)

    @property
    def k(self) -> int:
        """Components, the zero component included."""
        return int(self.logvars.numel())

    def components(self) -> tuple[Tensor, Tensor, Tensor]:
        """Means, log-variances and log mixing weights of all components in weight units (each
        (k,), component 0 the zero component), differentiable w.r.t. the parameters."""
        return self.formulas(self.means, self.logvars, self.logits, self.pi_zero, self.scale)

    @staticmethod
    def formulas(means: Tensor, logvars: Tensor, logits: Tensor, pi_zero: float, s: float) -> tuple[Tensor, Tensor, Tensor]:
        """The components from the parameters (see :meth:`components`)."""
        zero = means.new_zeros(1)
        mu = torch.cat([zero, means]) * s
        lv = logvars.clamp(2 * math.log(_MIN_STD), 2 * math.log(_MAX_STD)) + 2 * math.log(s)
        logpi = torch.cat([zero + math.log(pi_zero), math.log1p(-pi_zero) + torch.log_softmax(logits, 0)])
        return mu, lv, logpi

    @staticmethod
    def formulas_backward(g_mu: Tensor, g_lv: Tensor, g_logpi: Tensor, logvars: Tensor, logits: Tensor,
                          s: float) -> tuple[Tensor, Tensor, Tensor]:
        """The gradients of the parameters (means, log-variances, logits) from those of the
        components, through :meth:`formulas` (what autograd would give)."""
        inside = (logvars >= 2 * math.log(_MIN_STD)) & (logvars <= 2 * math.log(_MAX_STD))
        g = g_logpi[1:]
        return g_mu[1:] * s, g_lv * inside, g - torch.softmax(logits, 0) * g.sum()

    def nll(self, weights: list[tuple[Tensor, Tensor | None]], chunk: int | None = None,
            table: bool = True, scale: float | Tensor = 1.0, reuse: bool = False) -> Tensor:
        """``scale`` times the summed negative log-likelihood of the kept entries of every
        ``(weight, mask)``.

        With ``table`` and more than 8192 of them it is read from a table (:func:`_table`) and
        the evaluation is held. With ``reuse``, while the same weight tensors and masks come
        back, the held evaluation answers instead of a new one: its loss and gradients (the
        weights' as they were at their values then), at the current ``scale``. Otherwise it is
        exact (chunked).
        """
        key = tuple((w.shape, w.device, None if m is None else m._version) for w, m in weights)
        held = self._held
        if not (table and reuse and held is not None and held.key == key and held.made_for(weights)):
            kept = [_kept_flat(w, mask) for w, mask in weights]
            if not table or sum(x.numel() for x in kept) <= _EXACT_BELOW:
                mu, lv, logpi = self.components()
                return _nll(kept, mu, lv, logpi, chunk, False) * scale
            held = self._held = self._evaluate(weights, key, scale)
            if held is None:  # non-finite weights: what the exact evaluation gives
                return self.nll(weights, chunk, table=False, scale=scale)
        ratio = 1.0 if scale is held.scale else scale / held.scale
        return _HeldNLL.apply(held, ratio, self.means, self.logvars, self.logits, *(w.reshape(-1) for w, _ in weights))

    def _evaluate(self, weights: list[tuple[Tensor, Tensor | None]], key: tuple[Any, ...],
                  scale: float | Tensor) -> _Held | None:
        """A full evaluation at loss weight ``scale`` from the table, for :meth:`nll` to hold (None:
        non-finite weights)."""
        kept = [_kept_flat(w.detach(), mask).float() for w, mask in weights]
        xs = tuple(x for x in kept if x.numel())
        with torch.no_grad():
            mu, lv, logpi = self.components()
        grid = _grid(*_ranges(xs, xs[0].device.type == "cpu"), lv)
        if grid is None:
            return None
        cells = grid.cells(xs)
        t = _table(grid, cells, mu, lv, logpi)
        grads = self.formulas_backward(t.g_mu * scale, t.g_logvar * scale, t.g_logpi * scale, self.logvars.detach(),
                                       self.logits.detach(), self.scale)
        g_cell, g_ws, each = t.g_cell * scale, [], iter(cells)
        for (w, mask), x in zip(weights, kept, strict=True):
            g = g_cell.index_select(0, next(each)) if x.numel() else x
            if mask is not None:  # full size, zero off the mask: held, it needs no indexing
                g = torch.zeros(w.numel(), device=w.device).masked_scatter_(mask.reshape(-1), g)
            g_ws.append(g)
        refs = tuple((weakref.ref(w), None if m is None else weakref.ref(m)) for w, m in weights)
        return _Held(key, refs, scale, t.loss * scale, tuple(g_ws), grads)


@dataclass(frozen=True)
class Mixture:
    """A fitted mixture as plain arrays (weight units): zero component first, ``mu[0] == 0``."""

    mu: np.ndarray
    var: np.ndarray
    pi: np.ndarray

    @classmethod
    def of(cls, prior: MixturePrior) -> Mixture:
        """The prior's current components."""
        with torch.no_grad():
            mu, lv, logpi = (t.detach().double().cpu().numpy() for t in prior.components())
        return cls(mu, np.exp(lv), np.exp(logpi))

    def merged(self, threshold: float) -> Mixture:
        """Repeatedly merge the two adjacent components (by mean) that are closest relative to
        the larger of their standard deviations, while that distance is below ``threshold``.
        A merge matches the first two moments; a merge with the zero component stays at zero."""
        mu, var, pi = list(self.mu), list(self.var), list(self.pi)
        while len(mu) > 1:
            order = sorted(range(len(mu)), key=lambda i: mu[i])
            gaps = [(abs(mu[b] - mu[a]) / math.sqrt(max(var[a], var[b])), a, b)
                    for a, b in zip(order, order[1:], strict=False)]
            gap, a, b = min(gaps)
            if gap >= threshold:
                break
            if b == 0:
                a, b = b, a  # keep the zero component's slot
            p = pi[a] + pi[b]
            m = 0.0 if a == 0 else (pi[a] * mu[a] + pi[b] * mu[b]) / p
            second = (pi[a] * (var[a] + mu[a] ** 2) + pi[b] * (var[b] + mu[b] ** 2)) / p
            mu[a], var[a], pi[a] = m, max(second - m * m, 1e-30), p
            del mu[b], var[b], pi[b]
        return Mixture(np.array(mu), np.array(var), np.array(pi))

    def assign(self, values: np.ndarray) -> np.ndarray:
        """For each value, the more likely of the two components whose means bracket it."""
        order = np.argsort(self.mu, kind="stable")
        mu, var, logpi = self.mu[order], self.var[order], np.log(self.pi[order])
        hi = np.clip(np.searchsorted(mu, values), 0, mu.size - 1)
        lo = np.clip(hi - 1, 0, mu.size - 1)

        def score(j: np.ndarray) -> np.ndarray:
            return logpi[j] - 0.5 * np.log(var[j]) - (values - mu[j]) ** 2 / (2 * var[j])

        best = np.where(score(lo) >= score(hi), lo, hi)
        return order[best]


# ------------------------------------------------------------------------------ technique


@dataclass(frozen=True)
class SWSConfig(TechniqueConfig):
    """Soft weight-sharing.

    Attributes:
        components: Mixture components k, the zero component included, 4..64. The final codebook
            has at most k-1 entries (``ceil(log2(k-1))``-bit indices).
        pi_zero: Fixed mixing weight of the zero component (0.5..0.999): the prior belief that a
            weight is zero; higher prunes more.
        tau: Weight of the complexity loss (per-weight negative log-likelihood of the prior).
        warmup: Fraction of the fine-tune over which ``tau`` rises linearly from 0.
        lr_means: Learning rate of the component means (units of the weight std).
        lr_logvar: Learning rate of the log-variances.
        lr_mixing: Learning rate of the mixing logits.
        merge: Components whose means are closer than this many of the larger standard deviation
            are merged at ``finalize``.
        zero_std: Initial standard deviation of the zero component, in units of the weights'
            std (0.05..1), or 0: the std of the k-means cluster nearest zero (plans recorded
            before this field existed). A broad zero component is what lets the prior pull the
            many small weights to zero, as in the paper: on LeNet-300-100 (t10k split, 33
            epochs, the paper's tau) 0 gave 14.6x at -0.4 points, 1.0 gave 114x at -0.85.
    """

    components: int = 16
    pi_zero: float = 0.7
    tau: float = 3.0
    warmup: float = 0.25
    lr_means: float = 5e-4
    lr_logvar: float = 3e-3
    lr_mixing: float = 3e-3
    merge: float = 0.5
    zero_std: float = 0.0

    def validate(self) -> None:
        """Check ranges."""
        check(4 <= self.components <= 64, f"sws.components must be in 4..64, got {self.components}")
        check(0.5 <= self.pi_zero <= 0.999, f"sws.pi_zero must be in [0.5, 0.999], got {self.pi_zero}")
        check(self.tau >= 0, f"sws.tau must be >= 0, got {self.tau}")
        check(0 <= self.warmup < 1, f"sws.warmup must be in [0, 1), got {self.warmup}")
        for name in ("lr_means", "lr_logvar", "lr_mixing"):
            check(getattr(self, name) >= 0, f"sws.{name} must be >= 0, got {getattr(self, name)}")
        check(self.merge >= 0, f"sws.merge must be >= 0, got {self.merge}")
        check(self.zero_std == 0 or _MIN_STD <= self.zero_std <= _MAX_STD,
              f"sws.zero_std must be 0 (the central cluster's) or in [{_MIN_STD}, {_MAX_STD}], got {self.zero_std}")


@dataclass
class SWSState:
    """What ``apply`` returns for ``hooks`` and ``finalize``: the prior and the layers under it.

    The prior is training-only state: it stays out of the model (and out of the artifact). Copy
    it together with its model (``copy.deepcopy((model, state))``) so that ``layers`` follows.
    """

    prior: MixturePrior
    layers: list[CConv2d | CLinear]


def _prior_weights(layers: list[CConv2d | CLinear]) -> list[tuple[Tensor, Tensor | None]]:
    return [(m.weight, m.mask) for m in layers]


class SWSHook(TrainHook):
    """The prior's parameter groups and the complexity loss ``tau(step) * NLL / n``."""

    def __init__(self, state: SWSState, config: SWSConfig) -> None:
        self.state, self.config = state, config

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Means, log-variances and mixing logits, each with its own learning rate (no decay)."""
        prior = self.state.prior
        device = next((m.weight.device for m in self.state.layers), torch.device("cpu"))
        prior.to(device)
        c = self.config
        return [
            {"params": [prior.means], "lr": c.lr_means, "weight_decay": 0.0},
            {"params": [prior.logvars], "lr": c.lr_logvar, "weight_decay": 0.0},
            {"params": [prior.logits], "lr": c.lr_mixing, "weight_decay": 0.0},
        ]

    def tau(self, step: int, total_steps: int) -> float:
        """The complexity weight at ``step``: linear warm-up, then ``config.tau``."""
        warm = self.config.warmup * total_steps
        return self.config.tau * (min(1.0, (step + 1) / warm) if warm >= 1 else 1.0)

    def loss(self, model: nn.Module, step: int, total_steps: int) -> Tensor | None:
        """``tau(step)`` times the prior's negative log-likelihood per weight."""
        weights = _prior_weights(self.state.layers)
        if not weights or self.config.tau == 0:
            return None
        # Masks are counted on the device each step (they may change under gradual pruning; int()
        # would synchronise the GPU); unmasked layers are counted on the host, for free. The
        # weight goes into the likelihood, which folds it into its tables (see _table).
        n: float | Tensor = float(sum(w.numel() for w, m in weights if m is None))
        masks = [m for _, m in weights if m is not None]
        if masks:
            n = (torch.stack([m.sum() for m in masks]).sum() + n).float().clamp_min(1.0)
        scale = self.tau(step, total_steps) / (n if masks else max(n, 1.0))
        # A full evaluation costs about as much as the rest of a LeNet-300 step, so one is reused
        # for a few steps (MixturePrior.nll): as many as keep the outcome of a fine-tune that
        # evaluates every step, which takes fewer the faster the prior's parameters move (they
        # move in proportion to tau and their learning rates; see the module doc).
        c = self.config
        speed = c.tau * max(c.lr_means / SWSConfig.lr_means, c.lr_logvar / SWSConfig.lr_logvar,
                            c.lr_mixing / SWSConfig.lr_mixing)
        every = max(1, min(_REFRESH, int(_PULL / speed))) if speed > 0 else _REFRESH
        return self.state.prior.nll(weights, scale=scale, reuse=step % every != 0)


def _kept(layer: CConv2d | CLinear) -> np.ndarray:
    return kept_values(layer)


@register_technique
class SoftWeightSharing(Technique[SWSConfig, SWSState]):
    """Soft weight-sharing: a learned Gaussian-mixture prior during fine-tuning, then a snap to
    its means (zero component -> pruned) and a global codebook."""

    name = "sws"
    stage = "weights"
    family = "sws"
    config_cls = SWSConfig

    def suggest(self, trial: optuna.Trial, prefix: str) -> SWSConfig:
        """Components (log scale), tau (log scale) and pi_zero; a broad zero component
        (``zero_std`` 1: not a parameter, so studies recorded before it resume unchanged); the
        rest at their defaults."""
        return SWSConfig(
            components=trial.suggest_int(f"{prefix}.components", 4, 64, log=True),
            tau=trial.suggest_float(f"{prefix}.tau", 0.01, 30.0, log=True),
            pi_zero=trial.suggest_float(f"{prefix}.pi_zero", 0.5, 0.99),
            zero_std=1.0,
        )

    def apply(self, model: nn.Module, config: SWSConfig, ctx: ApplyContext) -> SWSState:
        """Wrap the layers, protect the ones the policy protects, and fit the prior to the
        others' weights."""
        protected = ctx.policy.protected_paths(model)
        layers = []
        for path, layer in compressed_layers(model):
            if path in protected:
                protect(layer)
            else:
                layers.append(layer)
        values = np.concatenate([_kept(m) for m in layers]) if layers else np.zeros(0)
        return SWSState(MixturePrior.fit(values, config.components, config.pi_zero, config.zero_std), layers)

    def hooks(self, model: nn.Module, config: SWSConfig, state: SWSState) -> list[TrainHook]:
        """The prior's hook (parameter groups and complexity loss)."""
        return [SWSHook(state, config)]

    def finalize(self, model: nn.Module, config: SWSConfig, state: SWSState) -> None:
        """Merge close components, snap each weight to its component's mean (zero -> pruned),
        and install the mask and a global codebook of the non-zero means."""
        mix = Mixture.of(state.prior).merged(config.merge)
        assigned = [mix.assign(_kept(m)) for m in state.layers]
        used = np.unique(np.concatenate(assigned + [np.zeros(0, dtype=np.int64)]))
        used = used[used != 0]
        used = used[np.argsort(mix.mu[used])]
        centroids = mix.mu[used] if used.size else np.zeros(1)
        remap = np.full(mix.mu.size, -1, dtype=np.int64)
        remap[used] = np.arange(used.size)
        shared = nn.Parameter(torch.from_numpy(centroids).float())
        labels_all = np.concatenate([remap[a][remap[a] >= 0] for a in assigned] + [np.zeros(0, np.int64)])
        counts = member_counts(labels_all, shared.numel())
        for layer, comp in zip(state.layers, assigned, strict=True):
            self._install(layer, remap[comp], shared, counts)
        snap_weights(model)

    @staticmethod
    def _install(layer: CConv2d | CLinear, labels: np.ndarray, centroids: nn.Parameter, counts: Tensor) -> None:
        """Mask the zero-snapped weights and give the layer the shared codebook."""
        device = layer.weight.device
        old = layer.mask.detach().cpu().reshape(-1) if layer.mask is not None else torch.ones(layer.weight.numel(), dtype=torch.bool)
        lab = torch.from_numpy(labels)
        kept = torch.zeros_like(old)
        kept[old] = lab >= 0
        idx = torch.zeros(layer.weight.numel(), dtype=torch.int64)
        idx[kept] = lab[lab >= 0]
        layer.set_mask(kept.reshape(layer.weight.shape).to(device))
        layer.weight_repr = CodebookRepr.build(centroids, idx.reshape(layer.weight.shape).to(device),
                                               share=SHARE, counts=counts)
        layer.weight_repr.to(device)

    def settings(self) -> list[SWSConfig]:
        """32, 16, 8, 4 components."""
        return [SWSConfig(components=k) for k in (32, 16, 8, 4)]

    def moderate(self) -> SWSConfig:
        """16 components (at most 15 non-zero shared values, 4-bit indices) and the defaults."""
        return SWSConfig(components=16)
