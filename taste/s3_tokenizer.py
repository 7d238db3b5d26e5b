"""S3 speech tokens, the unit decoder's targets: CosyVoice's ``speech_tokenizer_v1.onnx`` (in the release as
``cosyvoice/speech_tokenizer_v1.onnx``), 4096 tokens at 50 Hz, run from its ONNX file by :class:`taste.onnx.OnnxGraph`
(no onnxruntime).

What the official processor computes (``taste_speech/processing_taste.py``, spec 1.1 step 6): the 16 kHz waveform as
it is (no padding to 30 s) -> openai-whisper's 128-bin log-mel (each utterance floored at its own maximum minus 8)
-> the ONNX model with the frame count as its second input -> tokens. Audio longer than 30 s is refused (the
official code returns no tokens for it, with a warning). Every utterance runs alone, as the official code runs it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

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
        self.register_buffer("filters", mel_filters(self.n_mels), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    @classmethod
    def from_official(cls, path: str, *, device=None) -> S3Tokenizer:
        """The release directory (``cosyvoice/speech_tokenizer_v1.onnx``), a CosyVoice model directory, or the ONNX
        file."""
        return cls(load_onnx_file(path, SEARCH, "an S3 tokenizer")).to(device).eval()

    def forward(self, mel: Tensor) -> Tensor:
        """``mel (n_mels, F)`` float32 of one utterance -> ``(T_s,)`` int64 token ids."""
        if mel.dim() != 2 or mel.shape[0] != self.n_mels:
            raise ValueError(f"mel must be ({self.n_mels}, frames), got {tuple(mel.shape)}")
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

    @torch.no_grad()
    def encode(self, waveforms: Sequence[Tensor], sample_rate: int | Sequence[int] = SAMPLE_RATE) -> list[Tensor]:
        """Per waveform (mono, any rate: resampled to 16 kHz, at most 30 s), its ``(T_s,)`` int64 S3 token ids
        (50 per second)."""
        tokens = [self(mel) for mel in self.log_mel(waveforms, sample_rate)]  # (on a GPU: queued, no host sync)
        return [t.cpu() for t in tokens]
