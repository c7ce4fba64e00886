"""Write ``ewc_sentences.jsonl``: a deterministic labelled sentence set for ``ewc_minilm.py``.

Each sentence is built from templates by ``random.Random(0)``: a topic (sports, cooking, weather,
finance: the label of task A) and an opinion (very negative, negative, positive, very positive: the
label of task B) are drawn independently, then a subject and an object of that topic and an opinion
phrase of that grade fill one of the templates. 1 200 sentences, each line
``{"text", "topic", "opinion", "split"}`` with split train (800) / test (400). Re-running this script
rewrites the same file byte for byte::

    python benchmarks/data/make_sentences.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "sports": (["the striker", "our team", "the goalkeeper", "the coach", "the runner", "the tennis player"],
               ["the final match", "the league game", "the marathon", "the penalty shootout", "the training session",
                "the championship"]),
    "cooking": (["the chef", "my grandmother", "the baker", "the new cook", "the pastry chef", "our host"],
                ["the tomato soup", "the roast chicken", "the lemon cake", "the fresh bread", "the curry",
                 "the risotto"]),
    "weather": (["the forecast", "the storm", "the morning fog", "the summer heat", "the cold front",
                 "the spring rain"],
                ["the weekend", "the coastal towns", "the harvest", "the mountain pass", "the afternoon",
                 "the whole valley"]),
    "finance": (["the central bank", "the stock market", "our accountant", "the investors", "the pension fund",
                 "the bond market"],
                ["the quarterly report", "the interest rates", "the budget", "the share price", "the tax return",
                 "the currency"]),
}
OPINIONS = [
    ["was an absolute disaster for", "completely ruined", "was a total catastrophe for", "utterly wrecked"],
    ["was a bit disappointing for", "did not help", "was somewhat poor for", "slightly spoiled"],
    ["was quite good for", "helped", "was pleasant for", "nicely improved"],
    ["was absolutely wonderful for", "brilliantly transformed", "was a fantastic triumph for", "perfectly saved"],
]
TEMPLATES = [
    "{s} {o} {x}.",
    "Yesterday {s} {o} {x}.",
    "Everyone agreed that {s} {o} {x}.",
    "According to the news, {s} {o} {x}.",
    "I think {s} {o} {x} this time.",
]


def main() -> None:
    rng = random.Random(0)
    names = list(TOPICS)
    lines = []
    seen: set[str] = set()
    while len(lines) < 1200:
        topic = rng.randrange(4)
        opinion = rng.randrange(4)
        subjects, objects = TOPICS[names[topic]]
        text = rng.choice(TEMPLATES).format(s=rng.choice(subjects), o=rng.choice(OPINIONS[opinion]),
                                            x=rng.choice(objects))
        text = text[0].upper() + text[1:]
        if text in seen:
            continue
        seen.add(text)
        lines.append({"text": text, "topic": topic, "opinion": opinion, "split": "train" if len(lines) < 800 else "test"})
    out = Path(__file__).with_name("ewc_sentences.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in lines))
    print(f"wrote {len(lines)} sentences to {out}")


if __name__ == "__main__":
    main()
