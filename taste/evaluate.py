"""What a trained stage-1 model preserves (``taste eval-tokenizer``) and what it sounds like (``taste resynthesize``).

Metrics on the held-out rows of a units manifest (the last ``eval_size``, never trained on):
- teacher-forced unit accuracy, top-1 and top-5, over every target (units and EOS), and the cross-entropy, also
  with the TASTE rows shuffled across the words of the batch (how much the decoder relies on them);
- code bitrate (bits of the word codes per second of speech) and token rate (words per second);
- duration consistency: units sampled by the decoder (top-k, seeded) against the reference count, as the mean
  absolute relative error ``|n_gen - n_ref| / n_ref`` and the correlation of the two counts.

A stage-0 (``asr``) run gets the next-token cross-entropy and top-1 accuracy of the transcript given its own
speech, and the cross-entropy given another utterance's speech (the batch's mel rolled by one): the gap is how
much the model reads the speech rather than a language model of the transcripts.

Resynthesis: codes -> unit decoder -> units -> the k-means centroids (50 Hz log-mel frames) -> mel power ->
linear magnitude (least squares through the mel filters) -> Griffin-Lim (torch STFT) -> a 16 kHz wav.
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import torch

from taste._checks import check_positive_int
from taste.audio import HOP_LENGTH, MEL_BINS, N_FFT, mel_filters
from taste.train import Stage1Model, UnitCorpus


def _stage(model_dir: str) -> str:
    for d in (os.path.join(model_dir, "final"), model_dir):
        path = os.path.join(d, "train_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)["stage"]
    return "vq"


@torch.no_grad()
def evaluate(model_dir: str, manifest: str, *, eval_size: int = 64, batch_size: int = 16, seed: int = 0,
             stage: str | None = None, device=None, word_rows=None) -> dict:  # fmt: skip
    """The metrics of the module docstring for the run (or model directory) ``model_dir``.

    ``word_rows``: for ablations, a callable ``(manifest row indices) -> (W, taste_dim)`` float tensor of one row
    per word of those utterances, given to the decoder instead of the tokenizer's TASTE embeddings (for example
    oracle features of the words' prosody); the tokenizer is then not run."""
    check_positive_int(eval_size, "eval_size", " (the manifest's last rows)")
    check_positive_int(batch_size, "batch_size")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stage = stage or _stage(model_dir)
    if word_rows is not None:
        stage = "no_vq"
    model = Stage1Model.from_pretrained(model_dir, device=device).eval()
    corpus = UnitCorpus(manifest)
    n = len(corpus.rows)
    rows = list(range(max(0, n - eval_size), n))
    if stage == "asr":
        return _evaluate_asr(model, corpus, rows, batch_size, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    top1 = top5 = targets = 0
    ce_sum, ce_shuffled, words, seconds, n_ref, n_gen = 0.0, 0.0, 0, 0.0, [], []
    shuffle = torch.Generator().manual_seed(seed)
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        batch = corpus.batch(idx, model, device, need_audio=stage != "text" and word_rows is None)
        if word_rows is not None:
            rows_in = word_rows(idx).to(device)
            out, tok = model.decode(batch, rows_in), SimpleNamespace(word_embeddings=rows_in)
        else:
            _, out, tok = model(batch, stage)
        best = out.logits.float().topk(5, dim=-1).indices
        top1 += int((best[:, 0] == out.targets).sum())
        top5 += int((best == out.targets[:, None]).any(1).sum())
        targets += out.targets.numel()
        ce_sum += float(torch.nn.functional.cross_entropy(out.logits.float(), out.targets, reduction="sum"))
        words += int(batch["text"].word_cu_seqlens[-1])
        seconds += sum(corpus.audio[i].numel() for i in idx) / 16000
        a = batch["text"].asr
        taste = None if tok is None else tok.word_embeddings
        if taste is not None:  # the same batch with the TASTE rows of its words shuffled: does the decoder use them?
            perm = torch.randperm(taste.shape[0], generator=shuffle).to(device)
            other = model.decode(batch, taste[perm])
            ce_shuffled += float(
                torch.nn.functional.cross_entropy(other.logits.float(), other.targets, reduction="sum")
            )
        units = model.decoder.generate(
            a.tokens.to(device), a.cu_seqlens.to(device), a.max_seqlen, taste=taste,
            word_offsets=a.word_offsets.to(device), speaker=batch["speaker"], generator=gen,
        )  # fmt: skip
        n_gen += [u.numel() for u in units]
        n_ref += [corpus.units[i].numel() for i in idx]
    ref, got = torch.tensor(n_ref, dtype=torch.float64), torch.tensor(n_gen, dtype=torch.float64)
    q = model.tokenizer.quantizer
    bits_per_word = q.num_quantizers * math.log2(q.codebook_size) if stage == "vq" else float("nan")
    return {
        "stage": stage,
        "utterances": len(rows),
        "unit_top1": top1 / targets,
        "unit_top5": top5 / targets,
        "unit_ce": ce_sum / targets,
        "unit_ce_taste_shuffled": ce_shuffled / targets if stage != "text" else float("nan"),
        "duration_abs_rel_error": float(((got - ref).abs() / ref).mean()),
        "duration_corr": float(torch.corrcoef(torch.stack([got, ref]))[0, 1]),
        "word_rate_per_s": words / seconds,
        "code_bitrate_bps": bits_per_word * words / seconds,
    }


def _evaluate_asr(model: Stage1Model, corpus: UnitCorpus, rows: list[int], batch_size: int, device) -> dict:
    ce = ce_other = correct = count = 0.0
    for start in range(0, len(rows), batch_size):
        batch = corpus.batch(rows[start : start + batch_size], model, device, need_audio=True)
        _, out, _ = model.asr_loss(batch)
        ce += float(torch.nn.functional.cross_entropy(out.logits.float(), out.targets, reduction="sum"))
        correct += int((out.logits.argmax(-1) == out.targets).sum())
        count += out.targets.numel()
        batch["mel"] = batch["mel"].roll(1, 0)
        _, other, _ = model.asr_loss(batch)
        ce_other += float(torch.nn.functional.cross_entropy(other.logits.float(), other.targets, reduction="sum"))
    return {
        "stage": "asr",
        "utterances": len(rows),
        "asr_ce": ce / count,
        "asr_top1": correct / count,
        "asr_ce_other_audio": ce_other / count,
    }


def griffin_lim(magnitude: torch.Tensor, iters: int = 64, seed: int = 0) -> torch.Tensor:
    """``(201, F)`` STFT magnitudes (n_fft 400, hop 160) -> ``(T,)`` waveform (fast Griffin-Lim, momentum 0.99)."""
    window = torch.hann_window(N_FFT, device=magnitude.device)
    g = torch.Generator(device=magnitude.device).manual_seed(seed)
    angles = torch.exp(2j * math.pi * torch.rand(magnitude.shape, generator=g, device=magnitude.device))
    previous = torch.zeros_like(angles)
    length = magnitude.shape[1] * HOP_LENGTH  # Whisper's framing: T samples <-> T / 160 frames (last one dropped)
    for _ in range(iters):
        wave = torch.istft(magnitude * angles, N_FFT, HOP_LENGTH, window=window, length=length)
        rebuilt = torch.stft(wave, N_FFT, HOP_LENGTH, window=window, return_complex=True)[:, : magnitude.shape[1]]
        accelerated = rebuilt - 0.99 / 1.99 * previous
        previous = rebuilt
        angles = accelerated / accelerated.abs().clamp(min=1e-8)
    return torch.istft(magnitude * angles, N_FFT, HOP_LENGTH, window=window, length=length)


def check_centroids(centroids: torch.Tensor, num_units: int | None = None) -> None:
    """Refuses unit centroids that cannot be the mel frames of ``num_units`` units: a ``(num_units, n_mels)`` float
    tensor, ``n_mels`` one of :data:`taste.audio.MEL_BINS` (checked before a decoder spends its time generating)."""
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 2 or not centroids.is_floating_point():
        got = tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__
        raise ValueError(f"centroids must be a (num_units, n_mels) float tensor, got {got}")
    if num_units is not None and centroids.shape[0] != num_units:
        raise ValueError(f"centroids has {centroids.shape[0]} rows but the unit decoder has {num_units} units: "
                         "the centroids of another `taste units` run than the one it was trained on")  # fmt: skip
    if centroids.shape[1] not in MEL_BINS:
        raise ValueError(f"centroids must have {' or '.join(map(str, MEL_BINS))} mel bins per row, got "
                         f"{centroids.shape[1]}")  # fmt: skip


def units_to_wave(units: torch.Tensor, centroids: torch.Tensor, iters: int = 64) -> torch.Tensor:
    """``(T,)`` 50 Hz units + ``(K, 80)`` centroids (normalised Whisper log-mel) -> 16 kHz waveform in [-1, 1]."""
    check_centroids(centroids)
    if units.numel() and not 0 <= int(units.min()) <= int(units.max()) < centroids.shape[0]:
        raise ValueError(f"units must lie in [0, {centroids.shape[0]}) (the centroids' rows), got "
                         f"[{int(units.min())}, {int(units.max())}]")  # fmt: skip
    frames = centroids[units].T.repeat_interleave(2, dim=1)  # (80, 2T) at 100 Hz
    power_mel = torch.pow(10.0, frames.double() * 4.0 - 4.0)
    filters = mel_filters(centroids.shape[1]).double()  # (80, 201)
    power = (torch.linalg.pinv(filters) @ power_mel).clamp(min=0)  # (201, 2T), least squares
    wave = griffin_lim(power.sqrt().float(), iters)
    return wave / wave.abs().max().clamp(min=1e-6) * 0.9


@torch.no_grad()
def resynthesize(model_dir: str, audio: torch.Tensor, text: str, centroids: torch.Tensor, *, seed: int = 0,
                 sample_rate: int = 16000) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One utterance through TASTE and back: ``(codes (W, Q), waveform (T,) at 16 kHz)``."""
    from taste.reconstruct import reconstruct

    model = Stage1Model.from_pretrained(model_dir).eval()
    out = reconstruct(model, [audio], [text], sample_rate=sample_rate, centroids=centroids, stage=_stage(model_dir),
                      seed=seed)  # fmt: skip
    return out.codes[0], out.waves[0]
