"""The TASTE text-query aggregator (spec section 1.4): a Whisper-decoder-shaped stack whose text-token queries
attend over the speech encoder, keys from one encoder hidden state and values from another.

Parameter names are those of transformers' ``WhisperDecoder`` (``embed_tokens``, ``embed_positions``,
``layers.{i}.self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``, ``encoder_attn.*``,
``encoder_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``, ``layer_norm``), so the key mapping from a
Whisper decoder is the identity, and from the official TASTE checkpoint it is the removal of
:data:`OFFICIAL_PREFIX`. Dropout is not modelled (Whisper and TASTE train the aggregator without it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taste._checks import check_at_least, check_field_types, check_id_range
from taste.ops import (
    cross_attention_folds,
    prefix_layout,
    text_query_attention,
    text_query_cross_attention,
    text_query_cross_attention_folded,
)
from taste.ops_attention import uniform_offsets
from taste.text import WHISPER_LANGUAGES

OFFICIAL_PREFIX = "audio_tower.audio_joint_encoder_segmenter.audio_segmenter.decoder."
WHISPER_PREFIX_IDS = (50258, 50259, 50360, 50364)  # <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>
_WHISPER_BPE_IDS = 50257  # the byte-level BPE ranks; <|endoftext|>, <|startoftranscript|> and the languages follow


def whisper_prefix_ids(vocab_size: int, language: str = "en") -> tuple[int, ...]:
    """The official prefix ``<|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>`` in a multilingual
    Whisper vocabulary of ``vocab_size`` ids: 51866 for large-v3 and its distillations (100 languages), 51865 for
    the earlier multilingual models (99). The ids after the language tokens move with their count, so large-v3's
    ids in a 99-language model would be ``<|startoflm|>`` and the first timestamp. ``language``: another of
    Whisper's language codes in place of ``en`` (the official model is English; words are split on whitespace)."""
    languages = vocab_size - (_WHISPER_BPE_IDS + 2 + 5 + 1 + 1501)  # ... translate, transcribe, startoflm,
    if languages not in (99, 100):  # startofprev, nospeech; notimestamps; 1501 timestamps
        kind = " (an English-only Whisper: GPT-2's BPE, not the multilingual one)" if vocab_size == 51864 else ""
        raise ValueError(
            f"no Whisper prefix ids for a vocabulary of {vocab_size} ids{kind}: the multilingual Whisper "
            "vocabularies have 51865 or 51866; pass prefix_ids (and a matching asr_tokenizer)"
        )
    if language not in WHISPER_LANGUAGES[:languages]:
        raise ValueError(f"language must be one of this Whisper's {languages} language codes "
                         f"({', '.join(WHISPER_LANGUAGES[:5])}, ...), got {language!r}")  # fmt: skip
    first_task = _WHISPER_BPE_IDS + 2 + languages  # <|translate|>
    lang = _WHISPER_BPE_IDS + 2 + WHISPER_LANGUAGES.index(language)
    return (_WHISPER_BPE_IDS + 1, lang, first_task + 1, first_task + 5)


@dataclass(frozen=True)
class AggregatorConfig:
    vocab_size: int = 51866
    d_model: int = 1280
    num_heads: int = 20
    num_layers: int = 2
    ffn_dim: int = 5120
    max_positions: int = 448
    prefix_ids: tuple[int, ...] = WHISPER_PREFIX_IDS
    skip_prefix: int = 4  # the official skip_prefix_idx: leading outputs that are not text tokens
    identity_v_proj: bool = True  # make_v_proj_identity: cross-attention values start as the raw value states
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check_field_types(self)
        check_at_least(self, 1, "vocab_size", "d_model", "num_heads", "ffn_dim")
        check_at_least(self, 0, "num_layers")
        if self.max_positions <= len(self.prefix_ids):
            raise ValueError(f"max_positions ({self.max_positions}) must exceed the {len(self.prefix_ids)} prefix "
                             "tokens: it bounds the prefix and the text together")  # fmt: skip
        if any(not 0 <= i < self.vocab_size for i in self.prefix_ids):
            raise ValueError(f"prefix_ids must lie in [0, vocab_size={self.vocab_size}), got {self.prefix_ids}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @classmethod
    def distil_large_v3(cls, **overrides) -> AggregatorConfig:
        """The official aggregator: distil-whisper/distil-large-v3's decoder (2 layers, 1280, 20 x 64)."""
        return replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> AggregatorConfig:
        """A small random model for tests and CPU experiments (head dim 32, vocabulary of 1000 ids)."""
        base = cls(
            vocab_size=1000,
            d_model=64,
            num_heads=2,
            num_layers=2,
            ffn_dim=128,
            max_positions=96,
            prefix_ids=(996, 997, 998, 999),
        )
        return replace(base, **overrides)

    def to_dict(self) -> dict:
        """The fields as a dict (peft reads a model's ``config.to_dict()`` when adapters are injected)."""
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


@torch.no_grad()
def whisper_init(module: nn.Module, std: float = 0.02) -> None:
    """Whisper's random initialisation (transformers' ``init_std``): linear, convolution and embedding weights
    N(0, std), biases 0, LayerNorms 1 / 0. Matters for models trained from scratch: PyTorch's default N(0, 1)
    embeddings make the tied output layer's logits, and the residual stream, far too large."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Embedding)):
            m.weight.normal_(0.0, std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()


def balanced_chunk(count: int, most: int) -> int:
    """Items per chunk when ``count`` items go in chunks of at most ``most`` (at least 1): as few chunks as that
    allows, of equal size but the last (17 items, at most 16: chunks of 9 and 8, not 16 and 1). The largest chunk
    sets the peak memory, and a lone small chunk would cost a launch for little work."""
    most = max(1, min(count, most))
    chunks = -(-count // most)
    return -(-count // chunks) if count else 1


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself (no subclass or wrapper) without forward hooks: its weight and bias are its function."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


class WhisperAttention(nn.Module):
    """Whisper's bias layout: q, v and out with bias, k without."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.heads = num_heads

    def _heads(self, t: Tensor) -> Tensor:
        """``(rows, d_model)`` -> ``(rows, H, Dh)`` (shapes spelled out: rows may be 0)."""
        return t.view(t.shape[0], self.heads, t.shape[1] // self.heads)

    def _out(self, attn: Tensor) -> Tensor:
        return self.out_proj(attn.reshape(attn.shape[0], attn.shape[1] * attn.shape[2]))

    def forward(self, h_q, h_k, h_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
        """Packed attention of h_q's rows over h_k / h_v's rows (all (rows, d_model)) -> (rows of h_q, d_model)."""
        attn = text_query_attention(
            self._heads(self.q_proj(h_q)), self._heads(self.k_proj(h_k)), self._heads(self.v_proj(h_v)),
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
        )  # fmt: skip
        return self._out(attn)

    def forward_states(self, h_q, h_key, h_val, cu_seqlens_q, max_seqlen_q, chunk_frames=None, fold=True):
        """Cross-attention of packed ``h_q`` rows over dense encoder states ``(B, E, d_model)``.

        With ``fold``, where utterances hold few queries (on the CPU; ``ops.cross_attention_folds``), the key and value
        projections are folded into the queries and outputs (``ops.text_query_cross_attention_folded``) and no K/V
        is made: at inference, and in training where the encoder states need gradients too. (With frozen states,
        the folded attention's backward would still make their gradients, at the width of the states, which costs
        more than the projections' weight gradients it saves.) Otherwise, when no gradient is needed, keys and values
        are projected by ``ops.text_query_cross_attention`` for at most ``chunk_frames // E`` utterances at a time,
        in chunks of equal size (:func:`balanced_chunk`; None: all at once), so only that many utterances' K/V exist
        at once; otherwise every frame is projected by the modules and the differentiable op runs.

        The folded and chunked paths use ``k_proj``'s and ``v_proj``'s weights in place of calling them, so they run
        only while both are plain ``nn.Linear`` modules without hooks: a wrapper (a LoRA adapter, whose ``weight`` is
        its base layer's) or a hook makes every frame go through the modules."""
        b, e, d = h_key.shape
        k_proj, v_proj = self.k_proj, self.v_proj  # (each module attribute read costs the host ~0.3-0.6 us)
        fused = _plain_linear(k_proj) and _plain_linear(v_proj)
        if fused:
            k_weight, k_bias, v_weight, v_bias = params = (k_proj.weight, k_proj.bias, v_proj.weight, v_proj.bias)
        else:
            params = (*k_proj.parameters(), *v_proj.parameters())
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h_q, h_key, h_val, *params))
        if (
            fold
            and fused
            and (not grad or h_key.requires_grad or h_val.requires_grad)
            and cross_attention_folds(max_seqlen_q, self.heads, d, e, h_q.device)
        ):
            q = self._heads(self.q_proj(h_q))
            attn = text_query_cross_attention_folded(q, h_key, h_val, k_weight, v_weight, cu_seqlens_q, max_seqlen_q,
                                                     k_bias=k_bias, v_bias=v_bias)  # fmt: skip
            return self._out(attn)
        if fused and not grad:
            per_chunk = balanced_chunk(b, chunk_frames // max(e, 1)) if chunk_frames else b
            attn = text_query_cross_attention(self._heads(self.q_proj(h_q)), h_key, h_val, k_weight, v_weight,
                                              cu_seqlens_q, max_seqlen_q, k_bias=k_bias, v_bias=v_bias,
                                              chunk_size=per_chunk)  # fmt: skip
            return self._out(attn)
        cu_k = uniform_offsets(b, e, h_q.device)
        return self(h_q, h_key.reshape(b * e, d), h_val.reshape(b * e, d), cu_seqlens_q, cu_k, max_seqlen_q, e)

    def forward_dense(self, x: Tensor) -> Tensor:
        """Unmasked self-attention over every row of a dense ``(B, T, d_model)`` batch (the speech encoder's)."""
        b, t, d = x.shape

        def heads(p):
            return p.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, Dh)

        o = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(o.transpose(1, 2).reshape(b, t, d))


class WhisperLayer(nn.Module):
    """Whisper's pre-LN layer parts shared by the encoder and the aggregator: self-attention and the GELU FFN."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, eps: float):
        super().__init__()
        self.self_attn = WhisperAttention(d_model, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model, eps=eps)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model, eps=eps)

    def ffn(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class AggregatorLayer(WhisperLayer):
    def __init__(self, config: AggregatorConfig):
        super().__init__(config.d_model, config.num_heads, config.ffn_dim, config.layer_norm_eps)
        self.encoder_attn = WhisperAttention(config.d_model, config.num_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, x, cu_seqlens, max_seqlen, h_key, h_val, kv_chunk_frames=None, fold_kv=True):
        h = self.self_attn_layer_norm(x)
        x = x + self.self_attn(h, h, h, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        h = self.encoder_attn_layer_norm(x)
        x = x + self.encoder_attn.forward_states(h, h_key, h_val, cu_seqlens, max_seqlen, kv_chunk_frames, fold_kv)
        return self.ffn(x)


class TextQueryAggregator(nn.Module):
    """Text-token queries over the speech encoder; packed batches in and out, no host sync in forward.

    ``kv_chunk_frames`` (attribute): when no gradient is needed, the cross-attention keys and values are made for
    at most this many encoder frames (whole utterances, at least one; chunks of equal size) at a time and freed
    after their queries have attended, so inference never holds the whole batch's K/V (2 x B x E x d_model).
    ``"auto"`` (default): 24576 on CUDA (16 utterances of 30 s, enough for the attention grid to fill a GPU), 6000
    elsewhere (4 utterances: on 2 CPU cores as fast as all at once, where 2 utterances measured ~5% slower). ``None``
    projects every frame at once, as training always does.

    ``fold_kv`` (attribute, default True): on the CPU, where no utterance holds more than about 0.85 x a head dim
    of queries, prefix included (``ops.cross_attention_folds``), the cross-attention folds the key and value
    projections into the queries and outputs instead of projecting every frame
    (``ops.text_query_cross_attention_folded``): the same function, fewer multiply-adds, no K/V in memory. At
    inference, and in training where ``h_key`` or ``h_val`` need gradients (with a frozen encoder, projecting
    trains faster). False always projects.
    """

    kv_chunk_frames: int | str | None = "auto"
    fold_kv: bool = True

    def resolved_kv_chunk_frames(self, device: torch.device) -> int | None:
        """The frames per K/V chunk that inference on ``device`` uses (None: all at once)."""
        if self.kv_chunk_frames == "auto":
            return 24576 if device.type == "cuda" else 6000
        return self.kv_chunk_frames

    def __init__(self, *, config: AggregatorConfig):
        super().__init__()
        if config.d_model % config.num_heads:
            raise ValueError(f"config.d_model ({config.d_model}) must be divisible by num_heads ({config.num_heads})")
        if config.skip_prefix != len(config.prefix_ids):
            raise ValueError(
                f"config.skip_prefix must equal the prefix length {len(config.prefix_ids)} (the output has "
                f"one row per text token), got {config.skip_prefix}"
            )
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.max_positions, config.d_model)
        self.layers = nn.ModuleList(AggregatorLayer(config) for _ in range(config.num_layers))
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.register_buffer("prefix_ids", torch.tensor(config.prefix_ids, dtype=torch.long), persistent=False)
        whisper_init(self)
        if config.identity_v_proj:
            self.reset_v_proj_to_identity()

    @torch.no_grad()
    def reset_v_proj_to_identity(self) -> None:
        """The official make_v_proj_identity: every cross-attention v_proj becomes W = I, b = 0."""
        for layer in self.layers:
            layer.encoder_attn.v_proj.weight.copy_(torch.eye(self.config.d_model))
            layer.encoder_attn.v_proj.bias.zero_()

    @torch.no_grad()
    def remap_vocabulary(self, pieces: Sequence[Sequence[int]]) -> None:
        """Gives the queries another vocabulary, e.g. the LLM's (the official repository's PR #4): a new token
        embedding in which row t is the mean of the current rows ``pieces[t]``, the ids of the current vocabulary
        that spell new token t (:func:`taste.text.token_pieces`), or, where ``pieces[t]`` is empty (special
        tokens), the mean of every row that spells some token. The prefix rows follow the new vocabulary unchanged,
        ``prefix_ids`` move there, and ``config.vocab_size`` becomes ``len(pieces) + len(prefix_ids)``; the rest
        of the model is untouched."""
        old = self.embed_tokens.weight
        sizes = torch.tensor([len(p) for p in pieces], dtype=torch.long)
        flat = torch.tensor([i for p in pieces for i in p], dtype=torch.long)
        if not len(pieces) or not flat.numel():
            raise ValueError("pieces must spell at least one token of the new vocabulary with ids of the current one")
        if int(flat.min()) < 0 or int(flat.max()) >= old.shape[0]:
            raise ValueError(f"pieces must hold ids in [0, {old.shape[0]}) (the current vocabulary), got ids from "
                             f"{int(flat.min())} to {int(flat.max())}")  # fmt: skip
        offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        table, n = old.float(), len(pieces)
        vocab = n + len(self.prefix_ids)
        weight = old.new_empty(vocab, old.shape[1])
        for start in range(0, n, 1 << 14):  # (blocks of new tokens: no float32 copy of the whole new table)
            end = min(start + (1 << 14), n)
            bag = flat[offsets[start] : offsets[end]].to(old.device)
            weight[start:end] = F.embedding_bag(bag, table, (offsets[start : end + 1] - offsets[start]).to(old.device),
                                                mode="mean", include_last_offset=True)  # fmt: skip
        weight[:n][(sizes == 0).to(old.device)] = table[flat.unique().to(old.device)].mean(0).to(old.dtype)
        weight[n:] = old[self.prefix_ids.to(old.device)]
        self.embed_tokens = nn.Embedding.from_pretrained(weight, freeze=not old.requires_grad)
        self.config = replace(self.config, vocab_size=vocab, prefix_ids=tuple(range(n, vocab)))
        self.prefix_ids = torch.arange(n, vocab, device=self.prefix_ids.device)

    def forward(self, tokens: Tensor, cu_seqlens: Tensor, max_seqlen: int, h_key: Tensor, h_val: Tensor) -> Tensor:
        """Aggregates each text token's view of its utterance.

        Args:
            tokens: ``(N,)`` int64 packed ASR text tokens, without the prefix (added here per sequence).
            cu_seqlens: ``(B + 1,)`` int32 offsets of the sequences in ``tokens``.
            max_seqlen: host int, the longest sequence (``max_seqlen + len(prefix) <= max_positions``).
            h_key: ``(B, E, d_model)`` encoder states the keys are made from (Whisper's last hidden state).
            h_val: ``(B, E, d_model)`` encoder states the values are made from (a shallow layer's output).

        Returns:
            ``(N, d_model)``: the final-LayerNorm output at every text token (prefix outputs dropped). Output
            ``p`` is the state after reading token ``p``; ``taste.ops.segment_mean`` pools it into words.
        """
        cfg = self.config
        prefix = len(cfg.prefix_ids)
        if max_seqlen < 0 or max_seqlen + prefix > cfg.max_positions:
            raise ValueError(
                f"max_seqlen must be >= 0 and, with the {prefix} prefix tokens, <= max_positions="
                f"{cfg.max_positions}, got max_seqlen={max_seqlen}"
            )
        if h_key.shape != h_val.shape or h_key.dim() != 3 or h_key.shape[-1] != cfg.d_model:
            raise ValueError(
                f"h_key and h_val must both be (B, E, {cfg.d_model}), got {tuple(h_key.shape)} and {tuple(h_val.shape)}"
            )
        weight = self.embed_tokens.weight
        for name, t in (("h_key", h_key), ("h_val", h_val), ("tokens", tokens), ("cu_seqlens", cu_seqlens)):
            if t.device != weight.device:
                raise ValueError(f"{name} must be on the module's device ({weight.device}), got {t.device}")
        if weight.dtype != h_key.dtype or weight.dtype != h_val.dtype:
            if not torch.is_autocast_enabled(h_key.device.type):
                raise TypeError(
                    f"h_key and h_val must have the module's dtype ({weight.dtype}) outside torch.autocast, got "
                    f"{h_key.dtype} and {h_val.dtype}: cast them, or the module (.to(dtype)), or run under autocast"
                )
        batch = h_key.shape[0]
        if cu_seqlens.shape[0] != batch + 1:
            raise ValueError(
                f"cu_seqlens must have B + 1 = {batch + 1} entries (B from h_key), got {cu_seqlens.shape[0]}"
            )
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            self._check_values(tokens, cu_seqlens, max_seqlen)  # (on a GPU this would sync)
        prefix_ids = self.prefix_ids if self.prefix_ids.dtype == tokens.dtype else self.prefix_ids.to(tokens.dtype)
        layout = prefix_layout(tokens, cu_seqlens, prefix_ids)  # (no operator for a .to that changes nothing)
        x = self.embed_tokens(layout.ids) + self.embed_positions(layout.positions)  # (N + B*P, d)
        chunk = self.resolved_kv_chunk_frames(h_key.device)
        for layer in self.layers:
            x = layer(x, layout.cu_seqlens, max_seqlen + prefix, h_key, h_val, chunk, self.fold_kv)
        return self.layer_norm(x[layout.token_rows])  # (N, d): the skip_prefix prefix outputs dropped

    def _check_values(self, tokens: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> None:
        """What the ops would report in their own terms (or, for the ids, as an IndexError), in the caller's: the
        ids within the vocabulary, no sequence longer than ``max_seqlen`` (offsets checked by prefix_layout)."""
        check_id_range(tokens, self.config.vocab_size, "tokens")
        if cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1 and cu_seqlens.numel() > 1:
            steps = cu_seqlens.diff()
            longest = int(steps.max())
            if longest > max_seqlen and bool((steps >= 0).all()):  # (decreasing offsets: prefix_layout says so)
                raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence in cu_seqlens "
                                 f"({longest} tokens)")  # fmt: skip

    @classmethod
    def from_whisper_decoder(cls, decoder: nn.Module, *, language: str = "en", **overrides) -> TextQueryAggregator:
        """Builds the aggregator from a transformers ``WhisperDecoder`` (pretrained or random), copying its weights.

        The key mapping is the identity (same parameter names). ``overrides`` replace config fields, e.g.
        ``identity_v_proj=False`` to keep the decoder's cross-attention v_proj (the default re-initialises it
        to the identity as the official seed model does). The prefix ids are those of the decoder's vocabulary
        (:func:`whisper_prefix_ids`: large-v3's 51866 ids or the earlier models' 51865; ``language`` in place of
        English) unless ``prefix_ids`` is given. The module takes the decoder's dtype and device.
        """
        c = decoder.config
        shapes = dict(
            vocab_size=c.vocab_size,
            d_model=c.d_model,
            num_heads=c.decoder_attention_heads,
            num_layers=c.decoder_layers,
            ffn_dim=c.decoder_ffn_dim,
            max_positions=c.max_target_positions,
        )
        if overrides.get("vocab_size", c.vocab_size) != c.vocab_size:
            raise ValueError(
                f"vocab_size={overrides['vocab_size']} differs from the decoder's {c.vocab_size}: the token "
                "embedding is copied as it is (remap_vocabulary gives it another vocabulary)"
            )
        if "prefix_ids" not in overrides:
            shapes["prefix_ids"] = whisper_prefix_ids(c.vocab_size, language)
        elif language != "en":
            raise ValueError("give prefix_ids or language, not both (language picks the prefix's language token)")
        config = AggregatorConfig(**{**shapes, **overrides})  # (in one: the shapes alone may not fit the prefix)
        weight = decoder.embed_tokens.weight
        with torch.device("meta"):
            module = cls(config=replace(config, identity_v_proj=False))
        module.load_state_dict(decoder.state_dict(), strict=True, assign=True)
        module.prefix_ids = torch.tensor(config.prefix_ids, dtype=torch.long, device=weight.device)
        module.config = config
        if config.identity_v_proj:
            module.reset_v_proj_to_identity()
        return module.to(weight.dtype)

    def load_official_state_dict(self, state_dict: dict, strict: bool = True):
        """Loads the aggregator part of an official TASTE checkpoint (keys under :data:`OFFICIAL_PREFIX`)."""
        own = {k[len(OFFICIAL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(OFFICIAL_PREFIX)}
        return self.load_state_dict(own, strict=strict)
