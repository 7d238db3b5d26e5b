"""Whisper speech recognition for TASTE's inference transcripts (spec section 0, "ASR for inference").

The official inference runs a separate ``openai/whisper-large-v3`` Hugging Face pipeline (fp16, English, no
timestamps, one utterance at a time) to get the transcript that the aggregator reads, and then runs the same
encoder again inside TASTE: distil-large-v3's encoder, which TASTE uses frozen, is large-v3's. Here the Whisper
decoder reads the states the TASTE encoder already made (its final-LayerNorm output, the aggregator's keys), so
one encoder pass serves both (:meth:`taste.TasteTokenizer.transcribe_and_encode`); a transcriber that holds its
own encoder serves alone (:meth:`WhisperTranscriber.transcribe`).

Decoding is batched greedy search with a preallocated key/value cache: the prompt
``<|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>``, the checkpoint's ``suppress_tokens`` banned at
every step and its ``begin_suppress_tokens`` at the first, until ``<|endoftext|>`` or ``max_positions`` tokens in
all, as transformers' Whisper ``generate`` does on one 30 s window without timestamps. One decoding step
(:meth:`WhisperTranscriber.forward`) has the same shapes at every position, so ``torch.compile`` makes one graph
of it; the host reads back only an "all finished?" flag every ``check_every`` steps.

Parameter names are transformers' ``WhisperDecoder``'s (the aggregator's: :mod:`taste.aggregator`), so a Whisper
checkpoint's ``model.decoder.*`` (or ``decoder.*``) tensors load by the identity mapping; the output layer is the
token embedding (Whisper ties them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taste._checks import check_at_least, check_field_types, check_positive_int
from taste.aggregator import AggregatorLayer, whisper_init, whisper_prefix_ids
from taste.audio import LogMel, batch_waveforms
from taste.encoder import EncoderConfig, SpeechEncoder

WHISPER_EOS = 50257  # <|endoftext|>: the byte-level BPE ranks end just before it
WHISPER_BEGIN_SUPPRESS = (220, WHISPER_EOS)  # a lone space or an empty transcript as the first token
# transformers' clean_up_tokenization (a Whisper tokenizer_config's clean_up_tokenization_spaces)
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


@dataclass(frozen=True)
class TranscriberConfig:
    """A Whisper decoder's shapes and its greedy decoding rules (defaults: large-v3's shapes)."""

    vocab_size: int = 51866
    d_model: int = 1280
    num_heads: int = 20
    num_layers: int = 32
    ffn_dim: int = 5120
    max_positions: int = 448  # prompt and transcript together
    layer_norm_eps: float = 1e-5
    prompt_ids: tuple[int, ...] = (50258, 50259, 50360, 50364)
    eos_id: int = WHISPER_EOS
    suppress_ids: tuple[int, ...] = ()  # banned at every step (a checkpoint's suppress_tokens)
    begin_suppress_ids: tuple[int, ...] = WHISPER_BEGIN_SUPPRESS  # banned at the first step
    max_new_tokens: int | None = None  # the most tokens a transcript may have (None: max_positions less the prompt)
    clean_up_spaces: bool = False  # transformers' clean_up_tokenization on the decoded text

    def __post_init__(self):
        check_field_types(self)
        check_at_least(self, 1, "vocab_size", "d_model", "num_heads", "num_layers", "ffn_dim")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not self.prompt_ids:
            raise ValueError("prompt_ids must hold at least <|startoftranscript|>")
        if self.max_positions <= len(self.prompt_ids):
            raise ValueError(f"max_positions ({self.max_positions}) must exceed the {len(self.prompt_ids)} prompt "
                             "tokens: it bounds the prompt and the transcript together")  # fmt: skip
        for name in ("prompt_ids", "suppress_ids", "begin_suppress_ids"):
            ids = getattr(self, name)
            if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"{name} must be ids in [0, vocab_size={self.vocab_size}), got {ids}")
        if not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"eos_id must lie in [0, vocab_size={self.vocab_size}), got {self.eos_id}")
        if self.eos_id in self.suppress_ids:
            raise ValueError(f"suppress_ids must not hold eos_id ({self.eos_id}): no transcript could end")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        room = self.max_positions - len(self.prompt_ids)
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= room:
            raise ValueError(f"max_new_tokens must be in [1, {room}] (max_positions={self.max_positions} less the "
                             f"{len(self.prompt_ids)} prompt tokens) or None, got {self.max_new_tokens}")  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


@dataclass
class DecodeCache:
    """Per layer, the self-attention keys and values of the positions fed so far ``(B, H, P, Dh)`` (P: every
    position the decoding may feed) and the cross-attention keys and values of the encoder states
    ``(B, H, E, Dh)``, made once."""

    self_k: list[Tensor]
    self_v: list[Tensor]
    cross_k: list[Tensor]
    cross_v: list[Tensor]


def encoder_fingerprint(state: Mapping[str, Tensor], num_layers: int) -> tuple[float, ...]:
    """A few sums over a Whisper encoder's weights (``conv1``, its last layer's ``fc2``, the final LayerNorm;
    names without a prefix) that tell two encoders apart while ignoring their dtype: float32, bfloat16 and float16
    copies of one encoder agree within 0.2%. ``num_layers``: the layers the encoder has."""
    names = ("conv1.weight", f"layers.{num_layers - 1}.fc2.weight", "layer_norm.weight")
    sums = []
    for name in names:
        t = state[name].detach().double()
        sums += [float(t.abs().sum()), float(t.square().sum())]
    return (float(num_layers), *sums)


def same_encoder(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=2e-3, abs_tol=1e-6) for x, y in zip(a, b))


class WhisperTranscriber(nn.Module):
    """Batched greedy Whisper decoding over encoder states (the TASTE encoder's or its own).

    ``encoder``: a :class:`taste.encoder.SpeechEncoder` to hold for :meth:`transcribe` (None: the states come from
    elsewhere, e.g. :meth:`taste.TasteTokenizer.transcribe_and_encode`). ``encoder_fingerprint``: the
    :func:`encoder_fingerprint` of the Whisper encoder the decoder was trained with (set by :meth:`from_whisper`),
    which the TASTE tokenizer checks its own encoder against before lending its states.
    """

    def __init__(self, *, config: TranscriberConfig, encoder: SpeechEncoder | None = None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.max_positions, config.d_model)
        self.layers = nn.ModuleList(AggregatorLayer(config) for _ in range(config.num_layers))
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.encoder = encoder
        self.frontend = None if encoder is None else LogMel(n_mels=encoder.config.n_mels,
                                                            window_seconds=encoder.config.window_seconds)  # fmt: skip
        self.encoder_fingerprint: tuple[float, ...] | None = None
        self._compiled = None  # the compiled step (generate(compile=True)) and the cache it keeps
        self._kept: tuple[tuple, DecodeCache] | None = None
        self._set_tables()
        whisper_init(self.embed_tokens)
        whisper_init(self.embed_positions)
        whisper_init(self.layers)

    def _set_tables(self, device=None) -> None:
        cfg = self.config
        ban = torch.zeros(cfg.vocab_size, device=device)
        ban[list(cfg.suppress_ids)] = -math.inf
        first = ban.clone()
        first[list(cfg.begin_suppress_ids)] = -math.inf
        self.register_buffer("logit_bias", ban, persistent=False)  # every step
        self.register_buffer("first_logit_bias", first, persistent=False)  # the first generated token
        self.register_buffer("prompt_ids", torch.tensor(cfg.prompt_ids, device=device), persistent=False)

    # ---- one step ----
    def new_cache(self, states: Tensor, positions: int, into: DecodeCache | None = None) -> DecodeCache:
        """The cross-attention keys and values of ``states (B, E, d_model)`` and an empty self-attention cache of
        ``positions`` positions, in the module's dtype; ``into``: a cache of these shapes to fill in place (its
        self-attention rows are left: a step writes a position before any step reads it)."""
        b, e, d = states.shape
        h, dh = self.config.num_heads, self.config.head_dim
        states = states.to(self.embed_tokens.weight.dtype)

        def heads(t: Tensor) -> Tensor:
            return t.view(b, e, h, dh).transpose(1, 2)  # (B, H, E, Dh)

        if into is not None:
            for i, layer in enumerate(self.layers):
                into.cross_k[i].copy_(heads(layer.encoder_attn.k_proj(states)))
                into.cross_v[i].copy_(heads(layer.encoder_attn.v_proj(states)))
            return into
        cache = DecodeCache([], [], [], [])
        for layer in self.layers:
            attn = layer.encoder_attn
            cache.cross_k.append(heads(attn.k_proj(states)))
            cache.cross_v.append(heads(attn.v_proj(states)))
            cache.self_k.append(states.new_zeros(b, h, positions, dh))
            cache.self_v.append(states.new_zeros(b, h, positions, dh))
        return cache

    def _static_cache(self, states: Tensor, positions: int) -> DecodeCache:
        """For the compiled step: one cache kept per transcriber and filled again while the shapes stay, so that its
        addresses stay (a CUDA graph recorded with them replays; new ones would record it again)."""
        key = (*states.shape, positions, self.embed_tokens.weight.dtype, states.device)
        if self._kept is not None and self._kept[0] == key:
            return self.new_cache(states, positions, into=self._kept[1])
        self._kept = None  # (the previous one freed first)
        cache = self.new_cache(states, positions)
        for t in (*cache.self_k, *cache.self_v, *cache.cross_k, *cache.cross_v):
            torch._dynamo.mark_static_address(t)
        self._kept = (key, cache)
        return cache

    def forward(self, tokens: Tensor, position: Tensor, cache: DecodeCache, logit_bias: Tensor | None = None):
        """One decoding step: ``tokens (B,)`` int64 at ``position`` (a 0-d int64 tensor, the same for every row)
        are written to ``cache``; returns the next token's float32 logits ``(B, vocab_size)`` plus
        ``logit_bias`` (None: no logits, a prompt step). Shapes do not depend on ``position``: compiled, one graph
        serves every step."""
        b, d = tokens.shape[0], self.config.d_model
        h, dh = self.config.num_heads, self.config.head_dim
        x = self.embed_tokens(tokens) + self.embed_positions(position).to(self.embed_tokens.weight.dtype)  # (B, d)
        at = position.view(1)
        visible = (torch.arange(cache.self_k[0].shape[2], device=tokens.device) <= position).view(1, -1)  # (1, P)

        def heads(t: Tensor) -> Tensor:
            return t.view(b, h, 1, dh)

        for i, layer in enumerate(self.layers):
            attn, hs = layer.self_attn, layer.self_attn_layer_norm(x)
            cache.self_k[i].index_copy_(2, at, heads(attn.k_proj(hs)))
            cache.self_v[i].index_copy_(2, at, heads(attn.v_proj(hs)))
            o = F.scaled_dot_product_attention(heads(attn.q_proj(hs)), cache.self_k[i], cache.self_v[i], visible)
            x = x + attn.out_proj(o.reshape(b, d))
            attn, hs = layer.encoder_attn, layer.encoder_attn_layer_norm(x)
            o = F.scaled_dot_product_attention(heads(attn.q_proj(hs)), cache.cross_k[i], cache.cross_v[i])
            x = x + attn.out_proj(o.reshape(b, d))
            x = layer.ffn(x)
        if logit_bias is None:
            return None
        return F.linear(self.layer_norm(x), self.embed_tokens.weight).float() + logit_bias  # (as HF: model dtype)

    # ---- decoding ----
    @torch.no_grad()
    def generate(
        self, states: Tensor, *, max_new_tokens: int | None = None, check_every: int = 8, compile: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Greedy transcripts of encoder states ``(B, E, d_model)``: ``(ids (B, T) int64, lengths (B,) int64)``,
        each row's tokens before ``<|endoftext|>`` (then padded with it); the prompt is not included.
        ``max_new_tokens``: at most this many tokens each (default: ``config.max_new_tokens``; at most
        ``max_positions`` less the prompt). ``compile``: the decoding step under ``torch.compile`` (made once per
        transcriber; on CUDA ``reduce-overhead``: each step replays a CUDA graph), one graph per batch size and
        length. The compiled step's cache stays with the transcriber between calls (its addresses are the graph's);
        :meth:`release_cache` frees it."""
        cfg = self.config
        weight = self.embed_tokens.weight
        if states.dim() != 3 or states.shape[-1] != cfg.d_model:
            raise ValueError(f"states must be (B, E, {cfg.d_model}) encoder states, got {tuple(states.shape)}")
        if states.device != weight.device:
            raise ValueError(f"states must be on the transcriber's device ({weight.device}), got {states.device}")
        check_positive_int(check_every, "check_every")
        room = cfg.max_positions - len(cfg.prompt_ids)
        if max_new_tokens is None:
            max_new_tokens = cfg.max_new_tokens or room
        check_positive_int(max_new_tokens, "max_new_tokens")
        if max_new_tokens > room:
            raise ValueError(f"max_new_tokens must be <= {room} (max_positions={cfg.max_positions} less the "
                             f"{len(cfg.prompt_ids)} prompt tokens), got {max_new_tokens}")  # fmt: skip
        b, dev = states.shape[0], states.device
        out = torch.full((b, max_new_tokens), cfg.eos_id, dtype=torch.long, device=dev)
        if b == 0:
            return out, out.new_zeros(0)
        prompt = len(cfg.prompt_ids)
        positions = prompt + max_new_tokens - 1  # (the last token is never fed)
        if compile:
            cache, step_fn = self._static_cache(states, positions), self._compiled_step(dev)
        else:
            cache, step_fn = self.new_cache(states, positions), self
        position = torch.zeros((), dtype=torch.long, device=dev)
        for t in range(prompt - 1):
            step_fn(self.prompt_ids[t].repeat(b), position, cache)
            position += 1
        token = self.prompt_ids[-1].repeat(b)  # (contiguous, as every later step's tokens: one graph)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        eos = torch.full_like(out[:, 0], cfg.eos_id)
        for step in range(max_new_tokens):
            logits = step_fn(token, position, cache, self.first_logit_bias if step == 0 else self.logit_bias)
            token = torch.where(done, eos, logits.argmax(-1))
            out[:, step] = token
            done |= token == cfg.eos_id
            position += 1
            if (step + 1) % check_every == 0 and bool(done.all()):  # (the only read-back: every few steps)
                break
        return out, (out != cfg.eos_id).sum(1)

    def release_cache(self) -> None:
        """Frees the cache that ``generate(compile=True)`` keeps between calls."""
        self._kept = None

    def _compiled_step(self, device: torch.device):
        if self._compiled is None:
            mode = "reduce-overhead" if device.type == "cuda" else None
            self._compiled = torch.compile(self.forward, fullgraph=True, dynamic=False, mode=mode)
        return self._compiled

    def decode(self, ids: Tensor, lengths: Tensor) -> list[str]:
        """Each row's first ``lengths`` ids as text: the BPE tokens only (special tokens and timestamps skipped),
        as transformers' Whisper tokenizer decodes with ``skip_special_tokens`` (and its space clean-up where the
        checkpoint's tokenizer has it on)."""
        from taste.text import whisper_encoding

        languages = {51866: 100, 51865: 99}.get(self.config.vocab_size)
        if languages is None:
            raise ValueError(f"no built-in Whisper tokenizer for a vocabulary of {self.config.vocab_size} ids "
                             "(the multilingual Whisper vocabularies have 51865 or 51866)")  # fmt: skip
        encoding = whisper_encoding(languages)
        texts = []
        for row, n in zip(ids.tolist(), lengths.tolist()):
            text = encoding.decode([t for t in row[:n] if t < WHISPER_EOS])
            if self.config.clean_up_spaces:
                for old, new in _CLEAN_UP:
                    text = text.replace(old, new)
            texts.append(text)
        return texts

    def transcribe_states(self, states: Tensor, *, batch_size: int = 16, **generate_kwargs) -> list[str]:
        """Transcripts of encoder states ``(B, E, d_model)``, ``batch_size`` rows at a time (the cross-attention
        cache holds 2 x layers x the states of a batch)."""
        check_positive_int(batch_size, "batch_size")
        texts = []
        for start in range(0, states.shape[0], batch_size):
            texts += self.decode(*self.generate(states[start : start + batch_size], **generate_kwargs))
        return texts

    @torch.no_grad()
    def transcribe(
        self, waveforms: Sequence[Tensor], sample_rate: int | Sequence[int] = 16000, *, batch_size: int = 16,
        **generate_kwargs,
    ) -> list[str]:  # fmt: skip
        """Transcripts of mono waveforms (any rate; at most the encoder's window) through the transcriber's own
        encoder (:meth:`from_whisper` with ``encoder=True``)."""
        if self.encoder is None:
            raise ValueError("this transcriber holds no encoder: load it with from_whisper(..., encoder=True), or "
                             "give encoder states to transcribe_states")  # fmt: skip
        check_positive_int(batch_size, "batch_size")
        device = self.embed_tokens.weight.device
        texts = []
        for start in range(0, len(waveforms), batch_size):
            rate = sample_rate if isinstance(sample_rate, int) else sample_rate[start : start + batch_size]
            audio, _ = batch_waveforms(waveforms[start : start + batch_size], rate,
                                       window_seconds=self.encoder.config.window_seconds)  # fmt: skip
            states, _ = self.encoder(self.frontend(audio.to(device)))
            texts += self.transcribe_states(states, batch_size=batch_size, **generate_kwargs)
        return texts

    # ---- checkpoints ----
    @classmethod
    def from_whisper(
        cls, local_dir: str, *, language: str = "en", encoder: bool = False, dtype=None, device=None
    ) -> WhisperTranscriber:
        """The decoder of a local Whisper checkpoint (transformers layout: ``config.json`` and safetensors or
        ``.bin`` weights, sharded or not), and with ``encoder`` its encoder too. The decoding rules come from its
        ``generation_config.json`` (else ``config.json``): ``suppress_tokens``, ``begin_suppress_tokens`` and the
        transcript's bound (``max_new_tokens``, or ``max_length`` counting the prompt; neither: transformers'
        default, 20); the text clean-up from
        ``tokenizer_config.json``'s ``clean_up_tokenization_spaces``. ``language``: the prompt's language token
        (English, as the official inference). float32 unless ``dtype``. Without ``encoder`` only the decoder's
        tensors and the three of the encoder's fingerprint are read."""
        from taste.official import read_official_tensors

        if not os.path.isdir(local_dir):
            raise FileNotFoundError(f"local_dir {local_dir!r} is not a directory (a local Whisper checkpoint)")
        c = _read_json(local_dir, "config.json", required=True)
        needed = ("vocab_size", "d_model", "decoder_attention_heads", "decoder_layers", "decoder_ffn_dim",
                  "max_target_positions", "encoder_layers")  # fmt: skip
        if [k for k in needed if k not in c]:
            raise ValueError(f"{local_dir!r}: its config.json lacks {[k for k in needed if k not in c]}: not a "
                             f"Whisper config (model_type {c.get('model_type')!r})")  # fmt: skip
        rules = _read_json(local_dir, "generation_config.json") or c
        prompt = whisper_prefix_ids(c["vocab_size"], language)
        config = TranscriberConfig(
            vocab_size=c["vocab_size"],
            d_model=c["d_model"],
            num_heads=c["decoder_attention_heads"],
            num_layers=c["decoder_layers"],
            ffn_dim=c["decoder_ffn_dim"],
            max_positions=c["max_target_positions"],
            prompt_ids=prompt,
            eos_id=rules.get("eos_token_id", c.get("eos_token_id", WHISPER_EOS)),
            suppress_ids=tuple(rules.get("suppress_tokens") or ()),
            begin_suppress_ids=tuple(rules.get("begin_suppress_tokens") or ()),
            max_new_tokens=_max_new_tokens(rules, c["max_target_positions"], len(prompt)),
            clean_up_spaces=bool((_read_json(local_dir, "tokenizer_config.json") or {}).get(
                "clean_up_tokenization_spaces", False)),
        )  # fmt: skip
        last = c["encoder_layers"] - 1  # (without encoder: only the decoder and the fingerprint's tensors are read)
        wanted = ("encoder.",) if encoder else tuple(f"encoder.{name}" for name in (
            "conv1.weight", f"layers.{last}.fc2.weight", "layer_norm.weight"))  # fmt: skip
        wanted = (*wanted, "decoder.")
        state = {k.removeprefix("model."): v for k, v in read_official_tensors(
            local_dir, (*wanted, *(f"model.{w}" for w in wanted))).items()}  # fmt: skip
        decoder = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
        enc_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        if not decoder:
            raise ValueError(f"{local_dir!r} holds no decoder.* or model.decoder.* tensors: not a Whisper checkpoint")
        speech = None
        if encoder:
            enc_config = EncoderConfig(
                n_mels=c["num_mel_bins"], window_seconds=c["max_source_positions"] / 50, d_model=c["d_model"],
                num_layers=c["encoder_layers"], num_heads=c["encoder_attention_heads"], ffn_dim=c["encoder_ffn_dim"],
                value_layer=0,
            )  # fmt: skip
            with torch.device("meta"):
                speech = SpeechEncoder(config=enc_config)
            _load(speech, enc_state, local_dir, "encoder")
        with torch.device("meta"):
            module = cls(config=config)
        _load(module, decoder, local_dir, "decoder")
        module.encoder = speech
        if speech is not None:
            module.frontend = LogMel(n_mels=speech.config.n_mels, window_seconds=speech.config.window_seconds)
        module._set_tables()
        if enc_state.get("conv1.weight") is not None:
            module.encoder_fingerprint = encoder_fingerprint(enc_state, last + 1)
        module.to(device=device, dtype=dtype or torch.float32)
        return module


def _max_new_tokens(rules: dict, max_positions: int, prompt: int) -> int:
    """A generation config's bound on the transcript as transformers 4.51 (the official code's) counts it:
    ``max_new_tokens``, else ``max_length`` less the prompt (the prompt counts in it), else its default
    ``max_length`` of 20 less the prompt; within ``max_positions`` less the prompt. (transformers 5 adds the
    prompt to ``max_length`` instead: the same 444 tokens at large-v3's 448, more below the decoder's limit.)"""
    if rules.get("max_new_tokens"):
        bound = int(rules["max_new_tokens"])
    else:
        bound = min(int(rules.get("max_length") or 20), max_positions) - prompt
    return max(1, min(bound, max_positions - prompt))


def _read_json(directory: str, name: str, required: bool = False) -> dict | None:
    from taste.checkpoint import parse_json

    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"{directory!r} has no {name}: not a transformers Whisper checkpoint")
        return None
    with open(path) as f:
        return parse_json(f.read(), path)


def _load(module: nn.Module, state: dict, where: str, part: str) -> None:
    state = {k: v for k, v in state.items() if v is not None}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{where!r}: the Whisper {part} lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    for k in own:
        if tuple(state[k].shape) != tuple(own[k].shape):
            raise ValueError(f"{where!r}: {part} tensor {k} is {tuple(state[k].shape)}, expected {tuple(own[k].shape)}")
    module.load_state_dict({k: state[k] for k in own}, strict=True, assign=True)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str], *, normalize: bool = True) -> dict:
    """Corpus word error rate of ``hypotheses`` against ``references`` (pairs in order): the fewest word
    substitutions, deletions and insertions that turn each reference into its hypothesis, summed over the corpus,
    over the references' words. ``normalize``: both sides through openai-whisper's ``EnglishTextNormalizer``
    (lower case, no punctuation, spelled-out numbers and currency in one form: how Whisper's papers count WER),
    else split on whitespace as they are. Where alignments tie, substitutions are counted first.

    Returns ``{"wer", "substitutions", "deletions", "insertions", "reference_words", "utterances"}``."""
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("references and hypotheses must be sequences of texts, not a str")
    if len(references) != len(hypotheses):
        raise ValueError(f"references and hypotheses must pair up, got {len(references)} and {len(hypotheses)}")
    clean = _english_normalizer() if normalize else (lambda text: text)
    totals = [0, 0, 0, 0]  # substitutions, deletions, insertions, reference words
    for ref, hyp in zip(references, hypotheses):
        r, h = clean(ref).split(), clean(hyp).split()
        s, d, i = _edit_counts(r, h)
        totals = [totals[0] + s, totals[1] + d, totals[2] + i, totals[3] + len(r)]
    s, d, i, n = totals
    wer = (s + d + i) / n if n else (0.0 if s + d + i == 0 else math.inf)
    return {"wer": wer, "substitutions": s, "deletions": d, "insertions": i, "reference_words": n,
            "utterances": len(references)}  # fmt: skip


def _english_normalizer():
    try:
        from whisper.normalizers import EnglishTextNormalizer
    except ImportError as e:
        raise ImportError(
            "normalize=True needs openai-whisper's EnglishTextNormalizer (pip install 'taste-kernels[speech]'); "
            "pass normalize=False to compare the words as they are"
        ) from e
    return EnglishTextNormalizer()


def _edit_counts(ref: Sequence[str], hyp: Sequence[str]) -> tuple[int, int, int]:
    """(substitutions, deletions, insertions) of a fewest-edits alignment of ``hyp`` to ``ref`` (Levenshtein over
    words; ties prefer a substitution, then a deletion)."""
    # row[j]: (edits, substitutions, deletions, insertions) turning ref[:i] into hyp[:j]
    row = [(j, 0, 0, j) for j in range(len(hyp) + 1)]
    for i in range(1, len(ref) + 1):
        new = [(i, 0, i, 0)]
        for j in range(1, len(hyp) + 1):
            diag = row[j - 1]
            if ref[i - 1] == hyp[j - 1]:
                best = diag
            else:
                best = (diag[0] + 1, diag[1] + 1, diag[2], diag[3])
            up, left = row[j], new[j - 1]
            if up[0] + 1 < best[0]:
                best = (up[0] + 1, up[1], up[2] + 1, up[3])
            if left[0] + 1 < best[0]:
                best = (left[0] + 1, left[1], left[2], left[3] + 1)
            new.append(best)
        row = new
    return row[-1][1:]
