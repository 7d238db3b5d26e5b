"""What a trained tokenizer's word embeddings carry: linear probes onto the prosody the corpus drew.

Ridge regression (standardised inputs, a bias) from the continuous TASTE word embeddings (before the VQ) of
the first ``--train`` utterances to, per word, its rate %, pitch % and the pause after it, and its utterance's
rate and pitch; prints the R^2 on the last ``--eval-size`` utterances (never trained on). R^2 near 0 for the
word-level targets with a clear R^2 for the utterance-level ones means that the embeddings carry the
utterance's averages but not the word's own speech.

    python probe.py runs/no_vq [runs/vq ...]
"""

from __future__ import annotations

import argparse

import torch

from taste.train import Stage1Model, UnitCorpus

TARGETS = ("word rate", "word pitch", "pause after", "utterance rate", "utterance pitch")


def targets(row: dict) -> list[list[float]]:
    p = row["prosody"]
    return [[r, q, ms, row["rate"], row["pitch"]] for r, q, ms in zip(p["rate"], p["pitch"], p["pause_ms"])]


@torch.no_grad()
def word_embeddings(model: Stage1Model, corpus: UnitCorpus, rows: list[int], batch_size: int = 32):
    xs, ys = [], []
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        batch = corpus.batch(idx, model, "cpu", need_audio=True)
        xs.append(model.tokenizer.tokenize(batch["mel"], batch["text"], quantize=False).word_embeddings)
        ys += [t for i in idx for t in targets(corpus.rows[i])]
    return torch.cat(xs).double(), torch.tensor(ys, dtype=torch.float64)


def ridge_r2(xa, ya, xb, yb, lam: float) -> torch.Tensor:
    mu, sd = xa.mean(0), xa.std(0) + 1e-6
    xa = torch.nn.functional.pad((xa - mu) / sd, (0, 1), value=1.0)
    xb = torch.nn.functional.pad((xb - mu) / sd, (0, 1), value=1.0)
    w = torch.linalg.solve(xa.T @ xa + lam * torch.eye(xa.shape[1], dtype=xa.dtype), xa.T @ ya)
    return 1 - ((xb @ w - yb) ** 2).sum(0) / ((yb - ya.mean(0)) ** 2).sum(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--manifest", default="espeak/manifest.units.jsonl")
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--eval-size", type=int, default=96)
    ap.add_argument("--ridge", type=float, default=10.0)
    args = ap.parse_args()
    corpus = UnitCorpus(args.manifest)
    n = len(corpus.rows)
    if args.train + args.eval_size > n:
        raise ValueError(f"--train {args.train} + --eval-size {args.eval_size} exceeds the {n} utterances")
    print("held-out R^2 | " + " | ".join(TARGETS))
    for run in args.runs:
        model = Stage1Model.from_pretrained(run).eval()
        xa, ya = word_embeddings(model, corpus, list(range(args.train)))
        xb, yb = word_embeddings(model, corpus, list(range(n - args.eval_size, n)))
        r2 = ridge_r2(xa, ya, xb, yb, args.ridge)
        print(f"{run} | " + " | ".join(f"{float(v):.3f}" for v in r2))


if __name__ == "__main__":
    main()
