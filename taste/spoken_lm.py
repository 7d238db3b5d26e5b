"""TASLM, the spoken language model of TASTE (spec section 2): a causal LM adapted with LoRA that reads and writes
text tokens and TASTE codes together, with a word-level delay.

Packed end to end: a batch is the concatenated Llama tokens of its utterances with ``cu_seqlens``, per-token word
ids and one code row per word. :func:`taste.ops.delay_layout` turns it into the input/label rows of spec 2.4 and
everything else is gathers; the backbone sees one packed row sequence whose position ids restart per utterance
(transformers then masks attention per utterance). Generation lives in :mod:`taste.generate`.

Weight names follow the official checkpoint under ``spoken_lm.`` (``fuse_for_bridge_in_llm``,
``extract_for_bridge_out_llm``, ``pad_text_unit_embed``, ``pad_audio_unit_embed``, ``language_model`` as peft
wraps it), so :meth:`TasteSpokenLM.load_official_state_dict` is a prefix strip.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taste import ops, reference
from taste._checks import check_at_least, check_field_types, check_id_range, check_positive_int
from taste.aggregator import _plain_linear
from taste.bridge import ClassifierHead, LatentHead, WeightedSumFusion, build_backbone
from taste.checkpoint import meta_tensors, read_model, save_model
from taste.rvq import ResidualVQ

HEADS = ("latent", "classifier")
SCORE_BLOCK_ELEMENTS = 1 << 26  # float32 logits of one block of text rows in TasteSpokenLM.score: 256 MB
OFFICIAL_PREFIX = "spoken_lm."


def _llama(**overrides) -> dict:
    base = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})  # fmt: skip
    return {**base, **overrides}


@dataclass(frozen=True)
class SpokenLMConfig:
    """TASLM shapes and choices.

    ``backbone`` holds LlamaConfig fields (a random backbone of that shape) unless ``backbone_path`` names a local
    transformers checkpoint directory. ``lora_r = 0`` trains the whole backbone instead of LoRA adapters (for tiny
    models learnt from scratch). ``head``: ``"latent"`` (the released TASLM_emb head ``continue_latent_linear_last``)
    or ``"classifier"`` (``linear_last``: 4 x K logits, TASLM_token). ``official_latent`` reproduces two quirks of the
    official latent head (spec 7.1): the training sample carries the gradient of mu + sigma, and inference uses
    z = mu + sigma instead of mu. ``text_kl_weight`` > 0 mixes KL(reference || model) into the text loss (spec 2.6),
    the reference being the backbone with its adapters disabled.
    """

    backbone: dict = field(default_factory=_llama)
    backbone_path: str | None = None
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    taste_dim: int = 1280  # width of a TASTE word embedding (the tokenizer's RVQ dim)
    codebook_dim: int = 256
    num_quantizers: int = 4
    codebook_size: int = 512
    head: str = "latent"
    official_latent: bool = False
    delay: int = 1
    bos_id: int = 128000
    eos_id: int = 128001
    text_weight: float = 0.5
    taste_weight: float = 0.5
    text_kl_weight: float = 0.0
    fusion_init: tuple = (-2.0, 2.0)  # mixing logits (audio, text): "zero audio" at the start
    llm_tokenizer: str = "llama3"

    def __post_init__(self):
        check_field_types(self)
        check_at_least(self, 1, "taste_dim", "codebook_dim", "num_quantizers", "codebook_size")
        check_at_least(self, 0, "text_weight", "taste_weight")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.delay < 1:
            raise ValueError(f"delay must be >= 1 (the code of a word is predicted after it ends), got {self.delay}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0, got {self.lora_r}")
        if not 0.0 <= self.text_kl_weight <= 1.0:
            raise ValueError(f"text_kl_weight must be in [0, 1], got {self.text_kl_weight}")
        if self.text_kl_weight > 0 and self.lora_r == 0:
            raise ValueError("text_kl_weight > 0 needs LoRA (lora_r > 0): the reference is the backbone without them")

    @classmethod
    def llama_3_2_1b(cls, **overrides) -> SpokenLMConfig:
        """The released TASLM: Llama-3.2-1B shapes, LoRA r 64 / alpha 128, latent head, TASTE 4 x 512 x 256."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> SpokenLMConfig:
        """A 2-layer, 64-wide Llama with the real Llama-3 vocabulary, matching ``TasteConfig.tiny()``'s RVQ."""
        backbone = _llama(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=2048, rope_scaling=None)  # fmt: skip
        base = dict(backbone=backbone, lora_r=8, lora_alpha=16, lora_dropout=0.0, taste_dim=128, codebook_dim=32,
                    num_quantizers=4, codebook_size=64)  # fmt: skip
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SpokenLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SpokenLMConfig fields {sorted(unknown)}")
        d = dict(d)
        if "fusion_init" in d:
            d["fusion_init"] = tuple(d["fusion_init"])
        return cls(**d)


@dataclass
class SpokenLMOutput:
    """Losses (float32 scalars) and teacher-forced accuracies of a packed batch."""

    loss: Tensor
    text_loss: Tensor
    taste_loss: Tensor
    text_accuracy: Tensor
    code_accuracy: Tensor  # (Q,) per RVQ layer
    taste_mse: Tensor  # between the 256-d code sums of the predicted and the target codes


@dataclass
class SpokenLMScores:
    """Teacher-forced log-likelihoods of a packed batch (:meth:`TasteSpokenLM.score`), float32 (float64 for a
    float64 model); natural logarithms."""

    text: Tensor  # (B,) per utterance: the sum of its tokens' log-probabilities
    taste: Tensor  # (B,) per utterance: the sum of its scored words' code log-likelihoods (0 without codes)
    token_logprob: Tensor  # (N,) log p(token | what comes before it)
    word_logprob: Tensor  # (W_total,) the log-likelihood of each word's codes; 0 for a row with a -1 code
    num_tokens: Tensor  # (B,) int64
    num_words: Tensor  # (B,) int64: the words whose codes were scored


def _token_log_probs(head: nn.Module, h: Tensor, tokens: Tensor, vocab: int, block_elements: int) -> Tensor:
    """``(N,)`` ``log_softmax(head(h))[i, tokens[i]]`` through ``head``'s own forward, a block of rows at a time (about
    ``block_elements`` logits of a ``vocab``-wide head)."""
    out = torch.empty(tokens.shape, dtype=reference._acc_dtype(h.dtype), device=h.device)
    rows = max(1, block_elements // max(1, vocab))
    for lo in range(0, tokens.shape[0], rows):
        logp = head(h[lo : lo + rows]).to(out.dtype).log_softmax(-1)  # (rows, V); (on the CPU, logsumexp: 6x slower)
        out[lo : lo + rows] = logp.gather(1, tokens[lo : lo + rows, None])[:, 0]
    return out


class TasteSpokenLM(nn.Module):
    """TASLM (spec 2): backbone (+ LoRA), input fusion, output head and the frozen RVQ codebooks of the tokenizer.

    Build with :meth:`from_tokenizer` (shares a trained tokenizer's RVQ) or directly from a config.
    """

    def __init__(self, *, config: SpokenLMConfig):
        super().__init__()
        self.config = config
        self.language_model = build_backbone(config)
        hidden = self.causal_lm.config.hidden_size
        self.fuse_for_bridge_in_llm = WeightedSumFusion(config.taste_dim, hidden, config.fusion_init)
        if config.head == "latent":
            self.extract_for_bridge_out_llm = LatentHead(hidden, config.codebook_dim)
        else:
            self.extract_for_bridge_out_llm = ClassifierHead(hidden, config.num_quantizers, config.codebook_size)
        self.pad_text_unit_embed = nn.Parameter(torch.zeros(hidden))
        self.pad_audio_unit_embed = nn.Parameter(torch.zeros(config.taste_dim))
        self.vq = ResidualVQ(dim=config.taste_dim, codebook_dim=config.codebook_dim,
                             num_quantizers=config.num_quantizers, codebook_size=config.codebook_size,
                             kmeans_init=False, quantize_dropout=False)  # fmt: skip
        self.vq.requires_grad_(False)
        if config.lora_r > 0:  # peft froze the backbone; the rest of this module trains
            for name, p in self.named_parameters():
                if name.startswith("language_model."):
                    p.requires_grad_("lora_" in name)
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else None

    # ---- parts ----
    @property
    def causal_lm(self) -> nn.Module:
        """The transformers CausalLM inside (LoRA layers, if any, sit in it)."""
        lm = self.language_model
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    @property
    def decoder(self) -> nn.Module:
        """The transformer body (embeddings to final norm) of the causal LM."""
        lm = self.causal_lm
        return lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model

    @property
    def embed_tokens(self) -> nn.Module:
        return self.causal_lm.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vq.eval()  # frozen codebooks: never an EMA update, never a commitment loss
        return self

    def run_backbone(self, embeds: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None, cache=None):
        """``(B, T, hidden)`` input embeddings -> last hidden states ``(B, T, hidden)``."""
        kw = {}
        if cache is not None:
            kw[self._cache_kwarg or "past_key_values"] = cache
            kw["use_cache"] = True
        else:
            kw["use_cache"] = False
        out = self.decoder(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, **kw)
        return out.last_hidden_state

    def word_audio(self, codes: Tensor) -> Tensor:
        """``(W, Q)`` codes -> ``(W, taste_dim)`` TASTE word embeddings (``get_output_from_indices``)."""
        return self.vq.get_output_from_indices(codes)

    def fuse(self, text: Tensor, audio: Tensor) -> Tensor:
        return self.fuse_for_bridge_in_llm(text, audio)

    def latent(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, hidden)`` -> the point estimate z used for the codes at inference, and mu."""
        mu, logvar = self.extract_for_bridge_out_llm(h)
        z = mu + (0.5 * logvar).exp() if self.config.official_latent else mu
        return z, mu

    def predict_codes(self, h: Tensor, top_p: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """``(R, hidden)`` -> ``(R, Q)`` codes: RVQ search on z (latent head) or per-layer argmax / top-p."""
        if self.config.head == "latent":
            return self.vq.get_indices_from_code(self.latent(h)[0])
        logits = self.extract_for_bridge_out_llm(h)  # (R, Q, K)
        if top_p <= 0:
            return logits.argmax(-1)
        from taste.generate import top_p_filter

        flat = top_p_filter(logits.flatten(0, 1), top_p)
        return torch.multinomial(flat.softmax(-1), 1, generator=generator).view(logits.shape[:2])

    # ---- layout ----
    def embed_layout(self, tokens: Tensor, layout: ops.DelayLayout, audio: Tensor | None) -> Tensor:
        """The fused input rows ``(M, hidden)`` of a layout: BOS rows plain, other rows fuse(text, audio)."""
        embed = self.embed_tokens
        ext = torch.cat([tokens, tokens.new_full((1,), self.config.bos_id)])  # index N = BOS
        ids = ext[torch.where(layout.input_token >= 0, layout.input_token, tokens.shape[0])]
        text = embed(ids)  # (M, hidden)
        text = torch.where((layout.input_token == -2)[:, None], self.pad_text_unit_embed.to(text.dtype), text)
        pad_audio = self.pad_audio_unit_embed
        if audio is None or audio.shape[0] == 0:
            a = pad_audio.expand(layout.input_word.shape[0], -1)
        else:
            a = torch.where((layout.input_word >= 0)[:, None], audio[layout.input_word.clamp(min=0)], pad_audio)
        fused = self.fuse(text, a)
        return torch.where((layout.input_token == -1)[:, None], text, fused)

    @staticmethod
    def layout_positions(layout: ops.DelayLayout) -> Tensor:
        """``(M,)`` position of every row inside its sequence."""
        out_len = layout.cu_seqlens.diff().long()
        m = layout.input_token.shape[0]
        seq = torch.repeat_interleave(torch.arange(out_len.numel(), device=out_len.device), out_len, output_size=m)
        return torch.arange(m, device=out_len.device) - layout.cu_seqlens.long()[seq]

    def hidden_states(self, tokens, cu_seqlens, word_ids, codes) -> tuple[Tensor, ops.DelayLayout]:
        """The backbone's last hidden state on every layout row ``(M, hidden)``, and the layout."""
        layout = ops.delay_layout(word_ids, cu_seqlens, self.config.delay)
        audio = self.word_audio(codes) if codes is not None else None
        x = self.embed_layout(tokens, layout, audio)  # (M, hidden)
        return self.run_backbone(x[None], self.layout_positions(layout)[None])[0], layout

    def forward(self, tokens: Tensor, cu_seqlens: Tensor, word_ids: Tensor, codes: Tensor | None) -> SpokenLMOutput:
        """Teacher-forced losses of a packed batch (spec 2.4-2.6).

        Args:
            tokens: ``(N,)`` int64 Llama ids of all utterances, concatenated (no BOS).
            cu_seqlens: ``(B + 1,)`` int32 token offsets; every utterance has at least one token.
            word_ids: ``(N,)`` int32 word of each token, 0-based within its utterance.
            codes: ``(W_total, Q)`` int64 TASTE codes, one row per word in order, or None (text only).
        """
        self._check_batch(tokens, cu_seqlens, word_ids, codes)
        h, layout = self.hidden_states(tokens, cu_seqlens, word_ids, codes)
        seq, text_rows = self._text_rows(tokens, cu_seqlens)
        kl = self.config.text_kl_weight
        ref_h = self._reference_states(tokens, cu_seqlens, seq) if kl > 0 else None
        head = self.lm_head
        if _plain_linear(head) and head.bias is None:  # (N, V) logits a block of rows at a time, never all at once
            text_loss, text_accuracy = ops.linear_cross_entropy(h[text_rows], head.weight, tokens, ref_h=ref_h,
                                                                kl_weight=kl)  # fmt: skip
        else:  # a head with a bias, a hook or a wrapper: its own forward, on every row at once
            text_loss, text_accuracy = self._text_loss_unfused(head, h[text_rows], tokens, ref_h, kl)

        zero = text_loss.new_zeros(())
        q = self.config.num_quantizers
        if codes is None:
            taste_loss, code_acc, mse = zero, text_loss.new_zeros(q), zero
        else:
            taste_loss, pred = self._taste_loss(h[self._taste_rows(layout, codes.shape[0])], codes)
            valid = (codes >= 0).all(-1)
            code_acc = ((pred == codes) & valid[:, None]).float().sum(0) / valid.sum().clamp(min=1)
            mse = (self.vq.get_code_from_indices(pred) - self.vq.get_code_from_indices(codes)).pow(2).mean()
        loss = self.config.text_weight * text_loss + self.config.taste_weight * taste_loss
        return SpokenLMOutput(loss, text_loss.detach(), taste_loss.detach(), text_accuracy, code_acc, mse)

    def _text_rows(self, tokens: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
        """``(N,)`` the utterance of every token, and ``(N,)`` the layout row whose label is that token."""
        n, b = tokens.shape[0], cu_seqlens.shape[0] - 1
        seq = torch.repeat_interleave(torch.arange(b, device=tokens.device), cu_seqlens.diff().long(), output_size=n)
        return seq, torch.arange(n, device=tokens.device) + seq * (self.config.delay + 1)

    @staticmethod
    def _taste_rows(layout: ops.DelayLayout, num_words: int) -> Tensor:
        """``(W,)``: row ``i`` of the layout predicts word ``i``'s codes (its TASTE label)."""
        key = torch.where(layout.label_word >= 0, layout.label_word, layout.label_word.numel() + num_words)
        return torch.argsort(key, stable=True)[:num_words]

    @torch.no_grad()
    def score(self, tokens: Tensor, cu_seqlens: Tensor, word_ids: Tensor, codes: Tensor | None = None, *,
              block_elements: int = SCORE_BLOCK_ELEMENTS) -> SpokenLMScores:  # fmt: skip
        """Teacher-forced log-likelihoods of a packed batch, per token, per word and per utterance: what
        likelihood-based evaluations (spoken StoryCloze, SALMON: which of two recordings the model prefers) compare.
        One pass of the backbone over the whole batch; the text's ``(N, V)`` logits are made a block of rows at a
        time, never all at once. No gradient.

        The text term of a token is ``log p(token | the tokens and word codes before it)``, at the row that predicts
        it in training (spec 2.4). The TASTE term of a word is the log-likelihood of its code row at the row that
        predicts it: for the classifier head, the sum over the Q layers of the code's log-softmax; for the latent
        head, the log-density of the word's code sum ``y`` (``codebook_dim``-dimensional) under ``N(mu, diag
        exp(b_logvar))``, the distribution the head is trained as (a density: it can be positive, and it is not
        comparable with the text's probabilities, so the two are kept apart).

        The model runs in its current mode: call ``.eval()`` first for scores free of (LoRA) dropout.

        Args: as :meth:`forward`; ``codes`` None scores the text alone, every word's audio the padding embedding.
            A word whose code row holds a -1 is not scored (it counts in neither ``taste`` nor ``num_words``).
            block_elements: about how many float32 logits one block of text rows holds (the default: 256 MB, 523
                rows of Llama-3's vocabulary; on 2 CPU cores smaller blocks were slower than the whole logits at
                once, 1.5x at 130 rows and 1.16x at 260, the same at 520: each block's product reads the whole
                output layer).

        Returns:
            :class:`SpokenLMScores`.
        """
        self._check_batch(tokens, cu_seqlens, word_ids, codes)
        check_positive_int(block_elements, "block_elements")
        h, layout = self.hidden_states(tokens, cu_seqlens, word_ids, codes)
        _, text_rows = self._text_rows(tokens, cu_seqlens)
        vocab = self.causal_lm.config.vocab_size
        token_logprob = _token_log_probs(self.lm_head, h[text_rows], tokens, vocab, block_elements)
        num_tokens = cu_seqlens.diff().long()
        text = ops.segment_sum(token_logprob, cu_seqlens)
        if codes is None:
            none = torch.zeros_like(num_tokens)
            return SpokenLMScores(text, torch.zeros_like(text), token_logprob, text.new_zeros(0), num_tokens, none)
        word_logprob, valid = self._code_log_likelihood(h[self._taste_rows(layout, codes.shape[0])], codes)
        words = word_ids[cu_seqlens[1:].long() - 1].to(torch.int32) + 1  # (every utterance has a token: checked)
        cu_words = torch.cat([words.new_zeros(1), words.cumsum(0, dtype=torch.int32)])
        taste = ops.segment_sum(word_logprob, cu_words)
        num_words = ops.segment_sum(valid.to(word_logprob.dtype), cu_words).round().long()
        return SpokenLMScores(text, taste, token_logprob, word_logprob, num_tokens, num_words)

    def _code_log_likelihood(self, h: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        """``(W,)`` the log-likelihood of each word's codes at its rows ``h (W, hidden)`` (0 where a code is -1), and
        ``(W,)`` which words were scored."""
        valid = (codes >= 0).all(-1)
        target = codes.clamp(min=0)
        head = self.extract_for_bridge_out_llm
        if self.config.head == "classifier":
            logp = head(h).float().log_softmax(-1)  # (W, Q, K)
            ll = logp.gather(-1, target[..., None])[..., 0].sum(-1)
        else:
            mu, logvar = head(h)
            mu, logvar = mu.float(), logvar.float()
            y = self.vq.get_code_from_indices(target).to(mu.dtype)
            ll = -0.5 * ((y - mu).pow(2) * (-logvar).exp() + logvar + math.log(2 * math.pi)).sum(-1)
        return torch.where(valid, ll, 0.0), valid

    def _taste_loss(self, h: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        """The head's loss on the rows ``h (W, hidden)`` that predict ``codes (W, Q)``, and its predicted codes."""
        head = self.extract_for_bridge_out_llm
        if self.config.head == "classifier":
            return head.loss(h, codes)
        loss = head.loss(h, self.vq.get_code_from_indices(codes.clamp(min=0)), (codes >= 0).all(-1),
                         official=self.config.official_latent)  # fmt: skip
        with torch.no_grad():
            pred = self.vq.get_indices_from_code(self.latent(h)[0])
        return loss, pred

    def _reference_states(self, tokens: Tensor, cu_seqlens: Tensor, seq: Tensor) -> Tensor:
        """``(N, hidden)``: the reference model's states at the row before each token (the KL's target, spec 2.6):
        the same backbone with its adapters disabled, reading the plain tokens after a BOS, without gradient."""
        n, b = tokens.shape[0], cu_seqlens.shape[0] - 1
        dev = tokens.device
        starts = cu_seqlens.long()[:-1] + torch.arange(b, device=dev)  # BOS rows of the reference input
        ids = torch.full((n + b,), self.config.bos_id, dtype=torch.long, device=dev)
        tok_rows = torch.arange(n, device=dev) + seq + 1
        ids[tok_rows] = tokens
        pos = torch.arange(n + b, device=dev) - starts[torch.repeat_interleave(torch.arange(b, device=dev),
                                                                               cu_seqlens.diff().long() + 1,
                                                                               output_size=n + b)]  # fmt: skip
        with torch.no_grad(), self.language_model.disable_adapter():
            return self.run_backbone(self.embed_tokens(ids)[None], pos[None])[0][tok_rows - 1]

    @staticmethod
    def _text_loss_unfused(head: nn.Module, h: Tensor, tokens: Tensor, ref_h: Tensor | None, kl: float):
        """What :func:`taste.ops.linear_cross_entropy` computes, through ``head``'s own forward on all rows."""
        logits = head(h).float()  # (N, V)
        loss = F.cross_entropy(logits, tokens)
        if kl > 0:
            with torch.no_grad():
                ref = head(ref_h).float().log_softmax(-1)
            loss = kl * F.kl_div(logits.log_softmax(-1), ref, log_target=True, reduction="batchmean") + (1 - kl) * loss
        return loss, (logits.argmax(-1) == tokens).float().mean()

    def _check_batch(self, tokens, cu_seqlens, word_ids, codes, *, allow_empty: bool = False) -> None:
        """Clear errors for malformed packed batches; value checks only where they cost no device sync (CPU)."""
        if tokens.dim() != 1 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be a (N,) int64 tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be a (B+1,) int32 tensor with B >= 1 sequences, got {cu_seqlens.dtype} "
                f"{tuple(cu_seqlens.shape)}"
            )
        if word_ids.shape != tokens.shape:
            raise ValueError(f"word_ids must have tokens' shape {tuple(tokens.shape)}, got {tuple(word_ids.shape)}")
        if codes is not None and (codes.dim() != 2 or codes.shape[1] != self.config.num_quantizers):
            raise ValueError(f"codes must be (W_total, {self.config.num_quantizers}) int64, got {tuple(codes.shape)}")
        if tokens.device.type != "cpu" or torch.compiler.is_compiling():
            return
        lengths = cu_seqlens.diff()
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != tokens.numel() or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to N={tokens.numel()}, got {cu_seqlens.tolist()}")
        if not allow_empty and bool((lengths < 1).any()):
            raise ValueError("every utterance needs at least one token (cu_seqlens must be strictly increasing)")
        check_id_range(tokens, self.causal_lm.config.vocab_size, "tokens")
        if codes is not None:
            last = word_ids[(cu_seqlens[1:].long() - 1).clamp(min=0)].long() + 1 if tokens.numel() else lengths
            words = int(torch.where(lengths > 0, last, 0).sum())
            if words != codes.shape[0]:
                raise ValueError(f"codes has {codes.shape[0]} rows but the batch has {words} words")

    def generate(self, tokens=None, cu_seqlens=None, word_ids=None, codes=None, *, num_sequences=None,
                 config=None, generator=None, use_cache=True, compile=False):  # fmt: skip
        """Batched continuation of packed prompts (spec 2.7), see :mod:`taste.generate`.

        Args:
            tokens, cu_seqlens, word_ids: the prompts' Llama ids ``(N,)`` int64, ``(B + 1,)`` int32 offsets and
                ``(N,)`` int32 word ids; None for the zero prompt (then ``num_sequences`` sequences from BOS).
            codes: ``(W_total, Q)`` codes of the prompt words (speech prompt), or None (text prompt).
            config: a :class:`taste.generate.GenerationConfig`.
            generator: torch.Generator for sampling.
            use_cache: False re-runs the whole sequence every step (the reference algorithm).
            compile: run the one-row backbone step under torch.compile (``reduce-overhead``, CUDA graphs, on CUDA)
                and the step's state machine and code heads as one more compiled function.

        Returns:
            :class:`taste.generate.GenerationOutput`.
        """
        from taste.generate import GenerationConfig, generate

        return generate(self, tokens, cu_seqlens, word_ids, codes, num_sequences=num_sequences,
                        config=config or GenerationConfig(), generator=generator, use_cache=use_cache,
                        compile=compile)  # fmt: skip

    # ---- checkpoints ----
    def save_pretrained(self, directory: str, *, full: bool | None = None) -> None:
        """``config.json`` + ``model.safetensors``. Adapter, bridges, heads and RVQ only (``full=False``) when the
        backbone comes from ``backbone_path``; everything otherwise (a random backbone cannot be rebuilt)."""
        if full is None:
            full = self.config.backbone_path is None
        keep = None
        if not full:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            keep = trainable | {k for k in self.state_dict() if k.startswith("vq.")}
        save_model(directory, {**self.config.to_dict(), "saved_full": full}, self, keep=keep)

    @classmethod
    def from_pretrained(cls, directory: str, *, device=None) -> TasteSpokenLM:
        """A :meth:`save_pretrained` directory, or a ``taste train-lm`` out_dir (its ``final/``)."""
        if os.path.isdir(os.path.join(directory, "final")):
            directory = os.path.join(directory, "final")
        raw, state = read_model(directory, "TasteSpokenLM")
        full = raw.pop("saved_full", True)
        config = SpokenLMConfig.from_dict(raw)
        if full and config.backbone_path is None:
            # Every weight is in the file: built on the meta device and given the file's tensors, not initialised
            # at random first (16 s for the Llama-3.2-1B shapes on 2 cores). A tied lm_head, saved once under the
            # embedding's name, is tied again.
            with torch.device("meta"):
                model = cls(config=config)
            result = model.load_state_dict(state, strict=False, assign=True)
            if result.unexpected_keys:
                raise ValueError(f"{directory}: weights this model does not have: {result.unexpected_keys[:5]}")
            model._materialise(f"{directory}: weights missing from the checkpoint")
            return model.to(device)
        model = cls(config=config)
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{directory}: weights this model does not have: {result.unexpected_keys[:5]}")
        own = model.state_dict()
        loaded = {(v.untyped_storage().data_ptr(), tuple(v.shape)) for k, v in own.items() if k in state}
        missing = [k for k in result.missing_keys if (own[k].untyped_storage().data_ptr(), tuple(own[k].shape))
                   not in loaded]  # fmt: skip
        if full and missing:
            raise ValueError(f"{directory}: weights missing from the checkpoint: {missing[:5]}")
        return model.to(device)

    @classmethod
    def from_tokenizer(cls, tokenizer, config: SpokenLMConfig | None = None, **overrides) -> TasteSpokenLM:
        """A TASLM whose RVQ is ``tokenizer``'s (a :class:`taste.TasteTokenizer`); shapes taken from it."""
        vq = tokenizer.quantizer
        out = vq.project_out
        taste_dim = out.out_features if isinstance(out, nn.Linear) else vq.codebook_dim
        dims = dict(taste_dim=taste_dim, codebook_dim=vq.codebook_dim,
                    num_quantizers=vq.num_quantizers, codebook_size=vq.codebook_size)  # fmt: skip
        config = dataclasses.replace(config or SpokenLMConfig(), **dims, **overrides)
        model = cls(config=config)
        model.vq.load_state_dict(vq.state_dict())
        return model

    def merge_lora(self) -> TasteSpokenLM:
        """Folds the LoRA adapters into the backbone weights (for deployment); afterwards ``lora_r`` is 0."""
        if self.config.lora_r == 0:
            return self
        self.language_model = self.language_model.merge_and_unload()
        self.config = dataclasses.replace(self.config, lora_r=0, text_kl_weight=0.0)
        return self

    def load_official_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Loads the spoken LM of an official checkpoint (keys under ``spoken_lm.``; the RVQ under
        ``audio_tower.vq.rvq.`` through ResidualVQ's official mapping). A separate ``lm_head.weight`` is accepted
        and, for a tied backbone, replaced by the embedding it is tied to. ``assign``: take the given tensors instead
        of copying into the model's (for a model built on the meta device; the tie is then made again)."""
        own = {k[len(OFFICIAL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(OFFICIAL_PREFIX)}
        if self.causal_lm.config.tie_word_embeddings:  # the tied alias follows the embedding
            embed = [k for k in own if k.endswith("model.embed_tokens.weight")]
            for k in [k for k in self.state_dict() if k.endswith("lm_head.weight")]:
                if embed:
                    own[k] = own[embed[0]]
        from taste.rvq import OFFICIAL_PREFIX as RVQ_PREFIX

        if any(k.startswith(RVQ_PREFIX) for k in state_dict):
            self.vq.load_official_state_dict(state_dict, strict=strict, assign=assign)
        own.update({f"vq.{k}": v for k, v in self.vq.state_dict().items()})
        result = self.load_state_dict(own, strict=strict, assign=assign)
        if assign and self.causal_lm.config.tie_word_embeddings:
            self.causal_lm.tie_weights()  # assign gave lm_head and the embedding Parameters of their own
        return result

    def _materialise(self, missing: str) -> None:
        """After an ``assign`` load into a model built on the meta device: ties a tied lm_head to the embedding
        again, rebuilds the rotary tables on the CPU (buffers no checkpoint holds), and raises ``ValueError``
        (``missing``: what, naming the tensors) if anything is still on the meta device."""
        if self.causal_lm.config.tie_word_embeddings:
            self.causal_lm.tie_weights()
        self._rebuild_rotary_tables()
        left = meta_tensors(self)
        if left:
            raise ValueError(f"{missing}: {left[:5]}")

    def _rebuild_rotary_tables(self) -> None:
        """Replaces each rotary embedding whose tables are on the meta device by a fresh one built on the CPU."""
        config = self.causal_lm.config
        for name, module in list(self.named_modules()):
            if hasattr(module, "inv_freq") and any(b.is_meta for b in module.buffers(recurse=False)):
                parent, _, leaf = name.rpartition(".")
                with torch.device("cpu"):
                    setattr(self.get_submodule(parent) if parent else self, leaf, type(module)(config=config))
