"""taste.ops.relpos_attention (the unit decoder's relative-position attention, a block of queries at a time)
against the whole-score formula of taste.reference, and what the blocks are for: memory."""

import common
import pytest
import torch

from taste import ops, reference
from taste.relpos import causal_mask


def problem(batch=3, heads=2, tq=11, tk=None, d_k=8, p_len=None, dtype=torch.float64, seed=0):
    """Ragged causal rows (lengths 11, 7, 1 for the default batch); with tk > tq the queries are the last tq positions
    of tk (a KV cache's prefill after a prompt), each seeing the keys up to itself."""
    g = torch.Generator().manual_seed(seed)
    tk = tq if tk is None else tk
    p_len = tk if p_len is None else p_len

    def rand(*shape):
        return (0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()

    qu, qv = rand(batch, heads, tq, d_k), rand(batch, heads, tq, d_k)
    k, v = rand(batch, heads, tk, d_k), rand(batch, heads, tk, d_k)
    p = rand(heads, p_len, d_k)
    lengths = torch.tensor([tk, max(tk - 4, 1), 1, tk][:batch])
    positions = torch.arange(tk - tq, tk).expand(batch, -1)
    mask = (torch.arange(tk)[None, None] <= positions[..., None]) & (torch.arange(tk) < lengths[:, None])[:, None]
    return qu, qv, k, v, p, positions, mask


def grads(fn, inputs, g):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs[:5], g)


@pytest.mark.parametrize("block_elements", [1, 200, 600])  # one row a block, a few rows, or (600) the formula
@pytest.mark.parametrize("shape", [dict(), dict(tq=5, tk=13), dict(batch=1, tq=1, tk=9, p_len=12)])
def test_matches_the_whole_score_formula(block_elements, shape):
    inputs = problem(**shape)
    g = torch.randn(inputs[0].shape[:3] + (inputs[3].shape[-1],), dtype=torch.float64)
    want, want_grads = grads(reference.relpos_attention, inputs, g)
    got, got_grads = grads(lambda *a: ops.relpos_attention(*a, block_elements=block_elements), inputs, g)
    torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-13)
    for name, a, b in zip(("qu", "qv", "k", "v", "p"), got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


def test_gradcheck_and_opcheck():
    qu, qv, k, v, p, positions, mask = problem(batch=2, tq=5, d_k=4)
    torch.autograd.gradcheck(lambda *a: ops.relpos_attention(*a, positions, mask, block_elements=12),
                             (qu, qv, k, v, p))  # fmt: skip
    torch.library.opcheck(torch.ops.taste.relpos_attention.default, (qu, qv, k, v, p, positions, mask, 12))
    whole = torch.ops.taste.relpos_attention(qu, qv, k, v, p, positions, mask, 10**6)  # (the op in one block)
    torch.testing.assert_close(whole, reference.relpos_attention(qu, qv, k, v, p, positions, mask))
    plain = [t.detach() for t in (qu, qv, k, v, p)]  # (the backward op has no backward of its own)
    args = (torch.randn(2, 2, 5, 4, dtype=torch.float64), *plain, positions, mask, 12)
    torch.library.opcheck(torch.ops.taste.relpos_attention_backward.default, args)


def test_float32_and_compiled_with_changing_lengths():
    for tq in (11, 17):  # (a second length: dynamic shapes in the same compiled function)
        inputs = problem(tq=tq, dtype=torch.float32, seed=tq)
        want = reference.relpos_attention(*inputs)
        torch.testing.assert_close(ops.relpos_attention(*inputs, block_elements=50), want, atol=1e-6, rtol=1e-5)
        compiled = torch.compile(lambda *a: ops.relpos_attention(*a, block_elements=50), fullgraph=True,
                                 backend="aot_eager")  # fmt: skip
        got = compiled(*inputs)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        got.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs[:5])


def test_under_autocast_as_its_matmuls():
    """16-bit products as autocast gives the formula's matmuls, probabilities in float32, output in bfloat16."""
    qu, qv, k, v, p, positions, mask = problem(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference.relpos_attention(qu, qv, k, v, p, positions, mask)
        got = ops.relpos_attention(qu, qv, k, v, p, positions, mask, block_elements=30)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1.6e-2)


def test_blocks_hold_less_memory_than_the_whole_scores():
    """Forward and backward: the formula keeps several (B, H, Tq, Tk) tensors for its backward (2 MB each here); the
    blocked op keeps its inputs and recomputes, so its peak is a fraction of the formula's."""
    qu, qv, k, v, p, positions, mask = problem(batch=2, heads=4, tq=256, d_k=32, dtype=torch.float32)
    g = torch.randn(2, 4, 256, 32)

    def step(fn):
        return lambda: torch.autograd.grad(fn(qu, qv, k, v, p, positions, mask), (qu, qv, k, v, p), g)

    whole = common.peak_mb(step(reference.relpos_attention), "cpu")
    blocked = common.peak_mb(step(lambda *a: ops.relpos_attention(*a, block_elements=1 << 15)), "cpu")
    assert whole > 10 and blocked < 0.4 * whole, (whole, blocked)


def test_bad_input():
    qu, qv, k, v, p, positions, mask = problem()
    with pytest.raises(ValueError, match=r"qu and qv must be \(B, H, Tq, d_k\)"):
        ops.relpos_attention(qu[0], qv, k, v, p, positions, mask)
    with pytest.raises(ValueError, match=r"p \(2, P, 8\)"):
        ops.relpos_attention(qu, qv, k, v, p[:1], positions, mask)
    with pytest.raises(ValueError, match=r"positions must be \(3, 11\) int64"):
        ops.relpos_attention(qu, qv, k, v, p, positions.int(), mask)
    with pytest.raises(ValueError, match=r"mask must be \(3, 11, 11\) bool"):
        ops.relpos_attention(qu, qv, k, v, p, positions, mask[:, :, :5])
    with pytest.raises(ValueError, match="block_elements must be >= 1 or None, got 0"):
        ops.relpos_attention(qu, qv, k, v, p, positions, mask, block_elements=0)


def test_the_decoder_layout_of_causal_mask():
    """What the unit decoder passes in training: causal_mask over padded rows and positions 0..T-1."""
    lengths = torch.tensor([6, 3])
    inputs = list(problem(batch=2, tq=6))
    inputs[5], inputs[6] = torch.arange(6).expand(2, -1), causal_mask(lengths, 6)
    torch.testing.assert_close(ops.relpos_attention(*inputs, block_elements=20), reference.relpos_attention(*inputs))
