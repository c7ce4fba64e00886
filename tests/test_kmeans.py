"""k-means: determinism, correctness on separated blobs, the k-means++ seeding rule, input errors."""

from __future__ import annotations

import pytest
import torch
from rbank_torch.kernels.kmeans import KMeansResult, kmeans, kmeans_plusplus


def blobs(n_per: int, k: int, d: int, seed: int, spread: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` tight blobs around centres ~10 apart; returns (x [k·n_per, D], labels), rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(k, d, generator=g)
    labels = torch.arange(k).repeat_interleave(n_per)
    x = centres[labels] + spread * torch.randn(k * n_per, d, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return x[perm], labels[perm]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two labelings group the rows identically (up to renaming the clusters)."""
    pairs = torch.unique(torch.stack([a, b], dim=1), dim=0)
    return pairs.shape[0] == int(torch.unique(a).numel()) == int(torch.unique(b).numel())


def test_result_fields_and_consistency() -> None:
    x, _ = blobs(40, 4, 8, seed=0)
    r = kmeans(x, 4)
    assert isinstance(r, KMeansResult)
    assert r.centroids.shape == (4, 8) and r.centroids.dtype == torch.float32
    assert r.assignments.shape == (160,) and r.assignments.dtype == torch.int64
    assert r.sizes.dtype == torch.int64 and int(r.sizes.sum()) == 160
    assert torch.equal(r.sizes, torch.bincount(r.assignments, minlength=4))
    # assignments are the nearest returned centroid, inertia their squared distances
    d2 = torch.cdist(x.double(), r.centroids.double()) ** 2
    assert torch.equal(r.assignments, d2.argmin(dim=1))
    assert r.inertia == pytest.approx(float(d2.min(dim=1).values.sum()), rel=1e-4)
    assert 1 <= r.iterations <= 50


def test_recovers_separated_blobs() -> None:
    x, labels = blobs(50, 6, 16, seed=1)
    r = kmeans(x, 6, seed=3)
    assert same_partition(r.assignments, labels)
    assert sorted(r.sizes.tolist()) == [50] * 6
    # inertia of the true partition: 300 rows · 16 dims · spread²
    assert r.inertia == pytest.approx(300 * 16 * 0.05**2, rel=0.2)


def test_deterministic_for_a_seed() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(600, 12, generator=g)
    a = kmeans(x, 9, seed=11, iters=15)
    b = kmeans(x, 9, seed=11, iters=15)
    assert torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.assignments, b.assignments)
    assert a.inertia == b.inertia and a.iterations == b.iterations
    c = kmeans(x, 9, seed=12, iters=15)
    assert not torch.equal(a.centroids, c.centroids)


def test_batch_size_does_not_change_the_result_on_blobs() -> None:
    x, _ = blobs(30, 5, 10, seed=2)
    a = kmeans(x, 5, seed=1)
    b = kmeans(x, 5, seed=1, batch_size=7)
    assert torch.equal(a.assignments, b.assignments)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-5, atol=1e-5)


def test_kmeans_plusplus_never_reseeds_a_chosen_point() -> None:
    # k distinct points, each repeated 50 times: D² sampling gives an already chosen value weight 0, so
    # the k seeds are the k distinct points for every seed (uniform sampling would repeat some).
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(8, 5, generator=g)
    x = distinct.repeat(50, 1)
    for seed in range(10):
        idx = kmeans_plusplus(x, 8, torch.Generator().manual_seed(seed))
        assert torch.unique(x[idx], dim=0).shape[0] == 8


def test_kmeans_plusplus_prefers_far_points() -> None:
    # 999 points at the origin and one far away: after a first seed at the origin, D² sampling must pick
    # the outlier (every other point has weight 0).
    x = torch.zeros(1000, 3)
    x[417] = torch.tensor([100.0, 0.0, 0.0])
    hits = 0
    for seed in range(20):
        idx = kmeans_plusplus(x, 2, torch.Generator().manual_seed(seed)).tolist()
        assert 417 in idx
        hits += idx[0] != 417
    assert hits > 0  # the first seed is uniform, mostly not the outlier


def test_iters_zero_returns_seeds() -> None:
    x, _ = blobs(20, 3, 4, seed=3)
    r = kmeans(x, 3, iters=0)
    assert r.iterations == 0
    # every centroid is one of the rows
    d = torch.cdist(r.centroids, x).min(dim=1).values
    assert bool((d == 0).all())


def test_duplicates_and_empty_clusters() -> None:
    # 3 distinct values, k = 5: some seeds coincide and their clusters start empty; they are re-seeded
    # and nothing becomes NaN.
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0], [9.0, 0.0], [9.0, 0.0]])
    r = kmeans(x, 5, seed=0)
    assert bool(torch.isfinite(r.centroids).all())
    assert int(r.sizes.sum()) == 6
    assert r.inertia == pytest.approx(0.0, abs=1e-6)
    assert kmeans(x, 5, seed=0).assignments.tolist() == r.assignments.tolist()


def test_empty_cluster_reseeded_with_farthest_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # Seeds 0, 0, 1: the duplicate seed's cluster is empty after the first assignment; it must take the
    # row farthest from its centroid (50.0), which ends up alone.
    from rbank_torch.kernels import kmeans as kmeans_module

    monkeypatch.setattr(kmeans_module, "kmeans_plusplus", lambda x, k, g: torch.tensor([0, 0, 1]))
    x = torch.tensor([[0.0], [0.1], [0.2], [50.0]])
    one = kmeans(x, 3, seed=0, iters=1)
    assert one.iterations == 1
    assert float(one.centroids[1, 0]) == pytest.approx(50.0, abs=1e-4)  # an empty mean would be 0 here
    assert float(one.centroids[2, 0]) == pytest.approx((0.1 + 0.2 + 50.0) / 3, abs=1e-4)
    r = kmeans(x, 3, seed=0)
    assert sorted(r.sizes.tolist()) == [1, 1, 2]
    assert int(r.sizes[r.assignments[3]]) == 1  # the far row ends alone
    assert r.inertia == pytest.approx(0.005, rel=1e-3)


def test_spherical() -> None:
    g = torch.Generator().manual_seed(4)
    dirs = torch.nn.functional.normalize(torch.randn(4, 20, generator=g), dim=1)
    labels = torch.arange(4).repeat_interleave(25)
    # Lengths 1 or 30 at random; the directions define the clusters.
    scale = torch.where(torch.rand(100, 1, generator=g) < 0.5, 1.0, 30.0)
    x = (dirs[labels] + 0.02 * torch.randn(100, 20, generator=g)) * scale
    r = kmeans(x, 4, spherical=True)
    torch.testing.assert_close(r.centroids.norm(dim=1), torch.ones(4), rtol=1e-5, atol=1e-5)
    assert same_partition(r.assignments, labels)
    plain = kmeans(x, 4)
    assert not same_partition(plain.assignments, labels)  # lengths mislead plain k-means here


def test_float64_input_stays_float64() -> None:
    x, labels = blobs(20, 3, 4, seed=6)
    r = kmeans(x.double(), 3)
    assert r.centroids.dtype == torch.float64
    assert same_partition(r.assignments, labels)


def test_k_equals_n_and_k_one() -> None:
    x, _ = blobs(3, 4, 5, seed=7)
    r = kmeans(x, 12)
    assert r.inertia == pytest.approx(0.0, abs=1e-5)
    assert sorted(r.sizes.tolist()) == [1] * 12
    one = kmeans(x, 1)
    torch.testing.assert_close(one.centroids[0], x.mean(dim=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("x", "k", "kwargs", "match"),
    [
        (torch.randn(10, 3), 0, {}, r"k must be within \[1, N\]"),
        (torch.randn(10, 3), 11, {}, r"k must be within \[1, N\]"),
        (torch.randn(10, 3), 2.0, {}, "k must be an int"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, {}, "x must hold finite"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1, {}, "x must hold finite"),
        (torch.randn(10), 2, {}, "x must be 2-D"),
        (torch.ones(10, 3, dtype=torch.int64), 2, {}, "x must have a floating dtype"),
        (torch.randn(0, 3), 1, {}, "x must have at least one row"),
        ([[1.0, 2.0]], 1, {}, "x must be a torch.Tensor"),
        (torch.randn(10, 3), 2, {"iters": -1}, "iters must be"),
        (torch.randn(10, 3), 2, {"tol": -1.0}, "tol must be"),
        (torch.randn(10, 3), 2, {"batch_size": 0}, "batch_size must be"),
    ],
)
def test_invalid_inputs(x, k, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kmeans(x, k, **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_blobs_and_determinism() -> None:
    x, labels = blobs(100, 8, 32, seed=8)
    a = kmeans(x.cuda(), 8, seed=2)
    b = kmeans(x.cuda(), 8, seed=2)
    assert a.centroids.is_cuda and a.assignments.is_cuda
    assert torch.equal(a.assignments, b.assignments)
    assert same_partition(a.assignments.cpu(), labels)
