"""Whisper-compatible log-mel features for whole batches, in torch, on any device (spec section 1.2).

The features equal openai-whisper's ``log_mel_spectrogram`` of the audio padded (or trimmed) to the window:
Hann STFT with n_fft 400 and hop 160 at 16 kHz, the last frame dropped, power spectrum, the mel filters that
openai-whisper ships (``assets/mel_filters.npz``, 80 or 128 bins), ``log10(max(mel, 1e-10))``, a floor at the
utterance's maximum minus 8, then ``(x + 4) / 4``. The window is 30 s (Whisper's, 3000 frames) by default
and configurable for small models. Unlike the official front-end, every utterance of a batch keeps its own
length (the official batched path used the first sample's length for all).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from taste.text import _package_file

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
MEL_BINS = (80, 128)  # the filter banks openai-whisper ships


def mel_filters(n_mels: int, device=None) -> Tensor:
    """``(n_mels, 201)`` float32: openai-whisper's mel filter bank (``n_mels`` 80 or 128)."""
    if n_mels not in MEL_BINS:
        raise ValueError(f"n_mels must be 80 or 128 (the filter banks openai-whisper ships), got {n_mels}")
    with np.load(_package_file("whisper", "assets/mel_filters.npz", "openai-whisper")) as f:
        return torch.from_numpy(f[f"mel_{n_mels}"]).to(device=device, dtype=torch.float32)


def resample(wave: Tensor, orig_rate: int, new_rate: int = SAMPLE_RATE, *, zero_crossings: int = 6) -> Tensor:
    """Band-limited resampling of ``(..., T)`` audio by a Hann-windowed sinc (polyphase, one conv1d).

    The low-pass sits at 0.99 of the lower Nyquist frequency; ``zero_crossings`` sets the filter length. The
    output has ``ceil(T * new_rate / orig_rate)`` samples.
    """
    orig_rate, new_rate = _sample_rate(orig_rate, "orig_rate"), _sample_rate(new_rate, "new_rate")
    if orig_rate == new_rate:
        return wave
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g  # `down` input samples make `up` output samples
    cutoff = 0.99 * min(up, down) / 2  # in cycles per block of `down` inputs / `up` outputs
    half = zero_crossings / (2 * cutoff)  # filter half-length in block units
    width = math.ceil(half * down)  # in input samples
    k = torch.arange(-width, width + down, dtype=torch.float64)  # input offsets
    p = torch.arange(up, dtype=torch.float64)[:, None]  # output phases
    t = p / up - k / down  # (up, taps): time from each input tap to each output phase, in block units
    window = torch.where(t.abs() <= half, torch.cos(math.pi * t / (2 * half)) ** 2, 0.0)
    kernel = (2 * cutoff / down) * torch.sinc(2 * cutoff * t) * window  # (up, taps)
    shape = wave.shape
    x = wave.reshape(-1, 1, shape[-1])
    kernel = kernel.to(x.dtype if x.is_floating_point() else torch.float32).to(x.device)
    x = nn.functional.pad(x.to(kernel.dtype), (width, width + down))
    y = nn.functional.conv1d(x, kernel[:, None, :], stride=down)  # (R, up, blocks)
    y = y.transpose(1, 2).reshape(x.shape[0], y.shape[1] * y.shape[2])  # interleave the phases
    n_out = math.ceil(shape[-1] * up / down)
    return y[:, :n_out].reshape(*shape[:-1], n_out)


def _sample_rate(value, name: str) -> int:
    """A sample rate as a positive int: ints of any kind (Python, NumPy, a 0-d tensor) and integral floats."""
    if isinstance(value, Tensor):
        value = value.item() if value.dim() == 0 else value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive integer (samples per second), got {type(value).__name__}")
    if not float(value).is_integer() or value <= 0:
        raise ValueError(f"{name} must be a positive integer (samples per second), got {value!r}")
    return int(value)


def batch_waveforms(
    waveforms: Sequence[Tensor],
    sample_rate: int | Sequence[int] = SAMPLE_RATE,
    *,
    window_seconds: float = 30.0,
    truncate: bool = False,
) -> tuple[Tensor, Tensor]:
    """Validates, resamples to 16 kHz and zero-pads a list of mono waveforms into one batch.

    Args:
        waveforms: B tensors of shape ``(T,)`` (or ``(1, T)``), any float dtype.
        sample_rate: their rate in Hz (one for all, or one per waveform): an integer of any kind (Python, NumPy,
            a 0-d tensor) or an integral float.
        window_seconds: the feature window; longer audio is refused unless ``truncate``.
        truncate: cut audio longer than the window (the official front-end does, silently).

    Returns:
        ``audio (B, window_samples)`` float32 and ``lengths (B,)`` int64 (samples before padding).
    """
    if isinstance(waveforms, Tensor):
        raise TypeError("waveforms must be a list of 1-D tensors (one per utterance), got a single tensor")
    if len(waveforms) == 0:
        raise ValueError("waveforms is empty: need at least one utterance")
    if (sample_rate.dim() if isinstance(sample_rate, Tensor) else np.ndim(sample_rate)) == 0:  # one rate for all
        rates = [_sample_rate(sample_rate, "sample_rate")] * len(waveforms)
    else:
        rates = [_sample_rate(r, f"sample_rate[{i}]") for i, r in enumerate(sample_rate)]
    if len(rates) != len(waveforms):
        raise ValueError(f"sample_rate has {len(rates)} entries for {len(waveforms)} waveforms")
    limit = round(window_seconds * SAMPLE_RATE)
    out, lengths = [], []
    for i, (w, rate) in enumerate(zip(waveforms, rates)):
        w = torch.as_tensor(w)
        if w.dim() == 2 and w.shape[0] == 1:
            w = w[0]
        if w.dim() != 1:
            raise ValueError(
                f"waveforms[{i}] must be mono, shape (T,) or (1, T); got {tuple(w.shape)} (mix channels down first)"
            )
        if w.numel() == 0:
            raise ValueError(f"waveforms[{i}] is empty")
        if not w.is_floating_point():
            raise TypeError(f"waveforms[{i}] must be floating point in [-1, 1], got {w.dtype}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"waveforms[{i}] contains NaN or infinite samples")
        w = resample(w.float(), rate, SAMPLE_RATE)
        if w.numel() > limit:
            if not truncate:
                raise ValueError(
                    f"waveforms[{i}] lasts {w.numel() / SAMPLE_RATE:.2f} s, longer than the {window_seconds:g} s "
                    "window; split it or pass truncate=True"
                )
            w = w[:limit]
        out.append(w)
        lengths.append(w.numel())
    audio = out[0].new_zeros(len(out), limit)
    for i, w in enumerate(out):
        audio[i, : w.numel()] = w
    return audio, torch.tensor(lengths)


def waveforms_at_16k(
    waveforms: Sequence[Tensor], sample_rate: int | Sequence[int] = SAMPLE_RATE, *, max_seconds: float | None = None,
    truncate: bool = False,
) -> list[Tensor]:  # fmt: skip
    """Each mono waveform validated (as :func:`batch_waveforms` does) and resampled to 16 kHz, unpadded: a list of
    ``(T_i,)`` float32. ``max_seconds``: longer audio is refused, or cut when ``truncate``; None: no limit."""
    if isinstance(waveforms, Tensor):
        raise TypeError("waveforms must be a list of 1-D tensors (one per utterance), got a single tensor")
    if (sample_rate.dim() if isinstance(sample_rate, Tensor) else np.ndim(sample_rate)) == 0:
        sample_rate = [sample_rate] * len(waveforms)
    if len(sample_rate) != len(waveforms):
        raise ValueError(f"sample_rate has {len(sample_rate)} entries for {len(waveforms)} waveforms")
    if max_seconds is not None and not (isinstance(max_seconds, numbers.Real) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive number of seconds, got {max_seconds!r}")
    out = []
    for i, (w, rate) in enumerate(zip(waveforms, sample_rate)):
        w = torch.as_tensor(w)
        seconds = w.shape[-1] / float(_sample_rate(rate, f"sample_rate[{i}]")) if w.dim() else 0.0
        window = max_seconds if max_seconds is not None else math.ceil(seconds) + 1.0
        try:
            audio, length = batch_waveforms([w], rate, window_seconds=window, truncate=truncate)
        except (TypeError, ValueError) as e:
            raise type(e)(str(e).replace("waveforms[0]", f"waveforms[{i}]")) from None
        out.append(audio[0, : int(length[0])])
    return out


class LogMel(nn.Module):
    """Batched Whisper log-mel: ``audio (B, window_samples)`` float -> ``(B, n_mels, window_frames)`` float32.

    ``window_frames = window_seconds * 100`` (3000 for Whisper's 30 s). Audio shorter than the window is
    zero-padded (as Whisper's ``pad_or_trim``); longer audio is an error. Utterances go through the STFT
    ``chunk`` at a time: its transients (the framed windows, the complex spectrum) take about 10x the size of
    an utterance's features. ``None``: one at a time on the CPU, where a 2-core machine
    measured larger chunks no faster and their memory growing with the chunk (16 utterances of 30 s: 57 ms and
    39 MB one at a time, 67 ms and 86 MB four at a time), and 4 at a time on other devices, where every call
    costs host time.
    """

    def __init__(self, *, n_mels: int = 128, window_seconds: float = 30.0, chunk: int | None = None):
        super().__init__()
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
        self.n_mels, self.chunk = n_mels, chunk
        self.window_samples = round(window_seconds * SAMPLE_RATE)
        if self.window_samples % HOP_LENGTH:
            raise ValueError(f"window_seconds * 16000 must be a multiple of {HOP_LENGTH}, got {window_seconds}")
        self.frames = self.window_samples // HOP_LENGTH
        self.register_buffer("filters", mel_filters(n_mels), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    def _apply(self, fn, recurse=True):
        """As ``nn.Module._apply``, but the filters and the window stay float32 (made again where a ``.to(dtype)``
        or ``.half()`` of a model holding this module cast them): the features are float32 whatever the model's
        dtype, and a cast there and back would have rounded them."""
        super()._apply(fn, recurse)
        if self.filters.dtype != torch.float32 and not self.filters.is_meta:
            self.filters = mel_filters(self.n_mels, self.filters.device)
            self.window = torch.hann_window(N_FFT, device=self.window.device)
        return self

    def forward(self, audio: Tensor) -> Tensor:
        if audio.dim() != 2:
            raise ValueError(f"audio must be (B, samples), got shape {tuple(audio.shape)}")
        if audio.shape[1] > self.window_samples:
            raise ValueError(f"audio has {audio.shape[1]} samples, more than the window ({self.window_samples})")
        audio = audio.float()
        if audio.shape[1] < self.window_samples:  # (a pad of nothing would still copy the whole batch)
            audio = nn.functional.pad(audio, (0, self.window_samples - audio.shape[1]))
        return whisper_log_mel(audio, self.filters, self.window, chunk=self.chunk)


def whisper_log_mel(audio: Tensor, filters: Tensor, window: Tensor, *, chunk: int | None = None) -> Tensor:
    """openai-whisper's ``log_mel_spectrogram`` of each row of ``audio (B, T)`` float32 as it is (no padding to a
    window): ``(B, n_mels, T // 160)``, each row floored at its own maximum minus 8. ``filters``: ``mel_filters``;
    ``window``: the periodic Hann window of 400; ``chunk``: rows per STFT (see :class:`LogMel`)."""
    out = audio.new_empty(audio.shape[0], filters.shape[0], audio.shape[1] // HOP_LENGTH)
    chunk = chunk or (1 if audio.device.type == "cpu" else 4)
    for part, dest in zip(audio.split(chunk), out.split(chunk)):
        # (b, 201, F + 1) complex, freed once its power spectrum exists; the last frame is dropped
        spec = torch.stft(part, N_FFT, HOP_LENGTH, window=window, return_complex=True)
        torch.matmul(filters, spec[..., :-1].abs().square_(), out=dest)
    log_spec = out.clamp_(min=1e-10).log10_()  # (B, n_mels, F)
    torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0, out=log_spec)  # (in place)
    return log_spec.add_(4.0).div_(4.0)


def kaldi_mel_banks(num_bins: int = 80, n_fft: int = 512, sample_rate: int = SAMPLE_RATE, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> Tensor:  # fmt: skip
    """``(num_bins, n_fft // 2 + 1)`` float64: Kaldi's triangular filters, equally spaced on ``1127 ln(1 + f / 700)``
    between ``low_freq`` and ``high_freq`` (``<= 0``: that far below Nyquist), with no weight on the Nyquist bin."""
    nyquist = sample_rate / 2
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise ValueError(f"need 0 <= low_freq < high_freq <= {nyquist:g} Hz, got {low_freq} and {high}")
    mel = lambda f: 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)  # noqa: E731
    lo, hi = mel(low_freq), mel(high)
    step = (hi - lo) / (num_bins + 1)
    edges = lo + step * torch.arange(num_bins + 2, dtype=torch.float64)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bins = mel(torch.arange(n_fft // 2, dtype=torch.float64) * (sample_rate / n_fft))[None]
    weights = torch.minimum((bins - left) / (center - left), (right - bins) / (right - center)).clamp_min(0)
    return nn.functional.pad(weights, (0, 1))


def kaldi_fbank(
    audio: Tensor, lengths: Tensor | None = None, *, num_mel_bins: int = 80, sample_rate: int = SAMPLE_RATE
) -> tuple[Tensor, Tensor]:
    """Kaldi's log mel filter-bank features of a batch, as ``torchaudio.compliance.kaldi.fbank`` computes them with
    its defaults and ``dither=0`` (what CAM++ speaker encoders take): 25 ms frames every 10 ms that lie wholly
    inside the audio, each with its mean removed, pre-emphasis 0.97 (the first sample repeated before it), the
    Povey window, a 512-point power spectrum, Kaldi's mel filters from 20 Hz to Nyquist, and ``log(max(e, eps))``
    with float32's eps.

    Args:
        audio: ``(B, T)`` float waveforms (scaled to [-1, 1] as the official front-end reads them).
        lengths: ``(B,)`` valid samples per row (default: all ``T``).

    Returns:
        ``feats (B, F, num_mel_bins)`` in ``audio``'s dtype, zero past each row's frames, and ``frames (B,)`` int64:
        ``1 + (length - 400) // 160`` (0 when shorter than a frame).
    """
    if audio.dim() != 2 or not audio.is_floating_point():
        raise ValueError(f"audio must be a (B, T) float tensor, got {tuple(audio.shape)} {audio.dtype}")
    rate = _sample_rate(sample_rate, "sample_rate")
    win, hop = round(0.025 * rate), round(0.010 * rate)
    n_fft = 1 << (win - 1).bit_length()
    if lengths is None:
        lengths = torch.full((audio.shape[0],), audio.shape[1], dtype=torch.int64)
    lengths = torch.as_tensor(lengths, dtype=torch.int64).to(audio.device)
    if lengths.shape != (audio.shape[0],) or bool((lengths < 0).any() | (lengths > audio.shape[1]).any()):
        raise ValueError(f"lengths must be ({audio.shape[0]},) sample counts in [0, {audio.shape[1]}]")
    frames = torch.where(lengths >= win, 1 + (lengths - win).div(hop, rounding_mode="floor"), 0)
    count = max(0, 1 + (audio.shape[1] - win) // hop) if audio.shape[1] >= win else 0
    if count == 0:
        return audio.new_zeros(audio.shape[0], 0, num_mel_bins), frames
    index = torch.arange(count, device=audio.device)[:, None] * hop + torch.arange(win, device=audio.device)
    x = audio[:, index]  # (B, F, win)
    x = x - x.mean(-1, keepdim=True)
    x = x - 0.97 * torch.cat([x[..., :1], x[..., :-1]], dim=-1)
    window = torch.hann_window(win, periodic=False, dtype=torch.float64).pow(0.85).to(x.dtype).to(x.device)
    power = torch.fft.rfft(x * window, n=n_fft).abs().pow(2)  # (B, F, n_fft / 2 + 1)
    banks = kaldi_mel_banks(num_mel_bins, n_fft, rate).to(x.dtype).to(x.device)
    feats = (power @ banks.T).clamp_min(torch.finfo(torch.float32).eps).log()
    valid = torch.arange(count, device=audio.device)[None, :] < frames[:, None]
    return feats * valid[..., None], frames
