"""The unit decoder (spec section 1.7): text + TASTE embeddings + speaker -> speech units, CosyVoice-style.

Text branch ``text_embedding -> text_encoder (Conformer-style, no convolution) -> text_encoder_affine_layer``; TASTE
branch ``audio_embed_affine_layer -> audio_token_encoder -> audio_token_encoder_affine_layer`` on the word
embeddings broadcast to the word's subwords; trainable weighted-sum fusion ``softmax([w_a, w_t])``; the causal
"LLM" reads ``[sos, speaker, fused_1..S, task, unit_1..unit_T]`` per utterance and ``llm_decoder`` predicts the
next unit (the task position predicts unit 1, the last unit predicts EOS = ``num_units``). Parameter names are
the official checkpoint's under ``speech_decoder.`` (:data:`OFFICIAL_PREFIX`). Inputs are packed; the module
pads internally with ``taste.ops.unpack`` and gathers, no per-sample loops.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taste import ops
from taste._checks import check_at_least, check_field_types, check_id_range
from taste.checkpoint import load_saved_model, save_model
from taste.relpos import RelPosEncoder, relative_sinusoids

OFFICIAL_PREFIX = "speech_decoder."


@dataclass(frozen=True)
class UnitDecoderConfig:
    text_vocab: int = 51866
    text_dim: int = 512
    taste_dim: int = 1280  # width of the incoming TASTE word embeddings
    audio_dim: int = 512
    d_model: int = 1024
    heads: int = 8
    ffn_dim: int = 2048
    text_layers: int = 3
    audio_layers: int = 2
    lm_layers: int = 7
    num_units: int = 4096  # S3 tokens; EOS is id num_units
    spk_dim: int = 192
    dropout: float = 0.1
    pos_dropout: float = 0.1
    attn_dropout: float = 0.0
    top_k: int = 25
    min_len_ratio: float = 2.0  # generation: EOS is banned before min_len_ratio * (S + 3) units
    max_len_ratio: float = 20.0  # and forced after max_len_ratio * (S + 3)

    def __post_init__(self):
        check_field_types(self)
        check_at_least(self, 1, "text_vocab", "text_dim", "taste_dim", "audio_dim", "d_model", "heads", "ffn_dim",
                       "num_units", "spk_dim", "top_k")  # fmt: skip
        check_at_least(self, 0, "text_layers", "audio_layers", "lm_layers")
        for name in ("dropout", "pos_dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.min_len_ratio <= self.max_len_ratio or self.max_len_ratio <= 0:
            raise ValueError(f"need 0 <= min_len_ratio <= max_len_ratio and max_len_ratio > 0, got "
                             f"{self.min_len_ratio} and {self.max_len_ratio}")  # fmt: skip

    @classmethod
    def official(cls, **overrides) -> UnitDecoderConfig:
        """The official TASTE unit decoder (CosyVoice-300M LM shapes, spec 1.7)."""
        return replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> UnitDecoderConfig:
        """Small, for CPUs: width 128, 2 + 1 encoder blocks, a 3-block LM, 256 units, TASTE width 128."""
        base = cls(text_dim=64, taste_dim=128, audio_dim=64, d_model=128, heads=4, ffn_dim=256, text_layers=2,
                   audio_layers=1, lm_layers=3, num_units=256)  # fmt: skip
        return replace(base, **overrides)

    @property
    def eos(self) -> int:
        return self.num_units


@dataclass
class UnitDecoderOutput:
    """loss () token CE averaged over the targets; logits ``(M + B, num_units + 1)`` and targets ``(M + B,)`` packed
    per utterance (its units, then EOS), ``target_cu_seqlens (B + 1,)`` int32."""

    loss: Tensor
    logits: Tensor
    targets: Tensor
    target_cu_seqlens: Tensor


def _join(prompt: Tensor, plen: Tensor, units: Tensor) -> Tensor:
    """Per row, the first ``plen`` prompt rows then the unit rows: ``(B, P, d), (B,), (B, U, d) -> (B, P + U, d)``
    (rows past each sequence's end are don't-care)."""
    batch, p, d = prompt.shape
    i = torch.arange(p + units.shape[1], device=prompt.device)[None]  # (1, L)
    from_prompt = prompt.gather(1, i.clamp(max=p - 1).expand(batch, -1)[..., None].expand(-1, -1, d))
    j = (i - plen[:, None]).clamp(0, max(units.shape[1] - 1, 0))
    from_units = units.gather(1, j[..., None].expand(-1, -1, d))
    return torch.where((i < plen[:, None])[..., None], from_prompt, from_units)


def _encoder(c: UnitDecoderConfig, in_dim: int, layers: int, *, llm: bool) -> RelPosEncoder:
    return RelPosEncoder(
        in_dim, c.d_model, layers, c.heads, c.ffn_dim, activation="relu" if llm else "swish", conformer=not llm,
        input_relu=llm, dropout=c.dropout, pos_dropout=c.pos_dropout, attn_dropout=c.attn_dropout,
    )  # fmt: skip


class UnitDecoder(nn.Module):
    def __init__(self, *, config: UnitDecoderConfig):
        super().__init__()
        c = self.config = config
        self.text_embedding = nn.Embedding(c.text_vocab, c.text_dim)
        self.text_encoder = _encoder(c, c.text_dim, c.text_layers, llm=False)
        self.text_encoder_affine_layer = nn.Linear(c.d_model, c.d_model)
        self.audio_embed_affine_layer = nn.Linear(c.taste_dim, c.audio_dim)
        self.audio_token_encoder = _encoder(c, c.audio_dim, c.audio_layers, llm=False)
        self.audio_token_encoder_affine_layer = nn.Linear(c.d_model, c.d_model)
        self.fuse_encoded_audio_text_module = nn.Module()
        self.fuse_encoded_audio_text_module.weights = nn.Parameter(torch.ones(2))  # [audio, text], softmax-mixed
        self.spk_embed_affine_layer = nn.Linear(c.spk_dim, c.d_model)
        self.llm_embedding = nn.Embedding(2, c.d_model)  # rows: sos, task
        self.speech_embedding = nn.Embedding(c.num_units, c.d_model)
        self.llm = _encoder(c, c.d_model, c.lm_layers, llm=True)
        self.llm_decoder = nn.Linear(c.d_model, c.num_units + 1)

    # ---- conditioning: [sos, speaker, fused text/TASTE, task] ----
    def prompt(self, text_tokens, text_cu_seqlens, max_text, taste=None, word_offsets=None, speaker=None):
        """The LM prompt, padded: ``(B, max_text + 3, d_model)`` and its lengths ``(B,)`` (S + 3).

        Args:
            text_tokens: ``(N,)`` int64 packed ASR token ids (no prefix); text_cu_seqlens ``(B + 1,)`` int32;
                max_text host int.
            taste: ``(W_total, taste_dim)`` word-level TASTE embeddings, or None for the text-only model.
            word_offsets: ``(W_total + 1,)`` int32 words over the packed tokens (needed with ``taste``).
            speaker: ``(B, spk_dim)`` speaker embeddings (L2-normalised here), or None for none.
        """
        self._check_prompt(text_tokens, text_cu_seqlens, taste, word_offsets, speaker)
        lengths = text_cu_seqlens.diff()
        batch, n = lengths.shape[0], text_tokens.shape[0]
        text = ops.unpack(self.text_embedding(text_tokens), text_cu_seqlens, max_text)  # (B, S, text_dim)
        fused = self.text_encoder_affine_layer(self.text_encoder(text, lengths))
        if taste is not None:
            if word_offsets is None:
                raise ValueError("word_offsets is needed to broadcast the TASTE word embeddings to subwords")
            per_token = ops.segment_broadcast(taste.to(fused.dtype), word_offsets, n)  # (N, taste_dim)
            audio = self.audio_embed_affine_layer(ops.unpack(per_token, text_cu_seqlens, max_text))
            audio = self.audio_token_encoder_affine_layer(self.audio_token_encoder(audio, lengths))
            alpha = self.fuse_encoded_audio_text_module.weights.softmax(0)
            fused = alpha[0] * audio + alpha[1] * fused
        d = fused.shape[-1]
        if speaker is None:
            spk = self.spk_embed_affine_layer.bias.expand(batch, d)
        else:
            spk = self.spk_embed_affine_layer(F.normalize(speaker.to(fused.dtype), dim=-1))
        sos, task = self.llm_embedding.weight[0], self.llm_embedding.weight[1]
        seq = torch.cat([sos.expand(batch, 1, d), spk[:, None], fused, fused.new_zeros(batch, 1, d)], 1)
        is_task = torch.arange(seq.shape[1], device=seq.device)[None] == (lengths + 2)[:, None]  # (B, S + 3)
        return torch.where(is_task[..., None], task, seq), lengths + 3

    def _check_prompt(self, text_tokens, text_cu_seqlens, taste, word_offsets, speaker) -> None:
        """Errors in the caller's terms for what would otherwise fail deep inside (an embedding's "index out of
        range", a product's shapes, NaN from an utterance with no text); the values only on CPU tensors."""
        c = self.config
        if text_cu_seqlens.dim() != 1 or text_cu_seqlens.numel() < 1:
            raise ValueError(f"text_cu_seqlens must be a (B + 1,) tensor, got shape {tuple(text_cu_seqlens.shape)}")
        batch = text_cu_seqlens.numel() - 1
        if taste is not None and (taste.dim() != 2 or taste.shape[1] != c.taste_dim):
            raise ValueError(f"taste must be (W_total, taste_dim={c.taste_dim}), got {tuple(taste.shape)}")
        if taste is not None and word_offsets is not None and word_offsets.shape != (taste.shape[0] + 1,):
            raise ValueError(f"word_offsets must be (W_total + 1,) = ({taste.shape[0] + 1},) for taste's "
                             f"{taste.shape[0]} words, got {tuple(word_offsets.shape)}")  # fmt: skip
        if speaker is not None and speaker.shape != (batch, c.spk_dim):
            raise ValueError(f"speaker must be (B={batch}, spk_dim={c.spk_dim}), got {tuple(speaker.shape)}")
        if text_tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            check_id_range(text_tokens, c.text_vocab, "text_tokens", "text_vocab")
            if batch and text_cu_seqlens.dtype == torch.int32 and bool((text_cu_seqlens.diff() < 1).any()):
                raise ValueError(f"every utterance needs at least one text token, got text_cu_seqlens "
                                 f"{text_cu_seqlens.tolist()}")  # fmt: skip

    # ---- teacher forcing ----
    def forward(self, text_tokens, text_cu_seqlens, max_text, units, unit_cu_seqlens, max_units, *, taste=None,
                word_offsets=None, speaker=None) -> UnitDecoderOutput:  # fmt: skip
        """Teacher-forced next-unit loss. ``units (M,)`` int64 packed targets, ``unit_cu_seqlens (B + 1,)`` int32,
        ``max_units`` host int; the rest as :meth:`prompt`."""
        if unit_cu_seqlens.shape != text_cu_seqlens.shape:
            raise ValueError(f"unit_cu_seqlens must have text_cu_seqlens' shape {tuple(text_cu_seqlens.shape)} (one "
                             f"entry per utterance + 1), got {tuple(unit_cu_seqlens.shape)}")  # fmt: skip
        check_id_range(units, self.config.num_units, "units", "num_units")
        prompt, plen = self.prompt(text_tokens, text_cu_seqlens, max_text, taste, word_offsets, speaker)
        ulen = unit_cu_seqlens.diff()
        batch, m = ulen.shape[0], units.shape[0]
        unit_emb = ops.unpack(self.speech_embedding(units), unit_cu_seqlens, max_units)  # (B, U, d)
        seq = _join(prompt, plen, unit_emb) if max_units else prompt  # (B, L, d)
        hidden = self.llm(seq, plen + ulen)  # (B, L, d)
        # Predictions: prompt position P-1 (task) .. P-1+U, targets unit_1..unit_U then EOS.
        counts = ulen + 1
        target_cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        row = torch.repeat_interleave(torch.arange(batch, device=seq.device), counts, output_size=m + batch)
        t = torch.arange(m + batch, device=seq.device) - target_cu[row]
        logits = self.llm_decoder(hidden[row, plen[row] - 1 + t])  # (M + B, num_units + 1)
        is_unit = t < ulen[row]
        targets = torch.where(is_unit, units[(unit_cu_seqlens[row] + t).clamp(max=max(m - 1, 0))], self.config.eos)
        return UnitDecoderOutput(F.cross_entropy(logits.float(), targets), logits, targets, target_cu)

    # ---- generation ----
    def _sample(self, logits: Tensor, allow_eos: Tensor, greedy: bool, top_k: int, generator) -> Tensor:
        logits = logits.float()
        logits[:, self.config.eos] = torch.where(allow_eos, logits[:, self.config.eos], float("-inf"))
        if greedy:
            return logits.argmax(-1)
        values, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        pick = torch.multinomial(values.softmax(-1), 1, generator=generator)
        return idx.gather(1, pick)[:, 0]

    @torch.no_grad()
    def generate(self, text_tokens, text_cu_seqlens, max_text, *, taste=None, word_offsets=None, speaker=None,
                 greedy=False, top_k=None, generator=None, max_new_tokens=None, use_cache=True):  # fmt: skip
        """Samples units for every utterance of the batch (spec 1.7 rules: top-k, EOS banned before
        ``min_len_ratio * (S + 3)`` units, stop at ``max_len_ratio * (S + 3)``). The KV cache is allocated
        once; rows that emit EOS leave the batch and cost nothing afterwards. ``use_cache=False`` re-runs the
        whole sequence at every step (the official algorithm; a reference for tests).

        Returns B int64 tensors of units (EOS not included), on the CPU.
        """
        c = self.config
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (the config's {c.top_k}), got {top_k}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")
        prompt, plen = self.prompt(text_tokens, text_cu_seqlens, max_text, taste, word_offsets, speaker)
        batch, dev = prompt.shape[0], prompt.device
        if batch == 0:
            return []
        s_host = text_cu_seqlens.diff().tolist()
        min_len = torch.tensor([math.floor(c.min_len_ratio * (s + 3)) for s in s_host], device=dev)
        max_len = [math.floor(c.max_len_ratio * (s + 3)) for s in s_host]
        if max_new_tokens is not None:
            max_len = [min(m, max_new_tokens) for m in max_len]
        max_len = torch.tensor(max_len, device=dev)
        cap = prompt.shape[1] + int(max_len.max()) + 1
        top_k = top_k or c.top_k
        table = relative_sinusoids(cap, c.d_model, dev, prompt.dtype)
        projected = [layer.self_attn.project_positions(table) for layer in self.llm.encoders]  # (once, not a step)
        out = torch.full((batch, int(max_len.max()) + 1), -1, dtype=torch.long, device=dev)
        rows = torch.arange(batch, device=dev)  # original row of each active row
        count = torch.zeros(batch, dtype=torch.long, device=dev)
        if use_cache:
            heads, d_k = c.heads, c.d_model // c.heads
            cache = [(prompt.new_zeros(batch, heads, cap, d_k), prompt.new_zeros(batch, heads, cap, d_k))
                     for _ in self.llm.encoders]  # fmt: skip
            keys = prompt.shape[1]  # host int: the cache slots any row has filled (the longest prompt, then a step)
            pos = torch.arange(keys, device=dev).expand(batch, -1)
            mask = (torch.arange(keys, device=dev)[None, None] <= pos[..., None]) & (
                torch.arange(keys, device=dev)[None, None] < plen[:, None, None]
            )
            h = self._run(self.llm.embed_input(prompt), mask, pos, projected, cache, keys)
            last = h[torch.arange(batch, device=dev), plen - 1]
        else:
            last = self.llm(prompt, plen)[torch.arange(batch, device=dev), plen - 1]
        while rows.numel():
            token = self._sample(self.llm_decoder(last), count[rows] >= min_len[rows], greedy, top_k, generator)
            out[rows, count[rows]] = token
            count[rows] += 1
            done = (token == c.eos) | (count[rows] >= max_len[rows])
            if bool(done.any()):  # the one host sync per step: drop finished rows
                keep = ~done
                rows, token = rows[keep], token[keep]
                if use_cache:
                    cache = [(k[keep], v[keep]) for k, v in cache]
            if not rows.numel():
                break
            emb = self.speech_embedding(token)[:, None]  # (b, 1, d)
            if use_cache:
                keys += 1  # (every active row has made one more unit: its position is at most keys - 1)
                pos = (plen[rows] + count[rows] - 1)[:, None]  # (b, 1)
                mask = torch.arange(keys, device=dev)[None, None] <= pos[..., None]
                last = self._run(self.llm.embed_input(emb), mask, pos, projected, cache, keys)[:, 0]
            else:
                last = self._rerun(prompt, plen, out, rows, count)
        result = []
        for b, n in enumerate(count.tolist()):
            units = out[b, :n].cpu()
            result.append(units[units != c.eos])
        return result

    def _run(self, x, mask, pos, projected, cache, keys: int):
        """The LM on new rows ``x`` at ``pos`` with the caches; attention over the first ``keys`` slots only (views:
        the new keys and values are written through them), not the whole preallocated length."""
        for layer, p, (k, v) in zip(self.llm.encoders, projected, cache):
            x = layer(x, mask, pos, None, (k[:, :, :keys], v[:, :, :keys]), projected=p[:, :keys])
        return self.llm.after_norm(x)

    def _rerun(self, prompt, plen, out, rows, count):
        """The whole sequence again for the active rows (no cache): prompt ++ units so far."""
        n = count[rows]
        units = out[rows, : int(n.max())].clamp(min=0)
        emb = self.speech_embedding(units)  # (b, U, d)
        pl = plen[rows]
        h = self.llm(_join(prompt[rows], pl, emb), pl + n)
        return h[torch.arange(rows.numel(), device=h.device), pl + n - 1]

    def save_pretrained(self, directory: str) -> None:
        """``config.json`` + ``model.safetensors`` (the layout of :mod:`taste.checkpoint`)."""
        save_model(directory, dataclasses.asdict(self.config), self)

    @classmethod
    def from_pretrained(cls, directory: str, *, device=None) -> UnitDecoder:
        return load_saved_model(directory, "UnitDecoder", lambda raw: cls(config=UnitDecoderConfig(**raw))).to(device)

    def load_official_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Loads the unit decoder of an official TASTE checkpoint (keys under :data:`OFFICIAL_PREFIX`)."""
        own = {k[len(OFFICIAL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(OFFICIAL_PREFIX)}
        return self.load_state_dict(own, strict=strict, assign=assign)
