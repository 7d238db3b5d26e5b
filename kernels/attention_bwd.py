"""Triton kernels of the text-query attention's backward (see :mod:`taste.kernels.attention` for the layout).

Deterministic: dK/dV and dQ come from two kernels that each own their output rows; the probabilities are recomputed
from the forward's log-sum-exp. Key blocks that every row of a tile sees skip the mask, as in the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import COMPILE_OPTIONS, cdiv, launch_fitting, shrinking
from .attention import (
    MIN_BLOCKS,
    _key_range,
    _kv_block,
    _precision,
    _seq,
    _store_tile,
    _tile,
    _unmasked_end,
    _visible,
    bwd_tiles,
)

# fmt: off  (kernel signatures stay compact)


@triton.jit
def _text_query_attention_bwd_delta_kernel(
    O_ptr,
    DO_ptr,
    DELTA_ptr,
    num_heads,
    total_q,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < total_q
    o = _tile(O_ptr, rows, row_ok, h, num_heads, BLOCK_D).to(tl.float32)
    do = _tile(DO_ptr, rows, row_ok, h, num_heads, BLOCK_D).to(tl.float32)
    tl.store(DELTA_ptr + h * total_q + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_probs_and_ds(
    q, k, v, do, lse2, delta, rows, cols, row_ok, col_ok, shift, sm_scale, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Recomputed probabilities P and dS = P * (dO V^T - delta) of one (query tile, key tile) pair; ``lse2`` is
    the log-sum-exp in base 2 (:func:`_query_tile`), so that the scaling fuses into the exponent's FMA (the sm_90
    builds' hot loops keep 32-34 of their 128 multiplies per thread and key block). MASKED=False: every key of the
    tile is real and seen by every real row; rows past the sequence carry lse2 = +inf, so P = 0."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    p = tl.exp2(s * (sm_scale * 1.4426950408889634) - lse2[:, None])
    if MASKED:
        p = tl.where(_visible(rows, cols, row_ok, col_ok, shift, CAUSAL), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _dq_block(
    q, do, lse, delta, dq, K_ptr, V_ptr, k_start, start_n, rows, row_ok, hi, shift, h, num_heads, sm_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """dQ contribution of one key block to a query tile."""
    cols, col_ok, k, v = _kv_block(K_ptr, V_ptr, k_start, start_n, hi, h, num_heads, BLOCK_N, BLOCK_D, MASKED)
    _, ds = _bwd_probs_and_ds(
        q, k, v, do, lse, delta, rows, cols, row_ok, col_ok, shift, sm_scale, CAUSAL, PRECISION, MASKED
    )
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _query_tile(Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, q_start, q_len, start_m, h, num_heads, total_q,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """The backward's query side of the tile at start_m: rows, row_ok, Q, dO, the LSE in base 2 (log2 of the
    softmax denominator; +inf past the sequence: P = 0) and delta."""
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q = _tile(Q_ptr, q_start + rows, row_ok, h, num_heads, BLOCK_D)
    do = _tile(DO_ptr, q_start + rows, row_ok, h, num_heads, BLOCK_D)
    lse = tl.load(LSE_ptr + h * total_q + q_start + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA_ptr + h * total_q + q_start + rows, mask=row_ok, other=0.0)
    return rows, row_ok, q, do, lse * 1.4426950408889634, delta


@triton.jit
def _dkdv_tile(
    Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, q_start, q_len, start_m, k, v, dk, dv, cols, col_ok, shift, h, num_heads,
    total_q, sm_scale, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """dK/dV contributions of one query tile to a key tile."""
    rows, row_ok, q, do, lse, delta = _query_tile(Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, q_start, q_len, start_m, h,
                                                  num_heads, total_q, BLOCK_M, BLOCK_D)  # fmt: skip
    p, ds = _bwd_probs_and_ds(
        q, k, v, do, lse, delta, rows, cols, row_ok, col_ok, shift, sm_scale, CAUSAL, PRECISION, MASKED
    )
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _text_query_attention_bwd_dkdv_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,
    DO_ptr,
    LSE_ptr,
    DELTA_ptr,
    DK_ptr,
    DV_ptr,
    CUQ_ptr,
    CUK_ptr,
    num_heads,
    total_q,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b, h = pid_bh // num_heads, pid_bh % num_heads
    k_start, k_len = _seq(CUK_ptr, b)
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return
    q_start, q_len = _seq(CUQ_ptr, b)
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < k_len
    k = _tile(K_ptr, k_start + cols, col_ok, h, num_heads, BLOCK_D)
    v = _tile(V_ptr, k_start + cols, col_ok, h, num_heads, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    shift = k_len - q_len
    lo = 0
    free = 0  # the first query tile that sees every key of this tile (all of them, without causal masking)
    if CAUSAL:  # queries before start_n - (Lk - Lq) see none of these keys
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        free = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
    q_end = tl.cdiv(q_len, BLOCK_M) * BLOCK_M
    mid = tl.maximum(lo, tl.minimum(tl.where(start_n + BLOCK_N <= k_len, free, q_end), q_end))
    for start_m in range(lo, mid, BLOCK_M):
        dk, dv = _dkdv_tile(Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, q_start, q_len, start_m, k, v, dk, dv, cols, col_ok,
                            shift, h, num_heads, total_q, sm_scale, BLOCK_M, BLOCK_D, CAUSAL, PRECISION,
                            True)  # fmt: skip
    for start_m in range(mid, q_len, BLOCK_M):
        dk, dv = _dkdv_tile(Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, q_start, q_len, start_m, k, v, dk, dv, cols, col_ok,
                            shift, h, num_heads, total_q, sm_scale, BLOCK_M, BLOCK_D, CAUSAL, PRECISION,
                            False)  # fmt: skip
    _store_tile(DK_ptr, k_start + cols, col_ok, h, num_heads, dk * sm_scale, BLOCK_D)
    _store_tile(DV_ptr, k_start + cols, col_ok, h, num_heads, dv, BLOCK_D)


@triton.jit
def _text_query_attention_bwd_dq_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,
    DO_ptr,
    LSE_ptr,
    DELTA_ptr,
    DQ_ptr,
    CUQ_ptr,
    CUK_ptr,
    num_heads,
    total_q,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b, h = pid_bh // num_heads, pid_bh % num_heads
    q_start, q_len = _seq(CUQ_ptr, b)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    k_start, k_len = _seq(CUK_ptr, b)
    rows, row_ok, q, do, lse, delta = _query_tile(Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, q_start, q_len, start_m, h,
                                                  num_heads, total_q, BLOCK_M, BLOCK_D)  # fmt: skip
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = k_len - q_len
    lo, hi = _key_range(start_m, q_len, k_len, 0, 1, BLOCK_M, BLOCK_N, CAUSAL)
    mid = _unmasked_end(lo, hi, start_m, shift, BLOCK_N, CAUSAL)
    for start_n in range(lo, mid, BLOCK_N):
        dq = _dq_block(q, do, lse, delta, dq, K_ptr, V_ptr, k_start, start_n, rows, row_ok, hi, shift, h, num_heads,
                       sm_scale, BLOCK_N, BLOCK_D, CAUSAL, PRECISION, False)  # fmt: skip
    for start_n in range(mid, hi, BLOCK_N):
        dq = _dq_block(q, do, lse, delta, dq, K_ptr, V_ptr, k_start, start_n, rows, row_ok, hi, shift, h, num_heads,
                       sm_scale, BLOCK_N, BLOCK_D, CAUSAL, PRECISION, True)  # fmt: skip
    _store_tile(DQ_ptr, q_start + rows, row_ok, h, num_heads, dq * sm_scale, BLOCK_D)


# fmt: on


def text_query_attention_bwd(
    do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float
):
    """Returns dq, dk, dv in the inputs' dtypes."""
    do, q, k, v, out = (t.contiguous() for t in (do, q, k, v, out))
    total_q, heads, head_dim = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if total_q == 0 or batch == 0:
        return dq, dk, dv
    block_m, block_n, warps = bwd_tiles(max_seqlen_q, head_dim, q.dtype)
    delta = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    _text_query_attention_bwd_delta_kernel[(cdiv(total_q, 64), heads)](
        out, do, delta, heads, total_q, BLOCK_M=64, BLOCK_D=head_dim, num_warps=4, **COMPILE_OPTIONS
    )
    flags = dict(BLOCK_D=head_dim, CAUSAL=int(causal), PRECISION=_precision(q.dtype))
    tiles = shrinking(dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=2), MIN_BLOCKS)
    key = (q.device, q.dtype, tuple(flags.items()))

    # dK/dV: one program per key tile walks every query tile of its sequence; dQ: one per query tile.
    def dkdv(tile):
        _text_query_attention_bwd_dkdv_kernel[(cdiv(max(max_seqlen_k, 1), tile["BLOCK_N"]), batch * heads)](
            q, k, v, do, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, heads, total_q, scale, **flags, **tile,
            **COMPILE_OPTIONS,
        )  # fmt: skip

    def dq_(tile):
        _text_query_attention_bwd_dq_kernel[(cdiv(max(max_seqlen_q, 1), tile["BLOCK_M"]), batch * heads)](
            q, k, v, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, heads, total_q, scale, **flags, **tile,
            **COMPILE_OPTIONS,
        )  # fmt: skip

    launch_fitting(dkdv, tiles, ("bwd dkdv", *key))
    launch_fitting(dq_, tiles, ("bwd dq", *key))
    return dq, dk, dv
