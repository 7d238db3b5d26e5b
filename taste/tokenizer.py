"""The TASTE tokenizer (spec sections 1.1-1.6): speech + transcript in, one residual-VQ code row per word out.

Pipeline: batched Whisper log-mel (:mod:`taste.audio`) -> the speech encoder (:mod:`taste.encoder`: keys from
its final LayerNorm, values from layer ``value_layer``) -> the text-query aggregator over the transcript's
Whisper tokens -> the subword-to-word mean (``segment_mean``) -> the residual VQ on one row per word. The
official code quantises every subword after broadcasting the word mean; the rows of one word are identical
there, so pooling first gives the same codes with one VQ row per word.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from taste import ops
from taste._checks import check_field_types
from taste.aggregator import WHISPER_PREFIX_IDS, AggregatorConfig, TextQueryAggregator
from taste.asr import WhisperTranscriber, encoder_fingerprint, same_encoder
from taste.audio import LogMel, batch_waveforms
from taste.checkpoint import read_model, save_model
from taste.encoder import EncoderConfig, SpeechEncoder
from taste.rvq import ResidualVQ
from taste.text import DualTokenizer, TextBatch, WordTokenizer, token_pieces


@dataclass(frozen=True)
class QuantizerConfig:
    """:class:`taste.ResidualVQ` settings (spec 1.6); ``dim`` is the aggregator's d_model."""

    num_quantizers: int = 4
    codebook_size: int = 512
    codebook_dim: int = 256
    decay: float = 0.99
    eps: float = 1e-5
    kmeans_init: bool = True
    kmeans_iters: int = 100
    quantize_dropout: bool = True
    threshold_ema_dead_code: float = 0.0

    def __post_init__(self):
        check_field_types(self)  # (the values: taste.ResidualVQ's constructor)


@dataclass(frozen=True)
class TasteConfig:
    encoder: EncoderConfig = EncoderConfig()
    aggregator: AggregatorConfig = AggregatorConfig()
    quantizer: QuantizerConfig = QuantizerConfig()
    freeze_encoder: bool = True  # the official recipe never trains the Whisper encoder
    asr_tokenizer: str = "whisper"  # see taste.text: "whisper", "llama3" or a tokenizer directory
    llm_tokenizer: str = "llama3"

    def __post_init__(self):
        check_field_types(self)

    @classmethod
    def official(cls, **overrides) -> TasteConfig:
        """distil-large-v3 shapes: 32 x 1280 encoder (values after 6 layers), 2-layer aggregator, RVQ 4 x 512 x 256."""
        return replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> TasteConfig:
        """A small model for CPUs and from-scratch training: 80 mels over a 10 s window, width 128, real Whisper
        token ids (so it reads real transcripts), RVQ 4 x 64 x 32; the encoder is trainable; Whisper's random
        initialisation and no identity v_proj."""
        base = cls(
            encoder=EncoderConfig(
                n_mels=80, window_seconds=10.0, d_model=128, num_layers=4, num_heads=4, ffn_dim=512, value_layer=2
            ),
            # identity_v_proj is the official seed's choice for a pretrained Whisper; from scratch, the raw value
            # states would add one large constant to every query and drown the token embeddings
            aggregator=AggregatorConfig(
                d_model=128, num_heads=4, num_layers=2, ffn_dim=512, max_positions=448, identity_v_proj=False
            ),
            quantizer=QuantizerConfig(codebook_size=64, codebook_dim=32, kmeans_iters=20),
            freeze_encoder=False,
        )
        return replace(base, **overrides)

    def with_asr_tokenizer(self, name: str) -> TasteConfig:
        """This config with its queries tokenised by ``name``. For a tokenizer other than ``"whisper"`` the
        aggregator embeds that tokenizer's whole vocabulary with the prefix tokens after it, the layout that
        :meth:`TextQueryAggregator.remap_vocabulary` gives a Whisper-seeded model: for a model learnt from its
        random initialisation (``TasteTokenizer.from_whisper(..., asr_tokenizer=name)`` seeds one)."""
        if name == "whisper":
            return replace(self, asr_tokenizer=name)
        size, prefix = WordTokenizer(name).vocab_size, len(self.aggregator.prefix_ids)
        aggregator = replace(self.aggregator, vocab_size=size + prefix, prefix_ids=tuple(range(size, size + prefix)))
        return replace(self, aggregator=aggregator, asr_tokenizer=name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TasteConfig:
        agg = dict(d["aggregator"])
        agg["prefix_ids"] = tuple(agg.get("prefix_ids", WHISPER_PREFIX_IDS))
        rest = {k: v for k, v in d.items() if k not in ("encoder", "aggregator", "quantizer")}
        return cls(
            encoder=EncoderConfig(**d["encoder"]),
            aggregator=AggregatorConfig(**agg),
            quantizer=QuantizerConfig(**d["quantizer"]),
            **rest,
        )


@dataclass
class TokenizerOutput:
    """word_codes ``(W_total, Q)`` int64 (-1: stage not used); word_cu_seqlens ``(B + 1,)`` int32 words per
    utterance; word_embeddings ``(W_total, d_model)``: the quantised TASTE embeddings (straight-through in
    training; the pooled aggregator output when ``quantize=False``); commit_loss () float32."""

    word_codes: Tensor
    word_cu_seqlens: Tensor
    word_embeddings: Tensor
    commit_loss: Tensor


class TasteTokenizer(nn.Module):
    """Speech + transcript -> TASTE codes and embeddings, packed batches, no per-sample loops.

    ``encoder`` / ``aggregator``: modules of ``config.encoder`` / ``config.aggregator`` to hold (e.g. made from a
    Whisper checkpoint) instead of new random ones."""

    def __init__(
        self,
        *,
        config: TasteConfig,
        encoder: SpeechEncoder | None = None,
        aggregator: TextQueryAggregator | None = None,
    ):
        super().__init__()
        enc, agg, q = config.encoder, config.aggregator, config.quantizer
        if enc.d_model != agg.d_model:
            raise ValueError(f"encoder.d_model ({enc.d_model}) must equal aggregator.d_model ({agg.d_model})")
        for name, module, want in (("encoder", encoder, enc), ("aggregator", aggregator, agg)):
            if module is not None and module.config != want:
                raise ValueError(f"{name}'s config differs from config.{name}: {module.config} against {want}")
        self.config = config
        self.frontend = LogMel(n_mels=enc.n_mels, window_seconds=enc.window_seconds)
        self.encoder = SpeechEncoder(config=enc) if encoder is None else encoder
        self.aggregator = TextQueryAggregator(config=agg) if aggregator is None else aggregator
        self.quantizer = ResidualVQ(dim=agg.d_model, **dataclasses.asdict(q))
        if config.freeze_encoder:
            self.encoder.requires_grad_(False)
        self._text: DualTokenizer | None = None

    # ---- the model ----
    def encode_speech(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        """``mel (B, n_mels, frames)`` -> ``(h_key, h_val)`` ``(B, frames / 2, d_model)``; no graph when frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoder):
            return self.encoder(mel)

    def embed_words(
        self, h_key: Tensor, h_val: Tensor, asr_tokens: Tensor, asr_cu_seqlens: Tensor, max_seqlen: int,
        word_offsets: Tensor,
    ) -> Tensor:  # fmt: skip
        """Aggregator + word mean: ``(W_total, d_model)`` continuous word embeddings (before the VQ). No host sync;
        runs under ``torch.compile(fullgraph=True)``."""
        per_token = self.aggregator(asr_tokens, asr_cu_seqlens, max_seqlen, h_key, h_val)  # (N, d)
        return ops.segment_mean(per_token, word_offsets)  # (W_total, d)

    def forward(
        self,
        mel: Tensor,
        asr_tokens: Tensor,
        asr_cu_seqlens: Tensor,
        asr_word_ids: Tensor,
        *,
        max_seqlen: int | None = None,
        word_offsets: Tensor | None = None,
        quantize: bool = True,
    ) -> TokenizerOutput:
        """Tokenises a batch.

        Args:
            mel: ``(B, n_mels, frames)`` float log-mel (:class:`taste.audio.LogMel`).
            asr_tokens: ``(N,)`` int64 packed Whisper token ids of the transcripts (no special tokens).
            asr_cu_seqlens: ``(B + 1,)`` int32; every utterance has at least one token.
            asr_word_ids: ``(N,)`` int32/int64 word index of each token, 0-based within its utterance.
            max_seqlen: host int, the longest utterance in tokens; read back from ``asr_cu_seqlens`` if None.
            word_offsets: ``(W_total + 1,)`` int32 (:class:`taste.text.PackedText` has it); computed if None.
                Passing both keeps the forward free of host syncs.
            quantize: False skips the VQ (training stage 1-2): codes are all -1, embeddings the pooled vectors.
        """
        self.encoder.check_mel(mel)  # (first: the batch size below comes from it)
        if mel.shape[0] + 1 != asr_cu_seqlens.shape[0]:
            raise ValueError(
                f"asr_cu_seqlens must have B + 1 = {mel.shape[0] + 1} entries (B from mel), "
                f"got {asr_cu_seqlens.shape[0]}"
            )
        if asr_tokens.shape != asr_word_ids.shape:
            raise ValueError(
                f"asr_word_ids {tuple(asr_word_ids.shape)} must match asr_tokens {tuple(asr_tokens.shape)}"
            )
        if max_seqlen is None:
            max_seqlen = int(asr_cu_seqlens.diff().max())
        if word_offsets is None:
            word_offsets = ops.word_offsets(asr_word_ids, asr_cu_seqlens)
        h_key, h_val = self.encode_speech(mel)
        return self.forward_states(h_key, h_val, asr_tokens, asr_cu_seqlens, asr_word_ids, max_seqlen, word_offsets,
                                   quantize=quantize)  # fmt: skip

    def forward_states(
        self, h_key: Tensor, h_val: Tensor, asr_tokens: Tensor, asr_cu_seqlens: Tensor, asr_word_ids: Tensor,
        max_seqlen: int, word_offsets: Tensor, *, quantize: bool = True,
    ) -> TokenizerOutput:  # fmt: skip
        """:meth:`forward` after the speech encoder: from its states ``(h_key, h_val)`` (:meth:`encode_speech`)."""
        words = self.embed_words(h_key, h_val, asr_tokens, asr_cu_seqlens, max_seqlen, word_offsets)
        counts = asr_word_ids[asr_cu_seqlens[1:].long() - 1].to(torch.int32) + 1  # (B,) words per utterance
        word_cu = torch.cat([counts.new_zeros(1), counts.cumsum(0, dtype=torch.int32)])
        if not quantize:
            codes = torch.full((words.shape[0], self.quantizer.num_quantizers), -1, device=words.device)
            return TokenizerOutput(codes, word_cu, words, words.new_zeros((), dtype=torch.float32))
        quantized, codes, commit = self.quantizer(words)  # in its own precision: float32 (spec 7.3) unless cast
        return TokenizerOutput(codes, word_cu, quantized.to(words.dtype), commit)

    def embeddings_from_codes(self, codes: Tensor | list[list[int]]) -> Tensor:
        """``(W, Q)`` int64 codes (-1 = stage not used; a tensor, or the nested lists ``taste encode`` writes) ->
        ``(W, d_model)`` TASTE embeddings on the model's device."""
        if not isinstance(codes, Tensor):
            codes = torch.as_tensor(codes, dtype=torch.long)
        codes = codes.to(self.quantizer.embed.device)
        if codes.dim() != 2 or codes.shape[1] != self.quantizer.num_quantizers:
            raise ValueError(f"codes must be (W, {self.quantizer.num_quantizers}), got {tuple(codes.shape)}")
        return self.quantizer.get_output_from_indices(codes)

    # ---- raw audio and text ----
    @property
    def text_tokenizer(self) -> DualTokenizer:
        if self._text is None:
            agg = self.config.aggregator
            longest = agg.max_positions - len(agg.prefix_ids)
            text = DualTokenizer(self.config.asr_tokenizer, None, max_asr_tokens=longest)
            if text.asr.word_id_bound > agg.vocab_size:  # (ids past the embedding would fail at a batch)
                raise ValueError(
                    f"asr_tokenizer {self.config.asr_tokenizer!r} tokenises words into ids up to "
                    f"{text.asr.word_id_bound - 1} but the aggregator embeds {agg.vocab_size} (aggregator.vocab_size): "
                    "seed the model for that tokenizer "
                    "(TasteTokenizer.from_whisper(..., asr_tokenizer=...)) or set the vocabulary size"
                )
            self._text = text
        return self._text

    def prepare(
        self, waveforms: Sequence[Tensor], texts: Sequence[str], sample_rate: int | Sequence[int] = 16000
    ) -> tuple[Tensor, TextBatch]:
        """Host-side batch preparation: ``(mel (B, n_mels, frames) on the model's device, TextBatch)``."""
        text = self.text_tokenizer(texts)  # first: it names a single str passed for the list of texts
        if len(waveforms) != len(texts):
            raise ValueError(f"got {len(waveforms)} waveforms but {len(texts)} texts")
        audio, _ = batch_waveforms(waveforms, sample_rate, window_seconds=self.config.encoder.window_seconds)
        return self.frontend(audio.to(self.frontend.filters.device)), text

    def tokenize(self, mel: Tensor, text: TextBatch, *, quantize: bool = True) -> TokenizerOutput:
        """:meth:`forward` on a prepared batch (the tensors of ``text`` moved to ``mel``'s device)."""
        dev, asr = mel.device, text.asr
        return self(
            mel, asr.tokens.to(dev), asr.cu_seqlens.to(dev), asr.word_ids.to(dev),
            max_seqlen=asr.max_seqlen, word_offsets=asr.word_offsets.to(dev), quantize=quantize,
        )  # fmt: skip

    @torch.no_grad()
    def encode(
        self, waveforms: Sequence[Tensor], texts: Sequence[str], sample_rate: int | Sequence[int] = 16000
    ) -> list[Tensor]:
        """Codes of each utterance: B tensors ``(W_i, Q)`` int64 on the CPU, one row per word of its text."""
        with self._evaluating():
            mel, text = self.prepare(waveforms, texts, sample_rate)
            return _codes_per_utterance(self.tokenize(mel, text), text)

    @contextlib.contextmanager
    def _evaluating(self):
        """Eval mode inside, the mode it had after (whatever is raised)."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def transcribe_and_encode(
        self, waveforms: Sequence[Tensor], asr: WhisperTranscriber, sample_rate: int | Sequence[int] = 16000, *,
        check_encoder: bool = True, asr_batch_size: int | None = None, **generate_kwargs,
    ) -> tuple[list[str], list[Tensor]]:  # fmt: skip
        """The official inference without its second encoder pass: ``(transcripts, codes)`` of each utterance,
        the transcript from ``asr`` (a :class:`taste.asr.WhisperTranscriber`, e.g. large-v3's decoder) reading the
        states this model's encoder made for the aggregator's keys. Raises unless ``asr``'s Whisper encoder is this
        model's (distil-large-v3's encoder is large-v3's; ``check_encoder=False`` skips the check), and for an
        utterance in which the ASR found no words (``waveforms[k]``). ``asr_batch_size``: utterances decoded at a
        time (None: all; the decoder's cross-attention cache holds 2 x its layers x their encoder states).
        ``generate_kwargs`` go to :meth:`taste.asr.WhisperTranscriber.generate` (e.g. ``compile=True``)."""
        if not isinstance(asr, WhisperTranscriber):
            raise TypeError(f"asr must be a taste.asr.WhisperTranscriber, got {type(asr).__name__}")
        if asr.config.d_model != self.config.encoder.d_model:
            raise ValueError(f"asr reads {asr.config.d_model}-wide encoder states, this model's encoder makes "
                             f"{self.config.encoder.d_model}")  # fmt: skip
        if check_encoder:
            if asr.encoder_fingerprint is None:
                raise ValueError(
                    "asr has no encoder_fingerprint (load it with WhisperTranscriber.from_whisper) to "
                    "check this model's encoder against; pass check_encoder=False to skip the check"
                )
            mine = encoder_fingerprint(self.encoder.state_dict(), self.config.encoder.num_layers)
            if not same_encoder(mine, asr.encoder_fingerprint):
                raise ValueError(
                    "asr was trained on another Whisper encoder than this model's (its weights differ, "
                    "or this encoder keeps fewer layers): its transcripts of these states would be "
                    "wrong; transcribe with its own encoder (WhisperTranscriber.transcribe)"
                )
        with self._evaluating():
            audio, _ = batch_waveforms(waveforms, sample_rate, window_seconds=self.config.encoder.window_seconds)
            mel = self.frontend(audio.to(self.frontend.filters.device))
            h_key, h_val = self.encode_speech(mel)
            texts = asr.transcribe_states(h_key.to(asr.embed_tokens.weight.device),
                                          batch_size=asr_batch_size or max(len(waveforms), 1),
                                          **generate_kwargs)  # fmt: skip
            for k, text in enumerate(texts):
                if not text.split():
                    raise ValueError(f"waveforms[{k}]: the ASR found no words in it (transcript {text!r})")
            text = self.text_tokenizer(texts)
            dev, a = mel.device, text.asr
            out = self.forward_states(h_key, h_val, a.tokens.to(dev), a.cu_seqlens.to(dev), a.word_ids.to(dev),
                                      a.max_seqlen, a.word_offsets.to(dev))  # fmt: skip
            return texts, _codes_per_utterance(out, text)

    # ---- checkpoints ----
    def save_pretrained(self, directory: str) -> None:
        """Writes ``config.json`` and ``model.safetensors`` (weights and codebook buffers) into ``directory``."""
        save_model(directory, self.config.to_dict(), self)

    @classmethod
    def from_pretrained(cls, directory: str, *, device=None, dtype=None) -> TasteTokenizer:
        """Loads a model written by :meth:`save_pretrained`."""
        raw, state = read_model(directory, "TasteTokenizer")
        return cls.from_state_dict(TasteConfig.from_dict(raw), state, device=device, dtype=dtype)

    @classmethod
    def from_state_dict(cls, config: TasteConfig, state: dict, *, device=None, dtype=None) -> TasteTokenizer:
        """A model of ``config`` holding the tensors of ``state`` (every weight and codebook buffer, strictly; the
        RVQ's in this package's or in vector-quantize-pytorch's layout), without initialising weights first."""
        with torch.device("meta"):
            model = cls(config=config)
        model.load_state_dict(state, strict=True, assign=True)
        model.quantizer.float()  # codebook distances in float32 whatever the file holds (spec 7.3)
        model.frontend = LogMel(n_mels=config.encoder.n_mels, window_seconds=config.encoder.window_seconds)
        model.aggregator.prefix_ids = torch.tensor(config.aggregator.prefix_ids, dtype=torch.long)
        if config.freeze_encoder:
            model.encoder.requires_grad_(False)
        return model.to_precision(device=device, dtype=dtype)

    def to_precision(self, *, device=None, dtype=None) -> TasteTokenizer:
        """Moves the model to ``device`` and casts the encoder and aggregator to ``dtype``; the quantizer stays
        float32 (codebook distances in float32, spec 7.3)."""
        self.to(device=device)
        if dtype is not None:
            self.encoder.to(dtype=dtype)
            self.aggregator.to(dtype=dtype)
        return self

    @classmethod
    def from_whisper(
        cls,
        local_dir: str,
        *,
        value_layer: int = 6,
        quantizer: QuantizerConfig | None = None,
        dtype=None,
        language: str = "en",
        **overrides,
    ) -> TasteTokenizer:
        """The seed model from a local Whisper checkpoint (transformers layout): its encoder and decoder weights,
        the cross-attention ``v_proj`` set to the identity (spec 1.4), a fresh RVQ (each stage k-means-initialised
        on the first training batch it runs in). float32 unless ``dtype``; ``overrides`` replace
        :class:`TasteConfig` fields. ``language``: the Whisper language token of the prefix (English, as the
        official model, unless given).

        With ``asr_tokenizer`` other than ``"whisper"`` (e.g. ``"llama3"``: queries in the LLM's tokens) the
        aggregator's token embedding is remapped to that vocabulary, each new token starting as the mean of the
        Whisper embeddings that spell it (:meth:`TextQueryAggregator.remap_vocabulary`)."""
        from transformers import WhisperModel

        if not os.path.isdir(local_dir):
            raise FileNotFoundError(f"local_dir {local_dir!r} is not a directory (a local Whisper checkpoint)")
        whisper = WhisperModel.from_pretrained(local_dir).float()
        encoder = SpeechEncoder.from_whisper_encoder(whisper.encoder, value_layer=value_layer)
        aggregator = TextQueryAggregator.from_whisper_decoder(whisper.decoder, language=language)
        asr_tokenizer = overrides.get("asr_tokenizer", TasteConfig.asr_tokenizer)
        if asr_tokenizer != "whisper":
            aggregator.remap_vocabulary(token_pieces(asr_tokenizer, "whisper"))
        config = TasteConfig(
            encoder=encoder.config, aggregator=aggregator.config, quantizer=quantizer or QuantizerConfig(), **overrides
        )
        model = cls(config=config, encoder=encoder, aggregator=aggregator)  # (no random ones made first: 20 s and
        return model.to_precision(dtype=dtype)  # 3.6 GB at distil-large-v3's shapes)


def _codes_per_utterance(out: TokenizerOutput, text: TextBatch) -> list[Tensor]:
    """A batch's word codes split per utterance: B tensors ``(W_i, Q)`` int64 on the CPU."""
    return list(out.word_codes.cpu().split(text.word_cu_seqlens.diff().tolist()))
