"""Bad input gets an error that names the argument and what was expected."""

import pytest
import torch
from conftest import HAS_CUDA, make_cu

from taste import ops

I32 = torch.int32


def cu(*values):
    return torch.tensor(values, dtype=I32)


CASES = [
    # pack / pack_offsets / unpack
    ("lengths larger than T", lambda: ops.pack(torch.zeros(2, 3), torch.tensor([3, 4])), r"lengths\[1\]=4 exceeds"),
    ("negative lengths", lambda: ops.pack(torch.zeros(2, 3), torch.tensor([1, -1])), r"lengths must be >= 0"),
    ("float lengths", lambda: ops.pack(torch.zeros(2, 3), torch.tensor([1.0, 2.0])), r"lengths must be an int32"),
    ("lengths of wrong size", lambda: ops.pack(torch.zeros(2, 3), torch.tensor([1])), r"lengths must have shape"),
    ("1-D padded", lambda: ops.pack(torch.zeros(3), torch.tensor([1])), r"padded must have shape \(B, T"),
    ("int64 cu_seqlens", lambda: ops.unpack(torch.zeros(3), torch.tensor([0, 3]), 4), r"cu_seqlens must be an int32"),
    ("offsets not ending at N", lambda: ops.unpack(torch.zeros(3), cu(0, 2), 4), r"must end at the number of rows"),
    ("cu_seqlens not starting at 0", lambda: ops.unpack(torch.zeros(3), cu(1, 3), 4), r"cu_seqlens must start at 0"),
    ("decreasing cu_seqlens", lambda: ops.unpack(torch.zeros(3), cu(0, 3, 2, 3), 4), r"must be non-decreasing"),
    ("sequence longer than max_len", lambda: ops.unpack(torch.zeros(5), cu(0, 5), 4), r"exceeds max_len=4"),
    ("2-D cu_seqlens", lambda: ops.unpack(torch.zeros(3), cu(0, 3).view(1, 2), 4), r"must be a 1-D tensor"),
    ("pack_offsets total mismatch", lambda: ops.pack_offsets(torch.zeros(1, 4), cu(0, 3), 2), r"must end at the"),
    # word_offsets / delay_layout
    ("gapped word ids", lambda: ops.word_offsets(torch.tensor([0, 2]), cu(0, 2)), r"contiguous and non-decreasing"),
    ("decreasing word ids", lambda: ops.word_offsets(torch.tensor([0, 1, 0]), cu(0, 3)), r"word_ids\[1\]=1 then"),
    ("word ids not from 0", lambda: ops.word_offsets(torch.tensor([0, 1, 1]), cu(0, 1, 3)), r"sequence 1 must start"),
    ("float word ids", lambda: ops.word_offsets(torch.tensor([0.0]), cu(0, 1)), r"word_ids must be an int32 or"),
    ("offsets beyond word ids", lambda: ops.word_offsets(torch.tensor([0, 0]), cu(0, 3)), r"must end at the number"),
    ("delay layout gaps", lambda: ops.delay_layout(torch.tensor([0, 0, 3]), cu(0, 3)), r"contiguous and non-decr"),
    ("negative delay", lambda: ops.delay_layout(torch.tensor([0]), cu(0, 1), -1), r"delay must be >= 0"),
    # segment ops
    ("integer x", lambda: ops.segment_mean(torch.ones(3, 2, dtype=torch.long), cu(0, 3)), r"x must be a floating"),
    ("offsets not ending at N", lambda: ops.segment_sum(torch.ones(3, 2), cu(0, 2)), r"offsets must end at the"),
    ("fused: bad offsets", lambda: ops.segment_mean_broadcast(torch.ones(3, 2), cu(0, 4)), r"offsets must end at"),
    ("unsorted offsets", lambda: ops.segment_mean(torch.ones(3, 2), cu(0, 2, 1, 3)), r"offsets must be non-decr"),
    ("y rows vs segments", lambda: ops.segment_broadcast(torch.ones(3, 2), cu(0, 2, 3)), r"one row per segment"),
    ("num_rows mismatch", lambda: ops.segment_broadcast(torch.ones(2, 2), cu(0, 2, 3), 4), r"must end at the"),
    ("keys out of range", lambda: ops.segment_sum_by_key(torch.ones(2, 2), torch.tensor([0, 5]), 4), r"\[-1, 4\)"),
    ("keys below -1", lambda: ops.segment_sum_by_key(torch.ones(2, 2), torch.tensor([-2, 0]), 4), r"keys must lie"),
    ("keys of wrong size", lambda: ops.segment_sum_by_key(torch.ones(2, 2), torch.tensor([0]), 4), r"keys must have"),
    ("integer values", lambda: ops.segment_sum_by_key(torch.ones(2, dtype=I32), torch.tensor([0, 1]), 2), r"values"),
]


@pytest.mark.parametrize("what,call,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(what, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: ops.pack(torch.zeros(2, 3, device="cuda"), torch.tensor([1, 2])),
        lambda: ops.unpack(torch.zeros(3, device="cuda"), make_cu([3]), 4),
        lambda: ops.segment_mean(torch.ones(3, 2, device="cuda"), make_cu([3])),
        lambda: ops.word_offsets(torch.tensor([0, 0], device="cuda"), make_cu([2])),
        lambda: ops.delay_layout(torch.tensor([0, 0], device="cuda"), make_cu([2])),
        lambda: ops.segment_sum_by_key(torch.ones(2, 2, device="cuda"), torch.tensor([0, 1]), 2),
    ],
)
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_device_mix_is_refused(call):
    with pytest.raises(RuntimeError, match=r"must be on the same device as"):
        call()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_cuda_validates_where_it_syncs():
    with pytest.raises(RuntimeError, match=r"contiguous and non-decreasing"):
        ops.word_offsets(torch.tensor([0, 2], device="cuda"), make_cu([2], "cuda"))
    with pytest.raises(RuntimeError, match=r"sequence 1 must start at 0"):
        ops.word_offsets(torch.tensor([0, 1, 1], device="cuda"), make_cu([1, 2], "cuda"))
    with pytest.raises(RuntimeError, match=r"lengths\[0\]=5 exceeds"):
        ops.pack(torch.zeros(1, 3, device="cuda"), torch.tensor([5], device="cuda"))
    with pytest.raises(RuntimeError, match=r"offsets must start at 0"):
        ops.segment_broadcast(torch.ones(1, 2, device="cuda"), torch.tensor([1, 2], dtype=I32, device="cuda"))
