"""The shared training loop on a one-layer model: checkpoint retention, a save that fails, pre-emption signals."""

import errno
import json
import os
import signal
import warnings

import pytest
import torch
from conftest import on_two_ranks
from torch import nn

from taste import trainer
from taste.trainer import LoopConfig, TrainingInterrupted, checkpoint_steps, fit, latest_checkpoint, state_digest


class Line(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        torch.save(self.state_dict(), os.path.join(directory, "weights.pt"))

    @classmethod
    def from_pretrained(cls, directory):
        model = cls()
        model.load_state_dict(torch.load(os.path.join(directory, "weights.pt")))
        return model


X = torch.randn(24, 3, generator=torch.Generator().manual_seed(1))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5]])


def run(out_dir, stop_after=None, signal_at=None, nan_at=None, **kw):
    """Trains Line; ``signal_at=(signum, k)`` makes the process send itself signum during its k-th batch,
    ``nan_at=k`` makes the k-th batch's loss NaN."""
    options = {"steps": 7, "batch_size": 4, "save_every": 2, "log_every": 1, "warmup": 1, **kw}
    cfg = LoopConfig(out_dir=str(out_dir), **options)
    calls = [0]

    def compute(model, b):
        calls[0] += 1
        if signal_at is not None and calls[0] == signal_at[1]:
            os.kill(os.getpid(), signal_at[0])
        loss = ((model(b[0]) - b[1]) ** 2).mean()
        return (loss * float("nan") if calls[0] == nan_at else loss), len(b[0])

    return fit(cfg, Line(), lengths=[1] * len(X), train_idx=list(range(len(X))),
               make_batch=lambda idx: (X[idx], Y[idx]), compute=compute,
               reload=Line.from_pretrained, stop_after=stop_after, progress=False)  # fmt: skip


def test_keep_checkpoints_leaves_the_newest_and_resume_still_matches(tmp_path):
    whole = run(tmp_path / "all")
    assert checkpoint_steps(str(tmp_path / "all")) == [2, 4, 6, 7]
    run(tmp_path / "kept", stop_after=5, keep_checkpoints=2)  # "killed" after step 5
    assert checkpoint_steps(str(tmp_path / "kept")) == [2, 4]
    with open(tmp_path / "kept" / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed while writing a record
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run(tmp_path / "kept", keep_checkpoints=2)
    assert not [w for w in caught if "resuming" in str(w.message)]  # nothing changed that matters
    assert checkpoint_steps(str(tmp_path / "kept")) == [6, 7]
    assert state_digest(resumed) == state_digest(whole)
    assert sorted(os.listdir(tmp_path / "kept")) == ["checkpoint-6", "checkpoint-7", "final", "log.jsonl"]
    # step 5 was logged before the interruption and again after the resume: the log holds it once, the second time
    log = [json.loads(line) for line in open(tmp_path / "kept" / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 8))
    assert log == [json.loads(line) | {"elapsed_s": r["elapsed_s"], "units_per_s": r["units_per_s"]}
                   for line, r in zip(open(tmp_path / "all" / "log.jsonl"), log)]  # fmt: skip


def _full_disk_in(write, directory: str, path_of):
    """``write(obj, target, ...)`` that fails as a full disk would where ``path_of(target)`` lies in ``directory``."""

    def full_disk(obj, target, *args, **kwargs):
        if os.path.basename(os.path.dirname(path_of(target))) == directory:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(obj, target, *args, **kwargs)

    return full_disk


def test_a_save_that_fails_leaves_no_partial_checkpoint_and_the_run_resumes(tmp_path, monkeypatch):
    whole = run(tmp_path / "a")
    monkeypatch.setattr(trainer.torch, "save", _full_disk_in(torch.save, "checkpoint-4.tmp", lambda path: str(path)))
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path / "b")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-2", "log.jsonl"]
    assert latest_checkpoint(str(tmp_path / "b")).endswith("checkpoint-2")
    os.makedirs(tmp_path / "b" / "checkpoint-6.tmp")  # as a save killed mid-way leaves it
    (tmp_path / "b" / "checkpoint-6.tmp" / "half-written.bin").write_bytes(b"\0" * 64)
    assert state_digest(run(tmp_path / "b")) == state_digest(whole)
    assert checkpoint_steps(str(tmp_path / "b")) == [2, 4, 6, 7]
    assert sorted(os.listdir(tmp_path / "b" / "checkpoint-6")) == ["trainer.pt", "weights.pt"]
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "b"))
    # final/ too: a run whose final write failed has none (before: a final/ without its train_config.json), and
    # run again it writes it from its last checkpoint
    monkeypatch.setattr(trainer.json, "dump", _full_disk_in(trainer.json.dump, "final.tmp", lambda f: f.name))
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path / "c")
    monkeypatch.undo()
    assert "final" not in os.listdir(tmp_path / "c") and "final.tmp" not in os.listdir(tmp_path / "c")
    assert state_digest(run(tmp_path / "c")) == state_digest(whole)
    assert sorted(os.listdir(tmp_path / "c" / "final")) == ["train_config.json", "weights.pt"]


@pytest.mark.parametrize("keep", [0, -1, 1.5, True, "2"])
def test_keep_checkpoints_must_be_a_positive_integer(tmp_path, keep):
    with pytest.raises(ValueError, match=r"keep_checkpoints must be an integer >= 1 or None \(keep all\), got"):
        LoopConfig(out_dir=str(tmp_path), keep_checkpoints=keep)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preemption_signal_saves_the_step_in_flight_and_the_run_resumes(tmp_path, signum):
    whole = run(tmp_path / "a")
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted, match=f"stopped by {signum.name} after step 3; saved .*checkpoint-3"):
        run(tmp_path / "b", signal_at=(signum, 3))  # arrives during step 3, which is not a save_every step
    assert signal.getsignal(signum) is before
    assert checkpoint_steps(str(tmp_path / "b")) == [2, 3] and not os.path.isdir(tmp_path / "b" / "final")
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert log[-1] == {"step": 3, "stopped_by": signum.name}
    assert state_digest(run(tmp_path / "b")) == state_digest(whole)


def test_the_command_line_exits_with_the_signal_status(tmp_path, monkeypatch):
    from taste import cli

    def preempted(*args, **kwargs):
        raise TrainingInterrupted(signal.SIGTERM, 5, str(tmp_path / "checkpoint-5"))

    monkeypatch.setattr("taste.train.train", preempted)
    (tmp_path / "c.json").write_text(json.dumps({"manifest": "m.jsonl", "out_dir": str(tmp_path)}))
    assert cli.main(["train-tokenizer", str(tmp_path / "c.json"), "--quiet"]) == 128 + signal.SIGTERM


def _signal_one_rank(rank, out):
    whole = state_digest(run(os.path.join(out, "a")))
    try:  # only rank 1 gets the signal, during its 3rd batch
        run(os.path.join(out, "b"), signal_at=(signal.SIGTERM, 3) if rank == 1 else None)
        stopped = None
    except TrainingInterrupted as e:
        stopped = e.step
    return {"whole": whole, "stopped": stopped, "resumed": state_digest(run(os.path.join(out, "b")))}


def test_under_ddp_every_rank_stops_at_the_step_one_rank_was_signalled(tmp_path):
    ranks = on_two_ranks(_signal_one_rank, tmp_path)
    assert [r["stopped"] for r in ranks] == [3, 3]
    assert ranks[0]["whole"] == ranks[1]["whole"] == ranks[0]["resumed"] == ranks[1]["resumed"]


def test_resuming_with_changed_options_warns_and_names_them(tmp_path):
    run(tmp_path, stop_after=3)
    with pytest.warns(UserWarning, match=r"with changes.*: batch_size: 4 -> 6; lr: 0\.001 -> 0\.002$"):
        run(tmp_path, batch_size=6, lr=2e-3, steps=9, log_every=3)  # steps and log_every may change freely
    assert checkpoint_steps(str(tmp_path)) == [2, 4, 6, 8, 9]


def _resume_on_two(rank, out):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        digest = state_digest(run(out, steps=9))
    return {"digest": digest, "warnings": [str(w.message) for w in caught if "resuming" in str(w.message)]}


def test_a_checkpoint_of_one_rank_resumes_on_two(tmp_path):
    run(tmp_path / "run", stop_after=4, steps=9)
    ranks = on_two_ranks(_resume_on_two, tmp_path / "run")
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert len(ranks[0]["warnings"]) == 1 and "ranks: 1 -> 2" in ranks[0]["warnings"][0] and not ranks[1]["warnings"]
    assert checkpoint_steps(str(tmp_path / "run")) == [2, 4, 6, 8, 9]


def test_a_nan_loss_stops_the_run_before_the_weights_take_it(tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 5: the gradient norm is nan .*newest: .*checkpoint-4\)"):
        run(tmp_path, nan_at=5, keep_checkpoints=1)
    assert checkpoint_steps(str(tmp_path)) == [4]
    weights = torch.load(tmp_path / "checkpoint-4" / "weights.pt")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def _accumulate_on_two(rank, out):
    entered = []
    no_sync = nn.parallel.DistributedDataParallel.no_sync

    def counted(self):
        entered.append(1)
        return no_sync(self)

    nn.parallel.DistributedDataParallel.no_sync = counted
    model = run(out, accum=2)
    return {"weights": [p.tolist() for p in model.parameters()], "no_sync": len(entered)}


def test_ddp_accumulation_reduces_once_a_step_and_matches_one_rank(tmp_path):
    # 2 ranks x 2 micro-batches of 4 take, each step, the same 16 rows as 1 rank x 4 micro-batches
    one = run(tmp_path / "one", accum=4)
    ranks = on_two_ranks(_accumulate_on_two, tmp_path / "two")
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["no_sync"] == ranks[1]["no_sync"] == 7  # 7 steps, all but the last micro-batch of each
    for mine, single in zip(ranks[0]["weights"], one.parameters()):
        torch.testing.assert_close(torch.tensor(mine), single.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "option, message",
    [({"steps": "100"}, "steps must be int, got '100' \\(str\\)"), ({"lr": "1e-3"}, "lr must be float, got '1e-3'"),
     ({"batch_size": 2.5}, "batch_size must be int, got 2.5"), ({"bf16": "no"}, "bf16 must be bool, got 'no'"),
     ({"steps": True}, "steps must be int, got True \\(bool\\)"), ({"out_dir": 5}, "out_dir must be str, got 5"),
     ({"clip": 0.0}, "clip must be > 0"), ({"lr": -1e-3}, "lr must be > 0"), ({"warmup": -5}, "warmup must be >= 0"),
     ({"weight_decay": -0.1}, "weight_decay must be >= 0"), ({"eval_size": -1}, "eval_size must be >= 0")],
)  # fmt: skip
def test_config_values_of_the_wrong_type_or_range_name_the_option_and_file(tmp_path, option, message):
    """Before: "'<' not supported between instances of 'str' and 'int'" for a quoted number, nothing at all for the
    others until the run failed (an IndexError for eval_size -1) or trained nothing (clip 0 zeroes every gradient)."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"out_dir": "o", **option}))
    with pytest.raises(ValueError, match=rf"run.json: {message}"):  # (a wrong type too: a bad value of the file)
        LoopConfig.from_json(str(path))
    assert LoopConfig.from_json(str(path), **{k: getattr(LoopConfig(out_dir="o"), k) for k in option})
    assert LoopConfig(out_dir="o", lr=1).lr == 1  # (an int does for a float: JSON writes 1.0 as 1 too)


def test_config_files_that_are_not_json_objects_name_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"out_dir": "o"\n"steps": 3}')
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON: Expecting ',' delimiter: line 2"):
        LoopConfig.from_json(str(path))  # before: the decoder's message alone, no file named
    path.write_text('["out_dir", "o"]')
    with pytest.raises(ValueError, match=r"broken.json: must hold a JSON object of training options, got list"):
        LoopConfig.from_json(str(path))
