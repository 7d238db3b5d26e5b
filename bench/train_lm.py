"""Benchmark of a TASLM training step (loss and backward): the text loss over the whole (N, V) logits, as the official
code computes it (transformers' causal-LM loss), against ours (taste.ops.linear_cross_entropy: a block of rows at a
time, never all logits at once), with and without the KL term of the official recipe (text_kl_weight 0.9).

    python bench/train_lm.py [--device cpu|cuda] [--batch B] [--tokens T] [--train-head] [--score] [--json out.json]

The model is TASLM with LoRA r 8 on a Llama with the Llama-3 vocabulary (128,256 ids): on the CPU a 95M one (d 512,
8 layers, as bench/generate.py), on a GPU the Llama-3.2-1B shapes (random weights, bf16 autocast). B utterances of T
tokens (two tokens a word) with their TASTE codes; the latent head. Both providers give the same loss (checked).
``--train-head`` also trains the output layer (tied to the embeddings; frozen in the official recipe), so the loss
makes its (V, d) gradient too. ``--score`` times likelihood scoring instead (``TasteSpokenLM.score``, no gradient)
against the same text log-likelihoods from the whole logits' log-softmax, at B and 4B utterances.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure, parse, parser, report  # noqa: E402

from taste.spoken_lm import SpokenLMConfig, TasteSpokenLM  # noqa: E402


def build(device: str, kl: float) -> TasteSpokenLM:
    torch.manual_seed(0)
    if device == "cpu":
        backbone = SpokenLMConfig().backbone | dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                                    num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
        config = SpokenLMConfig(backbone=backbone, lora_r=8, lora_alpha=16, text_kl_weight=kl)
    else:
        config = SpokenLMConfig.llama_3_2_1b(text_kl_weight=kl)
    with torch.device(device):
        return TasteSpokenLM(config=config).train()


def packed_batch(cfg, device: str, b: int, t: int, seed: int) -> tuple:
    """B utterances of T random Llama-3 tokens, two a word, with random codes: (tokens, cu_seqlens, word_ids, codes)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128000, (b * t,), generator=gen).to(device)
    cu = (torch.arange(b + 1, dtype=torch.int32) * t).to(device)
    word_ids = (torch.arange(t, dtype=torch.int32) // 2).repeat(b).to(device)
    codes = torch.randint(0, cfg.codebook_size, (b * ((t + 1) // 2), cfg.num_quantizers), generator=gen).to(device)
    return tokens, cu, word_ids, codes


def case(device: str, kl: float, b: int, t: int, reps: int, train_head: bool = False) -> list:
    """One training step of both providers on the same model and batch, with their losses compared."""
    model = build(device, kl)
    model.lm_head.weight.requires_grad_(train_head)
    tokens, cu, word_ids, codes = packed_batch(model.config, device, b, t, seed=1)
    losses = {}

    def step(whole: bool, name: str):
        def run():
            hook = model.lm_head.register_forward_hook(lambda *a: None) if whole else None  # (hooked: unfused)
            torch.manual_seed(0)  # (the same LoRA dropout and latent noise for both providers)
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                    out = model(tokens, cu, word_ids, codes)
                out.loss.backward()
            finally:
                if hook is not None:
                    hook.remove()
            losses[name] = float(out.loss.detach())
            model.zero_grad(set_to_none=True)

        return run

    label = f"step B={b} T={t}" + (" + KL 0.9" if kl else "") + (" + trained head" if train_head else "")
    providers = {"whole logits (official)": step(True, "whole"), "ours (blocks)": step(False, "ours")}
    rows = measure(label, providers, device, reps)
    print(f"  {label}: loss {losses['whole']:.6f} (whole logits) vs {losses['ours']:.6f} (ours)")
    return rows


def score_case(device: str, b: int, t: int, reps: int) -> list:
    """Likelihood scoring (``TasteSpokenLM.score``, no gradient) against the same scores from the whole ``(N, V)``
    logits and their log-softmax, as a caller would compute them from a causal LM's logits; values compared."""
    model = build(device, 0.0).eval()
    tokens, cu, word_ids, codes = packed_batch(model.config, device, b, t, seed=2)
    results = {}

    def whole():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            h, _ = model.hidden_states(tokens, cu, word_ids, codes)
            _, rows = model._text_rows(tokens, cu)
            logp = model.lm_head(h[rows]).float().log_softmax(-1)  # (N, V)
            results["whole"] = logp.gather(1, tokens[:, None])[:, 0].view(b, t).sum(-1)

    def ours():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            results["ours"] = model.score(tokens, cu, word_ids, codes).text

    label = f"score B={b} T={t}"
    rows = measure(label, {"whole logits": whole, "ours (blocks)": ours}, device, reps)
    gap = float((results["whole"] - results["ours"]).abs().max())
    print(f"  {label}: text log-likelihoods differ by at most {gap:.2e} (sums of {t} tokens)")
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=None, help="utterances (default: 8 on cpu, 16 on cuda)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per utterance (default: 60 on cpu, 256 on cuda)")
    p.add_argument("--train-head", action="store_true", help="also train the output layer (its (V, d) gradient)")
    p.add_argument("--score", action="store_true", help="time likelihood scoring (TasteSpokenLM.score) instead")
    args = parse(p)
    dev = args.device
    b = args.batch or (8 if dev == "cpu" else 16)
    t = args.tokens or (60 if dev == "cpu" else 256)
    if args.score:
        rows = score_case(dev, b, t, args.reps) + score_case(dev, 4 * b, t, args.reps)
        report(f"bench/train_lm.py --score on {dev}, TASLM likelihoods (Llama-3 vocabulary)", rows, dev, args.json)
        return
    rows = case(dev, 0.0, b, t, args.reps, args.train_head) + case(dev, 0.9, b, t, args.reps, args.train_head)
    report(f"bench/train_lm.py on {dev}, TASLM training step (LoRA, Llama-3 vocabulary)", rows, dev, args.json)


if __name__ == "__main__":
    main()
