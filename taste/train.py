"""Stage-1 training of TASTE (spec sections 1.9 and 3): the tokenizer learns by making the unit decoder reconstruct
each utterance's units from its text plus the TASTE embeddings.

Stages: ``text`` (1-1: the unit decoder from text alone), ``no_vq`` (1-2: TASTE embeddings without quantisation),
``vq`` (1-3: with the residual VQ, k-means-initialised on the first batch). Each starts from the previous one's
model (``init_from``). Loss: unit cross-entropy averaged over targets + the commitment loss (1-3).

``asr`` is a stage 0 for models trained from scratch: the official recipe starts from a pretrained Whisper, whose
decoder already attends to the speech of the next word; a random tiny model gets that from next-token prediction
of the transcript given the speech (the aggregator with its token embedding as the tied output layer, as in
Whisper), before stage 1-1, optionally with a CTC loss on the encoder (``asr_ctc_weight``). Hiding half of the
input tokens (``asr_token_dropout``) and enough steps are what made a tiny model read the speech (bench/RESULTS.md).

A run writes into ``out_dir``: ``checkpoint-{step}/`` every ``save_every`` steps and at the end (the model as
``tokenizer/`` and ``decoder/`` pretrained directories plus ``trainer.pt``: optimizer, scheduler, RNG states and
the data position), ``final/`` (the model only) and ``log.jsonl``; ``keep_checkpoints`` bounds how many
checkpoints stay on disk, and SIGTERM or SIGUSR1 stops it with a checkpoint of the step in flight
(:class:`taste.trainer.TrainingInterrupted`). Started again on the same ``out_dir`` it resumes
from the newest checkpoint and ends with the same weights as an uninterrupted run. Under ``torchrun`` it trains
with DistributedDataParallel (NCCL on GPUs, gloo on CPUs); the RVQ statistics are all-reduced by the RVQ itself.
"""

from __future__ import annotations

import dataclasses
import os
import random
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from taste.audio import SAMPLE_RATE, resample
from taste.checkpoint import saved_model_kind
from taste.corpus import UNIT_RATE, name_manifest_rows, read_manifest, read_wav, unit_features
from taste.tokenizer import TasteConfig, TasteTokenizer
from taste.trainer import LoopConfig, fit, setup_distributed
from taste.unit_decoder import UnitDecoder, UnitDecoderConfig

STAGES = ("asr", "text", "no_vq", "vq")


@dataclass(kw_only=True)
class TrainConfig(LoopConfig):
    """A stage-1 run (the loop options of :class:`taste.trainer.LoopConfig` plus these)."""

    manifest: str  # a `taste units` manifest (rows with "units")
    stage: str = "vq"
    # a previous run's out_dir (its final/ model), a stage-1 model directory (tokenizer/ + decoder/), or a
    # TasteTokenizer directory (`taste init-tokenizer`, e.g. seeded from Whisper as the official recipe is), which
    # then trains with a fresh unit decoder of the preset's shapes
    init_from: str | None = None
    preset: str = "tiny"  # model shapes when not init_from: "tiny" or "official"
    freeze_encoder: bool | None = None  # None: the preset's choice
    asr_token_dropout: float = 0.0  # stage asr: share of input tokens hidden (so the audio must be read)
    asr_ctc_weight: float = 0.0  # stage asr: weight of a CTC loss on the encoder's last states (see asr_loss)

    def __post_init__(self):
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if not 0.0 <= self.asr_token_dropout < 1.0:
            raise ValueError(f"asr_token_dropout must be in [0, 1), got {self.asr_token_dropout}")
        if self.asr_ctc_weight < 0:
            raise ValueError(f"asr_ctc_weight must be >= 0, got {self.asr_ctc_weight}")


class Stage1Model(nn.Module):
    """The tokenizer and the unit decoder trained together."""

    def __init__(self, tokenizer: TasteTokenizer, decoder: UnitDecoder):
        super().__init__()
        self.tokenizer, self.decoder = tokenizer, decoder

    def save_pretrained(self, directory: str) -> None:
        self.tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
        self.decoder.save_pretrained(os.path.join(directory, "decoder"))

    @classmethod
    def from_pretrained(cls, directory: str, device=None) -> Stage1Model:
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory!r} is not a directory (expected a stage-1 run, its final/, or a "
                                    "directory holding tokenizer/ and decoder/ or unit_decoder/)")  # fmt: skip
        if os.path.isdir(os.path.join(directory, "final")):
            directory = os.path.join(directory, "final")
        decoder = os.path.join(directory, "decoder")
        if not os.path.isdir(decoder) and os.path.isdir(os.path.join(directory, "unit_decoder")):
            decoder = os.path.join(directory, "unit_decoder")  # (`taste import-official`'s layout)
        return cls(
            TasteTokenizer.from_pretrained(os.path.join(directory, "tokenizer"), device=device),
            UnitDecoder.from_pretrained(decoder, device=device),
        )

    @classmethod
    def from_preset(
        cls, preset: str, num_units: int, freeze_encoder: bool | None, tokenizer: TasteTokenizer | None = None,
        spk_dim: int = 80,
    ) -> Stage1Model:  # fmt: skip
        """A random model of ``preset``'s shapes; with ``tokenizer`` (a seed), that tokenizer and a random unit
        decoder of the preset's shapes sized to it (its width and text vocabulary)."""
        tcfg = getattr(TasteConfig, preset)() if tokenizer is None else tokenizer.config
        if freeze_encoder is not None:
            tcfg = dataclasses.replace(tcfg, freeze_encoder=freeze_encoder)
        dcfg = getattr(UnitDecoderConfig, preset)(
            num_units=num_units, taste_dim=tcfg.aggregator.d_model, spk_dim=spk_dim,
            text_vocab=tcfg.aggregator.vocab_size,
        )  # fmt: skip
        if tokenizer is None:
            tokenizer = TasteTokenizer(config=tcfg)
        else:
            tokenizer.config = tcfg
            tokenizer.encoder.requires_grad_(not tcfg.freeze_encoder)
        return cls(tokenizer, UnitDecoder(config=dcfg))

    def forward(self, batch: dict, stage: str):
        """``(loss, decoder output, tokenizer output or None)`` of one packed batch (see :class:`UnitCorpus`)."""
        text = batch["text"]
        dev = batch["units"].device
        if stage == "asr":
            return self.asr_loss(
                batch, batch.get("token_dropout", 0.0), batch.get("ctc_weight", 0.0), batch.get("ctc_vocab")
            )
        taste, words, commit = None, None, torch.zeros((), device=dev)
        if stage != "text":
            words = self.tokenizer.tokenize(batch["mel"], text, quantize=stage == "vq")
            taste, commit = words.word_embeddings, words.commit_loss
        out = self.decode(batch, taste)
        return out.loss.float() + commit, out, words

    def decode(self, batch: dict, taste):
        """The unit decoder's teacher-forced output on a batch, given word-level TASTE rows (or None)."""
        a, dev = batch["text"].asr, batch["units"].device
        return self.decoder(
            a.tokens.to(dev), a.cu_seqlens.to(dev), a.max_seqlen, batch["units"], batch["unit_cu_seqlens"],
            batch["max_units"], taste=taste, word_offsets=a.word_offsets.to(dev), speaker=batch["speaker"],
        )  # fmt: skip

    def asr_loss(self, batch: dict, token_dropout: float = 0.0, ctc_weight: float = 0.0, ctc_vocab=None):
        """Stage 0: next ASR token given the speech and the tokens so far (the last token of each utterance has no
        target). ``token_dropout`` hides that share of the input tokens (replaced by the first prefix id), so that
        the transcript alone cannot predict the next token.

        ``ctc_weight`` > 0 adds that times a CTC loss of the transcript on the encoder's last states (the keys of
        the aggregator), read out through the same tied token embedding over a closed vocabulary: ``ctc_vocab``,
        the sorted ``(V,)`` int64 ids that the corpus uses (:func:`corpus_vocabulary`), with the first prefix id
        (start of transcript, never in a transcript) as the blank. Every frame of the window is an input frame
        (the padding is silence, read as blanks). It is meant to make a random encoder read the speech sooner and
        line each frame up with the embedding of the token it says, which the aggregator's queries are made of
        (on the espeak-ng corpus it did not, within 600 steps: bench/RESULTS.md).

        Returns ``(loss, SimpleNamespace(targets=..., logits=...), None)``."""
        a, tok = batch["text"].asr, self.tokenizer
        dev = batch["mel"].device
        tokens, cu = a.tokens.to(dev), a.cu_seqlens.to(dev)
        inputs = tokens
        if self.training and token_dropout > 0:
            hide = torch.rand(tokens.shape, device=dev) < token_dropout
            inputs = torch.where(hide, tok.aggregator.prefix_ids[0], tokens)
        h_key, h_val = tok.encode_speech(batch["mel"])
        states = tok.aggregator(inputs, cu, a.max_seqlen, h_key, h_val)  # (N, d)
        logits = states @ tok.aggregator.embed_tokens.weight.T  # (N, vocab): Whisper ties its output layer
        last = torch.zeros(tokens.shape[0], dtype=torch.bool, device=dev)
        last[cu[1:].long() - 1] = True
        targets = torch.where(last, -100, tokens.roll(-1))
        loss = nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100)
        if ctc_weight > 0:
            if ctc_vocab is None:
                raise ValueError("ctc_vocab (the corpus's token ids, corpus_vocabulary) is needed with ctc_weight > 0")
            loss = loss + ctc_weight * self.ctc_loss(h_key, tokens, cu, ctc_vocab.to(dev))
        return loss, SimpleNamespace(targets=targets[~last], logits=logits[~last]), None

    def ctc_loss(self, h_key, tokens, cu_seqlens, vocab):
        """CTC of the packed ``tokens`` on ``h_key (B, T, d)`` over ``[blank] + vocab`` (see :meth:`asr_loss`),
        in nats per frame."""
        blank = self.tokenizer.aggregator.prefix_ids[:1].to(vocab.device)
        classes = torch.cat([blank, vocab])
        if not bool(torch.isin(tokens, vocab).all()):
            raise ValueError("a transcript token is not in ctc_vocab: build it from the whole corpus")
        pos = torch.searchsorted(vocab, tokens)
        logits = h_key @ self.tokenizer.aggregator.embed_tokens.weight[classes].T  # (B, T, 1 + V)
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, C)
        batch, frames = h_key.shape[0], h_key.shape[1]
        input_lengths = torch.full((batch,), frames, dtype=torch.long, device=h_key.device)
        total = nn.functional.ctc_loss(
            log_probs, pos + 1, input_lengths, cu_seqlens.diff().long(), blank=0, reduction="sum", zero_infinity=True
        )
        return total / (batch * frames)  # per frame: the scale of a cross-entropy, whatever the window


def corpus_vocabulary(tokenizer: TasteTokenizer, texts: list[str]) -> torch.Tensor:
    """The sorted distinct ASR token ids of ``texts`` (the closed vocabulary of the CTC loss), ``(V,)`` int64."""
    ids = torch.cat([tokenizer.text_tokenizer(texts[i : i + 256]).asr.tokens for i in range(0, len(texts), 256)])
    return ids.unique()


def _speaker_of(row: dict, manifest: str, size: int | None) -> torch.Tensor:
    """A row's ``speaker`` vector: a non-empty list of numbers, of ``size`` values (the first row's) when given."""
    value = row.get("speaker")
    ok = isinstance(value, list) and len(value) > 0 and all(isinstance(v, (int, float)) for v in value)
    if not ok or (size is not None and len(value) != size):
        want = f"{size} numbers (as the first row's)" if size is not None else "numbers"
        raise ValueError(f"row {row['id']!r} of {manifest}: 'speaker' must be a list of {want}")
    return torch.tensor(value, dtype=torch.float32)


class UnitCorpus:
    """The utterances of a units manifest held in memory (16 kHz int16 audio, units, speaker vectors), and
    packed batches of them. The speaker input is the rows' ``speaker`` vectors where the manifest has them (CAM++
    vectors, as the official recipe: ``taste s3-units --speaker-model``), else each utterance's mean 50 Hz log-mel
    frame (80 values), a stand-in."""

    def __init__(self, manifest: str):
        self.rows = read_manifest(manifest)
        if "units" not in self.rows[0]:
            raise ValueError(f"{manifest} has no 'units' field: run `taste units` on it first")
        self.audio, self.units, self.speaker = [], [], []
        for row in self.rows:
            wave, rate = read_wav(row["audio_path"])
            wave = resample(wave, rate, SAMPLE_RATE)
            self.audio.append((wave.clamp(-1, 1) * 32767).round().to(torch.int16))
            self.units.append(torch.tensor(row["units"], dtype=torch.long))
            if self.units[-1].numel() == 0:
                raise ValueError(f"row {row['id']!r} of {manifest} has no units")
            if "speaker" in self.rows[0]:
                self.speaker.append(_speaker_of(row, manifest, self.speaker[0].numel() if self.speaker else None))
            elif "speaker" in row:
                raise ValueError(f"row {row['id']!r} of {manifest} has a 'speaker' vector and the first row has none: "
                                 "give every row one, or none")  # fmt: skip
            else:
                self.speaker.append(unit_features(wave).mean(0))
        self.spk_dim = int(self.speaker[0].numel())
        self.texts = [row["text"] for row in self.rows]
        self.num_units = int(self.rows[0].get("num_units", 0)) or 1 + max(int(u.max()) for u in self.units)

    def check(self, model: Stage1Model, manifest: str, need_audio: bool) -> None:
        """Every row as the batches will take it, before the first step (a bad row met at step 5000 would end the run
        there): a transcript with words and within the aggregator's positions, audio within the window."""
        if model.decoder.config.spk_dim != self.spk_dim:
            raise ValueError(f"the unit decoder takes ({model.decoder.config.spk_dim},) speaker vectors, {manifest} "
                             f"gives ({self.spk_dim},)")  # fmt: skip
        ids = [row["id"] for row in self.rows]
        for i in range(0, len(self.texts), 256):
            try:
                model.tokenizer.text_tokenizer(self.texts[i : i + 256])
            except (TypeError, ValueError) as e:
                raise ValueError(name_manifest_rows(str(e), ids[i : i + 256], manifest)) from e
        window = model.tokenizer.config.encoder.window_seconds
        for row_id, audio in zip(ids, self.audio):
            if need_audio and audio.numel() > round(window * SAMPLE_RATE):
                raise ValueError(f"row {row_id!r} of {manifest} lasts {audio.numel() / SAMPLE_RATE:.2f} s, longer than "
                                 f"the model's {window:g} s window")  # fmt: skip
        seconds = sum(a.numel() for a in self.audio) / SAMPLE_RATE
        rate = sum(u.numel() for u in self.units) / max(seconds, 1e-9)
        if not 0.8 * UNIT_RATE <= rate <= 1.2 * UNIT_RATE:  # (e.g. 25 Hz tokens: the decoder learns them all the same)
            warnings.warn(f"taste: {manifest} has {rate:.1f} units per second of audio; this package's units are "
                          f"{UNIT_RATE} Hz, and the duration metrics and resynthesis of `taste eval-tokenizer` and "
                          "`taste resynthesize` read them so", stacklevel=2)  # fmt: skip

    def batch(self, indices: list[int], model: Stage1Model, device, need_audio: bool) -> dict:
        waves = [self.audio[i].float() / 32767 for i in indices]
        texts = [self.texts[i] for i in indices]
        if need_audio:
            mel, text = model.tokenizer.prepare(waves, texts)
        else:
            mel, text = None, model.tokenizer.text_tokenizer(texts)
        units = [self.units[i] for i in indices]
        lengths = torch.tensor([u.numel() for u in units])
        return {
            "mel": mel.to(device) if mel is not None else None,
            "text": text,
            "units": torch.cat(units).to(device),
            "unit_cu_seqlens": torch.cat([torch.zeros(1), lengths.cumsum(0)]).to(torch.int32).to(device),
            "max_units": int(lengths.max()),
            "speaker": torch.stack([self.speaker[i] for i in indices]).to(device),
        }


def train(cfg: TrainConfig, *, stop_after: int | None = None, progress: bool = True) -> Stage1Model:
    """Runs (or resumes) a stage. ``stop_after`` ends the run after that many optimizer steps of this call, as an
    interruption would (checkpoints as configured); a later call resumes."""
    _, _, _, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    corpus = UnitCorpus(cfg.manifest)
    if len(corpus.rows) <= cfg.eval_size:
        raise ValueError(f"the manifest has {len(corpus.rows)} rows, not more than eval_size={cfg.eval_size}")
    if cfg.init_from and saved_model_kind(cfg.init_from) == "TasteTokenizer":  # a seed: a fresh decoder with it
        seed = TasteTokenizer.from_pretrained(cfg.init_from)
        model = Stage1Model.from_preset(cfg.preset, corpus.num_units, cfg.freeze_encoder, tokenizer=seed,
                                        spk_dim=corpus.spk_dim)  # fmt: skip
    elif cfg.init_from:
        model = Stage1Model.from_pretrained(cfg.init_from)
    else:
        model = Stage1Model.from_preset(cfg.preset, corpus.num_units, cfg.freeze_encoder, spk_dim=corpus.spk_dim)
    model.to(device).train()
    corpus.check(model, cfg.manifest, need_audio=cfg.stage != "text")

    ctc_vocab = None
    if cfg.stage == "asr" and cfg.asr_ctc_weight > 0:
        ctc_vocab = corpus_vocabulary(model.tokenizer, corpus.texts).to(device)

    def make_batch(indices):
        batch = corpus.batch(indices, model, device, need_audio=cfg.stage != "text")
        batch.update(token_dropout=cfg.asr_token_dropout, ctc_weight=cfg.asr_ctc_weight, ctc_vocab=ctc_vocab)
        return batch

    def compute(module, batch):
        loss, out, _ = module(batch, cfg.stage)
        return loss, int(out.targets.numel())

    def reload(directory):
        return Stage1Model.from_pretrained(directory)

    train_idx = list(range(len(corpus.rows) - cfg.eval_size))
    return fit(cfg, model, lengths=[u.numel() for u in corpus.units], train_idx=train_idx, make_batch=make_batch,
               compute=compute, reload=reload, stop_after=stop_after, progress=progress)  # fmt: skip
