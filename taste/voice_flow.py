"""The flow-matching decoder of :class:`taste.VoiceGenerator` (CosyVoice-300M's ``flow.*``): a Conformer token
encoder, the length regulator and the U-Net estimator of matcha-TTS, made length-aware for batches (see
:mod:`taste.voice`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taste.relpos import RelPosEncoder

if TYPE_CHECKING:
    from taste.voice import VoiceGeneratorConfig


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
