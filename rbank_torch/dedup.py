"""Greedy deduplication of lessons by text and embedding similarity (SPEC §5).

The rule, for lessons taken in the given order: a lesson is a *duplicate* when some lesson kept so far
has ``w_jaccard · jaccard + w_cosine · cosine > threshold``; a duplicate is merged into the kept lesson
(of all kept so far) with the highest word-Jaccard, the earliest on ties; any other lesson is kept.
Merging never changes a kept lesson's text or embedding, so the decisions depend on the texts and the
embeddings only and :func:`greedy_dedup` returns them as one index per lesson.

Similarity of record (what both the fast path and any reference implementation compute):

* words: ``set(text.lower().split())`` (Python's Unicode lower-casing and whitespace split);
* ``jaccard = |A ∩ B| / |A ∪ B|`` as the correctly rounded float64 quotient of the two integers
  (0 when both sets are empty). For sets of fewer than 2**26 words, comparing these floats is the
  same as comparing the exact rationals;
* ``cosine``: with the embeddings converted to float64, ``dot = fsum(a_i*b_i)``,
  ``|a| = sqrt(fsum(a_i*a_i))`` (``fsum`` = correctly rounded sum of the float64 products, as
  :func:`math.fsum`), ``cosine = dot / (|a|*|b|)`` clamped to [-1, 1]; 0 when ``|a|*|b|`` is 0;
* ``score = w_jaccard*jaccard + w_cosine*cosine`` in float64, compared with ``score > threshold``.

The fast path: exact word-set intersections on integer vocabulary ids (no hashing), candidate pairs
from a prefix filter on tokens ordered rarest first (a pair with ``jaccard > t`` must share a token in
both prefixes), or, when the Jaccard bound cannot prune, blocked float32 GEMMs of unit embeddings
against the lessons kept so far with a safe margin. Candidate scores are evaluated in float64 and any
score within ``1e-9`` of the threshold is recomputed with the record formula. A sequential scan over
the sparse candidate pairs then reproduces the greedy rule exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "greedy_dedup",
    "words_of",
    "jaccard_of_record",
    "cosine_of_record",
    "similarity_of_record",
]

_SCORE_TOL = 1e-9  # re-check a float64 candidate score exactly when it is this close to the threshold
_BOUND_SLACK = 1e-9  # slack on the pruning bounds, so that rounding can never prune a true duplicate
_PAIR_CHUNK = 1 << 21  # candidate pairs processed at once
_METHODS = ("auto", "jaccard", "gemm")


# ---------------------------------------------------------------------------------------------------------
# The similarity of record, one pair at a time.


def words_of(text: str) -> frozenset[str]:
    """The word set of a lesson: ``frozenset(text.lower().split())``."""
    return frozenset(text.lower().split())


def jaccard_of_record(a: frozenset[str] | set[str], b: frozenset[str] | set[str]) -> float:
    """``|a ∩ b| / |a ∪ b|`` as a float64 (0 for two empty sets)."""
    inter = len(a & b)
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


def _fsum_sq(a: Sequence[float]) -> float:
    return math.fsum([x * x for x in a])


def cosine_of_record(a: Any, b: Any) -> float:
    """Cosine of two embeddings ``[D]`` as defined in the module docstring (float64, fsum-based)."""
    av = torch.as_tensor(a).detach().to(torch.float64).reshape(-1).tolist()
    bv = torch.as_tensor(b).detach().to(torch.float64).reshape(-1).tolist()
    if len(av) != len(bv):
        raise ValueError(f"embeddings must have the same length, got {len(av)} and {len(bv)}")
    return _cos_lists(av, bv, _fsum_sq(av), _fsum_sq(bv))


def _cos_lists(av: list[float], bv: list[float], sa: float, sb: float) -> float:
    den = math.sqrt(sa) * math.sqrt(sb)
    if den == 0.0:
        return 0.0
    c = math.fsum([x * y for x, y in zip(av, bv)]) / den
    return min(1.0, max(-1.0, c))


def similarity_of_record(
    text_a: str,
    text_b: str,
    emb_a: Any,
    emb_b: Any,
    *,
    w_jaccard: float = 0.6,
    w_cosine: float = 0.4,
) -> float:
    """``w_jaccard · jaccard + w_cosine · cosine`` of two lessons, exactly as :func:`greedy_dedup` decides."""
    return w_jaccard * jaccard_of_record(words_of(text_a), words_of(text_b)) + w_cosine * cosine_of_record(
        emb_a, emb_b
    )


# ---------------------------------------------------------------------------------------------------------
# Token tables.


class _Tokens:
    """Word sets of N lessons as a CSR of integer token ranks (rarest token first within each row).

    Attributes:
        indptr: ``[N+1]`` int64 row offsets.
        ranks: ``[nnz]`` int64 token ranks; a token's rank orders tokens by (document frequency, id).
        sizes: ``[N]`` int64 word-set sizes.
        keys: ``[nnz]`` int64 sorted ``row * n_tokens + rank`` (membership tests).
    """

    def __init__(self, texts: Sequence[str]) -> None:
        n = len(texts)
        vocab: dict[str, int] = {}
        setdefault = vocab.setdefault
        flat: list[int] = []
        lens = np.empty(n, dtype=np.int64)
        for i, t in enumerate(texts):
            ws = t.lower().split()
            lens[i] = len(ws)
            flat.extend([setdefault(w, len(vocab)) for w in ws])
        v = max(len(vocab), 1)
        rows = np.repeat(np.arange(n, dtype=np.int64), lens)
        ids = np.asarray(flat, dtype=np.int64)
        uniq = np.unique(rows * v + ids)  # [nnz] distinct (row, id), sorted
        rows = uniq // v
        ids = uniq % v
        df = np.bincount(ids, minlength=v)
        order = np.lexsort((np.arange(v), df))  # rarest first, then by id
        rank_of = np.empty(v, dtype=np.int64)
        rank_of[order] = np.arange(v, dtype=np.int64)
        keys = np.sort(rows * v + rank_of[ids])
        self.n = n
        self.n_tokens = v
        self.keys = keys
        self.ranks = keys % v
        self.sizes = np.bincount(rows, minlength=n).astype(np.int64)
        self.indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.indptr[1:])

    def intersections(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``|words(a_p) ∩ words(b_p)|`` for every pair p; ``a``, ``b``: ``[M]`` int64 → ``[M]`` int64."""
        m = a.shape[0]
        out = np.zeros(m, dtype=np.int64)
        if m == 0:
            return out
        swap = self.sizes[a] > self.sizes[b]
        small = np.where(swap, b, a)
        big = np.where(swap, a, b)
        cnt = self.sizes[small]
        nq = int(cnt.sum())
        if nq == 0:
            return out
        pair = np.repeat(np.arange(m, dtype=np.int64), cnt)
        starts = np.repeat(self.indptr[small] - np.cumsum(cnt) + cnt, cnt)
        pos = starts + np.arange(nq, dtype=np.int64)
        q = big[pair] * self.n_tokens + self.ranks[pos]
        at = np.searchsorted(self.keys, q)
        np.minimum(at, self.keys.shape[0] - 1, out=at)
        hit = self.keys[at] == q
        return np.bincount(pair[hit], minlength=m).astype(np.int64)

    def prefix_postings(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prefix-filter postings for ``jaccard > t``.

        Returns ``(lesson, group_start, within)``, all ``[P]`` int64: the prefix entries sorted by
        (token rank, lesson), the offset where each entry's token group starts, and the entry's index
        within its group (= the number of earlier lessons sharing that prefix token).
        """
        sizes = self.sizes
        if t > 0.0:
            plen = sizes - np.floor(t * sizes).astype(np.int64)
        else:
            plen = sizes.copy()
        rows = np.repeat(np.arange(self.n, dtype=np.int64), sizes)
        pos = np.arange(self.keys.shape[0], dtype=np.int64) - self.indptr[rows]
        sel = pos < plen[rows]
        r = self.ranks[sel]
        lesson = rows[sel]
        order = np.argsort(r * max(self.n, 1) + lesson, kind="stable")
        r = r[order]
        lesson = lesson[order]
        p = r.shape[0]
        if p == 0:
            e = np.zeros(0, dtype=np.int64)
            return e, e, e
        new_group = np.empty(p, dtype=bool)
        new_group[0] = True
        np.not_equal(r[1:], r[:-1], out=new_group[1:])
        gidx = np.cumsum(new_group) - 1
        gstarts = np.flatnonzero(new_group).astype(np.int64)
        group_start = gstarts[gidx]
        within = np.arange(p, dtype=np.int64) - group_start
        return lesson, group_start, within


def _expand_pairs(
    lesson: np.ndarray, group_start: np.ndarray, within: np.ndarray, entries: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """All (later, earlier) lesson pairs that share a posting group, for the given query entries."""
    cnt = within[entries]
    total = int(cnt.sum())
    if total == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e
    later = np.repeat(lesson[entries], cnt)
    base = np.repeat(group_start[entries] - np.cumsum(cnt) + cnt, cnt)
    earlier = lesson[base + np.arange(total, dtype=np.int64)]
    return later, earlier


def _jaccard_pairs(
    tok: _Tokens,
    t: float,
    query_mask: np.ndarray | None = None,
    postings: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (later i, earlier k < i) with ``jaccard > t`` (``t ≥ 0``), exactly.

    Args:
        tok: token table.
        t: the Jaccard bound; pairs with jaccard exactly ``≤ t`` are dropped.
        query_mask: ``[N]`` bool; when given, only pairs whose later lesson is marked.
        postings: ``tok.prefix_postings(t)`` when already computed.

    Returns:
        ``(later, earlier, jaccard)``: ``[M]`` int64, int64, float64, sorted by (later, earlier).
    """
    lesson, group_start, within = tok.prefix_postings(t) if postings is None else postings
    entries = (
        np.flatnonzero(within > 0)
        if query_mask is None
        else np.flatnonzero((within > 0) & query_mask[lesson])
    )
    out_l: list[np.ndarray] = []
    out_e: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    if entries.shape[0]:
        csum = np.cumsum(within[entries])
        n_chunks = int(csum[-1] // _PAIR_CHUNK) + 1
        bounds = np.searchsorted(csum, np.arange(1, n_chunks) * _PAIR_CHUNK)
        for chunk in np.split(entries, bounds):
            later, earlier = _expand_pairs(lesson, group_start, within, chunk)
            if later.shape[0] == 0:
                continue
            sl, se = tok.sizes[later], tok.sizes[earlier]
            keep = np.minimum(sl, se) > t * np.maximum(sl, se)
            later, earlier = later[keep], earlier[keep]
            inter = tok.intersections(later, earlier)
            union = tok.sizes[later] + tok.sizes[earlier] - inter
            jac = np.divide(inter, union, out=np.zeros(inter.shape[0]), where=union > 0)
            keep = jac > t
            out_l.append(later[keep])
            out_e.append(earlier[keep])
            out_j.append(jac[keep])
    if not out_l:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0)
    later = np.concatenate(out_l)
    earlier = np.concatenate(out_e)
    jac = np.concatenate(out_j)
    key = later * max(tok.n, 1) + earlier
    key, first = np.unique(key, return_index=True)
    return later[first], earlier[first], jac[first]


# ---------------------------------------------------------------------------------------------------------
# Embedding side.


class _Embeddings:
    """float64 copy ``[N, D]`` of the embeddings, squared norms and float32 unit vectors."""

    def __init__(self, emb: torch.Tensor) -> None:
        self.e64 = emb.detach().to(device="cpu", dtype=torch.float64).contiguous()  # [N, D]
        sq = (self.e64 * self.e64).sum(dim=1)  # [N]
        if not bool(torch.isfinite(sq).all()):
            raise ValueError("embeddings: a squared norm overflows float64; scale the embeddings down")
        self.norm = sq.sqrt()  # [N]
        self.fragile = ((sq < 1e-280) & (sq > 0)) | (sq > 1e280)  # [N] rows always re-checked exactly
        safe = torch.where(self.norm > 0, self.norm, torch.ones_like(self.norm))
        self.unit32 = (self.e64 / safe[:, None]).to(torch.float32)  # [N, D]
        self.dim = int(self.e64.shape[1]) if self.e64.dim() == 2 else 0
        self._lists: dict[int, tuple[list[float], float]] = {}

    def approx_cos(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """float64 cosine of pairs (not fsum-exact; error ~ D·2^-53). ``[M]`` → ``[M]`` float64."""
        m = a.shape[0]
        out = np.empty(m, dtype=np.float64)
        step = max(1, (1 << 22) // max(self.dim, 1))
        ta = torch.from_numpy(a)
        tb = torch.from_numpy(b)
        for s in range(0, m, step):
            ia, ib = ta[s : s + step], tb[s : s + step]
            dot = (self.e64[ia] * self.e64[ib]).sum(dim=1)
            den = self.norm[ia] * self.norm[ib]
            c = torch.where(
                den > 0, dot / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(dot)
            )
            out[s : s + step] = c.clamp(-1.0, 1.0).numpy()
        return out

    def _row(self, i: int) -> tuple[list[float], float]:
        r = self._lists.get(i)
        if r is None:
            v = self.e64[i].tolist()
            r = (v, _fsum_sq(v))
            self._lists[i] = r
        return r

    def exact_cos(self, i: int, k: int) -> float:
        av, sa = self._row(i)
        bv, sb = self._row(k)
        return _cos_lists(av, bv, sa, sb)


def _scores(
    emb: _Embeddings,
    later: np.ndarray,
    earlier: np.ndarray,
    jac: np.ndarray,
    w_jaccard: float,
    w_cosine: float,
    threshold: float,
) -> np.ndarray:
    """``[M]`` bool: does the pair's score of record exceed the threshold?"""
    if later.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    cos = emb.approx_cos(later, earlier)
    score = w_jaccard * jac + w_cosine * cos
    frag = emb.fragile.numpy()
    near = np.flatnonzero((np.abs(score - threshold) <= _SCORE_TOL) | frag[later] | frag[earlier])
    for p in near.tolist():
        c = emb.exact_cos(int(later[p]), int(earlier[p]))
        score[p] = w_jaccard * float(jac[p]) + w_cosine * c
    return score > threshold


# ---------------------------------------------------------------------------------------------------------
# The scan.


def _scan(
    n: int,
    t_later: np.ndarray,
    t_earlier: np.ndarray,
    p_later: np.ndarray,
    p_earlier: np.ndarray,
    p_jac: np.ndarray,
    kept: np.ndarray,
    parent: np.ndarray,
    lo: int = 0,
) -> None:
    """Apply the greedy rule to lessons ``lo..`` given their trigger pairs and their Jaccard pairs.

    ``t_*``: the pairs whose score exceeds the threshold; ``p_*``: the pairs that can hold the parent
    (jaccard above the bound). Both sorted by (later, earlier). ``kept``/``parent`` are updated in place.
    """
    if t_later.shape[0] == 0:
        return
    rows = np.unique(t_later)
    t_start = np.searchsorted(t_later, rows, side="left")
    t_end = np.searchsorted(t_later, rows, side="right")
    p_start = np.searchsorted(p_later, rows, side="left")
    p_end = np.searchsorted(p_later, rows, side="right")
    te = t_earlier.tolist()
    pe = p_earlier.tolist()
    pj = p_jac.tolist()
    kept_l = kept  # numpy bool array, indexed with Python ints
    for r, ts, tend, ps, pend in zip(
        rows.tolist(), t_start.tolist(), t_end.tolist(), p_start.tolist(), p_end.tolist()
    ):
        dup = False
        for k in te[ts:tend]:
            if kept_l[k]:
                dup = True
                break
        if not dup:
            continue
        best_k = -1
        best_j = -1.0
        for idx in range(ps, pend):
            k = pe[idx]
            if kept_l[k] and pj[idx] > best_j:  # earlier k first, so ties keep the earliest
                best_j = pj[idx]
                best_k = k
        if best_k < 0:
            best_k = int(np.flatnonzero(kept_l[:r])[0])  # every kept lesson has jaccard 0: the earliest
        kept_l[r] = False
        parent[r] = best_k


# ---------------------------------------------------------------------------------------------------------
# Public entry point.


def _check_inputs(
    texts: Sequence[str], embeddings: Any, threshold: float, w_jaccard: float, w_cosine: float, method: str
) -> tuple[list[str], torch.Tensor, float, float, float]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError("texts must be a list of strings")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] must be a string, got {type(t).__name__}")
    if isinstance(embeddings, np.ndarray):
        embeddings = torch.from_numpy(np.ascontiguousarray(embeddings))
    elif not isinstance(embeddings, torch.Tensor):
        embeddings = torch.as_tensor(embeddings, dtype=torch.float64)
    if not embeddings.dtype.is_floating_point:
        embeddings = embeddings.to(torch.float64)
    if embeddings.dim() != 2:
        if embeddings.numel() == 0 and len(texts) == 0:
            embeddings = embeddings.reshape(0, 1)
        else:
            raise ValueError(f"embeddings must be 2-D [N, D], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] != len(texts):
        raise ValueError(
            f"embeddings must have one row per text: {embeddings.shape[0]} rows, {len(texts)} texts"
        )
    if embeddings.shape[0] and not bool(torch.isfinite(embeddings).all()):
        raise ValueError("embeddings must hold finite values (found NaN or inf)")
    vals = []
    for name, v in (("threshold", threshold), ("w_jaccard", w_jaccard), ("w_cosine", w_cosine)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {v!r}") from None
        if not math.isfinite(f):
            raise ValueError(f"{name} must be finite, got {f}")
        vals.append(f)
    thr, wj, wc = vals
    if wj < 0 or wc < 0:
        raise ValueError(f"w_jaccard and w_cosine must be >= 0, got {wj} and {wc}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return texts, embeddings, thr, wj, wc


def greedy_dedup(
    texts: Sequence[str],
    embeddings: Any,
    threshold: float,
    *,
    w_jaccard: float = 0.6,
    w_cosine: float = 0.4,
    method: str = "auto",
) -> torch.Tensor:
    """Greedy lesson deduplication of SPEC §5 (see the module docstring for the exact similarity).

    Args:
        texts: N lesson texts, in the order of the scan.
        embeddings: ``[N, D]`` embeddings (tensor, numpy array or nested lists), finite.
        threshold: a lesson is a duplicate when its score with some kept lesson is ``> threshold``.
        w_jaccard, w_cosine: non-negative weights of the word-Jaccard and the cosine.
        method: ``"auto"``; ``"jaccard"`` (prefix-filtered Jaccard candidates first, needs
            ``threshold > w_cosine``) or ``"gemm"`` (blocked float32 GEMM against the kept lessons first).
            All give the same result; the choice only changes speed.

    Returns:
        ``[N]`` int64 tensor: ``i`` where lesson ``i`` is kept, else the index of the kept lesson it merges into.

    Example:
        >>> greedy_dedup(["a b c", "a b c", "x y"], torch.eye(3)[[0, 0, 1]], 0.85).tolist()
        [0, 0, 2]
    """
    texts, emb_t, thr, wj, wc = _check_inputs(texts, embeddings, threshold, w_jaccard, w_cosine, method)
    n = len(texts)
    parent = np.arange(n, dtype=np.int64)
    if n <= 1:
        return torch.from_numpy(parent)
    kept = np.ones(n, dtype=bool)
    tok = _Tokens(texts)
    emb = _Embeddings(emb_t)

    # Bounds (jaccard ≤ 1, cosine ≤ 1): score > thr needs jaccard > j_lo and cosine > c_lo.
    j_lo = (thr - wc) / wj - _BOUND_SLACK if wj > 0 else -math.inf
    c_lo = (thr - wj) / wc - _BOUND_SLACK if wc > 0 else -math.inf
    if j_lo >= 1.0 or c_lo >= 1.0 or (wj == 0 and wc == 0 and thr >= 0):
        return torch.from_numpy(parent)

    use_jaccard = method == "jaccard"
    if method == "jaccard" and j_lo <= 0:
        raise ValueError(f"method 'jaccard' needs threshold > w_cosine ({wc}), got threshold {thr}")
    postings = None
    if method == "auto" and j_lo > 0:
        postings = tok.prefix_postings(j_lo)
        est_pairs = float(postings[2].sum())
        mean_len = float(tok.sizes.mean()) + 1.0
        gemm_cost = 0.5 * n * n * max(emb.dim, 1) / 4e3  # in units of one candidate-pair check
        use_jaccard = est_pairs * mean_len <= gemm_cost

    if use_jaccard:
        later, earlier, jac = _jaccard_pairs(tok, j_lo, postings=postings)
        trig = _scores(emb, later, earlier, jac, wj, wc, thr)
        _scan(n, later[trig], earlier[trig], later, earlier, jac, kept, parent)
    else:
        _gemm_dedup(tok, emb, thr, wj, wc, j_lo, c_lo, kept, parent)
    return torch.from_numpy(parent)


def _gemm_dedup(
    tok: _Tokens,
    emb: _Embeddings,
    thr: float,
    wj: float,
    wc: float,
    j_lo: float,
    c_lo: float,
    kept: np.ndarray,
    parent: np.ndarray,
) -> None:
    """Blocked scan: each block of lessons against the kept lessons before it and against itself."""
    n = tok.n
    d = max(emb.dim, 1)
    margin = 2.0 * d * 2.0**-24 + 1e-6  # float32 GEMM of unit vectors vs the float64 cosine
    c_cut = c_lo - margin
    frag = emb.fragile
    unit = emb.unit32  # [N, D]
    kept_buf = torch.empty((min(n, 1024), unit.shape[1]), dtype=torch.float32)  # [cap, D] kept unit rows
    kept_ids = np.empty(n, dtype=np.int64)
    n_kept = 0
    j_par = max(j_lo, 0.0)
    a = 0
    while a < n:
        bsz = int(min(4096, max(64, (1 << 23) // max(n_kept + 1, 1))))
        b = min(n, a + bsz)
        blk = unit[a:b]  # [B, D]
        later_parts: list[np.ndarray] = []
        earlier_parts: list[np.ndarray] = []
        for cols_ids, cols in (
            (kept_ids[:n_kept], kept_buf[:n_kept]),  # [K] ids, [K, D] unit rows of the kept lessons
            (np.arange(a, b, dtype=np.int64), blk),  # the block itself
        ):
            if cols_ids.shape[0] == 0:
                continue
            sims = blk @ cols.T  # [B, C]
            cand = sims > c_cut if c_cut > -1.0 - margin else torch.ones_like(sims, dtype=torch.bool)
            fr_rows = frag[a:b]
            if bool(fr_rows.any()):
                cand[fr_rows] = True
            fr_cols = frag[torch.from_numpy(cols_ids)]
            if bool(fr_cols.any()):
                cand[:, fr_cols] = True
            ri, ci = torch.nonzero(cand, as_tuple=True)
            later_parts.append(ri.numpy().astype(np.int64) + a)
            earlier_parts.append(cols_ids[ci.numpy()])
        later = np.concatenate(later_parts)
        earlier = np.concatenate(earlier_parts)
        keep = earlier < later
        later, earlier = later[keep], earlier[keep]
        inter = tok.intersections(later, earlier)
        union = tok.sizes[later] + tok.sizes[earlier] - inter
        jac = np.divide(inter, union, out=np.zeros(inter.shape[0]), where=union > 0)
        if j_lo > -math.inf:
            keep = jac > j_lo
            later, earlier, jac = later[keep], earlier[keep], jac[keep]
        trig = _scores(emb, later, earlier, jac, wj, wc, thr)
        t_l, t_e = later[trig], earlier[trig]
        order = np.lexsort((t_e, t_l))
        t_l, t_e = t_l[order], t_e[order]
        if t_l.shape[0]:
            q = np.zeros(n, dtype=bool)
            q[t_l] = True
            p_l, p_e, p_j = _jaccard_pairs(tok, j_par, query_mask=q)
            _scan(n, t_l, t_e, p_l, p_e, p_j, kept, parent)
        new = np.flatnonzero(kept[a:b]) + a
        if new.shape[0]:
            need = n_kept + new.shape[0]
            if need > kept_buf.shape[0]:
                grown = torch.empty((max(need, 2 * kept_buf.shape[0]), unit.shape[1]), dtype=torch.float32)
                grown[:n_kept] = kept_buf[:n_kept]
                kept_buf = grown
            kept_buf[n_kept:need] = unit[torch.from_numpy(new)]
            kept_ids[n_kept:need] = new
            n_kept = need
        a = b
