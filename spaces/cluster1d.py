"""Exact and fast one-dimensional clustering of network weights.

Weights are scalars, so codebook quantization is 1-D clustering, and 1-D admits algorithms that
the generic n-dimensional ones in scikit-learn cannot use:

* :func:`kmeans_1d`: *exact* k-means by dynamic programming over sorted points. Large inputs are
  first reduced to a weighted histogram (``bins`` equal-width bins, each represented by the mean
  of its values; an asinh-warped grid instead when outliers make equal-width bins too coarse);
  the DP finds the optimal partition of the bins, and exact Lloyd steps on the original values
  then move each boundary to its place inside its bin.
* :func:`gmm_1d`: EM for a Gaussian mixture on the same histogram (per-bin count, sum and
  scatter), initialised by the 1-D k-means; the reported log-likelihood is computed on the
  original values.
* :func:`dbscan_1d`: DBSCAN by sorting: neighbour counts by binary search, clusters as runs of
  core points, border points tie-broken exactly as scikit-learn's expansion order does.

All functions take any 1-D float array (float32 or float64) and return a :class:`Clustering1D`
whose centroids are sorted ascending and whose labels index into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Clustering1D", "GMMParams", "dbscan_1d", "gmm_1d", "kmeans_1d", "sse"]

# Values per chunk in passes over all values (the final GMM pass holds a k-by-chunk array).
_CHUNK = 1 << 18
# The bin of a value is computed in floating point; a value may land one bin off when it lies
# within a rounding error of an edge. Bins are therefore treated as reaching this fraction of a
# bin width beyond their edges when deciding whether a decision boundary cuts through them.
_EDGE_TOL = 1e-3
# Fewest bins between consecutive centroids for the histogram to count as fine enough.
_MIN_BINS = 16
# Cap on exact Lloyd iterations after the DP (it starts at the optimum over bin-aligned cuts and
# usually stops after a handful).
_LLOYD_ITERS = 200


@dataclass(frozen=True)
class Clustering1D:
    """Result of a 1-D clustering.

    ``centroids`` is a float64 array sorted ascending; ``labels[i]`` is the index into
    ``centroids`` of value ``i`` (int32), or -1 for DBSCAN noise.
    """

    centroids: np.ndarray
    labels: np.ndarray

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.centroids.shape[0])


@dataclass(frozen=True)
class GMMParams:
    """A fitted 1-D Gaussian mixture, components sorted by mean.

    ``log_likelihood`` is the mean log-density per original value (scikit-learn's ``score``);
    ``n_iter``/``converged`` describe the EM run and ``var_floor`` the variance floor used.
    """

    means: np.ndarray
    variances: np.ndarray
    weights: np.ndarray
    log_likelihood: float
    n_iter: int
    converged: bool
    var_floor: float


# --------------------------------------------------------------------------------------------
# Validation and the weighted-points representation


def _as_values(values: object) -> np.ndarray:
    """Return ``values`` as a non-empty, finite, 1-D float32/float64 array (no copy if possible)."""
    x = np.asarray(values)
    if x.ndim != 1:
        raise ValueError(f"values must be a 1-D array, got shape {x.shape}")
    if x.size == 0:
        raise ValueError("values is empty (size 0); pass at least one value")
    if x.dtype != np.float32 and x.dtype != np.float64:
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"values must be numeric, got dtype {x.dtype}")
        x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("values contains NaN or infinity; remove or replace them")
    return x


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got k={k!r}")
    return int(k)


def _check_bins(bins: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got bins={bins!r}")
    return int(bins)


def _as_weights(weights: object, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},) like values, got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and >= 0")
    if not (w > 0).any():
        raise ValueError("weights are all zero; at least one value needs a positive weight")
    return w


@dataclass(frozen=True)
class _Atoms:
    """Weighted points sorted ascending: the data the DP and EM work on.

    ``x`` is the (weighted) mean of the values an atom stands for, ``w`` their total weight and
    ``scatter`` their weighted sum of squared deviations from ``x`` (0 for exact values).
    """

    x: np.ndarray
    w: np.ndarray
    scatter: np.ndarray


@dataclass(frozen=True)
class _Grid:
    """Bins of equal width in T(v): T(v) = v, or asinh((v - centre) / scale) when ``scale`` is set.

    The warped grid keeps ``nbins`` bins but makes them fine where the values are dense and wide
    in the tails; the bin coordinate of v is (T(v) - t0) / width.
    """

    t0: float
    width: float
    nbins: int
    centre: float = 0.0
    scale: float | None = None

    @classmethod
    def spanning(
        cls, lo: float, hi: float, nbins: int, centre: float, scale: float | None
    ) -> _Grid:
        g = cls(0.0, 1.0, nbins, centre, scale)
        t_lo, t_hi = g.transform(np.array([lo, hi]))
        return cls(float(t_lo), float(t_hi - t_lo) / nbins, nbins, centre, scale)

    def transform(self, v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        return v if self.scale is None else np.arcsinh((v - self.centre) / self.scale)

    def coord(self, v: np.ndarray) -> np.ndarray:
        """Position of each value in bin units; its bin is the integer part."""
        t = self.transform(v) - self.t0
        t *= 1.0 / self.width
        return t


@dataclass(frozen=True)
class _Histogram:
    """Values binned on ``grid``: ``idx[i]`` is the bin of value ``i``, atoms the non-empty bins."""

    grid: _Grid
    idx: np.ndarray
    atoms: _Atoms
    atom_bin: np.ndarray  # bin number of each atom


def _unique_atoms(x: np.ndarray, w: np.ndarray | None) -> tuple[_Atoms, np.ndarray]:
    """Distinct values with their total weights, and the inverse map value -> atom."""
    u, inv = np.unique(x, return_inverse=True)
    wt = np.bincount(inv, weights=w, minlength=u.size).astype(np.float64)
    return _Atoms(u.astype(np.float64), wt, np.zeros_like(wt)), inv


def _histogram(x: np.ndarray, w: np.ndarray | None, grid: _Grid, *, scatter: bool) -> _Histogram:
    """Bin ``x`` on ``grid`` and keep the non-empty bins as atoms.

    Each atom sits at the mean of its values, not at the bin centre, so it carries the exact first
    moment of the bin; the within-bin scatter (kept when ``scatter=True``) is the only thing lost,
    and k-means adds it as the same constant to every partition that does not cut through a bin.
    Works in chunks so that only the int32 bin index of each value is allocated at full size.
    """
    n, bins = x.size, grid.nbins
    mid = (float(x.min()) + float(x.max())) / 2  # moments about mid: S2 - S1^2/W does not cancel
    idx = np.empty(n, dtype=np.int32)
    wsum, s1, s2 = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for start in range(0, n, _CHUNK):
        sl = slice(start, start + _CHUNK)
        t = grid.coord(x[sl])  # float64: within ~1e-10 bins of the exact coordinate
        ic = idx[sl]
        np.copyto(ic, t, casting="unsafe")  # truncation == floor for t >= 0 (t > -1e-10 here)
        np.clip(ic, 0, bins - 1, out=ic)  # the maximum lands on the last bin's closing edge
        xc = np.subtract(x[sl], mid, dtype=np.float64)
        wc = None if w is None else w[sl]
        wsum += np.bincount(ic, weights=wc, minlength=bins)
        s1 += np.bincount(ic, weights=xc if wc is None else wc * xc, minlength=bins)
        if scatter:
            xc *= xc
            s2 += np.bincount(ic, weights=xc if wc is None else wc * xc, minlength=bins)
    keep = np.flatnonzero(wsum > 0)
    wk = wsum[keep]
    mc = s1[keep] / wk
    sc = np.maximum(s2[keep] - wk * mc * mc, 0.0) if scatter else np.zeros_like(wk)
    mean = mc + mid
    # Rounding can push a bin mean a hair outside its bin; sorting keeps the atoms ordered.
    order = np.argsort(mean, kind="stable")
    atoms = _Atoms(mean[order], wk[order], sc[order])
    return _Histogram(grid, idx, atoms, keep[order])


def _equal_width(x: np.ndarray, bins: int) -> _Grid:
    return _Grid.spanning(float(x.min()), float(x.max()), bins, 0.0, None)


def _warped(x: np.ndarray, h: _Histogram) -> _Grid:
    """An asinh grid centred on the median with the interquartile half-range as its scale."""
    cw = np.cumsum(h.atoms.w)
    q25, q50, q75 = h.atoms.x[np.searchsorted(cw, np.array([0.25, 0.5, 0.75]) * cw[-1])]
    lo, hi = float(x.min()), float(x.max())
    scale = max((q75 - q25) / 2, (hi - lo) * 1e-9)
    return _Grid.spanning(lo, hi, h.grid.nbins, float(q50), float(scale))


def _resolved(grid: _Grid, c: np.ndarray) -> bool:
    """Whether consecutive centroids are at least _MIN_BINS bins apart on the grid."""
    return c.size < 2 or float(np.diff(grid.coord(c)).min()) >= _MIN_BINS


def _predicted_spacing(h: _Histogram, k: int) -> float:
    """Predicted smallest gap, in bins, between k optimal centroids.

    High-resolution quantisation theory: optimal centroids have density proportional to p^(1/3),
    so the gap at the densest bin is sum_b count_b^(1/3) / (k * max_b count_b^(1/3)) bins.
    """
    c = np.cbrt(h.atoms.w)
    return float(c.sum() / (k * c.max()))


def _fine_histogram(
    x: np.ndarray, w: np.ndarray | None, bins: int, k: int, *, scatter: bool
) -> tuple[_Histogram, np.ndarray]:
    """A histogram fine enough for k clusters, and the optimal partition of its atoms.

    Equal-width bins first. When outliers stretch the range so far that some optimal clusters
    would span fewer than _MIN_BINS bins (the DP could then only place their boundaries coarsely,
    and Lloyd repairs boundaries only locally), the values are binned again on an asinh grid that
    is fine in the dense centre. The need is predicted before the DP (so that the DP usually runs
    once) and checked after it.
    """
    h = _histogram(x, w, _equal_width(x, bins), scatter=scatter)
    warp = h.atoms.x.size < k or _predicted_spacing(h, k) < 1.5 * _MIN_BINS
    if not warp:
        cuts = _optimal_partition(h.atoms, k)
        warp = not _resolved(h.grid, _segment_means(h.atoms, cuts))
    if warp:
        h = _histogram(x, w, _warped(x, h), scatter=scatter)
        cuts = _optimal_partition(h.atoms, k)
    return h, cuts


# --------------------------------------------------------------------------------------------
# Exact weighted 1-D k-means by dynamic programming


class _Prefix:
    """Prefix sums of w, w*x, w*x^2 (x centred) giving any contiguous cluster's SSE in O(1)."""

    def __init__(self, atoms: _Atoms) -> None:
        w = atoms.w
        xc = atoms.x - _wsum(w, atoms.x) / w.sum()  # centring avoids cancellation in Q - S^2/W
        self.W = np.concatenate(([0.0], np.cumsum(w)))
        self.S = np.concatenate(([0.0], np.cumsum(w * xc)))
        self.Q = np.concatenate(([0.0], np.cumsum(w * xc * xc + atoms.scatter)))

    def cost(self, s: np.ndarray, i: np.ndarray) -> np.ndarray:
        """SSE of the cluster made of atoms s..i-1 (s < i elementwise)."""
        dw = self.W[i] - self.W[s]
        ds = self.S[i] - self.S[s]
        return (self.Q[i] - self.Q[s]) - ds * ds / dw


def _segment_argmin(val: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Position (into ``val``) of the first minimum of each contiguous segment."""
    best = np.minimum.reduceat(val, starts)
    hit = np.flatnonzero(val == np.repeat(best, lens))
    return hit[np.searchsorted(hit, starts)]


def _dp_layer(
    prev: np.ndarray, low: np.ndarray, j: int, m: int, pre: _Prefix
) -> tuple[np.ndarray, np.ndarray]:
    """Row j of the DP: D[i] = min_s prev[s] + cost(s, i) for i in [j, m], with its argmins.

    The optimal split is monotone in i (the SSE cost satisfies the quadrangle inequality), so
    divide and conquer evaluates O(m log m) candidates; it is also never before the previous
    row's split ``low[i]`` (as in Ckmeans.1d.dp), which prunes most candidates when k is large.
    All subproblems of one recursion level are evaluated together in flat numpy arrays.
    """
    d = np.full(m + 1, np.inf)
    arg = np.zeros(m + 1, dtype=np.int64)
    # Q[i] is the same for every candidate s of one i, so it is added only to the minimum.
    base = prev - pre.Q
    ilo, ihi = np.array([j]), np.array([m])
    slo, shi = np.array([j - 1]), np.array([m - 1])
    while ilo.size:
        mid = (ilo + ihi) // 2
        hi = np.minimum(shi, mid - 1)
        lo = np.minimum(np.maximum(slo, low[mid]), hi)  # min(): robust to rounding ties
        lens = hi - lo + 1
        starts = np.cumsum(lens) - lens
        s = np.repeat(lo - starts, lens)
        s += np.arange(s.size)
        dw = np.repeat(pre.W[mid], lens) - pre.W[s]
        ds = np.repeat(pre.S[mid], lens) - pre.S[s]
        ds *= ds
        ds /= dw
        val = base[s] - ds
        pos = _segment_argmin(val, starts, lens)
        best_s = s[pos]
        d[mid], arg[mid] = val[pos] + pre.Q[mid], best_s
        left, right = ilo <= mid - 1, mid + 1 <= ihi
        ilo = np.concatenate((ilo[left], mid[right] + 1))
        ihi = np.concatenate((mid[left] - 1, ihi[right]))
        slo = np.concatenate((slo[left], best_s[right]))
        shi = np.concatenate((best_s[left], shi[right]))
    return d, arg


def _optimal_cuts(atoms: _Atoms, k: int) -> np.ndarray:
    """Boundaries b_0=0 < b_1 < ... < b_k=m of the optimal k-partition of the sorted atoms.

    Cluster j is atoms[b_j : b_{j+1}]. Requires 1 <= k <= m (number of atoms).
    """
    m = atoms.x.size
    pre = _Prefix(atoms)
    if k == 1:
        return np.array([0, m])
    ii = np.arange(m + 1)
    prev = np.full(m + 1, np.inf)
    prev[1:] = pre.cost(np.zeros(m, dtype=np.int64), ii[1:])
    arg = np.zeros(m + 1, dtype=np.int64)
    args = []
    for j in range(2, k):
        prev, arg = _dp_layer(prev, arg, j, m, pre)
        args.append(arg.astype(np.int32))
    # Last layer: only D[k][m] is needed.
    s = np.arange(max(k - 1, int(arg[m])), m)
    last = int(s[np.argmin(prev[s] + pre.cost(s, np.full_like(s, m)))])
    cuts = [m, last]
    for a in reversed(args):
        cuts.append(int(a[cuts[-1]]))
    cuts.append(0)
    return np.array(cuts[::-1])


def _segment_means(atoms: _Atoms, cuts: np.ndarray) -> np.ndarray:
    ws = np.add.reduceat(atoms.w, cuts[:-1])
    ss = np.add.reduceat(atoms.w * atoms.x, cuts[:-1])
    return ss / ws


def _optimal_partition(atoms: _Atoms, k: int) -> np.ndarray:
    """Boundaries of the optimal partition of the atoms into min(k, m) clusters."""
    m = atoms.x.size
    return np.arange(m + 1) if k >= m else _optimal_cuts(atoms, k)


def _midpoints(c: np.ndarray) -> np.ndarray:
    return (c[1:] + c[:-1]) / 2


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest sorted centroid (ties to the lower one), exact in float64."""
    return np.searchsorted(_midpoints(c), x.astype(np.float64, copy=False), side="left").astype(
        np.int32
    )


# --------------------------------------------------------------------------------------------
# Exact Lloyd refinement on the original values, with the histogram as an exact index


def _cut_bins(grid: _Grid, mids: np.ndarray) -> np.ndarray:
    """Bins whose (slightly widened) interval contains a decision boundary."""
    pos = grid.coord(mids)
    lo = np.floor(pos - _EDGE_TOL).astype(np.int64)
    hi = np.floor(pos + _EDGE_TOL).astype(np.int64)
    both = np.unique(np.concatenate((lo, hi)))
    return both[(both >= 0) & (both < grid.nbins)]


def _piecewise_labels(
    x: np.ndarray, h: _Histogram | None, points: np.ndarray, seg: np.ndarray
) -> np.ndarray:
    """Labels of a step function of the value: ``seg[j]`` on (points[j-1], points[j]].

    With a histogram, each bin that no step point cuts through takes one label for all its
    values (a table lookup by bin); only the values in cut bins are compared with the points.
    """
    seg = seg.astype(np.int32)
    if h is None:
        return seg[np.searchsorted(points, x.astype(np.float64, copy=False), side="left")]
    nb = h.grid.nbins
    # An uncut bin lies wholly on one side of each point, like its centre does.
    table = seg[np.searchsorted(h.grid.coord(points), np.arange(nb) + 0.5, side="left")]
    labels = table[h.idx]
    cut = _cut_bins(h.grid, points)
    if cut.size:
        mask = np.zeros(nb, dtype=bool)
        mask[cut] = True
        pos = np.flatnonzero(mask[h.idx])
        labels[pos] = seg[np.searchsorted(points, x[pos].astype(np.float64), side="left")]
    return labels


class _Refiner:
    """Lloyd iterations on the exact values, touching only the values in cut bins.

    A bin that no decision boundary cuts through sends all its values to one centroid, so its
    aggregate (weight, sum) is exact for the centroid update; only the bins that boundaries cut
    need their individual values, which are gathered once per expansion (one O(n) pass).
    """

    def __init__(self, h: _Histogram, x: np.ndarray, w: np.ndarray | None) -> None:
        self.h, self.x, self.w = h, x, w
        self.open = np.zeros(h.grid.nbins, dtype=bool)  # bins expanded into their values
        self.open_pos = np.zeros(0, dtype=np.int64)
        self._build()

    def _build(self) -> None:
        a = self.h.atoms
        closed = ~self.open[self.h.atom_bin]
        px = self.x[self.open_pos].astype(np.float64)
        pw = np.ones_like(px) if self.w is None else self.w[self.open_pos]
        ax = np.concatenate((a.x[closed], px))
        aw = np.concatenate((a.w[closed], pw))
        order = np.argsort(ax, kind="stable")
        self.ax, aw = ax[order], aw[order]
        self.pw = np.concatenate(([0.0], np.cumsum(aw)))
        self.ps = np.concatenate(([0.0], np.cumsum(aw * self.ax)))

    def expand(self, bins: np.ndarray) -> bool:
        """Open ``bins`` (and their neighbours); False if they were all open already."""
        nb = self.h.grid.nbins
        bins = np.unique(np.clip(np.concatenate((bins - 1, bins, bins + 1)), 0, nb - 1))
        new = bins[~self.open[bins]]
        if new.size == 0:
            return False
        self.open[new] = True
        self.open_pos = np.flatnonzero(self.open[self.h.idx])
        self._build()
        return True

    def step(self, c: np.ndarray) -> np.ndarray:
        """One Lloyd update: the exact means of the values nearest to each centroid."""
        cuts = np.concatenate(
            ([0], np.searchsorted(self.ax, _midpoints(c), side="right"), [self.ax.size])
        )
        wsum = np.diff(self.pw[cuts])
        ssum = np.diff(self.ps[cuts])
        return np.where(wsum > 0, ssum / np.where(wsum > 0, wsum, 1.0), c)

    def run(self, c: np.ndarray) -> np.ndarray:
        for _ in range(_LLOYD_ITERS):
            cut = _cut_bins(self.h.grid, _midpoints(c))
            if not self.open[cut].all():
                self.expand(cut)
            new = self.step(c)
            if np.array_equal(new, c):
                break
            c = new
        return c

    def labels(self, c: np.ndarray) -> np.ndarray:
        """Nearest-centroid labels of all values (ties to the lower centroid)."""
        return _piecewise_labels(self.x, self.h, _midpoints(c), np.arange(c.size))


def kmeans_1d(
    values: object,
    k: int,
    *,
    weights: object = None,
    bins: int = 65536,
    exact_threshold: int | None = None,
) -> Clustering1D:
    """Optimal (weighted) 1-D k-means: minimum sum of squared distances to k centroids.

    Inputs of at most ``exact_threshold`` values (default: ``bins``) are solved exactly by dynamic
    programming on their distinct values. Larger inputs are reduced to a ``bins``-bin histogram
    whose atoms are the bin means; the DP finds the optimal partition of the bins, and exact Lloyd
    steps on the original values (which never raise the SSE) then place each boundary inside its
    bin. The DP partition is off only where the optimum cuts through a bin, which Lloyd repairs
    locally, so the SSE is within a tiny fraction of the optimum (~1e-6 relative in the tests)
    provided every cluster spans many bins: when outliers stretch the range so far that it would
    not, the histogram is rebuilt on an asinh grid that is fine where the values are dense.

    Returns ``min(k, distinct values)`` centroids sorted ascending, and int32 labels assigning
    every value to its nearest centroid. ``weights`` (optional, >= 0, same length as ``values``)
    weight each value's squared error.
    """
    x = _as_values(values)
    k = _check_k(k)
    bins = _check_bins(bins)
    w = _as_weights(weights, x.size)
    threshold = bins if exact_threshold is None else int(exact_threshold)
    if x.size <= threshold or x.min() == x.max():
        return _kmeans_exact(x, w, k)
    h, cuts = _fine_histogram(x, w, bins, k, scatter=False)
    c = _segment_means(h.atoms, cuts)
    if c.size < k:  # values packed into fewer than k bins: few distinct values, solve exactly
        return _kmeans_exact(x, w, k)
    refiner = _Refiner(h, x, w)
    c = refiner.run(c)
    return Clustering1D(c, refiner.labels(c))


def _kmeans_exact(x: np.ndarray, w: np.ndarray | None, k: int) -> Clustering1D:
    atoms, inv = _unique_atoms(x, w)
    labelled = atoms.w > 0  # zero-weight values do not pull on centroids but still get labels
    live = _Atoms(atoms.x[labelled], atoms.w[labelled], atoms.scatter[labelled])
    c = _segment_means(live, _optimal_partition(live, k))
    return Clustering1D(c, _nearest(atoms.x, c)[inv])


# --------------------------------------------------------------------------------------------
# Gaussian mixture by EM on the histogram


def _reduce(x: np.ndarray, bins: int, k: int) -> tuple[_Atoms, np.ndarray, _Histogram | None]:
    """Atoms (histogram bins with scatter for large inputs, exact distinct values for small
    ones), their optimal k-means partition, and the histogram if there is one."""
    if x.size <= bins or x.min() == x.max():
        atoms = _unique_atoms(x, None)[0]
        return atoms, _optimal_partition(atoms, k), None
    h, cuts = _fine_histogram(x, None, bins, k, scatter=True)
    return h.atoms, cuts, h


def _component_stats(atoms: _Atoms, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weight, mean and variance (including within-atom scatter) of each atom segment."""
    ws = np.add.reduceat(atoms.w, cuts[:-1])
    mu = np.add.reduceat(atoms.w * atoms.x, cuts[:-1]) / ws
    seg = np.repeat(np.arange(cuts.size - 1), np.diff(cuts))
    dev = atoms.x - mu[seg]
    var = np.add.reduceat(atoms.w * dev * dev + atoms.scatter, cuts[:-1]) / ws
    return ws, mu, var


def _init_params(
    atoms: _Atoms, cuts: np.ndarray, init: str, seed: int, floor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mixing weights, means and variances to start EM from (one component per k-means cluster)."""
    if init == "kmeans":
        ws, mu, var = _component_stats(atoms, cuts)
    else:
        k, m = cuts.size - 1, atoms.x.size
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(m, size=k, replace=False, p=atoms.w / atoms.w.sum()))
        mu = atoms.x[pick]
        var = np.full(k, _variance(atoms))
        ws = np.full(k, 1.0)
    return ws / ws.sum(), mu, np.maximum(var, floor)


def _log_joint(
    x: np.ndarray, pi: np.ndarray, mu: np.ndarray, var: np.ndarray, spread: np.ndarray | None = None
) -> np.ndarray:
    """log(pi_c) + log N(x | mu_c, var_c) - spread/(2 var_c), components in rows (k, n).

    Components are rows so that reductions over them are elementwise operations between k long
    rows, which numpy vectorises (a reduction over a short last axis is several times slower).
    """
    a = np.subtract.outer(mu, x)
    a *= a
    if spread is not None:
        a += spread
    a *= (-0.5 / var)[:, None]
    a += (np.log(pi) - 0.5 * np.log(2 * np.pi * var))[:, None]
    return a


def _normalise_rows(a: np.ndarray, mx: np.ndarray) -> np.ndarray:
    """Turn log-joints into responsibilities in place; return the log of the column sums."""
    a -= mx
    np.exp(a, out=a)
    total = a.sum(axis=0)
    a /= total
    return mx + np.log(total)


def _em(
    atoms: _Atoms,
    params: tuple[np.ndarray, np.ndarray, np.ndarray],
    iters: int,
    tol: float,
    floor: float,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int, bool]:
    """EM where every atom's values share one responsibility vector.

    With the within-atom scatter in the E-step this maximises a lower bound of the log-likelihood
    of the original values (the bound is tight when a component is wide compared to a bin), so
    the iterations are monotone like plain EM.
    """
    pi, mu, var = params
    n = atoms.w.sum()
    shift = _wsum(atoms.w, atoms.x) / n  # centred moments keep the variance update accurate
    xc = atoms.x - shift
    spread = atoms.scatter / atoms.w
    s1 = atoms.w * xc
    s2 = s1 * xc + atoms.scatter
    mu = mu - shift
    prev = -np.inf
    for it in range(1, iters + 1):
        r = _log_joint(xc, pi, mu, var, spread)
        lse = _normalise_rows(r, r.max(axis=0))
        ll = float(np.einsum("m,m->", atoms.w, lse)) / n
        # einsum rather than ``@``: these (k, m) x (m,) products are too small to gain from BLAS
        # threads, which only spin and lose when the cores are shared.
        nk = np.einsum("km,m->k", r, atoms.w) + 10 * np.finfo(np.float64).eps
        mu = np.einsum("km,m->k", r, s1) / nk
        var = np.maximum(np.einsum("km,m->k", r, s2) / nk - mu * mu, floor)
        pi = nk / nk.sum()
        if abs(ll - prev) < tol:
            return (pi, mu + shift, var), it, True
        prev = ll
    return (pi, mu + shift, var), iters, False


def _mean_loglik(x: np.ndarray, pi: np.ndarray, mu: np.ndarray, var: np.ndarray) -> float:
    """Mean log-density of the original values under the mixture (float64, in chunks)."""
    total = 0.0
    for start in range(0, x.size, _CHUNK):
        a = _log_joint(x[start : start + _CHUNK], pi, mu, var)
        total += float(_normalise_rows(a, a.max(axis=0)).sum())
    return total / x.size


def _argmax_steps(pi: np.ndarray, mu: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The component of highest responsibility as a step function of the value.

    Two weighted Gaussian log-densities differ by a quadratic, so they swap order at most twice;
    between consecutive crossing points of all pairs the winner is constant. Returns the points
    where the winner changes and the winner on each of the len(points) + 1 intervals.
    """
    a, b = np.triu_indices(mu.size, 1)
    # f_a - f_b in y = x - mu_a (moderate coefficients): A y^2 + B y + C.
    d = mu[b] - mu[a]
    const = np.log(pi) - 0.5 * np.log(var)
    qa, qb = 0.5 / var[a], 0.5 / var[b]
    big_a, big_b, big_c = qb - qa, -2 * d * qb, const[a] - const[b] + d * d * qb
    r = _quadratic_roots(big_a, big_b, big_c) + np.repeat(mu[a], 2)
    pts = np.unique(r[np.isfinite(r)])
    if pts.size == 0:
        return pts, np.array([_winner(np.array([mu[0]]), pi, mu, var)[0]])
    span = max(1.0, float(np.abs(pts).max()))
    probe = np.concatenate(([pts[0] - span], (pts[1:] + pts[:-1]) / 2, [pts[-1] + span]))
    win = _winner(probe, pi, mu, var)
    change = np.flatnonzero(win[1:] != win[:-1])
    return pts[change], np.concatenate((win[:1], win[change + 1]))


def _quadratic_roots(qa: np.ndarray, qb: np.ndarray, qc: np.ndarray) -> np.ndarray:
    """Both real roots of qa y^2 + qb y + qc per row (nan where absent), cancellation-free."""
    with np.errstate(divide="ignore", invalid="ignore"):
        disc = qb * qb - 4 * qa * qc
        q = -0.5 * (qb + np.copysign(np.sqrt(disc), qb))
        r1 = np.where(qa != 0, q / qa, -qc / qb)  # qa == 0 (equal variances): linear
        r2 = np.where(qa != 0, qc / q, np.nan)
    return np.column_stack((r1, r2)).ravel()


def _winner(x: np.ndarray, pi: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    return _log_joint(x, pi, mu, var).argmax(axis=0)


def gmm_1d(
    values: object,
    k: int,
    *,
    iters: int = 100,
    tol: float = 1e-6,
    bins: int = 65536,
    init: str = "kmeans",
    seed: int = 0,
    var_floor: float | None = None,
) -> tuple[Clustering1D, GMMParams]:
    """Fit a k-component 1-D Gaussian mixture by EM on a ``bins``-bin histogram.

    EM runs on the histogram atoms (bin count, mean and within-bin scatter), so each iteration
    costs O(bins * k) whatever the number of values; it stops after ``iters`` iterations or when
    the mean log-likelihood improves by less than ``tol``. ``init="kmeans"`` starts from the
    optimal 1-D k-means partition, ``"random"`` from k values drawn with ``seed``. Variances are
    floored at ``var_floor`` (default: 1e-6 times the data variance, a relative version of
    scikit-learn's ``reg_covar``: its absolute 1e-6 is as large as the variance of a narrow
    component of network weights).

    Returns the clustering (centroids = component means, sorted; labels = the component of highest
    responsibility for each value) and the :class:`GMMParams`, whose ``log_likelihood`` is the
    exact mean log-density of the original values. Inputs with fewer distinct values (or
    non-empty bins) than ``k`` get that many components.
    """
    x = _as_values(values)
    k = _check_k(k)
    bins = _check_bins(bins)
    if isinstance(iters, bool) or not isinstance(iters, int | np.integer) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got iters={iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got tol={tol!r}")
    if init not in ("kmeans", "random"):
        raise ValueError(f"init must be 'kmeans' or 'random', got init={init!r}")
    atoms, cuts, h = _reduce(x, bins, k)
    floor = _variance_floor(atoms) if var_floor is None else float(var_floor)
    if not floor > 0:
        raise ValueError(f"var_floor must be > 0, got var_floor={var_floor!r}")
    params = _init_params(atoms, cuts, init, seed, floor)
    (pi, mu, var), n_iter, converged = _em(atoms, params, int(iters), float(tol), floor)
    order = np.argsort(mu, kind="stable")
    pi, mu, var = pi[order], mu[order], var[order]
    labels = _piecewise_labels(x, h, *_argmax_steps(pi, mu, var))
    ll = _mean_loglik(x, pi, mu, var)
    return Clustering1D(mu.copy(), labels), GMMParams(mu, var, pi, ll, n_iter, converged, floor)


def _wsum(w: np.ndarray, v: np.ndarray) -> float:
    """sum(w * v) without BLAS (whose threads only spin on a shared machine)."""
    return float(np.einsum("i,i->", w, v))


def _variance(atoms: _Atoms) -> float:
    n = atoms.w.sum()
    d = atoms.x - _wsum(atoms.w, atoms.x) / n
    return (_wsum(atoms.w, d * d) + float(atoms.scatter.sum())) / n


def _variance_floor(atoms: _Atoms) -> float:
    var = _variance(atoms)
    if var > 0:
        return 1e-6 * var
    # Constant input: any positive floor gives a (degenerate) valid mixture.
    return 1e-12 * max(1.0, float(atoms.x[0]) ** 2)


# --------------------------------------------------------------------------------------------
# DBSCAN by sorting


def _within(xs: np.ndarray, i: np.ndarray, j: np.ndarray, eps: float) -> np.ndarray:
    """Whether sorted positions i and j are neighbours: |xs[j] - xs[i]| <= eps in float64.

    The difference is rounded once, like the distances scikit-learn computes; as a function of j
    it is monotone, so every neighbourhood is a contiguous range of sorted positions.
    """
    return np.abs(xs[j] - xs[i]) <= eps


def _upper(xs: np.ndarray, idx: np.ndarray, eps: float) -> np.ndarray:
    """For each position i in ``idx``: the first sorted position j with xs[j] - xs[i] > eps.

    ``searchsorted(xs, xs + eps)`` rounds ``xs + eps``; the fix-ups make the bound follow the
    rounded difference of :func:`_within` instead, stepping over whole runs of equal values.
    They touch almost nothing on real data.
    """
    n = xs.size
    r = np.searchsorted(xs, xs[idx] + eps, side="right")
    grow = np.flatnonzero(r < n)
    grow = grow[_within(xs, idx[grow], r[grow], eps)]
    while grow.size:  # xs[r] is still within eps: step past its run of equal values
        r[grow] = np.searchsorted(xs, xs[r[grow]], side="right")
        grow = grow[r[grow] < n]
        grow = grow[_within(xs, idx[grow], r[grow], eps)]
    shrink = np.flatnonzero(~_within(xs, idx, r - 1, eps))  # r - 1 >= i: xs[i] is within eps
    while shrink.size:  # xs[r-1] is beyond eps: step back before its run
        r[shrink] = np.searchsorted(xs, xs[r[shrink] - 1], side="left")
        shrink = shrink[~_within(xs, idx[shrink], r[shrink] - 1, eps)]
    return r


def _lower(xs: np.ndarray, idx: np.ndarray, eps: float) -> np.ndarray:
    """For each position i in ``idx``: the first sorted position j with xs[i] - xs[j] <= eps."""
    lft = np.searchsorted(xs, xs[idx] - eps, side="left")
    grow = np.flatnonzero(lft > 0)
    grow = grow[_within(xs, idx[grow], lft[grow] - 1, eps)]
    while grow.size:  # xs[l-1] is within eps: step before its run of equal values
        lft[grow] = np.searchsorted(xs, xs[lft[grow] - 1], side="left")
        grow = grow[lft[grow] > 0]
        grow = grow[_within(xs, idx[grow], lft[grow] - 1, eps)]
    shrink = np.flatnonzero(~_within(xs, idx, lft, eps))  # lft <= i
    while shrink.size:  # xs[l] is beyond eps: step past its run
        lft[shrink] = np.searchsorted(xs, xs[lft[shrink]], side="right")
        shrink = shrink[~_within(xs, idx[shrink], lft[shrink], eps)]
    return lft


def _core_mask(xs: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """Core points of the sorted values: at least ``min_samples`` values within eps (inclusive).

    Most values are settled by one comparison at a fixed offset: if the value min_samples-1
    positions to the right (or left) is within eps, so are all in between. Only the rest, in
    sparse regions, need their neighbourhood counted by binary search.
    """
    n = xs.size
    off = min_samples - 1
    if off == 0:
        return np.ones(n, dtype=bool)
    core = np.zeros(n, dtype=bool)
    if off < n:
        close = xs[off:] - xs[:-off] <= eps
        core[:-off] = close  # the off values to the right are neighbours
        core[off:] |= close  # the off values to the left are neighbours
        del close
    rest = np.flatnonzero(~core)
    if rest.size:
        count = _upper(xs, rest, eps) - _lower(xs, rest, eps)
        core[rest] = count >= min_samples
    return core


def dbscan_1d(values: object, eps: float, min_samples: int) -> Clustering1D:
    """DBSCAN of 1-D values, exact and with the same labels as scikit-learn up to permutation.

    A value is a core point when at least ``min_samples`` values (itself included) lie within
    distance ``eps`` (inclusive). In 1-D the clusters are the maximal runs of sorted core points
    whose consecutive gaps are <= eps; a non-core value within eps of a core point joins that
    core point's cluster, and if core points of two clusters (one on each side) reach it, it joins
    the cluster scikit-learn expands first: the one whose earliest core point comes first in the
    input. Everything else is noise (-1).

    Equal values always get equal labels, so the labels are computed on the sorted values and
    looked up by value: one sort, O(n log n) time, O(n) memory, no neighbour lists.
    Returns centroids = the mean of each cluster's values (sorted ascending: clusters do not
    interleave in 1-D) and int32 labels.
    """
    x = _as_values(values)
    if isinstance(eps, bool) or not isinstance(eps, int | float | np.integer | np.floating):
        raise ValueError(f"eps must be a number > 0, got eps={eps!r}")
    if not eps > 0:
        raise ValueError(f"eps must be a number > 0, got eps={eps!r}")
    if (
        isinstance(min_samples, bool)
        or not isinstance(min_samples, int | np.integer)
        or min_samples < 1
    ):
        raise ValueError(f"min_samples must be an integer >= 1, got min_samples={min_samples!r}")
    xs = np.sort(x).astype(np.float64)
    core = _core_mask(xs, float(eps), int(min_samples))
    sorted_labels, n_clusters = _label_sorted(x, xs, core, float(eps))
    del core
    member = sorted_labels >= 0
    sums = np.bincount(sorted_labels[member], weights=xs[member], minlength=n_clusters)
    sizes = np.bincount(sorted_labels[member], minlength=n_clusters)
    return Clustering1D(sums / np.maximum(sizes, 1), _labels_by_value(x, xs, sorted_labels))


def _labels_by_value(x: np.ndarray, xs: np.ndarray, sorted_labels: np.ndarray) -> np.ndarray:
    """Map labels of the sorted values back to the input: label runs are value intervals."""
    starts = np.concatenate(([0], np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1))
    # Runs start at distinct values (equal values share a label); casting them back to the input
    # dtype is exact, and searching in that dtype avoids a float64 copy of the input.
    edges = xs[starts].astype(x.dtype)
    run = np.searchsorted(edges, x, side="right")
    run -= 1
    return sorted_labels[starts][run]


def _label_sorted(
    x: np.ndarray, xs: np.ndarray, core: np.ndarray, eps: float
) -> tuple[np.ndarray, int]:
    """Cluster labels of the sorted values (-1 noise) and the number of clusters."""
    labels = np.full(xs.size, -1, dtype=np.int32)
    cpos = np.flatnonzero(core)
    if cpos.size == 0:
        return labels, 0
    new = np.empty(cpos.size, dtype=bool)
    new[0] = True
    new[1:] = xs[cpos[1:]] - xs[cpos[:-1]] > eps
    cid = np.cumsum(new, dtype=np.int32) - 1
    labels[cpos] = cid
    _attach_border(x, xs, core, cpos, cid, eps, labels)
    return labels, int(cid[-1]) + 1


def _attach_border(
    x: np.ndarray,
    xs: np.ndarray,
    core: np.ndarray,
    cpos: np.ndarray,
    cid: np.ndarray,
    eps: float,
    labels: np.ndarray,
) -> None:
    """Give each non-core value within eps of a core value the label of that core's cluster.

    All core values within eps on one side of a point lie within eps of each other, so they are
    in one cluster: only the nearest core value on each side matters.
    """
    idx = np.flatnonzero(~core)
    left = np.searchsorted(cpos, idx) - 1  # nearest core position to the left, as index in cpos
    right = left + 1
    has_left = left >= 0
    has_left[has_left] = _within(xs, idx[has_left], cpos[left[has_left]], eps)
    has_right = right < cpos.size
    has_right[has_right] = _within(xs, idx[has_right], cpos[right[has_right]], eps)
    lab_left = np.where(has_left, cid[np.maximum(left, 0)], -1)
    lab_right = np.where(has_right, cid[np.minimum(right, cpos.size - 1)], -1)
    labels[idx] = np.where(has_left, lab_left, lab_right)
    both = np.flatnonzero(has_left & has_right)
    if both.size:
        # scikit-learn expands clusters in the order of their first core value in the input, and
        # a border value goes to the first cluster that reaches it.
        wanted = np.unique(np.concatenate((lab_left[both], lab_right[both])))
        first = _first_core_index(x, xs, cpos, cid, wanted)
        pick_right = first[lab_right[both]] < first[lab_left[both]]
        labels[idx[both[pick_right]]] = lab_right[both[pick_right]]


def _first_core_index(
    x: np.ndarray, xs: np.ndarray, cpos: np.ndarray, cid: np.ndarray, wanted: np.ndarray
) -> np.ndarray:
    """Input index of the first core value of each cluster in ``wanted`` (others: n).

    Scans the input from its start in growing chunks and stops once every wanted cluster has
    been seen (a large cluster is seen almost at once). Each value is first located among the
    wanted clusters' value ranges (a search in a tiny array); only values inside one are looked
    up in the sorted data to tell core from non-core.
    """
    n = x.size
    first = np.full(int(cid[-1]) + 1, n, dtype=np.int64)
    run = np.flatnonzero(np.concatenate(([True], cid[1:] != cid[:-1])))  # run start in cpos
    run_end = np.concatenate((run[1:], [cid.size])) - 1
    lo, hi = xs[cpos[run[wanted]]], xs[cpos[run_end[wanted]]]
    # Value v lies in range j iff searchsorted(edges, v, "right") == 2j + 1.
    edges = np.column_stack((lo, np.nextafter(hi, np.inf))).ravel()
    missing = np.ones(wanted.size, dtype=bool)
    start, size = 0, 4096
    while start < n and missing.any():
        chunk = x[start : start + size].astype(np.float64)
        slot = np.searchsorted(edges, chunk, side="right")
        cand = np.flatnonzero(slot % 2 == 1)
        j = (slot[cand] - 1) // 2
        cand, j = cand[missing[j]], j[missing[j]]
        pos = np.searchsorted(xs, chunk[cand], side="left")  # first sorted position of the value
        rank = np.minimum(np.searchsorted(cpos, pos), cpos.size - 1)
        core = cpos[rank] == pos  # equal values share core status
        cand, j = cand[core], j[core]
        j, at = np.unique(j, return_index=True)  # cand is increasing: first hit per range
        first[wanted[j]] = start + cand[at]
        missing[j] = False
        start += size
        size *= 2
    return first


# --------------------------------------------------------------------------------------------


def sse(values: object, centroids: object, labels: object, *, weights: object = None) -> float:
    """Sum of (weighted) squared distances of each value to its labelled centroid.

    Values labelled -1 (DBSCAN noise) are left out. Accumulated in float64, in chunks.
    """
    x = _as_values(values)
    c = np.asarray(centroids, dtype=np.float64)
    lab = np.asarray(labels)
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    if lab.shape != x.shape:
        raise ValueError(f"labels must have shape {x.shape} like values, got {lab.shape}")
    if lab.size and (lab.max() >= c.size or lab.min() < -1):
        raise ValueError(f"labels must lie in [-1, {c.size - 1}], got [{lab.min()}, {lab.max()}]")
    w = _as_weights(weights, x.size)
    total = 0.0
    for start in range(0, x.size, _CHUNK):
        sl = slice(start, start + _CHUNK)
        lb = lab[sl]
        keep = lb >= 0
        d = x[sl][keep].astype(np.float64) - c[lb[keep]]
        wk = np.ones_like(d) if w is None else w[sl][keep]
        total += float(np.einsum("i,i,i->", d, d, wk))
    return total
