"""Speaker vectors for the unit decoder and the voice generator: the CAM++ speaker encoder the official models were
trained with, run from the release's ONNX file (``cosyvoice/speaker_embed.onnx``; CosyVoice's ``campplus.onnx``).

What the official processor computes (``taste_speech/processing_taste.py``): each reference waveform at 16 kHz ->
Kaldi log mel filter-bank features (80 bins, no dither) with each bin's mean over the utterance removed -> CAM++
-> a 192-d embedding; several references are averaged, and the mean is scaled to unit length. The features are
:func:`taste.audio.kaldi_fbank`, the network is the ONNX graph run by :class:`taste.onnx.OnnxGraph` (no onnxruntime):
the file's batch norms are folded into anonymous convolution weights, so running its graph is what reproduces it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taste.audio import SAMPLE_RATE, kaldi_fbank, waveforms_at_16k
from taste.onnx import OnnxGraph, find_onnx_file, load_onnx_file

OFFICIAL_FILE = os.path.join("cosyvoice", "speaker_embed.onnx")  # in the TASTE release
COSYVOICE_FILE = "campplus.onnx"  # in a CosyVoice model directory
MIN_FRAMES = 3  # CAM++ halves the frame rate once, and its statistics pooling takes an unbiased std over time


# where a release (cosyvoice/), a CosyVoice model directory and an import-official directory keep the file
SEARCH = (OFFICIAL_FILE, COSYVOICE_FILE, os.path.join("speaker", "speaker_embed.onnx"), "speaker_embed.onnx")


def find_speaker_model(path: str) -> str | None:
    """The speaker encoder's ONNX file under ``path`` (see :data:`SEARCH`), ``path`` itself if it is one, or None."""
    return find_onnx_file(path, SEARCH)


class SpeakerEncoder(nn.Module):
    """CAM++ from its ONNX file: waveforms -> speaker embeddings.

    ``embed`` gives one embedding per waveform (what ``campplus.onnx`` outputs); ``speaker`` gives the official
    processor's speaker vector of one speaker from one or more references (their mean, unit length), the vector
    that ``taste continue`` / ``taste vocode`` / ``VoiceGenerator.generate`` / ``UnitDecoder.generate`` take.
    ``forward`` runs the network on features.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, graph: OnnxGraph):
        super().__init__()
        if len(graph.input_names) != 1 or len(graph.output_names) != 1:
            raise ValueError(f"a speaker encoder's ONNX graph has one input (features) and one output (the "
                             f"embedding); this one has inputs {graph.input_names} and outputs "
                             f"{graph.output_names}")  # fmt: skip
        self.graph = graph

    @classmethod
    def from_official(cls, path: str, *, device=None) -> SpeakerEncoder:
        """The release directory (``cosyvoice/speaker_embed.onnx``), a CosyVoice model directory
        (``campplus.onnx``), or the ONNX file."""
        return cls(load_onnx_file(path, SEARCH, "a speaker encoder")).to(device).eval()

    def forward(self, feats: Tensor) -> Tensor:
        """``feats (B, F, 80)`` mean-normalised filter banks of equal length -> ``(B, D)`` embeddings."""
        if feats.dim() != 3:
            raise ValueError(f"feats must be (B, frames, mel bins), got {tuple(feats.shape)}")
        return self.graph(feats)

    def features(self, waveforms: Sequence[Tensor], sample_rate: int | Sequence[int] = SAMPLE_RATE, *,
                 max_seconds: float | None = None) -> list[Tensor]:  # fmt: skip
        """Per waveform, ``(F, 80)`` float32: Kaldi filter banks of the 16 kHz audio minus their mean over time.
        ``max_seconds`` keeps only the first seconds (the official ``spk_emb_cutoff_threshold``)."""
        out = []
        audios = waveforms_at_16k(waveforms, sample_rate, max_seconds=max_seconds, truncate=max_seconds is not None)
        for i, audio in enumerate(audios):
            feats, frames = kaldi_fbank(audio[None])
            if int(frames[0]) < MIN_FRAMES:
                raise ValueError(f"waveforms[{i}] is too short for a speaker embedding: {audio.numel()} samples at "
                                 f"16 kHz make {int(frames[0])} frames, CAM++ needs at least {MIN_FRAMES} "
                                 f"({(400 + 160 * (MIN_FRAMES - 1)) / 16000 * 1000:.0f} ms)")  # fmt: skip
            f = feats[0]
            out.append(f - f.mean(0, keepdim=True))
        return out

    @torch.no_grad()
    def embed(self, waveforms: Sequence[Tensor], sample_rate: int | Sequence[int] = SAMPLE_RATE, *,
              max_seconds: float | None = None) -> Tensor:  # fmt: skip
        """``(B, D)`` float32: one CAM++ embedding per waveform (not normalised), each run alone as the official
        processor runs it (the exported graph's pooling spans its whole input, and its batch size may be fixed)."""
        feats = self.features(waveforms, sample_rate, max_seconds=max_seconds)
        device = next(iter(self.graph.buffers())).device
        return torch.stack([self(f[None].to(device))[0].float() for f in feats])

    def speaker(self, waveforms: Sequence[Tensor], sample_rate: int | Sequence[int] = SAMPLE_RATE, *,
                max_seconds: float | None = None) -> Tensor:  # fmt: skip
        """``(D,)``: the speaker vector of one speaker from one or more reference waveforms, as the official
        processor makes ``speaker_embeds``: the mean of their embeddings, scaled to unit length."""
        return F.normalize(self.embed(waveforms, sample_rate, max_seconds=max_seconds).mean(0), dim=0)
