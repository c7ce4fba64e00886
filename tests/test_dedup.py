"""Greedy lesson deduplication: the vectorised rule against a plain sequential oracle."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rbank_torch.dedup import (
    cosine_of_record,
    greedy_dedup,
    jaccard_of_record,
    similarity_of_record,
    words_of,
)


def oracle_dedup(texts, emb, threshold, w_jaccard=0.6, w_cosine=0.4):
    """The SPEC §5 rule, one lesson at a time against every kept lesson (the reference)."""
    words = [frozenset(t.lower().split()) for t in texts]
    rows = torch.as_tensor(emb).to(torch.float64).tolist()
    sq = [math.fsum([x * x for x in r]) for r in rows]

    def jac(i, k):
        union = len(words[i] | words[k])
        return len(words[i] & words[k]) / union if union else 0.0

    def cos(i, k):
        den = math.sqrt(sq[i]) * math.sqrt(sq[k])
        if den == 0.0:
            return 0.0
        return min(1.0, max(-1.0, math.fsum([x * y for x, y in zip(rows[i], rows[k])]) / den))

    kept: list[int] = []
    parent = []
    for i in range(len(texts)):
        if any(w_jaccard * jac(i, k) + w_cosine * cos(i, k) > threshold for k in kept):
            best, best_j = kept[0], jac(i, kept[0])
            for k in kept[1:]:
                j = jac(i, k)
                if j > best_j:
                    best, best_j = k, j
            parent.append(best)
        else:
            kept.append(i)
            parent.append(i)
    return parent


WORDS = ["alpha", "Beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "->", "avoid:", "tool"]


def random_lessons(rng: random.Random, n: int, dim: int):
    """Lessons with many exact/near repeats, case variants, empty texts, zero and scaled embeddings."""
    texts, embs = [], []
    bases = [torch.tensor([rng.gauss(0, 1) for _ in range(dim)], dtype=torch.float64) for _ in range(4)]
    for _ in range(n):
        r = rng.random()
        if texts and r < 0.25:
            j = rng.randrange(len(texts))
            t = texts[j] if rng.random() < 0.5 else texts[j].upper()
            e = (
                embs[j] * rng.choice([1.0, 2.0, 0.5])
                if rng.random() < 0.7
                else embs[j] + 0.01 * torch.randn(dim)
            )
        else:
            k = rng.randrange(0, 6)
            t = " ".join(rng.choice(WORDS) for _ in range(k))
            if rng.random() < 0.05:
                e = torch.zeros(dim, dtype=torch.float64)
            else:
                e = rng.choice(bases) + rng.choice([0.0, 0.2, 1.0]) * torch.randn(dim, dtype=torch.float64)
        texts.append(t)
        embs.append(e)
    return texts, torch.stack(embs).to(torch.float32)


def run_all_methods(texts, emb, thr, **w):
    wc = w.get("w_cosine", 0.4)
    out = {
        "auto": greedy_dedup(texts, emb, thr, **w),
        "gemm": greedy_dedup(texts, emb, thr, method="gemm", **w),
    }
    if thr > wc + 1e-6 and w.get("w_jaccard", 0.6) > 0:
        out["jaccard"] = greedy_dedup(texts, emb, thr, method="jaccard", **w)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.3, 0.55, 0.7, 0.85, 0.95])
def test_matches_oracle_random(seed, thr):
    rng = random.Random(1000 * seed + int(thr * 100))
    torch.manual_seed(seed)
    texts, emb = random_lessons(rng, 90, dim=rng.choice([3, 8]))
    ref = oracle_dedup(texts, emb, thr)
    assert len(set(ref)) < len(ref)  # the case really has duplicates
    for method, got in run_all_methods(texts, emb, thr).items():
        assert got.dtype == torch.int64
        assert got.tolist() == ref, method


@pytest.mark.parametrize("weights", [(0.6, 0.4), (1.0, 0.0), (0.0, 1.0), (0.3, 0.9)])
def test_matches_oracle_other_weights(weights):
    wj, wc = weights
    rng = random.Random(7)
    torch.manual_seed(7)
    texts, emb = random_lessons(rng, 80, dim=4)
    for thr in (0.35, 0.6, 0.8):
        ref = oracle_dedup(texts, emb, thr, wj, wc)
        for method, got in run_all_methods(texts, emb, thr, w_jaccard=wj, w_cosine=wc).items():
            assert got.tolist() == ref, (method, thr)


def test_parent_is_highest_jaccard_earliest_on_ties_not_the_trigger():
    texts = ["a b x", "a b y", "a b"]
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # lesson 2: score with 1 is 0.6*2/3 + 0.4 = 0.8 > 0.7 (trigger); with 0 only 0.4.
    # both kept lessons have jaccard 2/3, so the earliest (0) receives it.
    assert oracle_dedup(texts, emb, 0.7) == [0, 1, 0]
    for method, got in run_all_methods(texts, emb, 0.7).items():
        assert got.tolist() == [0, 1, 0], method


def test_parent_among_all_kept_even_below_threshold():
    texts = ["p q r s", "p q r t", "p q r s t"]
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # lesson 2 is triggered by lesson 1 only (cosine 1); jaccard 4/5 with both: earliest = 0.
    thr = 0.6 * 0.8 + 0.4 * 0.5
    assert oracle_dedup(texts, emb, thr) == [0, 1, 0]
    for method, got in run_all_methods(texts, emb, thr).items():
        assert got.tolist() == [0, 1, 0], method


def test_merged_lessons_do_not_trigger():
    # lesson 1 merges into 0; lesson 2 is similar to 1 only, so it is kept.
    texts = ["a b c d", "a b c e", "f b c e"]
    emb = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    thr = 0.6 * (3 / 5) + 0.4 - 1e-9  # 0-1 and 1-2 pass, 0-2 (jaccard 2/6) does not
    assert oracle_dedup(texts, emb, thr) == [0, 0, 2]
    for method, got in run_all_methods(texts, emb, thr).items():
        assert got.tolist() == [0, 0, 2], method


def test_exact_threshold_is_not_a_duplicate_and_next_float_below_is():
    texts = ["w x y z", "w x y"]
    emb = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])
    s = similarity_of_record(texts[0], texts[1], emb[0], emb[1])
    assert s == 0.6 * 0.75 + 0.4 * cosine_of_record(emb[0], emb[1])
    for thr, expect in (
        (s, [0, 1]),
        (math.nextafter(s, -math.inf), [0, 0]),
        (math.nextafter(s, math.inf), [0, 1]),
    ):
        assert oracle_dedup(texts, emb, thr) == expect
        for method, got in run_all_methods(texts, emb, thr).items():
            assert got.tolist() == expect, (method, thr)


@pytest.mark.parametrize("seed", range(4))
def test_knife_edge_thresholds_on_random_pairs(seed):
    """Thresholds set to a pair's exact score of record (and one ulp below): the float64 fast path
    must defer to the exact formula."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    n, dim = 60, 64
    texts = [" ".join(rng.choice(WORDS[:6]) for _ in range(rng.randrange(3, 6))) for _ in range(n)]
    base = torch.randn(3, dim, generator=g)
    emb = (base[torch.randint(0, 3, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)).float()
    for _ in range(3):
        i, k = sorted(rng.sample(range(n), 2))
        s = similarity_of_record(texts[i], texts[k], emb[i], emb[k])
        for thr in (s, math.nextafter(s, -math.inf)):
            ref = oracle_dedup(texts, emb, thr)
            for method, got in run_all_methods(texts, emb, thr).items():
                assert got.tolist() == ref, (method, thr)


def test_knife_edge_pairs_use_the_exact_formula():
    """Two lessons whose threshold is their exact score of record: a plain float64 dot product
    differs from the fsum-based cosine in the last bits for most such pairs."""
    g = torch.Generator().manual_seed(11)
    for _ in range(40):
        emb = torch.randn(2, 384, generator=g)
        texts = ["same words here", "same words here"]
        s = similarity_of_record(texts[0], texts[1], emb[0], emb[1])
        for method, got in run_all_methods(texts, emb, s).items():
            assert got.tolist() == [0, 1], method
        for method, got in run_all_methods(texts, emb, math.nextafter(s, -math.inf)).items():
            assert got.tolist() == [0, 0], method


def test_record_definitions():
    assert words_of("Avoid:  the  THE tool\tx") == frozenset({"avoid:", "the", "tool", "x"})
    assert jaccard_of_record(frozenset(), frozenset()) == 0.0
    assert jaccard_of_record(frozenset("ab"), frozenset("bc")) == 1 / 3
    assert cosine_of_record([0.0, 0.0], [1.0, 0.0]) == 0.0
    assert cosine_of_record([1.0, 0.0], [-3.0, 0.0]) == -1.0
    assert cosine_of_record([3.0, 4.0], [4.0, 3.0]) == pytest.approx(24 / 25, abs=1e-15)


def test_identical_lessons_and_empty_and_zero():
    texts = ["", "", "a", "a", "A"]
    emb = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
    ref = oracle_dedup(texts, emb, 0.85)
    assert ref == [0, 1, 2, 2, 2]  # empty texts with zero vectors have score 0
    for method, got in run_all_methods(texts, emb, 0.85).items():
        assert got.tolist() == ref, method


def test_inputs_validated():
    with pytest.raises(ValueError, match="embeddings"):
        greedy_dedup(["a", "b"], torch.zeros(3, 2), 0.85)
    with pytest.raises(ValueError, match="finite"):
        greedy_dedup(["a", "b"], torch.tensor([[1.0, float("nan")], [1.0, 0.0]]), 0.85)
    with pytest.raises(ValueError, match="threshold"):
        greedy_dedup(["a"], torch.zeros(1, 2), float("nan"))
    with pytest.raises(ValueError, match="texts"):
        greedy_dedup(["a", 3], torch.zeros(2, 2), 0.85)
    with pytest.raises(ValueError, match="method"):
        greedy_dedup(["a"], torch.zeros(1, 2), 0.85, method="fast")
    with pytest.raises(ValueError, match="w_jaccard"):
        greedy_dedup(["a"], torch.zeros(1, 2), 0.85, w_jaccard=-1.0)
    assert greedy_dedup([], torch.zeros(0, 4), 0.85).tolist() == []
    assert greedy_dedup(["x"], np.ones((1, 3)), 0.85).tolist() == [0]


def test_larger_set_with_planted_near_duplicates():
    """A few hundred realistic lessons (Zipf words, 32-d) with planted near-duplicates."""
    rng = np.random.default_rng(3)
    vocab = [f"w{i}" for i in range(300)]
    n, dim = 500, 32
    texts, emb = [], []
    for i in range(n):
        if i > 10 and rng.random() < 0.3:
            j = int(rng.integers(0, i))
            ws = texts[j].split()
            if ws and rng.random() < 0.5:
                ws[int(rng.integers(0, len(ws)))] = vocab[int(rng.zipf(1.3)) % 300]
            texts.append(" ".join(ws))
            emb.append(emb[j] + float(rng.choice([0.0, 0.05, 0.3])) * rng.standard_normal(dim))
        else:
            k = int(rng.integers(4, 12))
            texts.append(" ".join(vocab[int(rng.zipf(1.3)) % 300] for _ in range(k)))
            emb.append(rng.standard_normal(dim))
    emb_t = torch.tensor(np.stack(emb), dtype=torch.float32)
    for thr in (0.85, 0.6):
        ref = oracle_dedup(texts, emb_t, thr)
        assert 0 < n - len(set(ref))
        for method, got in run_all_methods(texts, emb_t, thr).items():
            assert got.tolist() == ref, (method, thr)


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.lists(st.sampled_from(["a", "b", "c", "d", "B"]), max_size=4),
            st.lists(st.integers(-2, 2), min_size=3, max_size=3),
        ),
        min_size=1,
        max_size=25,
    ),
    thr=st.sampled_from([0.2, 0.45, 0.6, 0.8, 0.85, 0.99]),
)
def test_property_matches_oracle(data, thr):
    texts = [" ".join(w) for w, _ in data]
    emb = torch.tensor([e for _, e in data], dtype=torch.float32)
    ref = oracle_dedup(texts, emb, thr)
    for method, got in run_all_methods(texts, emb, thr).items():
        assert got.tolist() == ref, method
