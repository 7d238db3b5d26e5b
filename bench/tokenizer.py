"""Benchmark of the TASTE tokenizer end to end (waveforms + transcripts -> one code row per word): an
official-style pipeline (per-sample front-end, padded eager aggregator, span-loop pooling, unfused VQ on every
subword) against ours (taste.TasteTokenizer.encode), with the same weights, and a check that the codes agree.

    python bench/tokenizer.py [--device cpu|cuda] [--preset tiny|official] [--batch 16] [--json out.json]

Speech: espeak-ng utterances of the built-in sentences (taste.corpus), or noise of the same lengths when espeak-ng
is missing. Weights: random, with the codebooks k-means-initialised on other utterances. The official-style
pipeline runs transformers' WhisperEncoder with the same weights (keeping every hidden state, as the official
forward does); both encoders do the same work on the padded window, which identical codes require. A second case
times everything but the encoder (states given), the part this package changes. float32; ``tiny`` (10 s window)
on the CPU by default, ``official`` (distil-large-v3 shapes, 30 s window) for a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import (  # noqa: E402
    hf_whisper_encoder,
    official_codes_from_states,
    official_frontend,
    official_tokenizer_codes,
)
from common import measure, parse, parser, report  # noqa: E402

import taste  # noqa: E402
from taste.corpus import SENTENCES, read_manifest, read_wav, synthesize_corpus  # noqa: E402
from taste.text import whisper_encoding  # noqa: E402


def utterances(n: int, seed: int = 0) -> tuple[list[torch.Tensor], list[str], str]:
    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as tmp:
            rows = read_manifest(synthesize_corpus(tmp, n, seed=seed))
            waves = [read_wav(r["audio_path"])[0] for r in rows]
            return waves, [r["text"] for r in rows], "espeak-ng speech"
    g = torch.Generator().manual_seed(seed)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(n)]
    waves = [0.1 * torch.randn(int(16000 * (1.5 + 0.3 * len(t.split()))), generator=g) for t in texts]
    return waves, texts, "noise (espeak-ng not installed)"


def main() -> None:
    p = parser(__doc__)
    p.add_argument(
        "--preset", choices=("tiny", "official"), default=None, help="default: tiny on cpu, official on cuda"
    )
    p.add_argument("--batch", type=int, default=16)
    args = parse(p)
    dev = args.device
    preset = args.preset or ("tiny" if dev == "cpu" else "official")
    torch.manual_seed(0)
    config = getattr(taste.TasteConfig, preset)()
    config = dataclasses.replace(config, quantizer=dataclasses.replace(config.quantizer, kmeans_iters=10))
    model = taste.TasteTokenizer(config=config).to(dev)
    waves, texts, source = utterances(args.batch)
    seconds = sum(w.numel() for w in waves) / 16000
    with torch.no_grad():  # k-means-initialise the codebooks on other utterances, so that codes are not all 0
        model.train()
        init_waves, init_texts, _ = utterances(4 * args.batch, seed=1)
        model.tokenize(*model.prepare(init_waves, init_texts))
    model.eval()
    encode_word = whisper_encoding().encode_ordinary
    try:
        hf_encoder, encoder_name = hf_whisper_encoder(model), "transformers' WhisperEncoder"
    except ImportError:
        hf_encoder, encoder_name = model.encoder, "taste's SpeechEncoder (transformers not installed)"

    @torch.no_grad()
    def official():
        return official_tokenizer_codes(model, waves, texts, encode_word, encoder=hf_encoder)

    def ours():
        return model.encode(waves, texts)

    with torch.no_grad():
        h_key, h_val = model.encoder(model.prepare(waves, texts)[0])

    @torch.no_grad()
    def official_rest():
        mel = official_frontend(model, waves)
        return mel, official_codes_from_states(model, h_key, h_val, texts, encode_word)

    @torch.no_grad()
    def ours_rest():
        mel, text = model.prepare(waves, texts)
        a = text.asr
        words = model.embed_words(h_key, h_val, a.tokens.to(dev), a.cu_seqlens.to(dev), a.max_seqlen,
                                  a.word_offsets.to(dev))  # fmt: skip
        return mel, model.quantizer(words)[1]

    a, b = official(), ours()
    words = sum(c.shape[0] for c in b)
    differ = sum(int((x != y).any(dim=1).sum()) for x, y in zip(a, b))
    label = f"{preset} B={args.batch} ({seconds:.1f} s)"
    pair = ("official-style pipeline", "ours (TasteTokenizer.encode)")
    rows = measure(f"end to end {label}", dict(zip(pair, (official, ours))), dev, args.reps)
    for r in rows:
        r.extra = {"utt_per_s": args.batch / (r.median_ms * 1e-3), "rtf": r.median_ms * 1e-3 / seconds}
    rows += measure(f"all but the encoder {label}", dict(zip(pair, (official_rest, ours_rest))), dev, args.reps)
    report(f"bench/tokenizer.py on {dev}, float32, {source}; official-style encoder: {encoder_name}", rows, dev,
           args.json)  # fmt: skip
    for r in rows[:2]:
        print(f"{r.provider:<30} {r.extra['utt_per_s']:8.1f} utt/s  real-time factor {r.extra['rtf']:.5f}")
    encoder_share = 1 - rows[3].median_ms / rows[1].median_ms
    print(f"the speech encoder (the same work in both pipelines) takes {100 * encoder_share:.0f}% of ours end to end")
    print(f"codes: {words - differ} of {words} words identical between the two pipelines")


if __name__ == "__main__":
    main()
