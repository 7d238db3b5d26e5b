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
from taste.voice_flow import FlowDecoder
from taste.voice_hift import HiFTVocoder, hann_window

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
