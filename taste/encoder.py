"""The Whisper speech encoder as TASTE uses it (spec section 1.3): it stops at the layer the keys come from
and hands back two states, the values' shallow residual stream and the keys' final-LayerNorm output.

Parameter names are transformers' ``WhisperEncoder``'s (``conv1``, ``conv2``, ``embed_positions``,
``layers.{i}.self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``,
``layer_norm``), so a Whisper checkpoint's encoder weights load by the identity mapping (layers past
``key_layer`` are dropped). Attention is PyTorch's SDPA; like Whisper, no mask: padding frames are attended to.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taste._checks import check_at_least, check_field_types
from taste.aggregator import WhisperLayer, whisper_init
from taste.audio import MEL_BINS


@dataclass(frozen=True)
class EncoderConfig:
    n_mels: int = 128
    window_seconds: float = 30.0  # the mel window; the encoder sees window_seconds * 50 frames
    d_model: int = 1280
    num_layers: int = 32  # layers kept (the keys come from the last one)
    num_heads: int = 20
    ffn_dim: int = 5120
    value_layer: int = 6  # values = the residual stream after this many layers (HF hidden_states[value_layer])
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check_field_types(self)
        check_at_least(self, 1, "d_model", "num_layers", "num_heads", "ffn_dim")
        if self.n_mels not in MEL_BINS:
            raise ValueError(f"n_mels must be 80 or 128 (the filter banks openai-whisper ships), got {self.n_mels}")
        if not self.window_seconds > 0:
            raise ValueError(f"window_seconds must be > 0, got {self.window_seconds}")

    @classmethod
    def large_v3(cls, **overrides) -> EncoderConfig:
        """distil-large-v3's encoder (= large-v3's): 128 mels, 32 layers of 1280 / 20 heads, values after 6."""
        return replace(cls(), **overrides)

    def to_dict(self) -> dict:
        """The fields as a dict (peft reads a model's ``config.to_dict()`` when adapters are injected)."""
        return asdict(self)

    @property
    def frames(self) -> int:
        """Encoder output frames (the mel frames halved by conv2's stride)."""
        return round(self.window_seconds * 100) // 2

    def validate(self) -> None:
        if not 0 <= self.value_layer <= self.num_layers:
            raise ValueError(f"value_layer must be in [0, num_layers={self.num_layers}], got {self.value_layer}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")


def sinusoids(length: int, channels: int) -> Tensor:
    """Whisper's fixed positional table: sin of the first half of the channels, cos of the second."""
    inc = math.log(10000) / (channels // 2 - 1)
    freqs = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * freqs[None]
    return torch.cat([t.sin(), t.cos()], dim=1)


class EncoderLayer(WhisperLayer):
    def __init__(self, config: EncoderConfig):
        super().__init__(config.d_model, config.num_heads, config.ffn_dim, config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(x + self.self_attn.forward_dense(self.self_attn_layer_norm(x)))


class SpeechEncoder(nn.Module):
    """``mel (B, n_mels, 2 * frames)`` -> ``(h_key, h_val)``, both ``(B, frames, d_model)``."""

    def __init__(self, *, config: EncoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        d = config.d_model
        self.conv1 = nn.Conv1d(config.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.frames, d)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        whisper_init(self)
        self.embed_positions.requires_grad_(False)
        with torch.no_grad():
            self.embed_positions.weight.copy_(sinusoids(config.frames, d))

    def check_mel(self, mel: Tensor) -> None:
        """Raises unless ``mel`` is the ``(B, n_mels, 2 * frames)`` batch this encoder takes."""
        expected = 2 * self.config.frames
        if mel.dim() != 3 or mel.shape[1] != self.config.n_mels or mel.shape[2] != expected:
            raise ValueError(f"mel must be (B, {self.config.n_mels}, {expected}), got {tuple(mel.shape)}")

    def forward(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        self.check_mel(mel)
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, frames, d)
        x = x + self.embed_positions.weight
        h_val = x
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 == self.config.value_layer:
                h_val = x
        return self.layer_norm(x), h_val

    @classmethod
    def from_whisper_encoder(cls, encoder: nn.Module, *, value_layer: int = 6, num_layers: int | None = None):
        """Builds the encoder from a transformers ``WhisperEncoder``, keeping its first ``num_layers`` layers
        (all by default) and its final LayerNorm; dtype and device follow the source."""
        c = encoder.config
        config = EncoderConfig(
            n_mels=c.num_mel_bins,
            window_seconds=c.max_source_positions / 50,
            d_model=c.d_model,
            num_layers=c.encoder_layers if num_layers is None else num_layers,
            num_heads=c.encoder_attention_heads,
            ffn_dim=c.encoder_ffn_dim,
            value_layer=value_layer,
        )
        state = {k: v for k, v in encoder.state_dict().items() if _layer_index(k) < config.num_layers}
        with torch.device("meta"):
            module = cls(config=config)
        module.load_state_dict(state, strict=True, assign=True)
        return module


def _layer_index(key: str) -> int:
    return int(key.split(".")[1]) if key.startswith("layers.") else -1
