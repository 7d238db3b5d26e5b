"""S3 units to a waveform: CosyVoice-300M's flow-matching decoder and HiFT vocoder (spec section 1.8), the part of
the official release that turns the unit decoder's 4096 S3 tokens into speech (``cosyvoice/voice_generator.pth``).

The official code runs one utterance at a time. Here a batch of utterances of different lengths runs at once and
gives, per utterance, what that utterance gives alone (the official batch-1 computation):

- the token encoder attends only within an utterance (key padding mask);
- each utterance is interpolated to its own mel length (the official ``F.interpolate`` of a padded batch uses the
  padded length's ratio for every row);
- every convolution sees zeros past its utterance's end at its own resolution, as the batch-1 convolutions' zero
  padding, and the group norms average over the utterance's frames only;
- the estimator's attention hides padding keys (the official U-Net passes its 0/1 mask where an additive bias is
  expected, which hides nothing; at batch 1 there is nothing to hide);
- the vocoder's STFT reflects each utterance at its own end and its inverse overlap-adds and normalises each
  utterance's frames only;
- the classifier-free guidance's two estimator calls per step are one call on a batch of two.

Random draws (the flow's starting noise, the vocoder's harmonic phases and noise) are made per utterance, in order,
from ``generator``: a batch gives what its utterances give one after another with the same generator, and one
utterance draws exactly what the official code draws from the global generator (flow noise, then the vocoder's
phases and noise), so a seeded run reproduces it.

Parameter names are CosyVoice's (``flow.*``, ``hift.*``), so the released state dict loads by name; the vocoder's
weight-normalised convolutions are stored folded (``weight = g v / |v|``), as ``remove_weight_norm`` leaves them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taste._checks import check_at_least, check_field_types, check_id_range
from taste.checkpoint import load_saved_model, read_tensors, save_model
from taste.relpos import RelPosEncoder

OFFICIAL_FILE = os.path.join("cosyvoice", "voice_generator.pth")  # inside the release's directory


@dataclass(frozen=True)
class VoiceGeneratorConfig:
    """Shapes of the flow-matching decoder (``flow``) and of the HiFT vocoder (``hift``); defaults: CosyVoice-300M,
    as the official ``VoiceGenerator`` builds it."""

    num_units: int = 4096
    unit_dim: int = 512  # token embedding and encoder width
    spk_dim: int = 192  # CAM++ speaker vector
    mel_bins: int = 80
    encoder_layers: int = 6
    encoder_heads: int = 8
    encoder_ffn: int = 2048
    regulator_layers: int = 4
    channels: tuple[int, ...] = (256, 256)  # U-Net levels
    transformer_blocks: int = 4  # per U-Net block
    mid_blocks: int = 12
    attention_heads: int = 8
    head_dim: int = 64
    groups: int = 8  # group norm of the U-Net's convolution blocks
    unit_rate: int = 50  # units per second
    sample_rate: int = 22050
    mel_hop: int = 256  # samples per mel frame
    steps: int = 10  # Euler steps of the flow ODE
    cfg_rate: float = 0.7  # classifier-free guidance: v = (1 + r) v_cond - r v_uncond
    base_channels: int = 512  # vocoder
    harmonics: int = 8
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 8)
    upsample_kernels: tuple[int, ...] = (16, 16)
    n_fft: int = 16
    istft_hop: int = 4
    resblock_kernels: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_kernels: tuple[int, ...] = (7, 11)
    source_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    f0_channels: int = 512
    audio_limit: float = 0.99

    def __post_init__(self):
        for name in ("channels", "upsample_rates", "upsample_kernels", "resblock_kernels", "source_kernels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # (a JSON config gives lists)
        for name in ("resblock_dilations", "source_dilations"):
            object.__setattr__(self, name, tuple(tuple(d) for d in getattr(self, name)))
        check_field_types(self)
        check_at_least(self, 1, "num_units", "unit_dim", "spk_dim", "mel_bins", "encoder_heads", "encoder_ffn",
                       "attention_heads", "head_dim", "groups", "unit_rate", "sample_rate", "mel_hop", "steps",
                       "base_channels", "n_fft", "istft_hop", "f0_channels")  # fmt: skip
        check_at_least(self, 0, "encoder_layers", "regulator_layers", "transformer_blocks", "mid_blocks", "harmonics")
        if not self.channels or any(c % self.groups for c in self.channels):
            raise ValueError(f"channels must be non-empty multiples of groups ({self.groups}), got {self.channels}")
        if self.unit_dim % self.encoder_heads:
            raise ValueError(f"unit_dim ({self.unit_dim}) must be divisible by encoder_heads ({self.encoder_heads})")
        if (
            len(self.upsample_rates) != len(self.upsample_kernels)
            or len(self.upsample_rates) != len(self.source_kernels)
            or len(self.source_kernels) != len(self.source_dilations)
        ):
            raise ValueError("upsample_rates, upsample_kernels, source_kernels and source_dilations need one entry "
                             "per upsampling stage")  # fmt: skip
        if len(self.resblock_kernels) != len(self.resblock_dilations):
            raise ValueError("resblock_kernels and resblock_dilations need one entry per residual block")
        hop = math.prod(self.upsample_rates) * self.istft_hop
        if hop != self.mel_hop:
            raise ValueError(f"prod(upsample_rates) * istft_hop must be mel_hop ({self.mel_hop}), got {hop}")
        if self.n_fft % 2 or self.base_channels % 2 ** len(self.upsample_rates):
            raise ValueError("n_fft must be even and base_channels divisible by 2 per upsampling stage")
        if self.cfg_rate < 0:
            raise ValueError(f"cfg_rate must be >= 0, got {self.cfg_rate}")

    @classmethod
    def cosyvoice_300m(cls, **overrides) -> VoiceGeneratorConfig:
        """CosyVoice-300M's flow and HiFT vocoder, as the official TASTE release uses them."""
        return replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> VoiceGeneratorConfig:
        """Small, for tests on CPUs: the same structure, narrow and shallow, 256 units."""
        base = cls(num_units=256, unit_dim=64, spk_dim=16, mel_bins=16, encoder_layers=2, encoder_heads=4,
                   encoder_ffn=128, regulator_layers=2, channels=(32, 32), transformer_blocks=1, mid_blocks=2,
                   attention_heads=2, head_dim=16, base_channels=32, harmonics=2, f0_channels=32,
                   resblock_kernels=(3, 5), resblock_dilations=((1, 3), (1, 3)),
                   source_dilations=((1, 3), (1, 3)))  # fmt: skip
        return replace(base, **overrides)

    def mel_frames(self, units: Tensor) -> Tensor:
        """Mel frames for ``units`` units: ``int(n / 50 * 22050 / 256)`` in float32, as the official code."""
        return (units.to(torch.int32) / self.unit_rate * self.sample_rate / self.mel_hop).to(torch.int64)


# ---------------------------------------------------------------- masked building blocks (B, C, T) + mask (B, 1, T)


def masked_group_norm(x: Tensor, mask: Tensor, norm: nn.GroupNorm) -> Tensor:
    """``norm`` over each row's valid frames only (``mask`` 1.0 there): what the row gives alone, unpadded."""
    b, c, t = x.shape
    g = norm.num_groups
    xg, m = x.view(b, g, c // g, t), mask.view(b, 1, 1, t)
    count = m.sum((2, 3), keepdim=True).clamp(min=1) * (c // g)
    mean = (xg * m).sum((2, 3), keepdim=True) / count
    var = (((xg - mean) * m) ** 2).sum((2, 3), keepdim=True) / count
    y = ((xg - mean) * torch.rsqrt(var + norm.eps)).view(b, c, t)
    return y * norm.weight[:, None] + norm.bias[:, None]


class ConvBlock(nn.Module):
    """Conv1d k3 -> GroupNorm -> Mish, masked before and after (matcha's ``Block1D``; names ``block.{0,1}``)."""

    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish())

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = masked_group_norm(self.block[0](x * mask), mask, self.block[1])
        return F.mish(h) * mask


class ResnetBlock(nn.Module):
    """Two conv blocks with the time embedding added between them, and a 1x1 residual (matcha's ``ResnetBlock1D``)."""

    def __init__(self, dim: int, dim_out: int, time_dim: int, groups: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = ConvBlock(dim, dim_out, groups)
        self.block2 = ConvBlock(dim_out, dim_out, groups)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, mask: Tensor, time: Tensor) -> Tensor:
        h = self.block1(x, mask) + self.mlp(time)[..., None]
        return self.block2(h, mask) + self.res_conv(x * mask)


class _Linear(nn.Module):  # (diffusers' GELU module: its Linear is ``proj``)
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x))


class TransformerBlock(nn.Module):
    """Pre-LN self-attention (bias-free q/k/v, ``heads x head_dim`` wide) and GELU feed-forward x4, the diffusers
    ``BasicTransformerBlock`` as matcha configures it (names ``norm1``, ``attn1.to_{q,k,v,out.0}``, ``norm3``,
    ``ff.net.{0.proj,2}``)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(dim, inner, bias=False)
        self.attn1.to_k = nn.Linear(dim, inner, bias=False)
        self.attn1.to_v = nn.Linear(dim, inner, bias=False)
        self.attn1.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([_Linear(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        """``x (B, T, C)``, ``key_mask (B, 1, 1, T)`` bool."""
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = (lin(h).view(b, t, self.heads, -1).transpose(1, 2)
                   for lin in (self.attn1.to_q, self.attn1.to_k, self.attn1.to_v))  # fmt: skip
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.attn1.to_out[0](a.transpose(1, 2).reshape(b, t, -1))
        return x + self.ff.net[2](self.ff.net[0](self.norm3(x)))


class _Resample(nn.Module):  # (matcha's Downsample1D / Upsample1D: the convolution is ``conv``)
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def _timestep_sinusoids(t: Tensor, dim: int) -> Tensor:
    """matcha's ``SinusoidalPosEmb`` (scale 1000): ``(n,)`` times -> ``(n, dim)``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    emb = 1000 * t.reshape(-1, 1) * freqs[None]
    return torch.cat((emb.sin(), emb.cos()), dim=-1)


class FlowEstimator(nn.Module):
    """The velocity field (CosyVoice's ``ConditionalDecoder``): a 1-D U-Net over ``x, mu, speaker, cond`` stacked
    on channels, with a transformer stage after every resnet block and the time embedding added in every resnet."""

    def __init__(self, c: VoiceGeneratorConfig):
        super().__init__()
        in_ch, chans = 4 * c.mel_bins, c.channels
        time_dim = 4 * chans[0]
        self.time_mlp = nn.Module()
        self.time_mlp.linear_1 = nn.Linear(in_ch, time_dim)
        self.time_mlp.linear_2 = nn.Linear(time_dim, time_dim)

        def stage(dim_in, dim_out):
            blocks = nn.ModuleList(TransformerBlock(dim_out, c.attention_heads, c.head_dim)
                                   for _ in range(c.transformer_blocks))  # fmt: skip
            return ResnetBlock(dim_in, dim_out, time_dim, c.groups), blocks

        self.down_blocks, self.mid_blocks, self.up_blocks = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        out = in_ch
        for i, ch in enumerate(chans):
            resnet, blocks = stage(out, ch)
            last = i == len(chans) - 1
            down = nn.Conv1d(ch, ch, 3, padding=1) if last else _Resample(nn.Conv1d(ch, ch, 3, 2, 1))
            self.down_blocks.append(nn.ModuleList([resnet, blocks, down]))
            out = ch
        for _ in range(c.mid_blocks):
            self.mid_blocks.append(nn.ModuleList(stage(chans[-1], chans[-1])))
        ups = chans[::-1] + (chans[0],)
        for i in range(len(ups) - 1):
            resnet, blocks = stage(2 * ups[i], ups[i + 1])
            last = i == len(ups) - 2
            ch = ups[i + 1]
            up = nn.Conv1d(ch, ch, 3, padding=1) if last else _Resample(nn.ConvTranspose1d(ch, ch, 4, 2, 1))
            self.up_blocks.append(nn.ModuleList([resnet, blocks, up]))
        self.final_block = ConvBlock(ups[-1], ups[-1], c.groups)
        self.final_proj = nn.Conv1d(ups[-1], c.mel_bins, 1)
        self.in_channels = in_ch

    def _stage(self, resnet, blocks, x, mask, time):
        x = resnet(x, mask, time).transpose(1, 2)
        key_mask = mask.bool()[:, None]  # (B, 1, 1, T)
        for block in blocks:
            x = block(x, key_mask)
        return x.transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
        """``x, mu, cond (B, mel, T)``, ``mask (B, 1, T)`` float, ``t`` scalar time, ``spks (B, mel)``."""
        time = self.time_mlp.linear_2(F.silu(self.time_mlp.linear_1(_timestep_sinusoids(t, self.in_channels))))
        x = torch.cat([x, mu, spks[..., None].expand(-1, -1, x.shape[-1]), cond], dim=1)
        hiddens, masks = [], [mask]
        for resnet, blocks, down in self.down_blocks:
            m = masks[-1]
            x = self._stage(resnet, blocks, x, m, time)
            hiddens.append(x)
            x = down(x * m)
            masks.append(m[:, :, ::2])
        masks.pop()
        for resnet, blocks in self.mid_blocks:
            x = self._stage(resnet, blocks, x, masks[-1], time)
        for resnet, blocks, up in self.up_blocks:
            m, skip = masks.pop(), hiddens.pop()
            x = self._stage(resnet, blocks, torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1), m, time)
            x = up(x * m)
        x = self.final_block(x, m)
        return self.final_proj(x * m) * mask


class LengthRegulator(nn.Module):
    """Each utterance's encoder rows stretched to its mel length (nearest, as ``F.interpolate`` of that utterance
    alone), then (Conv1d k3 -> GroupNorm(1) -> Mish) x n and a 1x1 Conv1d (CosyVoice's ``InterpolateRegulator``;
    names ``model.{i}``)."""

    def __init__(self, c: VoiceGeneratorConfig):
        super().__init__()
        layers = []
        for _ in range(c.regulator_layers):
            layers += [nn.Conv1d(c.mel_bins, c.mel_bins, 3, 1, 1), nn.GroupNorm(1, c.mel_bins), nn.Mish()]
        self.model = nn.Sequential(*layers, nn.Conv1d(c.mel_bins, c.mel_bins, 1, 1))

    def forward(self, h: Tensor, lengths: Tensor, frames: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """``h (B, T, C)`` with ``lengths (B,)`` valid rows -> ``(B, C, width)`` (``width`` >= every frame count,
        given by the caller: no host read here) and the mask ``(B, 1, width)``."""
        f = torch.arange(width, device=h.device)
        # ATen's nearest index: floor(dst * (float)in / out) in float32, at most in - 1
        scale = lengths.to(torch.float32) / frames.clamp(min=1).to(torch.float32)
        src = torch.minimum((f[None].to(torch.float32) * scale[:, None]).floor().long(), (lengths - 1)[:, None])
        x = h.gather(1, src.clamp(min=0)[..., None].expand(-1, -1, h.shape[-1])).transpose(1, 2)
        mask = (f[None] < frames[:, None]).to(h.dtype)[:, None]
        layers = list(self.model)
        for i in range(0, len(layers) - 1, 3):
            x = F.mish(masked_group_norm(layers[i](x * mask), mask, layers[i + 1]))
        return layers[-1](x * mask) * mask, mask


class FlowDecoder(nn.Module):
    """Units -> 80-bin mel at 22.05 kHz / hop 256 (CosyVoice's ``MaskedDiffWithXvec.inference``, no prompt).
    ``batch_guidance`` (attribute): the guided and unguided velocities in one estimator call (default) or in two,
    as the official code (the same numbers; ``bench/voice.py`` times both)."""

    batch_guidance = True

    def __init__(self, c: VoiceGeneratorConfig):
        super().__init__()
        self.config = c
        self.input_embedding = nn.Embedding(c.num_units, c.unit_dim)
        self.spk_embed_affine_layer = nn.Linear(c.spk_dim, c.mel_bins)
        self.encoder = RelPosEncoder(c.unit_dim, c.unit_dim, c.encoder_layers, c.encoder_heads, c.encoder_ffn,
                                     activation="swish", conformer=True, input_relu=False, dropout=0.0,
                                     pos_dropout=0.0, attn_dropout=0.0, causal=False)  # fmt: skip
        self.encoder_proj = nn.Linear(c.unit_dim, c.mel_bins)
        self.length_regulator = LengthRegulator(c)
        self.decoder = nn.Module()
        self.decoder.estimator = FlowEstimator(c)

    def condition(self, units: Tensor, lengths: Tensor, speaker: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """``units (B, T)`` padded, ``lengths (B,)``, ``speaker (B, spk_dim)`` -> ``mu (B, mel, width)``, ``mask (B,
        1, width)`` and the projected speaker ``(B, mel)``; ``width``: at least the most mel frames of a row."""
        c = self.config
        valid = (torch.arange(units.shape[1], device=units.device) < lengths[:, None]).to(self.encoder_proj.weight)
        h = self.input_embedding(units.clamp(min=0)) * valid[..., None]
        h = self.encoder_proj(self.encoder(h, lengths))
        mu, mask = self.length_regulator(h, lengths, c.mel_frames(lengths), width)
        return mu, mask, self.spk_embed_affine_layer(F.normalize(speaker, dim=1))

    def forward(self, units: Tensor, lengths: Tensor, speaker: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Mel ``(B, mel, F)`` and its mask; ``noise (B, mel, F)`` is the ODE's starting point (zero past a row's
        frames). Euler steps over the cosine schedule ``t = 1 - cos(pi/2 s)``, guidance as the config says."""
        c = self.config
        mu, mask, spk = self.condition(units, lengths, speaker, noise.shape[-1])
        t_span = torch.linspace(0, 1, c.steps + 1, device=mu.device)
        t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        x, t, dt = noise * mask, t_span[0], t_span[1] - t_span[0]
        cond = torch.zeros_like(mu)
        estimator = self.decoder.estimator
        together = c.cfg_rate > 0 and self.batch_guidance
        if together:  # (conditioned and unconditioned rows in one call)
            mu2, mask2 = torch.cat([mu, torch.zeros_like(mu)]), torch.cat([mask, mask])
            spk2, cond2 = torch.cat([spk, torch.zeros_like(spk)]), torch.cat([cond, cond])
        for step in range(1, len(t_span)):
            if together:
                v, v_free = estimator(torch.cat([x, x]), mask2, mu2, t, spk2, cond2).chunk(2)
                v = (1.0 + c.cfg_rate) * v - c.cfg_rate * v_free
            elif c.cfg_rate > 0:
                v = estimator(x, mask, mu, t, spk, cond)
                v_free = estimator(x, mask, torch.zeros_like(mu), t, torch.zeros_like(spk), cond)
                v = (1.0 + c.cfg_rate) * v - c.cfg_rate * v_free
            else:
                v = estimator(x, mask, mu, t, spk, cond)
            x, t = x + dt * v, t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x, mask


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


# ---------------------------------------------------------------- the whole generator


class VoiceGenerator(nn.Module):
    """S3 units + a speaker vector -> 22.05 kHz speech: :class:`FlowDecoder` then :class:`HiFTVocoder`.

    >>> gen = VoiceGenerator.from_official("path/to/Llama-1B-TASTE-V0")          # cosyvoice/voice_generator.pth
    >>> waves = gen.generate([units_a, units_b], speaker, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, *, config: VoiceGeneratorConfig | None = None):
        super().__init__()
        self.config = config or VoiceGeneratorConfig()
        self.flow = FlowDecoder(self.config)
        self.hift = HiFTVocoder(self.config)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def draw_noise(self, units: list[Tensor] | Tensor, lengths: Tensor | None = None, generator=None):
        """Per utterance, in order: the flow's starting noise ``(mel, F)``, the vocoder's harmonic phases ``(H+1,
        1)`` and noise ``(H+1, F * hop)``, drawn as the official code draws them (``randn_like``, ``Uniform(-pi,
        pi)``, ``randn_like``). Returns three lists."""
        c, device = self.config, self.flow.encoder_proj.weight.device
        counts = [int(n) for n in (lengths if lengths is not None else [len(u) for u in units])]
        frames = c.mel_frames(torch.tensor(counts, dtype=torch.int64)).tolist()
        flow, phases, noises = [], [], []
        for f in frames:
            flow.append(torch.randn((c.mel_bins, f), generator=generator))
            phases.append(-math.pi + torch.rand((c.harmonics + 1, 1), generator=generator) * (2 * math.pi))
            noises.append(torch.randn((c.harmonics + 1, f * c.mel_hop), generator=generator))
        return [z.to(device) for z in flow], [p.to(device) for p in phases], [z.to(device) for z in noises]

    def _check(self, units: Tensor, lengths: Tensor, speaker: Tensor) -> None:
        c = self.config
        if units.dim() != 2 or units.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"units must be (B, T) integer ids, got {units.dtype} {tuple(units.shape)}")
        if lengths.shape != (units.shape[0],):
            raise ValueError(f"lengths must be ({units.shape[0]},), got {tuple(lengths.shape)}")
        if units.shape[0] and (int(lengths.min()) < 1 or int(lengths.max()) > units.shape[1]):
            raise ValueError(f"every length must be in [1, {units.shape[1]}] (an utterance needs a unit), got "
                             f"{lengths.tolist()}")  # fmt: skip
        if speaker.shape != (units.shape[0], c.spk_dim) or not speaker.is_floating_point():
            raise ValueError(f"speaker must be ({units.shape[0]}, {c.spk_dim}) float (CAM++ vectors), got "
                             f"{speaker.dtype} {tuple(speaker.shape)}")  # fmt: skip
        valid = torch.arange(units.shape[1], device=units.device)[None] < lengths[:, None]
        check_id_range(units[valid], c.num_units, "units", "num_units")

    @torch.inference_mode()
    def mel(self, units: Tensor, lengths: Tensor, speaker: Tensor, generator=None, noise=None) -> tuple[Tensor, Tensor]:
        """``(B, mel, F)`` mel and its frame counts ``(B,)``; ``noise`` a :meth:`draw_noise` triple (else drawn)."""
        self._check(units, lengths, speaker)
        mel, _ = self._mel(
            units, lengths, speaker, noise if noise is not None else self.draw_noise(units, lengths, generator)
        )
        return mel, self.config.mel_frames(lengths.cpu())

    def _mel(self, units: Tensor, lengths: Tensor, speaker: Tensor, noise) -> tuple[Tensor, Tensor]:
        dtype = self.flow.encoder_proj.weight.dtype
        width = max(n.shape[1] for n in noise[0])
        z = torch.stack([F.pad(n, (0, width - n.shape[1])) for n in noise[0]]).to(dtype)
        return self.flow(units.long(), lengths.to(units.device).long(), speaker.to(dtype), z)

    @torch.inference_mode()
    def forward(self, units: Tensor, lengths: Tensor, speaker: Tensor, generator=None, noise=None) -> Tensor:
        """``units (B, T)`` padded S3 ids, ``lengths (B,)``, ``speaker (B, spk_dim)`` -> ``(B, N)`` waveforms at
        ``sample_rate`` (utterance b fills its first ``mel_frames(lengths[b]) * mel_hop`` samples, zeros after)."""
        self._check(units, lengths, speaker)
        noise = noise if noise is not None else self.draw_noise(units, lengths, generator)
        mel, mask = self._mel(units, lengths, speaker, noise)
        return self.hift(mel, mask, noise[1], noise[2])

    def generate(self, units: list[Tensor], speaker: Tensor | None = None, *, generator=None) -> list[Tensor]:
        """A list of 1-D unit tensors -> a list of 1-D waveforms (each its own length). ``speaker``: ``(B,
        spk_dim)`` or ``(spk_dim,)`` for all; None: zeros (the flow then sees only its speaker layer's bias)."""
        if not units:
            return []
        for i, u in enumerate(units):
            if u.dim() != 1 or u.numel() == 0:
                raise ValueError(f"units[{i}] must be a non-empty 1-D tensor of S3 ids, got shape {tuple(u.shape)}")
        device = self.flow.encoder_proj.weight.device
        lengths = torch.tensor([len(u) for u in units], device=device)
        padded = torch.nn.utils.rnn.pad_sequence([u.to(device).long() for u in units], batch_first=True)
        if speaker is None:
            speaker = torch.zeros(len(units), self.config.spk_dim, device=device)
        elif speaker.dim() == 1:
            speaker = speaker.expand(len(units), -1)
        wave = self(padded, lengths, speaker.to(device).float(), generator=generator)
        samples = self.config.mel_frames(lengths.cpu()) * self.config.mel_hop
        return [wave[i, : int(n)] for i, n in enumerate(samples)]

    # ---- checkpoints

    def save_pretrained(self, directory: str) -> None:
        save_model(directory, dataclasses.asdict(self.config), self)

    @classmethod
    def from_pretrained(cls, directory: str, *, device=None) -> VoiceGenerator:
        model = load_saved_model(directory, "VoiceGenerator", lambda raw: cls(config=VoiceGeneratorConfig(**raw)))
        model.hift.window = hann_window(model.config.n_fft)  # (not saved: rebuilt off the meta device)
        return model.to(device).eval()

    @classmethod
    def from_official(cls, path: str, *, config: VoiceGeneratorConfig | None = None, device=None) -> VoiceGenerator:
        """The official ``voice_generator.pth`` (a file, or a release directory holding ``cosyvoice/...``), or a
        CosyVoice model directory holding ``flow.pt`` and ``hift.pt``. Loads strictly: a missing tensor, an
        unexpected one or another shape raises, naming it."""
        path = os.fspath(path)
        if os.path.isdir(path):
            for name in (OFFICIAL_FILE, "voice_generator.pth"):
                if os.path.isfile(os.path.join(path, name)):
                    return cls.from_official(os.path.join(path, name), config=config, device=device)
            flow, hift = os.path.join(path, "flow.pt"), os.path.join(path, "hift.pt")
            if not (os.path.isfile(flow) and os.path.isfile(hift)):
                raise FileNotFoundError(f"{path!r} holds neither {OFFICIAL_FILE} (a TASTE release) nor flow.pt and "
                                        "hift.pt (a CosyVoice model directory)")  # fmt: skip
            state = {f"flow.{k}": v for k, v in read_tensors(flow).items()}
            state.update({f"hift.{k}": v for k, v in read_tensors(hift).items()})
        else:
            state = read_tensors(path)
        model = cls(config=config or VoiceGeneratorConfig.cosyvoice_300m())
        model.load_official_state_dict(state)
        return model.to(device).eval()

    def load_official_state_dict(self, state: dict[str, Tensor]) -> None:
        """CosyVoice's names; weight-normalised tensors (``weight_g``/``weight_v``, or ``parametrizations.weight.
        original0/1``) are folded into ``weight``. Strict."""
        own = fold_weight_norm(state)
        expected = self.state_dict()
        missing = sorted(set(expected) - set(own))
        unexpected = sorted(set(own) - set(expected))
        wrong = sorted(k for k in set(own) & set(expected) if own[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            parts = [f"{len(missing)} missing (first: {missing[:3]})" if missing else "",
                     f"{len(unexpected)} unexpected (first: {unexpected[:3]})" if unexpected else "",
                     "shapes differ: " + ", ".join(f"{k} {tuple(own[k].shape)} (expected {tuple(expected[k].shape)})"
                                                   for k in wrong[:3]) if wrong else ""]  # fmt: skip
            raise ValueError("not a voice generator state dict of this config: " + "; ".join(p for p in parts if p))
        self.load_state_dict({k: v.to(expected[k].dtype) for k, v in own.items()}, strict=True)


def fold_weight_norm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{..}.weight_g`` + ``{..}.weight_v`` (``torch.nn.utils.weight_norm``, dim 0) and
    ``{..}.parametrizations.weight.original0/1`` (its parametrisation) -> ``{..}.weight = g v / |v|``, the norm over
    every dim but the first (as ``remove_weight_norm``)."""
    out, pairs = {}, {}
    for k, v in state.items():
        for g_name, v_name in (("weight_g", "weight_v"), ("parametrizations.weight.original0",
                                                           "parametrizations.weight.original1")):  # fmt: skip
            if k.endswith("." + g_name) or k.endswith("." + v_name):
                base = k.rsplit("." + (g_name if k.endswith(g_name) else v_name), 1)[0]
                pairs.setdefault(base, {})["g" if k.endswith(g_name) else "v"] = v
                break
        else:
            out[k] = v
    for base, gv in pairs.items():
        if set(gv) != {"g", "v"}:
            raise ValueError(f"{base}: a weight-normalised tensor needs both its magnitude and its direction")
        g, v = gv["g"].double(), gv["v"].double()
        norm = v.norm(dim=tuple(range(1, v.dim())), keepdim=True)
        out[f"{base}.weight"] = (g * v / norm).to(gv["v"].dtype)
    return out
