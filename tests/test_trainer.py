"""The shared training loop on a one-layer model: checkpoint retention and a save that fails."""

import errno
import os

import pytest
import torch
from torch import nn

from taste import trainer
from taste.trainer import LoopConfig, checkpoint_steps, fit, latest_checkpoint, state_digest


class Line(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)

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


def run(out_dir, stop_after=None, **kw):
    cfg = LoopConfig(out_dir=str(out_dir), **{"steps": 7, "batch_size": 4, "save_every": 2, "warmup": 1, **kw})
    return fit(cfg, Line(), lengths=[1] * len(X), train_idx=list(range(len(X))),
               make_batch=lambda idx: (X[idx], Y[idx]),
               compute=lambda model, b: (((model.lin(b[0]) - b[1]) ** 2).mean(), len(b[0])),
               reload=Line.from_pretrained, stop_after=stop_after, progress=False)  # fmt: skip


def test_keep_checkpoints_leaves_the_newest_and_resume_still_matches(tmp_path):
    whole = run(tmp_path / "all")
    assert checkpoint_steps(str(tmp_path / "all")) == [2, 4, 6, 7]
    run(tmp_path / "kept", stop_after=5, keep_checkpoints=2)  # "killed" after step 5
    assert checkpoint_steps(str(tmp_path / "kept")) == [2, 4]
    resumed = run(tmp_path / "kept", keep_checkpoints=2)
    assert checkpoint_steps(str(tmp_path / "kept")) == [6, 7]
    assert state_digest(resumed) == state_digest(whole)
    assert sorted(os.listdir(tmp_path / "kept")) == ["checkpoint-6", "checkpoint-7", "final", "log.jsonl"]


def test_a_save_that_fails_leaves_no_partial_checkpoint_and_the_run_resumes(tmp_path, monkeypatch):
    whole = run(tmp_path / "a")
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if os.path.basename(os.path.dirname(str(path))) == "checkpoint-4.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(trainer.torch, "save", full_disk)
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


@pytest.mark.parametrize("keep", [0, -1, 1.5, True, "2"])
def test_keep_checkpoints_must_be_a_positive_integer(tmp_path, keep):
    with pytest.raises(ValueError, match=r"keep_checkpoints must be an integer >= 1 or None \(keep all\), got"):
        LoopConfig(out_dir=str(tmp_path), keep_checkpoints=keep)
