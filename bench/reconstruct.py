"""Benchmark of speech through TASTE and back (``taste.reconstruct``: the official ``inference_reconstruction``):
ours, the utterances batched through every stage, against the official algorithm (one utterance at a time: the
tokenizer, the unit decoder without a preallocated cache (``bench/baselines.official_unit_generate``), the voice
generator with two estimator calls per flow step), on the same random weights and the same draws, greedy units.

    python bench/reconstruct.py [--device cpu|cuda] [--batch 16] [--units 150] [--json out.json]

The release's unit decoder (``UnitDecoderConfig.official()``, 4096 S3 units) and voice generator (CosyVoice-300M's
flow + HiFT); on a GPU also the release's tokenizer shapes (distil-large-v3's 32-layer Whisper encoder and the
2-layer aggregator). Utterances of 2-6 s of noisy tones with 6-12 word transcripts; every utterance makes
``--units`` units (random weights never choose EOS). Both providers must make the same units and waveforms (checked
and printed). Without a GPU the default problem is smaller (4 utterances, the tiny tokenizer, 40 units each) and
the first line says so.
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import official_unit_generate  # noqa: E402
from common import Row, parse, parser, peak_mb, report, time_providers  # noqa: E402
from voice import trained_like  # noqa: E402

from taste.corpus import SENTENCES  # noqa: E402
from taste.reconstruct import reconstruct  # noqa: E402
from taste.tokenizer import TasteConfig, TasteTokenizer  # noqa: E402
from taste.train import Stage1Model  # noqa: E402
from taste.unit_decoder import UnitDecoder, UnitDecoderConfig  # noqa: E402
from taste.voice import VoiceGenerator  # noqa: E402


def models(preset: str, device: str) -> tuple[Stage1Model, VoiceGenerator]:
    torch.manual_seed(0)
    tok = TasteTokenizer(config=getattr(TasteConfig, preset)())
    agg = tok.config.aggregator
    decoder = UnitDecoder(config=UnitDecoderConfig.official(taste_dim=agg.d_model, text_vocab=agg.vocab_size))
    with torch.no_grad():
        tok.quantizer.embed.normal_()
        tok.quantizer.initted.fill_(1)
    voice = trained_like(VoiceGenerator())
    return Stage1Model(tok, decoder).to(device).eval(), voice.to(device).eval()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=None, help="utterances (default 16 on a GPU, 4 on the CPU)")
    p.add_argument("--units", type=int, default=None, help="units per utterance (default 150; CPU 40)")
    args = parse(p)
    dev = args.device
    small = dev == "cpu" and args.batch is None and args.units is None
    batch, units = args.batch or (4 if dev == "cpu" else 16), args.units or (40 if dev == "cpu" else 150)
    preset = "tiny" if dev == "cpu" else "official"
    if small:
        print(f"no GPU: a CPU-sized problem ({batch} utterances, the tiny tokenizer, {units} units each); on a GPU the "
              "default is 16 utterances, the release's tokenizer shapes, 150 units each")  # fmt: skip
    stage1, voice = models(preset, dev)
    gen = torch.Generator().manual_seed(1)
    seconds = (2 + 4 * torch.rand(batch, generator=gen)).tolist()
    waves = []
    for k, s in enumerate(seconds):
        t = torch.arange(int(s * 16000)) / 16000
        waves.append(0.3 * torch.sin(2 * math.pi * (120 + 15 * k) * t) + 0.05 * torch.randn(t.numel(), generator=gen))
    texts = [" ".join(SENTENCES[k % len(SENTENCES)].split()[: 6 + k % 7]) for k in range(batch)]
    speaker = torch.nn.functional.normalize(torch.randn(batch, 192, generator=gen), dim=1).to(dev)
    tok, decoder = stage1.tokenizer, stage1.decoder
    c = decoder.config
    holder: dict = {}

    @torch.no_grad()
    def official():
        voice.flow.batch_guidance = False
        g = torch.Generator().manual_seed(0)
        made_units, made_waves = [], []
        for i in range(batch):
            codes = tok.encode([waves[i]], [texts[i]])[0]
            a = tok.text_tokenizer([texts[i]]).asr
            prompt, _ = decoder.prompt(a.tokens.to(dev), a.cu_seqlens.to(dev), a.max_seqlen,
                                       tok.embeddings_from_codes(codes), a.word_offsets.to(dev),
                                       speaker[i : i + 1])  # fmt: skip
            s = a.max_seqlen
            low, high = math.floor(c.min_len_ratio * (s + 3)), min(math.floor(c.max_len_ratio * (s + 3)), units)
            u = official_unit_generate(decoder, prompt, low, high)
            made_units.append(u.cpu())
            made_waves.append(voice.generate([u], speaker[i], generator=g)[0].float().cpu())
        voice.flow.batch_guidance = True
        holder["official"] = made_units, made_waves

    def ours():
        out = reconstruct(stage1, waves, texts, voice=voice, speaker=speaker, greedy=True, max_new_tokens=units)
        holder["ours"] = out.units, out.waves

    fns = {"official algorithm (one at a time)": official, f"ours (B={batch})": ours}
    times = time_providers(list(fns.values()), dev, args.reps or (2 if dev == "cpu" else 3), budget_s=0)
    (u_off, w_off), (u_ours, w_ours) = holder["official"], holder["ours"]
    same_units = all(torch.equal(a, b) for a, b in zip(u_off, u_ours))
    diff = max(float((a - b).abs().max()) for a, b in zip(w_off, w_ours)) if same_units else float("nan")
    speech = sum(w.numel() for w in w_ours) / voice.sample_rate
    rows = []
    for (name, fn), ms in zip(fns.items(), times):
        row = Row(f"{batch} utterances ({sum(seconds):.1f} s in, {speech:.1f} s out)", name, ms, peak_mb(fn, dev),
                  ratio=times[0] / ms)  # fmt: skip
        row.extra = {"speech_s_per_s": speech / (ms * 1e-3), "identical_units": same_units, "max_abs_difference": diff}
        rows.append(row)
        print(f"  {row.case} | {name}: {ms:.1f} ms, {speech / (ms * 1e-3):.2f} s of speech per second", flush=True)
    print(f"  identical units: {same_units}; largest waveform difference, official algorithm vs ours: {diff:.2e}")
    report(f"bench/reconstruct.py on {dev}, {preset} tokenizer + release-shape unit decoder and voice generator, "
           "greedy units, float32; speed-up over the official algorithm", rows, dev, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
