"""Stage-1 training of TASTE (spec sections 1.9 and 3): the tokenizer learns by making the unit decoder reconstruct
each utterance's units from its text plus the TASTE embeddings.

Stages: ``text`` (1-1: the unit decoder from text alone), ``no_vq`` (1-2: TASTE embeddings without quantisation),
``vq`` (1-3: with the residual VQ, k-means-initialised on the first batch). Each starts from the previous one's
model (``init_from``). Loss: unit cross-entropy averaged over targets + the commitment loss (1-3).

``asr`` is a stage 0 for models trained from scratch: the official recipe starts from a pretrained Whisper, whose
decoder already attends to the speech of the next word; a random tiny model gets that from next-token prediction
of the transcript given the speech (the aggregator with its token embedding as the tied output layer, as in
Whisper), before stage 1-1.

A run writes into ``out_dir``: ``checkpoint-{step}/`` every ``save_every`` steps and at the end (the model as
``tokenizer/`` and ``decoder/`` pretrained directories plus ``trainer.pt``: optimizer, scheduler, RNG states and
the data position), ``final/`` (the model only) and ``log.jsonl``. Started again on the same ``out_dir`` it resumes
from the newest checkpoint and ends with the same weights as an uninterrupted run. Under ``torchrun`` it trains
with DistributedDataParallel (NCCL on GPUs, gloo on CPUs); the RVQ statistics are all-reduced by the RVQ itself.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from taste.corpus import read_manifest, read_wav, unit_features
from taste.tokenizer import TasteConfig, TasteTokenizer
from taste.unit_decoder import UnitDecoder, UnitDecoderConfig

STAGES = ("asr", "text", "no_vq", "vq")


@dataclass
class TrainConfig:
    manifest: str  # a `taste units` manifest (rows with "units")
    out_dir: str
    stage: str = "vq"
    init_from: str | None = None  # a previous run's out_dir (its final/ model) or a model directory
    preset: str = "tiny"  # model shapes when not init_from: "tiny" or "official"
    freeze_encoder: bool | None = None  # None: the preset's choice
    steps: int = 1000
    batch_size: int = 16  # utterances per micro-batch (per rank)
    accum: int = 1
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    clip: float = 1.0
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    eval_size: int = 64  # the manifest's last rows, never trained on
    bf16: bool = True  # autocast on CUDA (ignored on the CPU)
    asr_token_dropout: float = 0.0  # stage asr: share of input tokens hidden (so the audio must be read)
    write_rank_digests: bool = False  # each rank writes a digest of its final weights (checks DDP agreement)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        for name in ("steps", "batch_size", "accum", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_json(cls, path: str, **overrides) -> TrainConfig:
        with open(path) as f:
            raw = json.load(f)
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown training options {sorted(unknown)}")
        return cls(**{**raw, **overrides})


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
        if os.path.isdir(os.path.join(directory, "final")):
            directory = os.path.join(directory, "final")
        return cls(
            TasteTokenizer.from_pretrained(os.path.join(directory, "tokenizer"), device=device),
            UnitDecoder.from_pretrained(os.path.join(directory, "decoder"), device=device),
        )

    @classmethod
    def from_preset(cls, preset: str, num_units: int, freeze_encoder: bool | None) -> Stage1Model:
        tcfg = getattr(TasteConfig, preset)()
        if freeze_encoder is not None:
            tcfg = dataclasses.replace(tcfg, freeze_encoder=freeze_encoder)
        dcfg = getattr(UnitDecoderConfig, preset)(
            num_units=num_units, taste_dim=tcfg.aggregator.d_model, spk_dim=80,
            text_vocab=tcfg.aggregator.vocab_size,
        )  # fmt: skip
        return cls(TasteTokenizer(config=tcfg), UnitDecoder(config=dcfg))

    def forward(self, batch: dict, stage: str):
        """``(loss, decoder output, tokenizer output or None)`` of one packed batch (see :class:`UnitCorpus`)."""
        text = batch["text"]
        dev = batch["units"].device
        if stage == "asr":
            return self.asr_loss(batch, batch.get("token_dropout", 0.0))
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

    def asr_loss(self, batch: dict, token_dropout: float = 0.0):
        """Stage 0: next ASR token given the speech and the tokens so far (the last token of each utterance has no
        target). ``token_dropout`` hides that share of the input tokens (replaced by the first prefix id), so that
        the transcript alone cannot predict the next token. Returns ``(loss, SimpleNamespace(targets=...), None)``."""
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
        return loss, SimpleNamespace(targets=targets[~last]), None


class UnitCorpus:
    """The utterances of a units manifest held in memory (16 kHz int16 audio, units, speaker vectors), and
    packed batches of them. The speaker input is the utterance's mean 50 Hz log-mel frame (80 values), a
    stand-in for the CAM++ embedding of the official recipe."""

    def __init__(self, manifest: str):
        from taste.audio import SAMPLE_RATE, resample

        self.rows = read_manifest(manifest)
        if "units" not in self.rows[0]:
            raise ValueError(f"{manifest} has no 'units' field: run `taste units` on it first")
        self.audio, self.units, self.speaker = [], [], []
        for row in self.rows:
            wave, rate = read_wav(row["audio_path"])
            wave = resample(wave, rate, SAMPLE_RATE)
            self.audio.append((wave.clamp(-1, 1) * 32767).round().to(torch.int16))
            self.units.append(torch.tensor(row["units"], dtype=torch.long))
            self.speaker.append(unit_features(wave).mean(0))
        self.texts = [row["text"] for row in self.rows]
        self.num_units = int(self.rows[0].get("num_units", 0)) or 1 + max(int(u.max()) for u in self.units)

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


def batch_order(lengths: list[int], indices: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches for one epoch: shuffle, sort within windows of 50 batches, shuffle the batches."""
    rng = random.Random(seed * 100003 + epoch)
    idx = list(indices)
    rng.shuffle(idx)
    window = batch_size * 50
    batches = []
    for start in range(0, len(idx), window):
        chunk = sorted(idx[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class Batches:
    """An endless, deterministic stream of batches; ``position`` (micro-batches consumed) restores it."""

    def __init__(self, lengths, indices, batch_size, seed, rank=0, world=1):
        self.lengths, self.indices, self.batch_size, self.seed = lengths, indices, batch_size, seed
        self.rank, self.world, self.position = rank, world, 0
        self._epoch, self._order = -1, []

    def next(self) -> list[int]:
        n = len(batch_order(self.lengths, self.indices, self.batch_size, self.seed, 0)) // self.world
        if n == 0:
            raise ValueError(f"{len(self.indices)} training utterances make no batch of {self.batch_size} per rank")
        epoch, k = divmod(self.position, n)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, batch_order(self.lengths, self.indices, self.batch_size, self.seed, epoch)
        self.position += 1
        return self._order[k * self.world + self.rank]


def _schedule(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete ``checkpoint-{step}`` directory of a run, or None."""
    steps = []
    for path in glob.glob(os.path.join(out_dir, "checkpoint-*", "trainer.pt")):
        name = os.path.basename(os.path.dirname(path))[len("checkpoint-") :]
        if name.isdigit():
            steps.append(int(name))
    return os.path.join(out_dir, f"checkpoint-{max(steps)}") if steps else None


def state_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(cfg: TrainConfig, *, stop_after: int | None = None, progress: bool = True) -> Stage1Model:
    """Runs (or resumes) a stage. ``stop_after`` ends the run after that many optimizer steps of this call, as an
    interruption would (checkpoints as configured); a later call resumes."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    corpus = UnitCorpus(cfg.manifest)
    if len(corpus.rows) <= cfg.eval_size:
        raise ValueError(f"the manifest has {len(corpus.rows)} rows, not more than eval_size={cfg.eval_size}")
    train_idx = list(range(len(corpus.rows) - cfg.eval_size))
    if cfg.init_from:
        model = Stage1Model.from_pretrained(cfg.init_from)
    else:
        model = Stage1Model.from_preset(cfg.preset, corpus.num_units, cfg.freeze_encoder)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    stream = Batches([u.numel() for u in corpus.units], train_idx, cfg.batch_size, cfg.seed, rank, world)
    step = 0
    resume = latest_checkpoint(cfg.out_dir)
    if resume:
        model.load_state_dict(Stage1Model.from_pretrained(resume).state_dict())
        state = torch.load(os.path.join(resume, "trainer.pt"), weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, stream.position = state["step"], state["position"]
        torch.set_rng_state(state["rng"][rank]["torch"])
        random.setstate(state["rng"][rank]["python"])
        if torch.cuda.is_available() and state["rng"][rank].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"])
        model.tokenizer.quantizer._initted_seen = False
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if distributed else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank == 0 else None
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step")
    t0, units_seen, done_here = time.perf_counter(), 0, 0
    while step < cfg.steps and (stop_after is None or done_here < stop_after):
        total = 0.0
        for _ in range(cfg.accum):
            batch = corpus.batch(stream.next(), model, device, need_audio=cfg.stage != "text")
            batch["token_dropout"] = cfg.asr_token_dropout
            with autocast:
                loss, out, _ = ddp(batch, cfg.stage)
            (loss / cfg.accum).backward()
            total += float(loss.detach()) / cfg.accum
            units_seen += int(out.targets.numel())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step, done_here = step + 1, done_here + 1
        if rank == 0:
            rate = units_seen / (time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}", units_per_s=f"{rate:.0f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, "loss": total, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                          "units_per_s": rate, "elapsed_s": time.perf_counter() - t0}  # fmt: skip
                log.write(json.dumps(record) + "\n")
                log.flush()
        if step % cfg.save_every == 0 or step == cfg.steps:
            _save(cfg, model, opt, sched, step, stream.position, rank, world)
    if bar is not None:
        bar.close()
    if rank == 0 and step == cfg.steps:
        final = os.path.join(cfg.out_dir, "final")
        model.save_pretrained(final)
        with open(os.path.join(final, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    if cfg.write_rank_digests:
        with open(os.path.join(cfg.out_dir, f"rank{rank}.sha256"), "w") as f:
            f.write(state_digest(model))
    if log is not None:
        log.close()
    if distributed:
        dist.barrier()
    return model


def _save(cfg, model, opt, sched, step, position, rank, world):
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}  # fmt: skip
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rng)
        rng_all = gathered
    else:
        rng_all = [rng]
    if rank != 0:
        return
    directory = os.path.join(cfg.out_dir, f"checkpoint-{step}")
    tmp = directory + ".tmp"
    model.save_pretrained(tmp)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                "position": position, "rng": rng_all, "config": dataclasses.asdict(cfg)},
               os.path.join(tmp, "trainer.pt"))  # fmt: skip
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.replace(tmp, directory)  # a checkpoint appears whole or not at all
