"""Benchmark of the unit decoder's generation: units per second of ours (batched, a KV cache allocated once, the
position tables projected once) against the official algorithm (batch 1, caches grown by concatenation, the
position table projected in every layer at every step, a host read per step), on the same random weights, greedy.

    python bench/unit_decoder.py [--device cpu|cuda] [--units 128] [--batch 16] [--json out.json]

The official-shape decoder (``UnitDecoderConfig.official()``: 7 LM layers of width 1024, 4096 units) on prompts of
12-20 words (1-3 text tokens each) with TASTE word embeddings and a speaker embedding; every utterance generates up
to ``--units`` units (EOS banned before 2 (S + 3), as the official rule). The official algorithm and ours at batch 1
run the first prompt; ours also runs ``--batch`` different prompts at once. The units of the first prompt must
agree between the official algorithm and ours (checked and printed).
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import official_unit_generate  # noqa: E402
from common import Row, parse, parser, peak_mb, report, time_providers  # noqa: E402

from taste.unit_decoder import UnitDecoder, UnitDecoderConfig  # noqa: E402


def prompts(batch: int, device: str, seed: int = 0) -> dict:
    """``batch`` utterances of 12-20 words of 1-3 tokens: the packed keyword arguments of ``UnitDecoder.prompt``."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(12, 21, (batch,), generator=gen)
    per_word = torch.randint(1, 4, (int(words.sum()),), generator=gen)
    word_offsets = torch.cat([torch.zeros(1, dtype=torch.long), per_word.cumsum(0)]).int()
    tokens_per_utt = torch.stack([w.sum() for w in per_word.split(words.tolist())])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), tokens_per_utt.cumsum(0)]).int()
    n = int(cu[-1])
    d = dict(text_tokens=torch.randint(0, 50000, (n,), generator=gen), text_cu_seqlens=cu,
             max_text=int(tokens_per_utt.max()), taste=torch.randn(int(words.sum()), 1280, generator=gen),
             word_offsets=word_offsets, speaker=torch.randn(batch, 192, generator=gen))  # fmt: skip
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def first(batch: dict) -> dict:
    """The first utterance of ``prompts``' batch, alone."""
    cu, wo = batch["text_cu_seqlens"], batch["word_offsets"]
    n = int(cu[1])
    words = int((wo <= n).sum()) - 1
    return dict(text_tokens=batch["text_tokens"][:n], text_cu_seqlens=cu[:2], max_text=n,
                taste=batch["taste"][:words], word_offsets=wo[: words + 1], speaker=batch["speaker"][:1])  # fmt: skip


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--units", type=int, default=128, help="units to generate per utterance at most (default 128)")
    p.add_argument("--batch", type=int, default=16)
    args = parse(p)
    dev = args.device
    torch.manual_seed(0)
    model = UnitDecoder(config=UnitDecoderConfig.official()).to(dev).eval()
    c = model.config
    batch = prompts(args.batch, dev)
    one = first(batch)
    s = one["max_text"]
    min_len = math.floor(c.min_len_ratio * (s + 3))
    max_len = min(math.floor(c.max_len_ratio * (s + 3)), args.units)
    holder: dict = {}

    @torch.no_grad()
    def official():
        prompt, _ = model.prompt(**one)
        holder["official"] = official_unit_generate(model, prompt, min_len, max_len)

    def ours1():
        holder["ours"] = model.generate(**one, greedy=True, max_new_tokens=args.units)

    def ours_b():
        holder["batch"] = model.generate(**batch, greedy=True, max_new_tokens=args.units)

    fns = {"official algorithm (B=1)": official, "ours B=1": ours1, f"ours B={args.batch}": ours_b}
    times = time_providers(list(fns.values()), dev, args.reps or 3, budget_s=0)
    made = {"official algorithm (B=1)": len(holder["official"]), "ours B=1": len(holder["ours"][0]),
            f"ours B={args.batch}": sum(len(u) for u in holder["batch"])}  # fmt: skip
    a, b = holder["official"].cpu(), holder["ours"][0].cpu()
    agree = next((i for i, (x, y) in enumerate(zip(a.tolist(), b.tolist())) if x != y), min(len(a), len(b)))
    same = torch.equal(a, b)
    base = made["official algorithm (B=1)"] / (times[0] * 1e-3)
    rows = []
    for (name, fn), ms in zip(fns.items(), times):
        ups = made[name] / (ms * 1e-3)
        row = Row(f"up to {args.units} units", name, ms, peak_mb(fn, dev), ratio=ups / base)
        row.extra = {"units_per_s": ups, "units": made[name], "identical": same, "agree": agree}
        rows.append(row)
        print(f"  {row.case} | {name}: {ms:.1f} ms, {made[name]} units, {ups:.1f} units/s", flush=True)
    print(f"  identical units (official vs ours B=1): {same}"
          + ("" if same else f"; they agree for the first {agree} of {len(a)}"))  # fmt: skip
    report(f"bench/unit_decoder.py on {dev}, official-shape unit decoder, greedy; speed-up = units/s over the "
           f"official algorithm", rows, dev, args.json)  # fmt: skip
    print(f"ours B=1 {rows[1].ratio:.1f}x, ours B={args.batch} {rows[2].ratio:.1f}x the official units/s")


if __name__ == "__main__":
    main()
