"""The training loop shared by stage 1 (:mod:`taste.train`) and TASLM (:mod:`taste.train_lm`).

AdamW, cosine schedule with warm-up, gradient clipping and accumulation, bf16 autocast on CUDA, length-bucketed
deterministic batches, a progress bar and a JSONL log. A run writes into ``out_dir``: ``checkpoint-{step}/`` every
``save_every`` steps and at the end (the model's ``save_pretrained`` layout plus ``trainer.pt``: optimizer,
scheduler, RNG states of every rank and the data position), ``final/`` (the model only, with ``train_config.json``)
and ``log.jsonl``. With ``keep_checkpoints=N`` only the newest N checkpoints stay on disk; a save that fails (a full
disk) removes its partial directory and raises, leaving the previous checkpoint as the one to resume from. A step
whose gradient norm is not finite raises FloatingPointError before the optimizer applies it, so no checkpoint holds
NaN weights. SIGTERM or SIGUSR1 (a scheduler's pre-emption notice) ends the run after the optimizer step in flight,
with a checkpoint of that step, and raises :class:`TrainingInterrupted` (under DDP every rank stops at the same
step, whichever got the signal). Started again on the same ``out_dir`` it resumes from the newest checkpoint and
ends with the same weights as an uninterrupted run (``log.jsonl`` drops what the interrupted run logged past the
checkpoint, so each step appears once); resumed with other options or on another number of ranks, it
warns, naming the changes, and goes on. Under ``torchrun`` it trains with DistributedDataParallel (NCCL on GPUs,
gloo on CPUs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from taste._checks import check_at_least, check_field_types
from taste.checkpoint import parse_json, read_jsonl_records, write_jsonl_atomically


@dataclass(kw_only=True)
class LoopConfig:
    """Options every training run has; stage-specific configs extend it."""

    out_dir: str
    steps: int = 1000
    batch_size: int = 16  # utterances per micro-batch (per rank)
    accum: int = 1
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    clip: float = 1.0
    save_every: int = 200
    keep_checkpoints: int | None = None  # keep only the newest N ``checkpoint-*`` directories (None: keep all)
    log_every: int = 10
    seed: int = 0
    eval_size: int = 64  # the data's last rows, never trained on
    bf16: bool = True  # autocast on CUDA (ignored on the CPU)
    write_rank_digests: bool = False  # each rank writes a digest of its final weights (checks DDP agreement)

    def __post_init__(self):
        keep = self.keep_checkpoints
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep_checkpoints must be an integer >= 1 or None (keep all), got {keep!r}")
        check_field_types(self)
        check_at_least(self, 1, "steps", "batch_size", "accum", "save_every", "log_every")
        for name, what in (("lr", "> 0"), ("clip", "> 0 (the largest gradient norm)")):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)}")
        check_at_least(self, 0, "warmup", "weight_decay", "eval_size")
        if not self.out_dir:
            raise ValueError("out_dir must name a directory")

    @classmethod
    def from_json(cls, path: str, **overrides):
        with open(path) as f:
            raw = parse_json(f.read(), path)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: must hold a JSON object of training options, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(raw) - known:
            raise ValueError(f"{path}: unknown training options {sorted(set(raw) - known)}")
        if set(overrides) - known:
            raise ValueError(f"unknown training options {sorted(set(overrides) - known)} among the overrides")
        try:
            return cls(**{**raw, **overrides})
        except (TypeError, ValueError) as e:  # (a value of the wrong type or range: a bad value of the file, named)
            raise ValueError(f"{path}: {e}") from e


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


def _schedule(cfg: LoopConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def checkpoint_steps(out_dir: str) -> list[int]:
    """The steps of the complete ``checkpoint-{step}`` directories of a run, ascending."""
    steps = []
    for path in glob.glob(os.path.join(out_dir, "checkpoint-*", "trainer.pt")):
        name = os.path.basename(os.path.dirname(path))[len("checkpoint-") :]
        if name.isdigit():
            steps.append(int(name))
    return sorted(steps)


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete ``checkpoint-{step}`` directory of a run, or None."""
    steps = checkpoint_steps(out_dir)
    return os.path.join(out_dir, f"checkpoint-{steps[-1]}") if steps else None


def state_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def setup_distributed() -> tuple[bool, int, int, torch.device]:
    """``(distributed, rank, world, device)``; joins the process group under torchrun (the ``taste`` command
    leaves it when it ends; a program of your own that calls this should call ``dist.destroy_process_group()``)."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    return distributed, rank, world, device


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingInterrupted(RuntimeError):
    """A run stopped by a signal after saving ``checkpoint``; running it again resumes from there."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved {checkpoint}; "
                         "run the same command again to resume")  # fmt: skip


class _StopRequests:
    """Records the first of ``STOP_SIGNALS`` received while active (main thread only; elsewhere it records
    nothing) and restores the previous handlers on exit."""

    def __init__(self):
        self.signum, self._previous = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum, frame):
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def fit(
    cfg: LoopConfig,
    model: nn.Module,
    *,
    lengths: list[int],
    train_idx: list[int],
    make_batch: Callable[[list[int]], dict],
    compute: Callable[[nn.Module, dict], tuple[Tensor, int]],
    reload: Callable[[str], nn.Module],
    stop_after: int | None = None,
    progress: bool = True,
    count_name: str = "units",
) -> nn.Module:
    """Runs (or resumes) a training run of ``model`` (on its device, parameters to train with requires_grad).

    Args:
        lengths: a length per data row (for length bucketing); ``train_idx`` the rows to train on.
        make_batch: row indices -> a batch.
        compute: (the model, or its DDP wrapper; a batch) -> (loss, number of targets counted for throughput).
        reload: a checkpoint directory -> a model whose state dict this model loads to resume.
        stop_after: end after that many optimizer steps of this call, as an interruption would; a later call
            resumes.

    Raises:
        TrainingInterrupted: SIGTERM or SIGUSR1 arrived; the step in flight finished and was saved.
    """
    distributed, rank, world = dist.is_initialized(), 0, 1
    if distributed:
        rank, world = dist.get_rank(), dist.get_world_size()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    stream = Batches(lengths, train_idx, cfg.batch_size, cfg.seed, rank, world)
    step = 0
    resume = latest_checkpoint(cfg.out_dir)
    if resume:
        model.load_state_dict(reload(resume).state_dict())
        state = torch.load(os.path.join(resume, "trainer.pt"), weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        if rank == 0:
            _warn_on_changes(resume, state, cfg, world)
        saved_world = len(state["rng"])
        # position counts one rank's micro-batches; on another number of ranks, keep the utterances consumed
        stream.position = state["position"] * saved_world // world
        if rank < saved_world:
            rng = state["rng"][rank]
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if torch.cuda.is_available() and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"])
        else:  # a rank the checkpoint did not have: seeded from the run's seed, its rank and the step
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
            random.seed(cfg.seed * 1_000_003 + step * 1009 + rank)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if distributed else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if resume:
            _truncate_log(os.path.join(cfg.out_dir, "log.jsonl"), step)
    with contextlib.ExitStack() as cleanup:
        stop = cleanup.enter_context(_StopRequests())
        log = cleanup.enter_context(open(os.path.join(cfg.out_dir, "log.jsonl"), "a")) if rank == 0 else None
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = cleanup.enter_context(tqdm(total=cfg.steps, initial=step, unit="step"))
        t0, seen, done_here = time.perf_counter(), 0, 0
        while step < cfg.steps and (stop_after is None or done_here < stop_after):
            total = 0.0
            for micro in range(cfg.accum):
                batch = make_batch(stream.next())
                # DDP all-reduces the gradients once a step, on its last micro-batch, not after every one
                local = ddp.no_sync() if distributed and micro < cfg.accum - 1 else contextlib.nullcontext()
                with local:
                    with autocast:  # the forward only: PyTorch advises against backward passes under autocast
                        loss, count = compute(ddp, batch)
                    (loss / cfg.accum).backward()
                total += float(loss.detach()) / cfg.accum
                seen += count
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
            if not math.isfinite(grad_norm):  # the same on every rank: DDP has averaged the gradients
                raise FloatingPointError(
                    f"step {step + 1}: the gradient norm is {grad_norm} (loss {total}); stopped before the optimizer "
                    f"applied it, so no checkpoint holds it (newest: {latest_checkpoint(cfg.out_dir)}). Lower lr, "
                    "raise warmup or clip, or check the batch"
                )
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, done_here = step + 1, done_here + 1
            if rank == 0:
                rate = seen / (time.perf_counter() - t0)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"loss": f"{total:.3f}", f"{count_name}_per_s": f"{rate:.0f}"})
                if step % cfg.log_every == 0 or step == cfg.steps:
                    record = {"step": step, "loss": total, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                              f"{count_name}_per_s": rate, "elapsed_s": time.perf_counter() - t0}  # fmt: skip
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            saved = step % cfg.save_every == 0 or step == cfg.steps
            if saved:
                _save(cfg, model, opt, sched, step, stream.position, rank, world)
            signum = stop.signum
            if distributed:  # every rank stops at the same step, whichever got the signal
                flag = torch.tensor([signum], dtype=torch.int64, device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                signum = int(flag.item())
            if signum and step < cfg.steps:
                if not saved:
                    _save(cfg, model, opt, sched, step, stream.position, rank, world)
                if log is not None:
                    log.write(json.dumps({"step": step, "stopped_by": signal.Signals(signum).name}) + "\n")
                    log.flush()
                if distributed:
                    dist.barrier()
                raise TrainingInterrupted(signum, step, os.path.join(cfg.out_dir, f"checkpoint-{step}"))
        if rank == 0 and step == cfg.steps:

            def write_final(directory):
                model.save_pretrained(directory)
                with open(os.path.join(directory, "train_config.json"), "w") as f:
                    json.dump(dataclasses.asdict(cfg), f, indent=2)

            _write_whole(os.path.join(cfg.out_dir, "final"), write_final)  # (a run stopped here redoes it on resume)
        if cfg.write_rank_digests:
            with open(os.path.join(cfg.out_dir, f"rank{rank}.sha256"), "w") as f:
                f.write(state_digest(model))
        if distributed:
            dist.barrier()
        return model


def _truncate_log(path: str, step: int) -> None:
    """Drops the log records of steps after ``step`` (those an interrupted run logged past its last checkpoint;
    the resumed run logs them again) and any line a killed run left half-written."""
    if os.path.exists(path):
        write_jsonl_atomically(path, [r for r in read_jsonl_records(path) if r.get("step", 0) <= step])


# Options that may change between a checkpoint and its resumption without making the resumed run inexact.
_FREE_TO_CHANGE = {"out_dir", "steps", "save_every", "keep_checkpoints", "log_every", "write_rank_digests"}


def _warn_on_changes(resume: str, state: dict, cfg: LoopConfig, world: int) -> None:
    """Warns when a run resumes with options or a number of ranks that differ from its checkpoint's: it goes on,
    but not as the uninterrupted run would have."""
    saved = state.get("config", {})
    changed = sorted(k for k, v in dataclasses.asdict(cfg).items() if k not in _FREE_TO_CHANGE and k in saved
                     and saved[k] != v)  # fmt: skip
    notes = [f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed]
    if len(state["rng"]) != world:
        notes.append(f"ranks: {len(state['rng'])} -> {world} (data order and random draws change)")
    if notes:
        warnings.warn(f"resuming {resume} with changes, so the run will not match an uninterrupted one: "
                      + "; ".join(notes), stacklevel=3)  # fmt: skip


def _write_whole(directory: str, write) -> None:
    """``write(path)`` fills a sibling ``directory.tmp`` that then replaces ``directory``: the directory appears whole
    or not at all. A write that fails removes what it wrote (the previous directory stays); one that was killed
    leaves its ``.tmp``, which the next write of the directory clears first."""
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.replace(tmp, directory)


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

    def write_checkpoint(directory):
        model.save_pretrained(directory)
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                    "position": position, "rng": rng_all, "config": dataclasses.asdict(cfg)},
                   os.path.join(directory, "trainer.pt"))  # fmt: skip

    _write_whole(os.path.join(cfg.out_dir, f"checkpoint-{step}"), write_checkpoint)
    if cfg.keep_checkpoints is not None:
        for old in checkpoint_steps(cfg.out_dir)[: -cfg.keep_checkpoints]:
            shutil.rmtree(os.path.join(cfg.out_dir, f"checkpoint-{old}"))
