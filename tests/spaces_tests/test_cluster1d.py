"""Tests of spaces.cluster1d: exactness against brute force and agreement with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import DBSCAN, KMeans
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from spaces.cluster1d import Clustering1D, dbscan_1d, gmm_1d, kmeans_1d, sse

# --------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """scikit-learn on one thread: its OpenMP/BLAS threads only spin on a shared, busy machine."""
    with threadpool_limits(1):
        yield


def brute_force_sse(x: np.ndarray, k: int, w: np.ndarray | None = None) -> float:
    """Optimal k-means SSE by the plain O(k n^2) DP over sorted values (no speed-ups)."""
    order = np.argsort(x)
    x = np.asarray(x, dtype=np.float64)[order]
    w = np.ones_like(x) if w is None else np.asarray(w, dtype=np.float64)[order]
    n = x.size
    k = min(k, np.unique(x).size)

    def cost(s: int, i: int) -> float:
        ws, xs = w[s:i], x[s:i]
        if ws.sum() == 0:
            return 0.0
        mu = np.dot(ws, xs) / ws.sum()
        return float(np.dot(ws, (xs - mu) ** 2))

    d = np.full((k + 1, n + 1), np.inf)
    d[0, 0] = 0.0
    for j in range(1, k + 1):
        for i in range(1, n + 1):
            d[j, i] = min(d[j - 1, s] + cost(s, i) for s in range(i))
    return float(d[k, n])


def heavy_tailed(n: int, seed: int, scale: float = 0.02) -> np.ndarray:
    """Weight-like values: a Student-t (df=4) half and a Laplace half."""
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.standard_t(4, n // 2) * scale, rng.laplace(0.0, scale / 2, n - n // 2)]
    )


def assert_nearest(x: np.ndarray, res: Clustering1D) -> None:
    dist = np.abs(np.asarray(x, dtype=np.float64)[:, None] - res.centroids[None, :])
    assigned = dist[np.arange(x.size), res.labels]
    np.testing.assert_array_equal(assigned, dist.min(axis=1))


def assert_valid(x: np.ndarray, res: Clustering1D) -> None:
    assert res.centroids.dtype == np.float64
    assert res.centroids.ndim == 1
    assert np.all(np.diff(res.centroids) > 0)
    assert res.labels.shape == x.shape
    assert res.labels.dtype in (np.int32, np.int64)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a permutation of the cluster ids, with noise (-1) fixed."""
    if not np.array_equal(a == -1, b == -1):
        return False
    keep = a != -1
    pairs = set(zip(a[keep].tolist(), b[keep].tolist(), strict=True))
    return len(pairs) == len(set(a[keep].tolist())) == len(set(b[keep].tolist()))


# --------------------------------------------------------------------------------------------
# k-means


@pytest.mark.parametrize("seed", range(12))
def test_kmeans_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 30))
    x = np.round(rng.normal(size=n), 1)  # rounding makes duplicates
    k = int(rng.integers(1, 7))
    res = kmeans_1d(x, k)
    assert_valid(x, res)
    assert_nearest(x, res)
    assert sse(x, res.centroids, res.labels) == pytest.approx(brute_force_sse(x, k), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_weighted_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    x = rng.normal(size=20)
    w = rng.uniform(0.0, 3.0, size=20)
    w[0] = 0.0  # a zero weight is allowed and still gets a label
    res = kmeans_1d(x, 4, weights=w)
    got = sse(x, res.centroids, res.labels, weights=w)
    assert got == pytest.approx(brute_force_sse(x, 4, w), abs=1e-12)
    assert_nearest(x, res)


def test_kmeans_integer_weights_equal_repeated_values():
    rng = np.random.default_rng(7)
    x = rng.normal(size=300)
    reps = rng.integers(1, 5, size=300)
    a = kmeans_1d(x, 8, weights=reps)
    b = kmeans_1d(np.repeat(x, reps), 8)
    np.testing.assert_allclose(a.centroids, b.centroids, rtol=1e-12)


@pytest.mark.parametrize("k", [2, 4, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_never_worse_than_sklearn(k, seed):
    x = heavy_tailed(5000, seed)
    res = kmeans_1d(x, k)
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x[:, None])
    ours = sse(x, res.centroids, res.labels)
    assert ours <= km.inertia_ * (1 + 1e-9)
    assert_valid(x, res)
    assert_nearest(x, res)


@pytest.mark.parametrize("bins", [256, 4096, 65536])
def test_kmeans_histogram_path_near_optimal(bins):
    x = heavy_tailed(20000, 3)
    exact = kmeans_1d(x, 16)  # n <= 65536: DP on the distinct values, optimal
    approx = kmeans_1d(x, 16, bins=bins, exact_threshold=0)  # forced through the histogram
    opt = sse(x, exact.centroids, exact.labels)
    got = sse(x, approx.centroids, approx.labels)
    assert opt <= got * (1 + 1e-12)
    assert got <= opt * 1.001
    assert_valid(x, approx)
    assert_nearest(x, approx)


@pytest.mark.parametrize("k", [16, 64])
def test_kmeans_histogram_path_with_outliers(k):
    # Outliers stretch the range ~1000x beyond the bulk: equal-width bins would be far too
    # coarse, so the histogram is rebuilt on an asinh grid.
    x = np.concatenate([heavy_tailed(70_000, 4, scale=0.01), [40.0, -25.0, 3.0]])
    got = kmeans_1d(x, k)
    opt = kmeans_1d(x, k, exact_threshold=10**6)
    assert sse(x, got.centroids, got.labels) <= sse(x, opt.centroids, opt.labels) * 1.001
    assert_nearest(x, got)


def test_kmeans_histogram_weighted_and_float32():
    rng = np.random.default_rng(5)
    x = heavy_tailed(100_000, 5).astype(np.float32)
    w = rng.uniform(0.5, 2.0, size=x.size)
    res = kmeans_1d(x, 8, weights=w)  # n > bins: histogram path
    assert_valid(x, res)
    assert_nearest(x, res)
    # Centroids are the weighted means of their clusters (Lloyd converged).
    for j, c in enumerate(res.centroids):
        sel = res.labels == j
        assert c == pytest.approx(np.dot(w[sel], x[sel].astype(np.float64)) / w[sel].sum())


def test_kmeans_float32_equals_float64():
    x = heavy_tailed(3000, 9).astype(np.float32)
    a = kmeans_1d(x, 6)
    b = kmeans_1d(x.astype(np.float64), 6)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.centroids, b.centroids, rtol=1e-12)


def test_kmeans_k_at_least_unique_values():
    x = np.array([3.0, 1.0, 1.0, 2.0, 3.0])
    res = kmeans_1d(x, 5)
    np.testing.assert_array_equal(res.centroids, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(res.labels, [2, 0, 0, 1, 2])
    assert sse(x, res.centroids, res.labels) == 0.0


def test_kmeans_histogram_path_few_unique_values():
    x = np.repeat(np.array([-0.5, 0.0, 0.25, 1.0]), 30_000)
    res = kmeans_1d(x, 8)
    np.testing.assert_array_equal(res.centroids, [-0.5, 0.0, 0.25, 1.0])
    assert sse(x, res.centroids, res.labels) == 0.0


@pytest.mark.parametrize("n", [10, 200_000])
def test_kmeans_constant_input(n):
    x = np.full(n, 0.125, dtype=np.float32)
    res = kmeans_1d(x, 4)
    np.testing.assert_array_equal(res.centroids, [0.125])
    assert np.all(res.labels == 0)


def test_kmeans_k1_is_mean():
    x = heavy_tailed(1000, 2)
    res = kmeans_1d(x, 1)
    assert res.centroids[0] == pytest.approx(x.mean())
    assert np.all(res.labels == 0)


# --------------------------------------------------------------------------------------------
# GMM


def mixture_loglik(x: np.ndarray, means: np.ndarray, variances: np.ndarray, w: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)[:, None]
    dens = w * np.exp(-((x - means) ** 2) / (2 * variances)) / np.sqrt(2 * np.pi * variances)
    return float(np.log(dens.sum(axis=1)).mean())


@pytest.mark.parametrize("k", [3, 8])
def test_gmm_loglik_matches_sklearn(k):
    x = heavy_tailed(20_000, 11)
    res, p = gmm_1d(x, k, iters=1000)
    # EM crawls on heavy tails: sklearn needs tol=1e-5 to come within 0.1% of convergence.
    gm = GaussianMixture(k, tol=1e-5, max_iter=1000, reg_covar=p.var_floor, random_state=0)
    ll_sk = gm.fit(x[:, None]).score(x[:, None])
    assert abs(p.log_likelihood - ll_sk) <= 1e-3 * abs(ll_sk)
    assert p.log_likelihood >= ll_sk - 1e-6
    assert p.log_likelihood == pytest.approx(mixture_loglik(x, p.means, p.variances, p.weights))
    assert p.weights.sum() == pytest.approx(1.0)
    assert np.all(p.weights > 0) and np.all(p.variances > 0)
    assert np.all(np.diff(p.means) > 0)
    np.testing.assert_array_equal(res.centroids, p.means)
    # Labels are the component of highest responsibility.
    logp = np.log(p.weights) - 0.5 * np.log(2 * np.pi * p.variances)
    logp = logp - (x[:, None] - p.means) ** 2 / (2 * p.variances)
    np.testing.assert_array_equal(res.labels, logp.argmax(axis=1))


def test_gmm_histogram_path_close_to_exact():
    x = heavy_tailed(100_000, 12).astype(np.float32)
    _, exact = gmm_1d(x, 6, bins=1 << 17)  # n <= bins: EM on the distinct values
    res, binned = gmm_1d(x, 6)  # 65,536-bin histogram
    assert abs(binned.log_likelihood - exact.log_likelihood) <= 1e-3 * abs(exact.log_likelihood)
    # Labels (looked up per bin, exact in bins where the winning component changes) are the
    # argmax of the responsibilities, except for exact ties.
    p = binned
    logp = np.log(p.weights) - 0.5 * np.log(2 * np.pi * p.variances)
    logp = logp - (x[:, None].astype(np.float64) - p.means) ** 2 / (2 * p.variances)
    top = np.sort(logp, axis=1)
    differ = res.labels != logp.argmax(axis=1)
    assert np.all(top[differ, -1] - top[differ, -2] < 1e-9)
    assert differ.sum() <= 2


def test_gmm_histogram_path_with_outliers():
    x = np.concatenate([heavy_tailed(100_000, 14, scale=0.01), [30.0, -30.0]])
    _, exact = gmm_1d(x, 6, bins=1 << 17)
    _, binned = gmm_1d(x, 6)
    assert abs(binned.log_likelihood - exact.log_likelihood) <= 1e-3 * abs(exact.log_likelihood)


def test_gmm_random_init_and_small_inputs():
    x = heavy_tailed(2000, 13)
    _, p = gmm_1d(x, 4, init="random", seed=3)
    assert p.weights.sum() == pytest.approx(1.0)
    res, p = gmm_1d(np.array([1.0, 1.0, 2.0]), 5)  # fewer distinct values than components
    assert p.means.size == 2 and np.all(p.variances > 0)
    res, p = gmm_1d(np.full(50, 0.3), 2)
    assert np.all(res.labels == 0) and np.isfinite(p.log_likelihood)


# --------------------------------------------------------------------------------------------
# DBSCAN


def sklearn_dbscan(x: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    return DBSCAN(eps=eps, min_samples=min_samples).fit(x[:, None]).labels_


@pytest.mark.parametrize(
    ("seed", "eps", "min_samples"),
    [(0, 0.05, 5), (1, 0.1, 10), (2, 0.02, 3), (3, 0.2, 25), (4, 0.08, 1), (5, 0.03, 8)],
)
def test_dbscan_matches_sklearn(seed, eps, min_samples):
    rng = np.random.default_rng(seed)
    x = np.concatenate(
        [
            rng.normal(0.0, 1.0, 1500),
            rng.normal(4.0, 0.2, 500),
            rng.uniform(-8.0, 10.0, 1000),  # sparse: noise and border points
        ]
    )
    rng.shuffle(x)
    ref = sklearn_dbscan(x, eps, min_samples)
    res = dbscan_1d(x, eps, min_samples)
    assert same_partition(ref, res.labels)
    assert (ref == -1).any() or min_samples == 1
    assert_valid(x, res)
    for j, c in enumerate(res.centroids):
        assert c == pytest.approx(x[res.labels == j].mean())


@pytest.mark.parametrize("seed", range(4))
def test_dbscan_grid_data_with_ties(seed):
    # Values on a binary grid: many duplicates, distances exactly equal to eps (inclusive), and
    # border points reached from two clusters (tie-broken by sklearn's expansion order).
    rng = np.random.default_rng(50 + seed)
    x = rng.integers(0, 80, size=400) * 0.25
    ref = sklearn_dbscan(x, 0.5, 6)
    assert same_partition(ref, dbscan_1d(x, 0.5, 6).labels)


@pytest.mark.parametrize("right_first", [False, True])
def test_dbscan_border_point_between_two_clusters(right_first):
    a = [0.0, 0.05, 0.1, 0.15]
    b = [2.09, 2.14, 2.19, 2.24]
    border = [1.12]  # within eps=1 of 0.15 and of 2.09, but only 3 neighbours: not core
    x = np.array(b + border + a if right_first else a + border + b)
    ref = sklearn_dbscan(x, 1.0, 4)
    res = dbscan_1d(x, 1.0, 4)
    assert same_partition(ref, res.labels)
    expected = 1 if right_first else 0  # the cluster whose first core point comes first
    assert res.labels[4] == expected
    assert res.k == 2


def test_dbscan_all_noise_and_single_cluster():
    x = np.arange(20, dtype=np.float32) * 10.0
    res = dbscan_1d(x, 1.0, 2)
    assert np.all(res.labels == -1) and res.centroids.shape == (0,)
    assert sse(x, res.centroids, res.labels) == 0.0
    y = np.linspace(0.0, 1.0, 101)
    res = dbscan_1d(y, 0.05, 3)
    assert np.all(res.labels == 0)
    assert res.centroids == pytest.approx([0.5])


def test_dbscan_float32_large_input():
    x = heavy_tailed(300_000, 21).astype(np.float32)
    res = dbscan_1d(x, 1e-4, 10)
    assert_valid(x, res)
    # Cluster ranges do not interleave and noise lies outside every cluster's core run.
    lo = np.array([x[res.labels == j].min() for j in range(res.k)])
    hi = np.array([x[res.labels == j].max() for j in range(res.k)])
    assert np.all(hi[:-1] < lo[1:])


# --------------------------------------------------------------------------------------------
# sse and argument checking


def test_sse_ignores_noise_and_applies_weights():
    x = np.array([0.0, 1.0, 2.0, 10.0])
    assert sse(x, [0.5, 2.0], [0, 0, 1, -1]) == pytest.approx(0.5)
    assert sse(x, [0.5, 2.0], [0, 0, 1, -1], weights=[2, 1, 1, 1]) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: kmeans_1d([1.0, 2.0], 0), "k=0"),
        (lambda: kmeans_1d([1.0, 2.0], -3), "k=-3"),
        (lambda: kmeans_1d([1.0, 2.0], 2.5), "k=2.5"),
        (lambda: kmeans_1d([], 2), "empty"),
        (lambda: kmeans_1d(np.zeros((2, 2)), 2), r"shape \(2, 2\)"),
        (lambda: kmeans_1d([1.0, np.nan], 2), "NaN"),
        (lambda: kmeans_1d([1.0, 2.0], 2, bins=0), "bins=0"),
        (lambda: kmeans_1d([1.0, 2.0], 2, weights=[1.0, -1.0]), "weights"),
        (lambda: kmeans_1d([1.0, 2.0], 2, weights=[1.0]), "weights"),
        (lambda: gmm_1d([1.0, 2.0], 0), "k=0"),
        (lambda: gmm_1d([], 2), "empty"),
        (lambda: gmm_1d([1.0, 2.0], 2, init="bogus"), "bogus"),
        (lambda: gmm_1d([1.0, 2.0], 2, iters=0), "iters=0"),
        (lambda: dbscan_1d([1.0, 2.0], 0.0, 2), "eps=0.0"),
        (lambda: dbscan_1d([1.0, 2.0], -1, 2), "eps=-1"),
        (lambda: dbscan_1d([1.0, 2.0], 0.5, 0), "min_samples=0"),
        (lambda: dbscan_1d([], 0.5, 2), "empty"),
        (lambda: sse([1.0, 2.0], [0.0], [0, 1]), "labels"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
