"""ops.prefix_layout: the same prefix before every sequence of a packed batch (the aggregator's Whisper prefix)."""

import pytest
import torch
from conftest import DEVICES, HAS_CUDA, LENGTH_CASES, make_cu, needs_extension

from taste import ops, reference

I32 = torch.int32


def per_sequence(tokens, lengths, prefix):
    """The layout built one sequence at a time: prefix ++ tokens, positions 0.., each token's new row."""
    ids, positions, token_rows, cu, row = [], [], [], [0], 0
    start = 0
    for n in lengths:
        ids.append(torch.cat([prefix, tokens[start : start + n]]))
        positions.append(torch.arange(len(prefix) + n))
        token_rows.append(row + len(prefix) + torch.arange(n))
        row += len(prefix) + n
        start += n
        cu.append(row)
    empty = torch.zeros(0, dtype=torch.int64)
    return (torch.tensor(cu, dtype=torch.int32), torch.cat(ids) if ids else tokens[:0],
            torch.cat(positions) if positions else empty, torch.cat(token_rows) if token_rows else empty)  # fmt: skip


def test_worked_example():
    out = ops.prefix_layout(torch.tensor([5, 6, 7]), make_cu([2, 0, 1]), torch.tensor([90, 91]))
    assert out.cu_seqlens.tolist() == [0, 4, 6, 9]
    assert out.ids.tolist() == [90, 91, 5, 6, 90, 91, 90, 91, 7]
    assert out.positions.tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]
    assert out.token_rows.tolist() == [2, 3, 8]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", LENGTH_CASES + [[]])
@pytest.mark.parametrize("num_prefix", [0, 1, 4])
def test_matches_per_sequence_construction_and_reference(device, lengths, num_prefix, gen):
    for dtype in (torch.int32, torch.int64):
        tokens = torch.randint(0, 51866, (sum(lengths),), generator=gen).to(dtype)
        prefix = torch.arange(50258, 50258 + num_prefix).to(dtype)
        cu = make_cu(lengths, device)
        out = ops.prefix_layout(tokens.to(device), cu, prefix.to(device))
        ref = reference.prefix_layout(tokens.to(device), cu, prefix.to(device))
        expected = per_sequence(tokens, lengths, prefix)
        assert out.cu_seqlens.dtype == torch.int32 and out.ids.dtype == dtype
        assert out.positions.dtype == out.token_rows.dtype == torch.int64
        for name, got, want, r in zip(out._fields, out, expected, ref):
            assert torch.equal(got.cpu(), want), name
            assert torch.equal(r.cpu(), want), f"reference {name}"
        assert torch.equal(out.ids[out.token_rows], tokens.to(device))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    args = (torch.tensor([3, 1, 4, 1, 5, 9, 2], device=device), make_cu([3, 0, 4], device),
            torch.tensor([7, 8], device=device))  # fmt: skip
    torch.library.opcheck(torch.ops.taste.prefix_layout, args)


BAD = [
    ("float tokens", lambda: ops.prefix_layout(torch.zeros(2), make_cu([2]), torch.tensor([1.0])), r"tokens must be"),
    ("2-D tokens", lambda: ops.prefix_layout(torch.zeros(1, 2, dtype=torch.long), make_cu([2]), torch.tensor([1])),
     r"tokens must be a 1-D \(N,\) tensor"),
    ("prefix dtype", lambda: ops.prefix_layout(torch.tensor([1, 2]), make_cu([2]), torch.tensor([1], dtype=I32)),
     r"prefix must be a 1-D \(P,\) tensor of tokens' dtype"),
    ("offsets short of N", lambda: ops.prefix_layout(torch.tensor([1, 2]), make_cu([1]), torch.tensor([1])),
     r"cu_seqlens must end at the number of rows \(2\)"),
    ("int64 offsets", lambda: ops.prefix_layout(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([1])),
     r"cu_seqlens must be an int32"),
]  # fmt: skip


@pytest.mark.parametrize("what,call,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(what, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_cuda_refuses_a_device_mix_and_survives_unchecked_offsets():
    with pytest.raises(RuntimeError, match=r"prefix must be on the same device as tokens"):
        ops.prefix_layout(torch.tensor([1, 2], device="cuda"), make_cu([2], "cuda"), torch.tensor([1]))
    # Offsets past the tokens (not value-checked on CUDA): rows without a token get id -1, nothing is read outside.
    out = ops.prefix_layout(torch.tensor([1, 2], device="cuda"), make_cu([3], "cuda"), torch.tensor([9], device="cuda"))
    torch.cuda.synchronize()
    assert out.ids.tolist()[:3] == [9, 1, 2]
