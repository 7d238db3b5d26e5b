"""S3 speech tokens, the unit decoder's targets: CosyVoice's ``speech_tokenizer_v1.onnx`` (in the release as
``cosyvoice/speech_tokenizer_v1.onnx``), 4096 tokens at 50 Hz, run from its ONNX file by :class:`taste.onnx.OnnxGraph`
(no onnxruntime).

What the official processor computes (``taste_speech/processing_taste.py``, spec 1.1 step 6): the 16 kHz waveform as
it is (no padding to 30 s) -> openai-whisper's 128-bin log-mel (each utterance floored at its own maximum minus 8)
-> the ONNX model with the frame count as its second input -> tokens. Audio longer than 30 s is refused (the
official code returns no tokens for it, with a warning). Every utterance runs alone, as the official code runs it,
unless ``encode`` is given ``batch_frames``: then utterances of similar length run together, padded, each with its own
frame count (checked against lone runs on the loaded graph before it is trusted, see :meth:`S3Tokenizer.encode`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taste._checks import check_positive_int
from taste.audio import N_FFT, SAMPLE_RATE, mel_filters, waveforms_at_16k, whisper_log_mel
from taste.onnx import OnnxGraph, find_onnx_file, load_onnx_file

OFFICIAL_FILE = os.path.join("cosyvoice", "speech_tokenizer_v1.onnx")  # in the TASTE release
COSYVOICE_FILE = "speech_tokenizer_v1.onnx"  # in a CosyVoice model directory
MAX_SECONDS = 30.0
TOKEN_RATE = 50  # tokens per second (v1)


# where a release (cosyvoice/), a CosyVoice model directory and an import-official directory keep the file
SEARCH = (OFFICIAL_FILE, COSYVOICE_FILE, os.path.join("s3_tokenizer", COSYVOICE_FILE))


def find_s3_tokenizer(path: str) -> str | None:
    """The S3 tokenizer's ONNX file under ``path`` (see :data:`SEARCH`), ``path`` itself if it is one, or None."""
    return find_onnx_file(path, SEARCH)


class S3Tokenizer(nn.Module):
    """CosyVoice's S3 tokenizer from its ONNX file: waveforms -> S3 token ids (``encode``); ``forward`` runs the
    network on one utterance's log-mel."""

    sample_rate = SAMPLE_RATE
    n_mels = 128

    def __init__(self, graph: OnnxGraph):
        super().__init__()
        if len(graph.input_names) != 2 or len(graph.output_names) < 1:
            raise ValueError(f"an S3 tokenizer's ONNX graph takes (log-mel, frame count) and returns tokens; this "
                             f"one has inputs {graph.input_names} and outputs {graph.output_names}")  # fmt: skip
        self.graph = graph
        # whether batches give the lone runs' tokens on this graph: None until checked (a batch, then a padded one:
        # utterances of unequal lengths); batches_ok False once one did not (every utterance then runs alone)
        self.batches_ok: bool | None = None
        self.padding_ok: bool | None = None
        self.register_buffer("filters", mel_filters(self.n_mels), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    @classmethod
    def from_official(cls, path: str, *, device=None) -> S3Tokenizer:
        """The release directory (``cosyvoice/speech_tokenizer_v1.onnx``), a CosyVoice model directory, or the ONNX
        file."""
        return cls(load_onnx_file(path, SEARCH, "an S3 tokenizer")).to(device).eval()

    def forward(self, mel: Tensor) -> Tensor:
        """``mel (n_mels, F)`` float32 of one utterance -> ``(T_s,)`` int64 token ids."""
        self._check_mel(mel, "mel")
        frames = torch.full((1,), mel.shape[1], dtype=torch.int32, device=mel.device)  # (filled there: no copy)
        out = self.graph(mel[None], frames)
        tokens = out[0] if isinstance(out, tuple) else out
        return tokens.reshape(-1).long()

    def log_mel(self, waveforms: Sequence[Tensor], sample_rate: int | Sequence[int] = SAMPLE_RATE) -> list[Tensor]:
        """Per waveform, ``(128, T // 160)`` float32: openai-whisper's log-mel of the 16 kHz audio as it is."""
        out = []
        for i, audio in enumerate(waveforms_at_16k(waveforms, sample_rate, max_seconds=MAX_SECONDS)):
            if audio.numel() <= N_FFT // 2:  # (the STFT reflects 200 samples at each end)
                raise ValueError(f"waveforms[{i}] is too short for S3 tokens: {audio.numel()} samples at 16 kHz, "
                                 f"at least {N_FFT // 2 + 1} needed")  # fmt: skip
            out.append(whisper_log_mel(audio[None].to(self.filters.device), self.filters, self.window)[0])
        return out

    def _check_mel(self, mel: Tensor, name: str) -> None:
        if mel.dim() != 2 or mel.shape[0] != self.n_mels:
            raise ValueError(f"{name} must be ({self.n_mels}, frames), got {tuple(mel.shape)}")

    def forward_batch(self, mels: Sequence[Tensor]) -> list[Tensor]:
        """Several utterances' ``(n_mels, F_i)`` log-mels in one call of the graph: zero-padded to the longest, with
        their frame counts as the graph's second input; per utterance its ``(ceil(F_i / 2),)`` int64 tokens (what
        the v1 tokenizer makes of ``F_i`` frames: its second convolution has stride 2)."""
        if not mels:
            return []
        for i, mel in enumerate(mels):
            self._check_mel(mel, f"mels[{i}]")
        frames = [m.shape[1] for m in mels]
        longest = max(frames)
        padded = torch.stack([F.pad(m, (0, longest - f)) for m, f in zip(mels, frames)])
        counts = torch.tensor(frames, dtype=torch.int32)
        if padded.device.type == "cuda":  # (a pinned copy: no host sync)
            counts = counts.pin_memory()
        out = self.graph(padded, counts.to(padded.device, non_blocking=True))
        tokens = (out[0] if isinstance(out, tuple) else out).long()
        if tokens.dim() != 2 or tokens.shape[0] != len(mels) or tokens.shape[1] < (longest + 1) // 2:
            raise ValueError(f"the graph gave tokens of shape {tuple(tokens.shape)} for {len(mels)} utterances of up "
                             f"to {longest} frames; expected ({len(mels)}, {(longest + 1) // 2})")  # fmt: skip
        return [tokens[i, : (f + 1) // 2] for i, f in enumerate(frames)]

    def _run_batch(self, mels: list[Tensor]) -> list[Tensor]:
        """``mels`` in one padded call where this graph is known (or now checked) to give the lone runs' tokens."""
        padded = len({m.shape[1] for m in mels}) > 1
        if len(mels) == 1 or self.batches_ok is False:
            return [self(m) for m in mels]
        checked = self.batches_ok and (self.padding_ok or not padded)
        try:
            got = self.forward_batch(mels)
        except Exception as e:  # an unchecked graph may have a fixed batch size: run alone, say why
            if checked or isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):  # (memory: a smaller batch)
                raise
            return self._no_batches(mels, f"it failed on a batch ({type(e).__name__}: {e})")
        if checked:
            return got
        alone = [self(m) for m in mels]
        if not all(a.shape == g.shape and torch.equal(a, g) for a, g in zip(alone, got)):
            return self._no_batches(mels, "its tokens for a padded batch differ from those of lone runs", alone)
        self.batches_ok = True
        if padded:
            self.padding_ok = True
        return got

    def _no_batches(self, mels: list[Tensor], why: str, alone: list[Tensor] | None = None) -> list[Tensor]:
        warnings.warn(f"this S3 tokenizer's graph does not take batches: {why}; every utterance runs alone",
                      stacklevel=3)  # fmt: skip
        self.batches_ok = False
        return alone if alone is not None else [self(m) for m in mels]

    @torch.no_grad()
    def encode(self, waveforms: Sequence[Tensor], sample_rate: int | Sequence[int] = SAMPLE_RATE, *,
               batch_frames: int | None = None) -> list[Tensor]:  # fmt: skip
        """Per waveform (mono, any rate: resampled to 16 kHz, at most 30 s), its ``(T_s,)`` int64 S3 token ids
        (50 per second).

        ``batch_frames``: None runs every utterance alone (as the official code). A number runs utterances of
        similar length together, zero-padded, at most that many padded log-mel frames (100 per second) per call and
        at least one utterance. The graph takes each utterance's frame count and masks the padding (the v1 model
        does), so the tokens are the lone runs'; this is checked on the loaded graph before it is trusted: the
        first batch, and the first with unequal lengths, also run alone, and a graph whose batches differ (or fail)
        runs every utterance alone from then on, with a warning. Memory grows with the batch: the graph's
        attention holds ``(B, 20, F / 2, F / 2)`` float32 scores."""
        if batch_frames is not None:
            check_positive_int(batch_frames, "batch_frames")
        mels = self.log_mel(waveforms, sample_rate)
        if batch_frames is None:
            tokens = [self(mel) for mel in mels]  # (on a GPU: queued, no host sync)
        else:
            tokens: list[Tensor | None] = [None] * len(mels)
            order = sorted(range(len(mels)), key=lambda i: mels[i].shape[1])
            start = 0
            while start < len(order):
                end = start + 1  # the batch's longest is its last: sorted by length
                while end < len(order) and (end + 1 - start) * mels[order[end]].shape[1] <= batch_frames:
                    end += 1
                chunk = order[start:end]
                for i, t in zip(chunk, self._run_batch([mels[i] for i in chunk])):
                    tokens[i] = t
                start = end
        return [t.cpu() for t in tokens]
