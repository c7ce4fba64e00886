"""The visual report of a bank (``rbank report``): one self-contained HTML file and/or a folder of PNGs.

Figures (drawn with matplotlib's Agg renderer, no display and no server needed):

- ``categories.png``: patterns per category (horizontal bars).
- ``quality.png``: histogram of the patterns' average quality (20 bins over [0, 1]) with their
  confidence as a second outline.
- ``usage.png``: histogram of the usage counts (log-scaled counts; log-spaced bins past 30 uses).
- ``neighbourhood.png``: a 2-D PCA map of the unit-normalised pattern embeddings (a seeded sample of at
  most ``max_points``, coloured by category) with the top patterns as stars and a line from each to its
  ``neighbours`` most similar patterns (cosine over the whole bank, not only the sample).
- ``similarity.png``: the cosine-similarity matrix of the top patterns.
- ``consolidation.png`` (only when ``rbank consolidate`` recorded a before/after in the bank's sidecar):
  patterns per category and the quality histogram before and after.

The HTML adds tables: a summary, the top patterns (with example steps, lessons and nearest neighbours),
the lessons found across all patterns (how many patterns carry each, their usage and mean quality) and
the consolidation figures. Images are embedded as base64 ``data:`` URIs, so the file opens anywhere.

"Top patterns" are ordered by usage count, then average quality, then confidence (highest first), then id.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_report", "REPORT_FIGURES", "top_pattern_rows"]

#: figure names in the order they appear (``consolidation`` only after ``rbank consolidate``)
REPORT_FIGURES = ("categories", "quality", "usage", "neighbourhood", "similarity", "consolidation")
_DPI = 100
_MAX_LESSON_ROWS = 60


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("the report needs matplotlib: pip install 'rbank-torch[report]'") from None


def _figure(w: float, h: float) -> Any:
    # NOTE: matplotlib.figure.Figure renders with Agg on savefig and never touches pyplot's global state,
    # so the report works headless and inside programs that use another backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=_DPI, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _empty(ax: Any, msg: str) -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _colours(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(sorted(names))}


def top_pattern_rows(cols: dict[str, Any], top: int) -> torch.Tensor:
    """Row indices ``[t]`` of the top patterns in ``cols`` (:meth:`PatternStore.columns`): usage count,
    then average quality, then confidence, highest first; ties by ascending id."""
    n = int(cols["id"].numel())
    if n == 0 or top <= 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(cols["id"], stable=True)  # ids ascending: the last tie-breaker
    for key in ("confidence", "avg_quality", "usage_count"):  # least significant first
        vals = cols[key][order].double()
        order = order[torch.argsort(-vals, stable=True)]
    return order[:top]


# ---------------------------------------------------------------------------------------------------------
# Figures.


def _fig_categories(by_cat: dict[str, int], colours: dict[str, Any]) -> bytes:
    items = sorted(by_cat.items(), key=lambda kv: (kv[1], kv[0]))
    fig = _figure(7, max(2.2, 0.38 * len(items) + 1.2))
    ax = fig.add_subplot()
    if not items:
        _empty(ax, "no patterns")
    else:
        names = [k for k, _ in items]
        vals = [v for _, v in items]
        bars = ax.barh(names, vals, color=[colours.get(k, "0.5") for k in names])
        ax.bar_label(bars, padding=3, fontsize=8)
        ax.set_xlabel("patterns")
        ax.margins(x=0.12)
    ax.set_title("Patterns per category")
    return _png(fig)


def _fig_quality(q: torch.Tensor, conf: torch.Tensor) -> bytes:
    fig = _figure(7, 3.4)
    ax = fig.add_subplot()
    if q.numel() == 0:
        _empty(ax, "no patterns")
    else:
        bins = [i / 20 for i in range(21)]
        ax.hist(q.double().numpy(), bins=bins, color="#4c72b0", alpha=0.85, label="average quality")
        ax.hist(conf.double().numpy(), bins=bins, histtype="step", color="#dd8452", linewidth=1.6,
                label="confidence")
        ax.axvline(float(q.double().mean()), color="#4c72b0", linestyle="--", linewidth=1,
                   label=f"mean quality {float(q.double().mean()):.3f}")
        ax.set_xlim(0, 1)
        ax.set_xlabel("value")
        ax.set_ylabel("patterns")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Quality and confidence of the patterns")
    return _png(fig)


def _fig_usage(u: torch.Tensor) -> bytes:
    fig = _figure(7, 3.4)
    ax = fig.add_subplot()
    if u.numel() == 0:
        _empty(ax, "no patterns")
    else:
        vals = u.double().numpy()
        hi = int(u.max())
        if hi <= 30:
            bins = [x - 0.5 for x in range(0, hi + 2)]
            ax.hist(vals, bins=bins, color="#55a868")
        else:
            edges = sorted({0.5} | {round(math.exp(math.log(1) + i * math.log(hi + 1) / 30), 6) + 0.5
                                    for i in range(31)})
            ax.hist(vals, bins=edges, color="#55a868")
            ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("usage count")
        ax.set_ylabel("patterns (log)")
    ax.set_title("How often patterns were used")
    return _png(fig)


def _pca2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and the two leading principal axes ``[D, 2]`` of ``x [n, D]`` (float64)."""
    mean = x.mean(dim=0)
    xc = x - mean
    if x.shape[0] < 2 or x.shape[1] < 2:
        axes = torch.zeros((x.shape[1], 2), dtype=x.dtype)
        axes[0, 0] = 1.0
        return mean, axes
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)  # vh [min(n, D), D]
    axes = vh[:2].T
    if axes.shape[1] < 2:
        axes = torch.cat([axes, torch.zeros((x.shape[1], 1), dtype=x.dtype)], dim=1)
    return mean, axes


def _fig_neighbourhood(
    unit: torch.Tensor, codes: torch.Tensor, names: list[str], ids: torch.Tensor, top_rows: torch.Tensor,
    nb_rows: torch.Tensor, nb_sims: torch.Tensor, colours: dict[str, Any], max_points: int,
) -> tuple[bytes, int]:
    n = int(unit.shape[0])
    fig = _figure(8.5, 6.5)
    ax = fig.add_subplot()
    if n == 0:
        _empty(ax, "no patterns")
        ax.set_title("Similarity neighbourhood of the top patterns")
        return _png(fig), 0
    g = torch.Generator().manual_seed(0)
    sample = torch.randperm(n, generator=g)[:max_points] if n > max_points else torch.arange(n)
    x = unit[sample].double()
    mean, axes = _pca2(x)
    xy_s = ((x - mean) @ axes).numpy()
    cs = codes[sample]
    for code in torch.unique(cs).tolist():
        m = (cs == code).numpy()
        name = names[int(code)]
        ax.scatter(xy_s[m, 0], xy_s[m, 1], s=6, alpha=0.45, color=colours.get(name, "0.5"), label=name,
                   linewidths=0)
    if top_rows.numel():
        xy_t = ((unit[top_rows].double() - mean) @ axes).numpy()
        for i in range(int(top_rows.numel())):
            for j in range(int(nb_rows.shape[1])):
                r = int(nb_rows[i, j])
                p = ((unit[r].double() - mean) @ axes).numpy()
                s = float(nb_sims[i, j])
                ax.plot([xy_t[i, 0], p[0]], [xy_t[i, 1], p[1]], color="0.25", alpha=0.25 + 0.5 * max(0.0, s),
                        linewidth=0.8, zorder=2)
                ax.scatter([p[0]], [p[1]], s=14, facecolors="none", edgecolors="0.2", linewidths=0.6, zorder=3)
        tcols = [colours.get(names[int(codes[r])], "0.5") for r in top_rows.tolist()]
        ax.scatter(xy_t[:, 0], xy_t[:, 1], marker="*", s=170, c=tcols, edgecolors="black", linewidths=0.7, zorder=4)
        for i in range(int(top_rows.numel())):
            ax.annotate(f"#{i + 1}", (xy_t[i, 0], xy_t[i, 1]), xytext=(4, 4),
                        textcoords="offset points", fontsize=7, zorder=5)
    ax.set_xlabel("principal axis 1")
    ax.set_ylabel("principal axis 2")
    ax.legend(fontsize=7, markerscale=2.5, loc="best", title="category", title_fontsize=7)
    shown = f"{len(sample)} of {n}" if n > max_points else f"all {n}"
    ax.set_title(f"Similarity neighbourhood of the top patterns (PCA of {shown} patterns)")
    return _png(fig), int(len(sample))


def pattern_label(i: int, p: Any, pid: int, width: int = 40) -> str:
    """Label of the i-th top pattern in figures: its text (shortened), else its id."""
    text = getattr(p, "text", None) if p is not None else None
    if text:
        text = " ".join(text.split())
        return f"#{i + 1} " + (text if len(text) <= width else text[: width - 1] + "…")
    return f"#{i + 1} id {pid}"


def _fig_similarity(unit_top: torch.Tensor, labels: list[str]) -> bytes:
    t = int(unit_top.shape[0])
    fig = _figure(max(4.5, 0.42 * t + 2.5), max(3.8, 0.42 * t + 1.8))
    ax = fig.add_subplot()
    if t == 0:
        _empty(ax, "no patterns")
    else:
        sim = (unit_top.double() @ unit_top.double().T).clamp(-1, 1).numpy()
        im = ax.imshow(sim, cmap="viridis", vmin=min(0.0, float(sim.min())), vmax=1.0)
        ax.set_xticks(range(t), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(t), labels, fontsize=7)
        if t <= 20:
            for i in range(t):
                for j in range(t):
                    ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if sim[i, j] < 0.6 else "black")
        fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
    ax.set_title("Similarity between the top patterns")
    return _png(fig)


def _fig_consolidation(rec: dict[str, Any], colours: dict[str, Any]) -> bytes:
    before, after = rec.get("before") or {}, rec.get("after") or {}
    fig = _figure(11, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    cats = sorted(set(before.get("by_category", {})) | set(after.get("by_category", {})))
    if cats:
        y = torch.arange(len(cats), dtype=torch.float64).numpy()
        b = [int(before.get("by_category", {}).get(c, 0)) for c in cats]
        a = [int(after.get("by_category", {}).get(c, 0)) for c in cats]
        ax1.barh(y + 0.2, b, height=0.4, color="0.7", label=f"before ({before.get('patterns', sum(b))})")
        ax1.barh(y - 0.2, a, height=0.4, color=[colours.get(c, "#4c72b0") for c in cats],
                 label=f"after ({after.get('patterns', sum(a))})")
        ax1.set_yticks(y, cats, fontsize=8)
        ax1.set_xlabel("patterns")
        ax1.legend(fontsize=8)
    else:
        _empty(ax1, "no categories recorded")
    ax1.set_title("Patterns per category, before and after")
    qb, qa = before.get("quality_hist"), after.get("quality_hist")
    if qb and qa:
        edges = [i / len(qb) for i in range(len(qb) + 1)]
        ax2.stairs(qb, edges, color="0.45", linewidth=1.6, label="before")
        ax2.stairs(qa, edges, fill=True, alpha=0.6, color="#4c72b0", label="after")
        ax2.set_xlim(0, 1)
        ax2.set_xlabel("average quality")
        ax2.set_ylabel("patterns")
        ax2.legend(fontsize=8)
    else:
        _empty(ax2, "no quality histogram recorded")
    ax2.set_title("Quality histogram, before and after")
    return _png(fig)


# ---------------------------------------------------------------------------------------------------------
# HTML.

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;width:100%}
th,td{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.4em 0}
.muted{color:#777;font-size:.85em}ul{margin:0;padding-left:1.1em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(head)
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>")
        for v, num in zip(r, numeric):
            cell = v if isinstance(v, _Raw) else _e(v)
            out.append(f'<td class="n">{cell}</td>' if num else f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class _Raw(str):
    """Cell content that is already HTML."""


def _ul(items: Sequence[str]) -> _Raw:
    if not items:
        return _Raw('<span class="muted">none</span>')
    return _Raw("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in items) + "</ul>")


def _img(name: str, png: bytes, alt: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img id="fig-{_e(name)}" alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _iso(dt: datetime | None) -> str:
    if dt is None:
        return "-"
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ---------------------------------------------------------------------------------------------------------
# Entry point.


def build_report(
    bank: Any,
    bank_path: str | os.PathLike,
    html_path: str | os.PathLike | None = None,
    png_dir: str | os.PathLike | None = None,
    sidecar: dict[str, Any] | None = None,
    top: int = 15,
    neighbours: int = 5,
    max_points: int = 5000,
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Draw the report of a bank and write it as HTML (``html_path``) and/or PNG files (``png_dir``).

    Args:
        bank: a :class:`~rbank_torch.bank.ReasoningBank` or a bare :class:`~rbank_torch.store.PatternStore`.
        bank_path: the bank file (named in the report; its size is shown when it exists).
        html_path: the HTML file to write (images embedded), or None.
        png_dir: a folder to write the figures into as ``<name>.png`` (created), or None.
        sidecar: the bank's ``BANK.json`` record (model name, last consolidation's before/after).
        top: how many top patterns to highlight and list (>= 0).
        neighbours: nearest neighbours drawn and listed per top pattern (>= 0).
        max_points: patterns drawn on the PCA map at most (a seeded sample; > 0).
        progress: a tqdm-like factory ``progress(total=, desc=)`` for a progress bar, or None.

    Returns:
        ``{"html", "html_bytes", "png_dir", "png_files", "figures", "patterns", "top_pattern_ids",
        "lessons", "consolidation", "points_drawn"}``.

    Raises:
        ValueError: a bad argument (named), or neither ``html_path`` nor ``png_dir``.
        RuntimeError: matplotlib is not installed.
    """
    if html_path is None and png_dir is None:
        raise ValueError("html_path or png_dir: give at least one output")
    if int(top) < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    if int(neighbours) < 0:
        raise ValueError(f"neighbours must be >= 0, got {neighbours}")
    if int(max_points) <= 0:
        raise ValueError(f"max_points must be > 0, got {max_points}")
    _require_matplotlib()
    side = sidecar or {}
    store = getattr(bank, "store", bank)
    bank_stats = bank.stats() if hasattr(bank, "store") and hasattr(bank, "stats") else None
    cons = side.get("last_consolidation") if isinstance(side.get("last_consolidation"), dict) else None
    steps = 7 if cons else 6
    bar = progress(total=steps, desc="report") if progress is not None else nullcontext(None)
    figs: dict[str, bytes] = {}
    with bar as pb:

        def tick() -> None:
            if pb is not None:
                pb.update(1)

        cols = store.columns()
        names: list[str] = list(cols["category_names"])
        n = int(cols["id"].numel())
        ids = cols["id"]
        codes = cols["category_code"]
        by_cat: dict[str, int] = {}
        if n:
            cc, cnt = torch.unique(codes, return_counts=True)
            by_cat = {names[int(c)]: int(k) for c, k in zip(cc.tolist(), cnt.tolist())}
        cats_all = set(by_cat)
        if cons:
            for when in ("before", "after"):
                cats_all |= set((cons.get(when) or {}).get("by_category") or {})
        colours = _colours(sorted(cats_all))
        emb = cols["embedding"].to("cpu", torch.float32)
        unit = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12) if n else emb  # [N, D]
        tick()

        figs["categories"] = _fig_categories(by_cat, colours)
        figs["quality"] = _fig_quality(cols["avg_quality"], cols["confidence"])
        figs["usage"] = _fig_usage(cols["usage_count"])
        tick()

        top_rows = top_pattern_rows(cols, int(top))  # [t]
        k = min(int(neighbours), max(n - 1, 0))
        if top_rows.numel() and k > 0:
            sims = unit[top_rows] @ unit.T  # [t, N]
            sims[torch.arange(top_rows.numel()), top_rows] = -math.inf  # not its own neighbour
            nb_sims, nb_rows = torch.topk(sims, k, dim=1)  # [t, k]
        else:
            nb_sims = torch.zeros((int(top_rows.numel()), 0))
            nb_rows = torch.zeros((int(top_rows.numel()), 0), dtype=torch.int64)
        tick()
        figs["neighbourhood"], drawn = _fig_neighbourhood(unit, codes, names, ids, top_rows, nb_rows, nb_sims,
                                                          colours, int(max_points))
        top_ids = [int(ids[r]) for r in top_rows.tolist()]
        top_pats = store.get_patterns(top_ids)
        labels = [pattern_label(i, p, top_ids[i]) for i, p in enumerate(top_pats)]
        figs["similarity"] = _fig_similarity(unit[top_rows], labels)
        tick()
        if cons:
            figs["consolidation"] = _fig_consolidation(cons, colours)
            tick()

        # Patterns as objects, only for the tables.
        lessons: dict[str, list[float]] = {}  # text -> [patterns, usage, quality sum]
        lesson_cats: dict[str, set[str]] = {}
        for p in store.get_all_patterns() if n else []:
            for text in dict.fromkeys(p.lessons):
                acc = lessons.setdefault(text, [0.0, 0.0, 0.0])
                acc[0] += 1
                acc[1] += p.usage_count
                acc[2] += p.avg_quality
                lesson_cats.setdefault(text, set()).add(str(p.category))
        tick()

        doc = _html(
            bank_path, side, store, bank_stats, n, by_cat, cols, figs, top_pats, top_rows, nb_rows, nb_sims, ids,
            lessons, lesson_cats, cons, drawn, int(max_points),
        )
        html_bytes = 0
        if html_path is not None:
            hp = Path(html_path)
            if hp.parent and not hp.parent.exists():
                hp.parent.mkdir(parents=True, exist_ok=True)
            data = doc.encode("utf-8")
            from .snapshot import atomic_write_bytes

            atomic_write_bytes(hp, lambda f: f.write(data))
            os.chmod(hp, 0o644)  # a document to share, not a private temp file
            html_bytes = len(data)
        png_files: list[str] = []
        if png_dir is not None:
            pd = Path(png_dir)
            pd.mkdir(parents=True, exist_ok=True)
            for name, png in figs.items():
                (pd / f"{name}.png").write_bytes(png)
                png_files.append(f"{name}.png")
        tick()
    return {
        "bank": str(bank_path),
        "html": None if html_path is None else str(html_path),
        "html_bytes": html_bytes,
        "png_dir": None if png_dir is None else str(png_dir),
        "png_files": png_files,
        "figures": list(figs),
        "patterns": n,
        "top_pattern_ids": top_ids,
        "lessons": len(lessons),
        "consolidation": cons is not None,
        "points_drawn": drawn,
    }


def _html(
    bank_path: Any, side: dict[str, Any], store: Any, bank_stats: Any, n: int, by_cat: dict[str, int],
    cols: dict[str, Any], figs: dict[str, bytes], top_pats: list[Any], top_rows: torch.Tensor,
    nb_rows: torch.Tensor, nb_sims: torch.Tensor, ids: torch.Tensor, lessons: dict[str, list[float]],
    lesson_cats: dict[str, set[str]], cons: dict[str, Any] | None, drawn: int, max_points: int,
) -> str:
    bp = Path(str(bank_path))
    size = f"{bp.stat().st_size / 1e6:.2f} MB" if bp.is_file() else "-"
    q = cols["avg_quality"].double()
    u = cols["usage_count"].double()
    c = cols["confidence"].double()
    summary = [
        ("bank file", str(bank_path)),
        ("file size", size),
        ("patterns", n),
        ("embedding dimension", store.config.embedding_dim),
        ("text model", side.get("embedding_model") or "unknown"),
        ("mean average quality", f"{float(q.mean()):.3f}" if n else "-"),
        ("mean confidence", f"{float(c.mean()):.3f}" if n else "-"),
        ("mean usage", f"{float(u.mean()):.2f}" if n else "-"),
        ("distinct lessons", len(lessons)),
    ]
    if bank_stats is not None:
        s = bank_stats
        summary += [
            ("trajectories seen", f"{s.total_trajectories} ({s.success_count} success, {s.failure_count} failure, "
                                  f"{s.recovered_count} recovered)"),
            ("consolidations", f"{s.consolidation_count} (last {_iso(s.last_consolidation)})"),
            ("distillations", f"{s.distillation_count} (last {_iso(s.last_distillation)})"),
        ]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>rbank report: {_e(bp.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>rbank report: {_e(bp.name)}</h1>",
        f'<p class="muted">Generated {generated} by <code>rbank report</code>. '
        "All figures are embedded; no server is needed.</p>",
        "<h2>Summary</h2>",
        _table(["", "value"], summary),
        "<h2>Categories</h2>",
        _img("categories", figs["categories"], "patterns per category"),
        _table(["category", "patterns", "share"],
               [(k, v, f"{100 * v / max(n, 1):.1f} %") for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])],
               [False, True, True]),
        "<h2>Quality and usage</h2>",
        _img("quality", figs["quality"], "quality histogram"),
        _img("usage", figs["usage"], "usage histogram"),
        "<h2>Similarity neighbourhood of the top patterns</h2>",
        f'<p class="muted">Top patterns: highest usage, then quality, then confidence. The map is a PCA of the '
        f"unit-normalised embeddings of {drawn} pattern(s) (a seeded sample when the bank holds more than "
        f"{max_points}); each star is a top pattern, its lines go to its {int(nb_rows.shape[1])} most similar "
        "patterns in the whole bank (darker: more similar).</p>",
        _img("neighbourhood", figs["neighbourhood"], "PCA map of the patterns with the top patterns"),
        _img("similarity", figs["similarity"], "similarity matrix of the top patterns"),
        "<h2>Top patterns</h2>",
    ]
    rows = []
    for i, p in enumerate(top_pats):
        if p is None:
            continue
        nb = [f"id {int(ids[int(nb_rows[i, j])])} ({float(nb_sims[i, j]):.3f})" for j in range(nb_rows.shape[1])]
        rows.append((
            i + 1, p.id, (p.text or "-") + (" (failure)" if p.outcome == "failure" else ""), str(p.category),
            f"{p.avg_quality:.3f}", f"{p.confidence:.3f}", p.usage_count,
            f"{100 * p.success_rate():.0f} %", _Raw(_e(" → ".join(p.example_actions[:6])) or "-"),
            _ul(p.lessons[:5]), _ul(nb),
        ))
    parts.append(_table(
        ["#", "id", "memory", "category", "quality", "confidence", "usage", "success", "example steps", "lessons",
         "nearest neighbours (cosine)"],
        rows, [True, True, False, False, True, True, True, True, False, False, False],
    ) if rows else '<p class="muted">The bank holds no patterns.</p>')
    parts.append("<h2>Lessons</h2>")
    if lessons:
        ordered = sorted(lessons.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
        lrows = [
            (text, int(a[0]), int(a[1]), f"{a[2] / a[0]:.3f}", ", ".join(sorted(lesson_cats[text])))
            for text, a in ordered[:_MAX_LESSON_ROWS]
        ]
        more = len(ordered) - len(lrows)
        parts.append(_table(["lesson", "patterns", "total usage", "mean quality", "categories"], lrows,
                            [False, True, True, True, False]))
        if more > 0:
            parts.append(f'<p class="muted">… and {more} more lesson(s).</p>')
    else:
        parts.append('<p class="muted">No pattern carries a lesson.</p>')
    if cons:
        b, a = cons.get("before") or {}, cons.get("after") or {}
        parts += [
            "<h2>Consolidation: before and after</h2>",
            f'<p class="muted">Last <code>rbank consolidate</code>: {_e(cons.get("at", "-"))}.</p>',
            _table(["", "before", "after"], [
                ("patterns", cons.get("patterns_before", b.get("patterns", "-")),
                 cons.get("patterns_after", a.get("patterns", "-"))),
                ("mean average quality", f"{float(b.get('avg_quality', 0.0)):.3f}",
                 f"{float(a.get('avg_quality', 0.0)):.3f}"),
                ("mean usage", f"{float(b.get('avg_usage', 0.0)):.2f}", f"{float(a.get('avg_usage', 0.0)):.2f}"),
                ("total usage", b.get("total_usage", "-"), a.get("total_usage", "-")),
            ], [False, True, True]),
            _table(["merged into leaders", "pruned", "λ used", "importance preserved", "seconds"], [(
                cons.get("merged", "-"), cons.get("pruned", "-"), cons.get("lambda_used", "-"),
                cons.get("importance_preserved", "-"), cons.get("seconds", "-"),
            )], [True] * 5),
        ]
        leaders = cons.get("top_leaders") or []
        if leaders:
            parts.append(_table(["leader pattern", "patterns absorbed"],
                                [(x.get("leader"), x.get("absorbed")) for x in leaders[:10]], [True, True]))
        parts.append(_img("consolidation", figs["consolidation"], "consolidation before and after"))
    parts.append("</body></html>\n")
    return "\n".join(parts)
