"""Benchmark of S3 units -> speech (``taste.VoiceGenerator``: flow-matching decoder + HiFT vocoder): ours, the
utterances batched and the guidance's two estimator calls per step made one, against the official algorithm (one
utterance at a time, two estimator calls per step), on the same random weights and the same random draws.

    python bench/voice.py [--device cpu|cuda] [--batch 16] [--units 150] [--json out.json]

CosyVoice-300M's shapes (125 M parameters). Utterances of ``--units`` units on average (between 0.6x and 1.4x;
50 units a second of speech). Both providers must write the same waveforms (the largest difference is printed).
Without a GPU the default problem is smaller (2 utterances of about 25 units) and the first line says so.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Row, parse, parser, peak_mb, report, time_providers  # noqa: E402

from taste.voice import VoiceGenerator  # noqa: E402


def trained_like(model: VoiceGenerator) -> VoiceGenerator:
    """``model`` with every weight scaled by ``1 + 0.1 N(0, 1)``: norm scales and Snake alphas off their 1.0 inits,
    as trained weights are (from the global generator)."""
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(1 + 0.1 * torch.randn_like(prm))
    return model


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=None, help="utterances (default 16 on a GPU, 2 on the CPU)")
    p.add_argument("--units", type=int, default=None, help="mean units per utterance (default 150; CPU 25)")
    args = parse(p)
    dev = args.device
    small = dev == "cpu" and args.batch is None and args.units is None
    batch, units = args.batch or (2 if dev == "cpu" else 16), args.units or (25 if dev == "cpu" else 150)
    if small:
        print(f"no GPU: a CPU-sized problem ({batch} utterances of about {units} units); on a GPU the default is 16 "
              "utterances of about 150")  # fmt: skip
    torch.manual_seed(0)
    model = trained_like(VoiceGenerator()).to(dev).eval()
    gen = torch.Generator().manual_seed(1)
    counts = (units * (0.6 + 0.8 * torch.rand(batch, generator=gen))).round().long().clamp(min=1).tolist()
    utts = [torch.randint(0, 4096, (n,), generator=gen, device="cpu").to(dev) for n in counts]
    speaker = torch.randn(batch, 192, generator=gen).to(dev)
    holder: dict = {}

    def official():
        model.flow.batch_guidance = False
        g = torch.Generator().manual_seed(0)
        holder["official"] = [model.generate([u], speaker[i], generator=g)[0] for i, u in enumerate(utts)]
        model.flow.batch_guidance = True

    def ours():
        holder["ours"] = model.generate(utts, speaker, generator=torch.Generator().manual_seed(0))

    fns = {"official algorithm (one at a time)": official, f"ours (B={batch})": ours}
    times = time_providers(list(fns.values()), dev, args.reps or 3, budget_s=0)
    seconds = sum(counts) / 50
    diff = max(float((a - b).abs().max()) for a, b in zip(holder["official"], holder["ours"]))
    rows = []
    for (name, fn), ms in zip(fns.items(), times):
        row = Row(f"{batch} utterances, {seconds:.1f} s of speech", name, ms, peak_mb(fn, dev), ratio=times[0] / ms)
        row.extra = {"speech_s_per_s": seconds / (ms * 1e-3), "max_abs_difference": diff, "units": counts}
        rows.append(row)
        print(f"  {row.case} | {name}: {ms:.1f} ms, {seconds / (ms * 1e-3):.1f} s of speech per second", flush=True)
    print(f"  largest waveform difference, official algorithm vs ours: {diff:.2e}")
    report(f"bench/voice.py on {dev}, CosyVoice-300M flow + HiFT, float32; speed-up over the official algorithm",
           rows, dev, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
