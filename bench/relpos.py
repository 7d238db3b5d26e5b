"""Benchmark of the unit decoder's relative-position attention: ESPnet's rel_selfattn as the official code runs it
(2T-1 offsets and the rel_shift), the whole-score formula with offsets gathered (taste.reference), and ours
(taste.ops.relpos_attention: a block of queries at a time, probabilities recomputed in the backward).

    python bench/relpos.py [--device cpu|cuda] [--batch B] [--length T] [--decoder] [--json out.json]

Problem: one attention of the decoder's "LLM" (8 heads x 128) over B padded causal rows of T positions (lengths
T to 3T/4): T = 853 is 30 s of S3 units at 25 Hz after a 100-token prompt. Cases: forward (inference) and
forward + backward (training). ``--decoder`` adds a whole training step of the official-shape unit decoder
(7 LM layers) with the attention as the formula against ours (``RelPositionAttention.block_elements``): the time and
the peak that the blocks save.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import espnet_rel_attention  # noqa: E402
from common import measure, parse, parser, report  # noqa: E402

from taste import ops, reference  # noqa: E402
from taste.relpos import RelPositionAttention, causal_mask  # noqa: E402
from taste.unit_decoder import UnitDecoder, UnitDecoderConfig  # noqa: E402

HEADS, D_K = 8, 128


def attention_inputs(batch: int, length: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (0.5 * torch.randn(*shape, generator=gen)).to(device, dtype)

    qu, qv, k, v = (rand(batch, HEADS, length, D_K) for _ in range(4))
    p_both = rand(HEADS, 2 * length - 1, D_K)  # offsets +(T-1)..-(T-1), as ESPnet's table
    p = p_both[:, length - 1 :].flip(1).contiguous()  # offsets 0..T-1
    lengths = torch.linspace(length, 0.75 * length, batch).round().long().to(device)
    mask = causal_mask(lengths, length)
    positions = torch.arange(length, device=device).expand(batch, -1)
    return qu, qv, k, v, p_both, p, positions, mask


def attention_rows(batch: int, length: int, device: str, dtype: torch.dtype, reps: int) -> list:
    qu, qv, k, v, p_both, p, positions, mask = attention_inputs(batch, length, device, dtype)
    grad_out = torch.randn_like(qu)
    params = [qu, qv, k, v, p, p_both]
    providers = {
        "ESPnet rel_shift (official)": lambda: espnet_rel_attention(qu, qv, k, v, p_both, mask),
        "whole-score formula": lambda: reference.relpos_attention(qu, qv, k, v, p, positions, mask),
        "ours (blocks)": lambda: ops.relpos_attention(qu, qv, k, v, p, positions, mask),
    }
    with torch.no_grad():
        rows = measure(f"forward B={batch} T={length}", providers, device, reps)
    for t in params:
        t.requires_grad_(True)

    def train(fn, inputs):
        return lambda: torch.autograd.grad(fn(), inputs, grad_out)

    uses_both = [qu, qv, k, v, p_both]
    uses_p = [qu, qv, k, v, p]
    training = {name: train(fn, uses_both if "official" in name else uses_p) for name, fn in providers.items()}
    return rows + measure(f"forward+backward B={batch} T={length}", training, device, reps)


def decoder_rows(batch: int, length: int, device: str, reps: int) -> list:
    """One training step (loss, backward) of the official-shape unit decoder: 100 text tokens, T - 103 units; under
    bfloat16 autocast on a GPU, as `taste train-tokenizer` trains there."""
    torch.manual_seed(0)
    model = UnitDecoder(config=UnitDecoderConfig.official()).to(device).train()
    text = torch.linspace(100, 75, batch).round().long()
    units = torch.linspace(length - 103, 0.75 * (length - 103), batch).round().long()
    cu = torch.cat([torch.zeros(1, dtype=torch.long), text.cumsum(0)]).int().to(device)
    ucu = torch.cat([torch.zeros(1, dtype=torch.long), units.cumsum(0)]).int().to(device)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50000, (int(text.sum()),), generator=gen).to(device)
    targets = torch.randint(0, 4096, (int(units.sum()),), generator=gen).to(device)
    offsets = torch.arange(int(text.sum()) + 1, dtype=torch.int32, device=device)  # one token a word
    embeddings = torch.randn(int(text.sum()), 1280, generator=gen).to(device)
    attentions = [m for m in model.modules() if isinstance(m, RelPositionAttention)]

    def step(block_elements: int | None):
        def run():
            for m in attentions:
                m.block_elements = block_elements
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):  # (as training on a GPU)
                out = model(tokens, cu, 100, targets, ucu, int(units.max()), taste=embeddings, word_offsets=offsets)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    providers = {"whole-score formula": step(2**62), "ours (blocks)": step(None)}  # (one block: the formula)
    return measure(f"decoder train step B={batch} T={length}", providers, device, reps)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=None, help="utterances (default: 2 on cpu, 32 on cuda)")
    p.add_argument("--length", type=int, default=853, help="positions T of the longest row (default 853)")
    p.add_argument("--decoder", action="store_true", help="also a whole training step of the unit decoder")
    args = parse(p)
    dev = args.device
    batch = args.batch or (2 if dev == "cpu" else 32)
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    rows = attention_rows(batch, args.length, dev, dtype, args.reps)
    if args.decoder:
        rows += decoder_rows(batch, args.length, dev, args.reps)
    report(f"bench/relpos.py on {dev}, {dtype}, {HEADS} heads x {D_K}", rows, dev, args.json)


if __name__ == "__main__":
    main()
