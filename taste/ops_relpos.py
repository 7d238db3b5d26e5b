"""``taste.ops.relpos_attention``: the unit decoder's relative-position self-attention (ESPnet ``rel_selfattn``,
spec 1.7), computed a block of queries at a time.

The formula (``taste.reference.relpos_attention``) builds, per layer, half a dozen ``(B, H, Tq, Tk)`` tensors (two
score terms, their sum, the mask, the probabilities) and autograd keeps the probabilities until the backward: at
the official decoder's shapes the attention made 773 of a training step's 1232 MB of activations and transients
(``bench/RESULTS.md``). Here the forward walks the queries
in blocks whose ``(B, H, rows, Tk)`` tensors hold about ``block_elements`` elements each and keeps only its inputs;
the backward recomputes each block's probabilities (the same operations, so the same values) and accumulates the
key, value and position gradients block after block, in a fixed order. Plain PyTorch on every device; registered
as a ``torch.library.custom_op`` so that ``torch.compile`` sees one opaque operator whatever the lengths.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from taste import reference
from taste._dispatch import call
from taste.ops_attention import _autocast

# Elements of one block's (B, H, rows, Tk) tensor, by device. The CPU's was measured (bench/RESULTS.md: 2^20 and
# smaller ran slower, 2^22 and larger no faster and larger in memory); on a GPU, where each block's dozen operators
# cost launches, larger blocks (64-128 MB a tensor) are a guess not yet timed.
BLOCK_ELEMENTS = {"cpu": 1 << 21}
BLOCK_ELEMENTS_ELSEWHERE = 1 << 25


def _block_rows(qu: Tensor, k: Tensor, block_elements: int) -> int:
    batch, heads, _, _ = qu.shape
    return max(1, block_elements // max(1, batch * heads * k.shape[2]))


def _block_probs(qu, qv, k, p, positions, mask, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Probabilities of query rows ``lo:hi`` ``(B, H, rows, Tk)`` (float32 at least, as autocast's softmax) and the
    relative-offset index ``(B, H, rows, Tk)`` their position scores were gathered with."""
    ac = qu[:, :, lo:hi] @ k.transpose(-1, -2)  # (B, H, rows, Tk)
    by_offset = reference.per_head_matmul(qv[:, :, lo:hi], p.transpose(-1, -2))  # (B, H, rows, P)
    offset = (positions[:, lo:hi, None] - torch.arange(k.shape[2], device=k.device)).clamp_(0, p.shape[1] - 1)
    index = offset[:, None].expand(-1, qu.shape[1], -1, -1)
    scores = (ac + by_offset.gather(-1, index)) / math.sqrt(qu.shape[-1])
    scores = scores.to(reference._acc_dtype(scores.dtype))
    return scores.masked_fill_(~mask[:, None, lo:hi], float("-inf")).softmax(-1), index


def _forward(qu: Tensor, qv: Tensor, k: Tensor, v: Tensor, p: Tensor, positions: Tensor, mask: Tensor,
             block_elements: int) -> Tensor:  # fmt: skip
    batch, heads, tq, _ = qu.shape
    out = v.new_empty(batch, heads, tq, v.shape[-1])
    step = _block_rows(qu, k, block_elements)
    for lo in range(0, tq, step):
        hi = min(lo + step, tq)
        probs, _ = _block_probs(qu, qv, k, p, positions, mask, lo, hi)
        out[:, :, lo:hi] = probs.to(v.dtype) @ v
    return out


_relpos = torch.library.custom_op("taste::relpos_attention", mutates_args=())(_forward)


@_relpos.register_fake
def _relpos_fake(qu, qv, k, v, p, positions, mask, block_elements):
    return v.new_empty(qu.shape[0], qu.shape[1], qu.shape[2], v.shape[-1])


@torch.library.custom_op("taste::relpos_attention_backward", mutates_args=())
def _relpos_backward(grad_out: Tensor, qu: Tensor, qv: Tensor, k: Tensor, v: Tensor, p: Tensor, positions: Tensor,
                     mask: Tensor, block_elements: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    acc = reference._acc_dtype(qu.dtype)  # key, value and position gradients summed over blocks in this
    dqu, dqv = torch.empty_like(qu), torch.empty_like(qv)
    dk, dv = torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)
    dp = torch.zeros(p.shape, dtype=acc, device=p.device)
    scale = 1.0 / math.sqrt(qu.shape[-1])
    step = _block_rows(qu, k, block_elements)
    for lo in range(0, qu.shape[2], step):
        hi = min(lo + step, qu.shape[2])
        probs, index = _block_probs(qu, qv, k, p, positions, mask, lo, hi)
        g = grad_out[:, :, lo:hi]
        dv += (probs.to(v.dtype).transpose(-1, -2) @ g).to(acc)
        dprobs = (g @ v.transpose(-1, -2)).to(probs.dtype)  # (B, H, rows, Tk)
        ds = probs.mul_(dprobs - (dprobs * probs).sum(-1, keepdim=True)).mul_(scale).to(qu.dtype)  # d scores
        dqu[:, :, lo:hi] = ds @ k
        dk += (ds.transpose(-1, -2) @ qu[:, :, lo:hi]).to(acc)
        # the gather's backward: each visible offset of a row is gathered once (masked keys add exact zeros)
        d_offset = ds.new_zeros(*ds.shape[:3], p.shape[1]).scatter_add_(-1, index, ds)  # (B, H, rows, P)
        dqv[:, :, lo:hi] = reference.per_head_matmul(d_offset, p)
        dp += (d_offset.transpose(-1, -2) @ qv[:, :, lo:hi]).sum(0).to(acc)
    return dqu, dqv, dk.to(k.dtype), dv.to(v.dtype), dp.to(p.dtype)


@_relpos_backward.register_fake
def _relpos_backward_fake(grad_out, qu, qv, k, v, p, positions, mask, block_elements):
    return torch.empty_like(qu), torch.empty_like(qv), torch.empty_like(k), torch.empty_like(v), torch.empty_like(p)


def _setup_context(ctx, inputs, output):
    qu, qv, k, v, p, positions, mask, block_elements = inputs
    ctx.save_for_backward(qu, qv, k, v, p, positions, mask)
    ctx.block_elements = block_elements


def _backward(ctx, grad_out):
    grads = _relpos_backward(grad_out.contiguous(), *ctx.saved_tensors, ctx.block_elements)
    return (*grads, None, None, None)


_relpos.register_autograd(_backward, setup_context=_setup_context)


def relpos_attention(
    qu: Tensor,
    qv: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
    positions: Tensor,
    mask: Tensor,
    *,
    block_elements: int | None = None,
) -> Tensor:
    """ESPnet's relative-position attention with the rel_shift done by gathering offsets (``taste.relpos``).

    ``score(i, j) = (qu_i . k_j + qv_i . p[offset(i, j)]) / sqrt(d_k)`` with ``offset(i, j) = positions_i - j``
    clamped to ``[0, P - 1]``, softmax over the keys ``mask`` allows, then the values.

    Args:
        qu, qv: ``(B, H, Tq, d_k)``: the queries plus ``pos_bias_u`` and plus ``pos_bias_v``.
        k, v: ``(B, H, Tk, d_k)``.
        p: ``(H, P, d_k)`` projected relative sinusoids of offsets ``0..P-1`` (``P`` above every visible offset).
        positions: ``(B, Tq)`` int64 index of each query (keys sit at ``0..Tk-1``).
        mask: ``(B, Tq, Tk)`` bool, True where the query may attend; a row with no key gives NaN, as the formula.
        block_elements: about how many elements one block's ``(B, H, rows, Tk)`` tensors hold (memory against
            the number of blocks); None: ``BLOCK_ELEMENTS`` for the device (2^21 on the CPU, 2^25 elsewhere).

    Returns:
        ``(B, H, Tq, d_k)`` in v's dtype; the probabilities are float32 at least (as autocast makes softmax).
        Differentiable in qu, qv, k, v and p; the backward recomputes the probabilities block by block (a problem
        that fits one block runs the formula, whose backward keeps them: recomputing would save nothing). Under
        ``torch.autocast`` the floating inputs are first cast to its dtype, as its matmuls would.
    """
    cast = _autocast(qu.device, qu, qv, k, v, p)
    if cast is not None:
        qu, qv, k, v, p = cast
    if qu.dim() != 4 or qv.shape != qu.shape or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"qu and qv must be (B, H, Tq, d_k) and k, v (B, H, Tk, d_k), got qu {tuple(qu.shape)}, "
                         f"qv {tuple(qv.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")  # fmt: skip
    batch, heads, tq, d_k = qu.shape
    if k.shape[:2] != (batch, heads) or k.shape[3] != d_k or p.dim() != 3 or p.shape[::2] != (heads, d_k):
        raise ValueError(f"k and v must be ({batch}, {heads}, Tk, {d_k}) and p ({heads}, P, {d_k}), got "
                         f"k {tuple(k.shape)}, p {tuple(p.shape)}")  # fmt: skip
    if positions.shape != (batch, tq) or positions.dtype != torch.int64:
        raise ValueError(f"positions must be ({batch}, {tq}) int64, got {positions.dtype} {tuple(positions.shape)}")
    if mask.shape != (batch, tq, k.shape[2]) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be ({batch}, {tq}, {k.shape[2]}) bool, got {mask.dtype} {tuple(mask.shape)}")
    if block_elements is None:
        block_elements = BLOCK_ELEMENTS.get(qu.device.type, BLOCK_ELEMENTS_ELSEWHERE)
    elif block_elements < 1:
        raise ValueError(f"block_elements must be >= 1 or None, got {block_elements}")
    if batch * heads * tq * k.shape[2] <= block_elements:  # one block: nothing to save by recomputing it
        return reference.relpos_attention(qu, qv, k, v, p, positions, mask)
    # (contiguous once: every block multiplies by k, v and p, and a strided batch would be copied each time)
    args = (qu.contiguous(), qv.contiguous(), k.contiguous(), v.contiguous(), p.contiguous(), positions, mask,
            int(block_elements))  # fmt: skip
    return call(_relpos, _forward, _forward, args, qu, qv, k, v, p)
