"""Benchmark of TASTE inference from speech alone (transcript by Whisper ASR, then TASTE codes): the official way
(transformers' Whisper generate on each utterance, its own encoder pass, then the TASTE tokenizer's encoder pass)
and transformers' generate batched, against ours (taste.TasteTokenizer.transcribe_and_encode: one encoder pass
serves the ASR and TASTE, batched greedy decoding with a preallocated cache).

    python bench/asr.py [--device cpu|cuda] [--preset tiny|large-v3] [--batch 4] [--tokens 24] [--compile]
                        [--json out.json]

Weights: a random transformers Whisper of the preset's shapes (``tiny``: whisper-tiny's, 4 + 4 layers of 384, on
the CPU by default; ``large-v3``: 32 + 32 layers of 1280, float16, for a GPU), saved to a temporary directory and
loaded by every provider, so that all give the same transcripts (checked). Speech: 30 s windows of espeak-ng
utterances (noise without espeak-ng). A random decoder rarely ends a transcript, so every utterance decodes about
``--tokens`` tokens in every provider (the counts are printed). The TASTE tokenizer after the ASR is this
package's in all: the difference measured is the ASR and the encoder pass it shares.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure, parse, parser, report  # noqa: E402
from tokenizer import utterances  # noqa: E402

import taste  # noqa: E402
from taste.asr import WhisperTranscriber  # noqa: E402

PRESETS = {  # d_model, layers (encoder = decoder), heads, ffn, mels
    "tiny": (384, 4, 6, 1536, 80),
    "large-v3": (1280, 32, 20, 5120, 128),
}


def random_whisper(directory: str, preset: str, tokens: int):
    """A random transformers Whisper of ``preset``'s shapes, with large-v3's generation rules (English, no
    timestamps; at most ``tokens`` new tokens), saved to ``directory``."""
    import transformers

    d, layers, heads, ffn, mels = PRESETS[preset]
    config = transformers.WhisperConfig(
        vocab_size=51866, num_mel_bins=mels, d_model=d, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        max_source_positions=1500, max_target_positions=448, eos_token_id=50257, pad_token_id=50257,
        decoder_start_token_id=50258,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    g = model.generation_config
    g.decoder_start_token_id, g.eos_token_id, g.pad_token_id = 50258, 50257, 50257
    g.lang_to_id, g.task_to_id = {"<|en|>": 50259}, {"transcribe": 50360, "translate": 50359}
    g.is_multilingual, g.no_timestamps_token_id = True, 50364
    g.suppress_tokens, g.begin_suppress_tokens = [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31], [220, 50257]
    g.max_new_tokens = tokens
    model.save_pretrained(directory)
    return model


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--preset", choices=tuple(PRESETS), default=None, help="default: tiny on cpu, large-v3 on cuda")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=24, help="the most tokens decoded per utterance")
    p.add_argument("--compile", action="store_true", help="also ours with the decoding step compiled (CUDA graphs "
                   "on a GPU)")  # fmt: skip
    args = parse(p)
    dev = args.device
    preset = args.preset or ("tiny" if dev == "cpu" else "large-v3")
    dtype = torch.float32 if dev == "cpu" else torch.float16
    with tempfile.TemporaryDirectory() as tmp:
        hf = random_whisper(tmp, preset, args.tokens).to(dev, dtype)
        value_layer = min(6, PRESETS[preset][1] - 1)
        tok = taste.TasteTokenizer.from_whisper(tmp, value_layer=value_layer, dtype=dtype).to(dev).eval()
        asr = WhisperTranscriber.from_whisper(tmp, dtype=dtype, device=dev)
    waves, _, source = utterances(args.batch)
    seconds = sum(w.numel() for w in waves) / 16000
    decode = asr.decode

    def hf_mel(w):
        audio, _ = taste.audio.batch_waveforms(w, 16000)
        return tok.frontend(audio.to(dev)).to(dtype)

    def hf_texts(ids):
        ids = ids[:, 4:] if ids.shape[1] and bool((ids[:, 0] == 50258).all()) else ids  # (prompt kept by some)
        return decode(ids, (ids != 50257).sum(1))

    @torch.no_grad()
    def official():  # the HF pipeline: one utterance at a time, its own encoder pass; then TASTE
        texts = []
        for w in waves:
            texts += hf_texts(hf.generate(hf_mel([w]), language="en", task="transcribe", return_timestamps=False))
        return texts, tok.encode(waves, texts)

    @torch.no_grad()
    def batched():
        texts = hf_texts(hf.generate(hf_mel(waves), language="en", task="transcribe", return_timestamps=False))
        return texts, tok.encode(waves, texts)

    def ours():
        return tok.transcribe_and_encode(waves, asr)

    def ours_compiled():
        return tok.transcribe_and_encode(waves, asr, compile=True)

    results = [f()[0] for f in (official, batched, ours, *((ours_compiled,) if args.compile else ()))]
    with torch.no_grad():
        decoded = asr.generate(tok.encode_speech(hf_mel(waves))[0])[1].tolist()  # tokens per utterance
    same = sum(len(set(texts)) == 1 for texts in zip(*results))
    label = f"{preset} B={args.batch} ({seconds:.1f} s)"
    providers = {"official-style (HF, B=1)": official, "HF generate batched": batched,
                 "ours (transcribe_and_encode)": ours}  # fmt: skip
    if args.compile:
        providers["ours, compiled step"] = ours_compiled
    rows = measure(f"ASR + TASTE codes {label}", providers, dev, args.reps or (3 if dev == "cpu" else 0))
    for r in rows:
        r.extra = {"utt_per_s": args.batch / (r.median_ms * 1e-3), "rtf": r.median_ms * 1e-3 / seconds}
    report(f"bench/asr.py on {dev}, {str(dtype).removeprefix('torch.')}, {source}, at most {args.tokens} tokens "
           "per utterance", rows, dev, args.json)  # fmt: skip
    print(f"transcripts: {same} of {args.batch} identical in the {len(results)} providers; tokens decoded per "
          f"utterance {decoded}")  # fmt: skip


if __name__ == "__main__":
    main()
