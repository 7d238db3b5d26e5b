"""Upper bound for the stage-1 experiment: the unit decoder given the words' true prosody instead of TASTE.

Trains the text-only decoder of ``runs/text`` (stage 1-1) on, per word, the prosody that the corpus drew for it
(rate %, pitch %, pause after it) and the utterance's rate and pitch, put in the first 5 of the ``taste_dim``
inputs, for as many steps as stage 1-2; then evaluates it like ``taste eval-tokenizer`` on the same held-out
rows. What it gains over the text-only decoder is what a TASTE that read the speech word by word could gain.

    python oracle.py [--steps 400] [--out runs/oracle]
"""

from __future__ import annotations

import argparse
import json

import torch

from taste.evaluate import evaluate
from taste.train import Stage1Model, TrainConfig, UnitCorpus
from taste.trainer import fit


def prosody_rows(row: dict, taste_dim: int) -> torch.Tensor:
    """``(words, taste_dim)``: the word's rate, pitch and pause and the utterance's rate and pitch, scaled to about
    unit range, then zeros."""
    p = row["prosody"]
    feats = torch.tensor(
        [[r / 100 - 1, q / 40, ms / 400, (row["rate"] - 170) / 40, (row["pitch"] - 50) / 25]
         for r, q, ms in zip(p["rate"], p["pitch"], p["pause_ms"])]
    )  # fmt: skip
    return torch.nn.functional.pad(feats, (0, taste_dim - feats.shape[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", default="runs/oracle")
    args = ap.parse_args()
    cfg = TrainConfig(
        manifest="espeak/manifest.units.jsonl", out_dir=args.out, stage="no_vq", init_from="runs/text",
        steps=args.steps, batch_size=16, lr=1e-3, warmup=50, save_every=100, eval_size=96, seed=0,
    )  # fmt: skip
    corpus = UnitCorpus(cfg.manifest)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Stage1Model.from_pretrained(cfg.init_from, device=device).train()
    model.tokenizer.requires_grad_(False)
    dim = model.decoder.config.taste_dim
    rows = [prosody_rows(r, dim) for r in corpus.rows]

    def word_rows(indices):
        return torch.cat([rows[i] for i in indices])

    def make_batch(indices):
        batch = corpus.batch(indices, model, device, need_audio=False)
        batch["oracle"] = word_rows(indices).to(device)
        return batch

    def compute(module, batch):
        out = module.decode(batch, batch["oracle"])
        return out.loss.float(), int(out.targets.numel())

    train_idx = list(range(len(corpus.rows) - cfg.eval_size))
    fit(cfg, model, lengths=[u.numel() for u in corpus.units], train_idx=train_idx, make_batch=make_batch,
        compute=compute, reload=Stage1Model.from_pretrained, progress=False)  # fmt: skip
    metrics = evaluate(cfg.out_dir, cfg.manifest, eval_size=cfg.eval_size, word_rows=word_rows, device=device)
    with open(f"{cfg.out_dir}/eval.json", "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
