"""The HiFT vocoder of :class:`taste.VoiceGenerator` (CosyVoice-300M's ``hift.*``): F0 predictor, harmonic source,
upsampling HiFi-GAN and iSTFT, made length-aware for batches (see :mod:`taste.voice`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from taste.voice import VoiceGeneratorConfig


# ---------------------------------------------------------------- the HiFT vocoder


def hann_window(n: int) -> Tensor:
    """scipy's periodic Hann window (``get_window("hann", n)``), computed in float64 and then made float32."""
    k = torch.arange(n, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * k / n)).float()


class Snake(nn.Module):
    """``x + sin^2(alpha x) / alpha`` per channel (``alpha`` linear scale)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        a = self.alpha[:, None]
        return x + (1.0 / (a + 1e-9)) * torch.sin(x * a) ** 2


class ResBlock(nn.Module):
    """HiFi-GAN residual block with Snake activations; every convolution's input masked."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=d * (kernel - 1) // 2)
                                    for d in dilations)  # fmt: skip
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, 1, padding=(kernel - 1) // 2)
                                    for _ in dilations)  # fmt: skip
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + c2(a2(c1(a1(x) * mask)) * mask)
        return x


class HiFTVocoder(nn.Module):
    """Mel -> waveform: an F0 predictor, a harmonic-plus-noise source, and an upsampling HiFi-GAN that predicts a
    small STFT (magnitude and phase) inverted by an iSTFT (CosyVoice's ``HiFTGenerator``)."""

    def __init__(self, c: VoiceGeneratorConfig):
        super().__init__()
        self.config = c
        self.f0_predictor = nn.Module()
        layers = []
        for i in range(5):
            layers += [nn.Conv1d(c.mel_bins if i == 0 else c.f0_channels, c.f0_channels, 3, padding=1), nn.ELU()]
        self.f0_predictor.condnet = nn.Sequential(*layers)
        self.f0_predictor.classifier = nn.Linear(c.f0_channels, 1)
        self.m_source = nn.Module()
        self.m_source.l_linear = nn.Linear(c.harmonics + 1, 1)
        bins = c.n_fft + 2
        self.conv_pre = nn.Conv1d(c.mel_bins, c.base_channels, 7, 1, padding=3)
        self.ups, self.source_downs, self.source_resblocks, self.resblocks = (nn.ModuleList() for _ in range(4))
        stages = len(c.upsample_rates)
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernels)):
            ch_in, ch = c.base_channels // 2**i, c.base_channels // 2 ** (i + 1)
            self.ups.append(nn.ConvTranspose1d(ch_in, ch, k, u, padding=(k - u) // 2))
            rate = math.prod(c.upsample_rates[i + 1 :])  # source frames per frame of this stage
            self.source_downs.append(nn.Conv1d(bins, ch, 1, 1) if rate == 1 else
                                     nn.Conv1d(bins, ch, rate * 2, rate, padding=rate // 2))  # fmt: skip
            self.source_resblocks.append(ResBlock(ch, c.source_kernels[i], c.source_dilations[i]))
            for kk, d in zip(c.resblock_kernels, c.resblock_dilations):
                self.resblocks.append(ResBlock(ch, kk, d))
        self.conv_post = nn.Conv1d(c.base_channels // 2**stages, bins, 7, 1, padding=3)
        self.register_buffer("window", hann_window(c.n_fft), persistent=False)

    def f0(self, mel: Tensor, mask: Tensor) -> Tensor:
        """``(B, F)`` Hz, from the masked mel (``ConvRNNF0Predictor``)."""
        x = mel
        for layer in self.f0_predictor.condnet:
            x = layer(x * mask) if isinstance(layer, nn.Conv1d) else layer(x)
        return self.f0_predictor.classifier(x.transpose(1, 2)).squeeze(-1).abs()

    def source(self, f0: Tensor, phases: list[Tensor], noises: list[Tensor], samples: Tensor) -> Tensor:
        """The harmonic source ``(B, N)`` (``SourceModuleHnNSF``: SineGen, then Linear + tanh over harmonics);
        ``phases[b] (H+1, 1)`` uniform in [-pi, pi) (harmonic 0 set to 0) and ``noises[b] (H+1, n_b)`` standard
        normal, per utterance."""
        c = self.config
        f0 = f0.repeat_interleave(c.mel_hop, dim=1)[:, None]  # (B, 1, N) nearest upsampling
        harmonics = torch.arange(1, c.harmonics + 2, device=f0.device, dtype=f0.dtype)[None, :, None]
        theta = 2 * math.pi * (torch.cumsum(f0 * harmonics / c.sample_rate, dim=-1) % 1)
        n = f0.shape[-1]
        phase = torch.stack(phases).to(f0)
        phase[:, 0] = 0
        noise = torch.stack([F.pad(z, (0, n - z.shape[-1])) for z in noises]).to(f0)
        sine = c.nsf_alpha * torch.sin(theta + phase)
        uv = (f0 > c.voiced_threshold).to(f0.dtype)
        amp = uv * c.nsf_sigma + (1 - uv) * c.nsf_alpha / 3
        sine = sine * uv + amp * noise
        valid = torch.arange(n, device=f0.device)[None] < samples[:, None]
        return torch.tanh(self.m_source.l_linear(sine.transpose(1, 2))).squeeze(-1) * valid

    def stft(self, s: Tensor, samples: Tensor) -> Tensor:
        """``(B, n_fft + 2, frames)`` real and imaginary parts; each row reflected at both of its own ends, as
        ``torch.stft(center=True)`` of that row alone."""
        c = self.config
        half, n = c.n_fft // 2, s.shape[1]
        j = torch.arange(-half, n + half, device=s.device)[None]  # positions in the row
        last = (samples - 1)[:, None]
        idx = torch.where(j < 0, -j, torch.where(j > last, 2 * last - j, j)).clamp(0, max(n - 1, 0))
        frames = s.gather(1, idx).unfold(1, c.n_fft, c.istft_hop)  # (B, frames, n_fft)
        spec = torch.fft.rfft(frames * self.window, dim=-1)  # (B, frames, bins)
        return torch.cat([spec.real, spec.imag], dim=-1).transpose(1, 2)

    def istft(self, magnitude: Tensor, phase: Tensor, frames: Tensor) -> Tensor:
        """``torch.istft(center=True)`` of each row's first ``frames[b]`` frames, in one call: ``(B, hop (F-1))``."""
        c = self.config
        spec = torch.polar(magnitude.clamp(max=1e2), phase)  # (B, bins, F)
        count = spec.shape[-1]
        keep = (torch.arange(count, device=spec.device)[None] < frames[:, None]).to(magnitude.dtype)  # (B, F)
        seg = torch.fft.irfft(spec.transpose(1, 2), n=c.n_fft, dim=-1) * self.window * keep[..., None]
        size = (count - 1) * c.istft_hop + c.n_fft
        y = F.fold(seg.transpose(1, 2), (1, size), (1, c.n_fft), stride=(1, c.istft_hop)).view(seg.shape[0], size)
        win = (self.window**2)[None, :, None] * keep[:, None]  # (B, n_fft, F)
        env = F.fold(win, (1, size), (1, c.n_fft), stride=(1, c.istft_hop)).view(seg.shape[0], size)
        half = c.n_fft // 2
        y, env = y[:, half : size - half], env[:, half : size - half]
        return torch.where(env > 1e-11, y / env.clamp(min=1e-11), torch.zeros_like(y))

    def forward(self, mel: Tensor, mask: Tensor, phases: list[Tensor], noises: list[Tensor]) -> Tensor:
        """``mel (B, mel_bins, F)``, ``mask (B, 1, F)`` -> ``(B, F * mel_hop)``, zero past each row's samples."""
        c = self.config
        frames = mask.sum((1, 2)).long()
        samples = frames * c.mel_hop
        s = self.source(self.f0(mel, mask), phases, noises, samples)
        stft_frames = samples // c.istft_hop + 1
        s_stft = self.stft(s, samples)
        keep = torch.arange(s_stft.shape[-1], device=mel.device)[None] < stft_frames[:, None]
        s_stft = s_stft * keep[:, None].to(s_stft.dtype)  # (frames past a row's own: zero, as its zero padding)
        x = self.conv_pre(mel * mask)
        rate = mask
        stages = len(self.ups)
        for i in range(stages):
            x = self.ups[i](F.leaky_relu(x, 0.1) * rate)
            up = math.prod(c.upsample_rates[: i + 1])
            valid = frames * up
            if i == stages - 1:
                x = F.pad(x, (1, 0), mode="reflect")
                valid = stft_frames
            rate = (torch.arange(x.shape[-1], device=x.device)[None] < valid[:, None]).to(x.dtype)[:, None]
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft), rate)
            k = len(c.resblock_kernels)
            x = sum(self.resblocks[i * k + j](x * rate, rate) for j in range(k)) / k
        x = self.conv_post(F.leaky_relu(x) * rate)
        half = c.n_fft // 2 + 1
        wave = self.istft(torch.exp(x[:, :half]), torch.sin(x[:, half:]), stft_frames)
        wave = wave.clamp(-c.audio_limit, c.audio_limit)
        return wave * (torch.arange(wave.shape[1], device=wave.device)[None] < samples[:, None])
