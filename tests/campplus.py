"""A PyTorch CAM++ (3D-Speaker's speaker encoder, the model behind CosyVoice's ``campplus.onnx`` and the TASTE
release's ``cosyvoice/speaker_embed.onnx``), written here as a test fixture: tests export it to ONNX and check that
``taste.onnx`` / ``taste.SpeakerEncoder`` run the exported graph as onnxruntime and PyTorch do.

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


def export(model: nn.Module, path: str, frames: int = 150) -> None:
    """The exporter CosyVoice's file came from: TorchScript's, batch norms folded into the convolutions, time
    dynamic."""
    x = torch.randn(1, frames, 80)
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    torch.onnx.export(model, (x,), path, input_names=["input"], output_names=["output"], opset_version=13,
                      dynamic_axes={"input": {1: "T"}}, **kwargs)  # fmt: skip
