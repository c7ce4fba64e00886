"""Generate the sample trajectory logs shipped in ``examples/`` (they are generated, not real agent runs).

``sample_log.jsonl``: 240 synthetic agent runs (coding, research, tool use, chat; successes, failures
with root causes, partial results, recoveries) from :func:`rbank_torch.synthetic.generate_tasks` with a
fixed seed. Records carry their query text only, so ``rbank ingest`` embeds them with the packaged
MiniLM model. ``--embeddings`` writes the 384-d query embeddings into the lines as well (a much larger
file that needs no model to read).

``sample_bad_lines.jsonl``: five records, two of which break the format (to try ``--skip-bad``).

Usage::

    python examples/make_sample_log.py            # rewrites examples/sample_log.jsonl and the bad-line file
    python examples/make_sample_log.py -n 1000 --out /tmp/runs.jsonl --embeddings
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from rbank_torch.logs import task_to_record, write_jsonl
from rbank_torch.synthetic import generate_tasks

HERE = Path(__file__).resolve().parent
START = datetime(2025, 1, 6, 9, 0, tzinfo=timezone.utc)


def sample_records(n: int = 240, seed: int = 7, embeddings: bool = False) -> list[dict]:
    """The log records of ``n`` generated agent runs, one every 7 minutes from ``START``."""
    tasks = generate_tasks(n, seed=seed)
    embs = None
    if embeddings:
        from rbank_torch.text import TextEmbedder

        embs = TextEmbedder().encode([t.query for t in tasks]).tolist()
    return [
        task_to_record(t, i + 1, START + timedelta(minutes=7 * i),
                       embedding=None if embs is None else [round(x, 6) for x in embs[i]])
        for i, t in enumerate(tasks)
    ]


def bad_lines_records() -> list[str]:
    """Five JSONL lines: lines 2 (confidence out of range) and 4 (not JSON) are bad."""
    good = sample_records(3, seed=11)
    bad = json.loads(json.dumps(good[1]))
    bad["id"] = 1002
    bad["steps"][0]["confidence"] = 1.7
    dump = [json.dumps(r, separators=(",", ":")) for r in good]
    return [dump[0], json.dumps(bad, separators=(",", ":")), dump[2], '{"query": "unterminated', dump[1]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=240, help="agent runs (default: 240)")
    ap.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    ap.add_argument("--out", default=str(HERE / "sample_log.jsonl"), help="log to write")
    ap.add_argument("--embeddings", action="store_true", help="include the MiniLM query embeddings")
    args = ap.parse_args(argv)
    n = write_jsonl(sample_records(args.n, args.seed, args.embeddings), args.out)
    print(f"wrote {n} records to {args.out}")
    if args.out == str(HERE / "sample_log.jsonl"):
        lines = bad_lines_records()
        (HERE / "sample_bad_lines.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(lines)} lines to {HERE / 'sample_bad_lines.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
