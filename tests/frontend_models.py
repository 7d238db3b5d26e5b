"""The official front-end's two ONNX models as PyTorch test fixtures, written here from their architectures: tests
export them to ONNX and check that ``taste.onnx``, ``taste.SpeakerEncoder`` and ``taste.S3Tokenizer`` run the
exported graphs as onnxruntime and PyTorch do.

CAM++: 3D-Speaker's speaker encoder, the model behind CosyVoice's ``campplus.onnx`` and the TASTE release's
``cosyvoice/speaker_embed.onnx``.

Structure (CAM++ paper, 3D-Speaker's model): a 2-D residual head over (frequency, time) with stride 2 along
frequency three times; a TDNN (kernel 5, stride 2 in time); three densely connected blocks of CAM layers (1x1
bottleneck, then a dilated conv gated by a context mask made of the utterance mean plus 100-frame segment means),
each followed by a transition that halves the channels; statistics pooling (mean and unbiased std over time) and a
dense layer with a non-affine batch norm. The released model: ``CamPlusPlus(embedding=192)`` (7.2 M parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(channels), nn.ReLU())


class ResBlock2d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.skip(x))


class Head(nn.Module):
    def __init__(self, channels: int, feat_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        blocks = []
        for _ in range(2):
            blocks += [ResBlock2d(channels, channels, 2), ResBlock2d(channels, channels, 1)]
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.out_channels = channels * (feat_dim // 8)

    def forward(self, x):  # (B, F, T)
        y = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        y = F.relu(self.bn2(self.conv2(self.blocks(y))))  # (B, C, F/8, T)
        return y.reshape(y.shape[0], y.shape[1] * y.shape[2], y.shape[3])


class ContextMaskedConv(nn.Module):
    def __init__(self, cin: int, cout: int, dilation: int, segment: int = 100):
        super().__init__()
        self.local = nn.Conv1d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.down = nn.Conv1d(cin, cin // 2, 1)
        self.up = nn.Conv1d(cin // 2, cout, 1)
        self.segment = segment

    def forward(self, x):  # (B, C, T)
        seg = F.avg_pool1d(x, self.segment, self.segment, ceil_mode=True)  # (B, C, ceil(T / segment))
        shape = seg.shape
        seg = seg.unsqueeze(-1).expand(*shape, self.segment).reshape(*shape[:-1], -1)[..., : x.shape[-1]]
        context = x.mean(-1, keepdim=True) + seg
        return self.local(x) * torch.sigmoid(self.up(F.relu(self.down(context))))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bottleneck: int, dilation: int):
        super().__init__()
        self.pre = bn_relu(cin)
        self.bottleneck = nn.Conv1d(cin, bottleneck, 1, bias=False)
        self.mid = bn_relu(bottleneck)
        self.cam = ContextMaskedConv(bottleneck, growth, dilation)

    def forward(self, x):
        return torch.cat([x, self.cam(self.mid(self.bottleneck(self.pre(x))))], dim=1)


class CamPlusPlus(nn.Module):
    def __init__(self, *, feat_dim: int = 80, embedding: int = 192, head_channels: int = 32, growth: int = 32,
                 bottleneck: int = 128, channels: int = 128, layers: tuple = (12, 24, 16)):  # fmt: skip
        super().__init__()
        self.head = Head(head_channels, feat_dim)
        body = [nn.Conv1d(self.head.out_channels, channels, 5, stride=2, padding=2, bias=False), *bn_relu(channels)]
        for n, dilation in zip(layers, (1, 2, 2)):
            for _ in range(n):
                body.append(DenseLayer(channels, growth, bottleneck, dilation))
                channels += growth
            body += [*bn_relu(channels), nn.Conv1d(channels, channels // 2, 1, bias=False)]
            channels //= 2
        body += [*bn_relu(channels)]
        self.body = nn.Sequential(*body)
        self.dense = nn.Conv1d(channels * 2, embedding, 1, bias=False)
        self.out_norm = nn.BatchNorm1d(embedding, affine=False)

    def forward(self, feats):  # (B, T, F) mean-normalised fbank -> (B, embedding)
        x = self.body(self.head(feats.transpose(1, 2)))
        stats = torch.cat([x.mean(-1), x.std(-1, unbiased=True)], dim=-1)
        return self.out_norm(self.dense(stats.unsqueeze(-1)).squeeze(-1))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and batch-norm statistics (so that folding them into the convolutions matters), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("weight") and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() > 1:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def tiny(seed: int = 0) -> CamPlusPlus:
    return randomized(CamPlusPlus(head_channels=4, growth=4, bottleneck=8, channels=8, layers=(2, 3, 2)), seed)


def _legacy_exporter() -> dict:
    return {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}


def export(model: nn.Module, path: str, frames: int = 150) -> None:
    """The exporter CosyVoice's file came from: TorchScript's, batch norms folded into the convolutions, time
    dynamic."""
    x = torch.randn(1, frames, 80)
    torch.onnx.export(model, (x,), path, input_names=["input"], output_names=["output"], opset_version=13,
                      dynamic_axes={"input": {1: "T"}}, **_legacy_exporter())  # fmt: skip


# S3 tokenizer v1 (CosyVoice's speech_tokenizer_v1.onnx): a Whisper-style encoder at 50 Hz over 128-bin log-mel
# frames (length-masked convolutions, sinusoidal positions, pre-LN blocks whose attention hides padding keys, no
# final norm), then the nearest of 4096 codewords to the L2-normalised frame.


def sinusoids(length: int, channels: int) -> torch.Tensor:
    scales = torch.exp(-torch.log(torch.tensor(10000.0)) / (channels // 2 - 1) * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * scales[None]
    return torch.cat([t.sin(), t.cos()], dim=1)


class S3Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_ln, self.mlp_ln = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, bias):  # x (B, T, d), bias (B, 1, 1, T)
        B, T, d = x.shape
        h = self.attn_ln(x)
        split = lambda t: t.reshape(B, T, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        w = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + bias, dim=-1)
        x = x + self.o((w @ v).transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.mlp_ln(x))


class S3TokenizerV1(nn.Module):
    def __init__(self, *, n_mels: int = 128, d: int = 1280, heads: int = 20, layers: int = 6, codes: int = 4096,
                 ctx: int = 1500):  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.register_buffer("positions", sinusoids(ctx, d))
        self.blocks = nn.ModuleList(S3Block(d, heads) for _ in range(layers))
        self.codebook = nn.Parameter(torch.randn(codes, d))

    def forward(self, mel, frames):  # mel (B, n_mels, F), frames (B,) int32 -> tokens (B, ceil(F / 2)) int64
        valid = torch.arange(mel.shape[2])[None] < frames[:, None]
        x = F.gelu(self.conv1(mel * valid[:, None]))
        half = (frames.long() - 1).div(2, rounding_mode="floor") + 1
        x = F.gelu(self.conv2(x * valid[:, None]))  # (B, d, T)
        keep = torch.arange(x.shape[2])[None] < half[:, None]
        x = x.transpose(1, 2) + self.positions[: x.shape[2]]
        bias = torch.where(keep, 0.0, -1e10)[:, None, None, :]
        for block in self.blocks:
            x = block(x, bias)
        x = F.normalize(x, dim=-1)
        dist = x.pow(2).sum(-1, keepdim=True) - 2 * x @ self.codebook.t() + self.codebook.pow(2).sum(-1)
        return dist.argmin(-1)


def tiny_s3(seed: int = 0) -> S3TokenizerV1:
    torch.manual_seed(seed)
    model = S3TokenizerV1(d=32, heads=4, layers=2, codes=64, ctx=400).eval()  # (up to 8 s)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # layer norms
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def export_s3(model: nn.Module, path: str, frames: int = 120) -> None:
    mel = torch.randn(1, 128, frames)
    frames = torch.tensor([frames], dtype=torch.int32)
    torch.onnx.export(model, (mel, frames), path, input_names=["feats", "feats_length"], output_names=["indices"],
                      opset_version=13,
                      dynamic_axes={"feats": {2: "T"}, "indices": {1: "T2"}}, **_legacy_exporter())  # fmt: skip
