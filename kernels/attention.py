"""Triton kernels of the text-query attention: packed variable-length queries over packed keys.

Built for the TASTE shape: few queries per utterance (10-200 text tokens) over many keys (1500 encoder frames).
One program owns a BLOCK_M tile of one sequence's queries for one head, and BLOCK_M covers a whole utterance's
queries where it can, so K/V of an utterance are read once per head. When the grid would not fill the GPU (one
utterance), the key range is split across programs and the partial results are merged by their log-sum-exp.
The backward is deterministic: dK/dV and dQ come from two kernels that each own their output rows.

Conventions: q (Nq, H, D), k/v (Nk, H, D), cu_seqlens int32 (B + 1,), out (Nq, H, D), lse float32 (H, Nq).
lse holds +inf for a query that sees no key (its output is 0). Causal masking is aligned bottom-right, as in
flash-attention: query i of a sequence sees keys j <= i + (Lk - Lq).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _key_range(
    start_m, q_len, k_len, split, num_splits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr
):
    """Keys [lo, hi) that split `split` of the query tile starting at start_m must visit."""
    per_split = tl.cdiv(tl.cdiv(k_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, k_len)
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + (k_len - q_len))
    return lo, hi


@triton.jit
def _text_query_attention_fwd_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,
    O_ptr,
    LSE_ptr,
    CUQ_ptr,
    CUK_ptr,
    stride_qm,
    stride_qh,
    stride_km,
    stride_kh,
    stride_vm,
    stride_vh,
    stride_om,
    stride_oh,
    stride_os,
    stride_ls,
    num_heads,
    total_q,
    num_splits,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start = tl.load(CUQ_ptr + b).to(tl.int64)
    q_len = tl.load(CUQ_ptr + b + 1).to(tl.int64) - q_start
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    k_start = tl.load(CUK_ptr + b).to(tl.int64)
    k_len = tl.load(CUK_ptr + b + 1).to(tl.int64) - k_start
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    q = tl.load(
        Q_ptr + (q_start + offs_m)[:, None] * stride_qm + h * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): the softmax runs in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, q_len, k_len, split, num_splits, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        k = tl.load(
            K_ptr + (k_start + cols)[:, None] * stride_km + h * stride_kh + offs_d[None, :],
            mask=col_ok[:, None],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = col_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None] + (k_len - q_len))
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V_ptr + (k_start + cols)[:, None] * stride_vm + h * stride_vh + offs_d[None, :],
            mask=col_ok[:, None],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    # Natural-log LSE; with splits a split without keys reports -inf (weight 0 in the merge), else +inf = no key.
    lse = (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) / 1.4426950408889634
    if SPLIT:
        lse = tl.where(has_key, lse, float("-inf"))
    else:
        lse = tl.where(has_key, lse, float("inf"))
    o_ptrs = O_ptr + split * stride_os + (q_start + offs_m)[:, None] * stride_om + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE_ptr + split * stride_ls + h * total_q + q_start + offs_m, lse, mask=row_ok)


@triton.jit
def _text_query_attention_merge_kernel(
    OP_ptr,
    LP_ptr,
    O_ptr,
    LSE_ptr,
    stride_ps,
    stride_pm,
    stride_ph,
    stride_ls,
    stride_om,
    stride_oh,
    total_q,
    num_splits,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < total_q
    lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        lse_max = tl.maximum(
            lse_max, tl.load(LP_ptr + s * stride_ls + h * total_q + offs_m, mask=row_ok, other=float("-inf"))
        )
    use = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        w = tl.exp(tl.load(LP_ptr + s * stride_ls + h * total_q + offs_m, mask=row_ok, other=float("-inf")) - use)
        o = tl.load(
            OP_ptr + s * stride_ps + offs_m[:, None] * stride_pm + h * stride_ph + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        acc += w[:, None] * o
        weight += w
    has_key = weight > 0.0
    out = acc / tl.where(has_key, weight, 1.0)[:, None]
    tl.store(
        O_ptr + offs_m[:, None] * stride_om + h * stride_oh + offs_d[None, :],
        out.to(O_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    lse = tl.where(has_key, use + tl.log(tl.where(has_key, weight, 1.0)), float("inf"))
    tl.store(LSE_ptr + h * total_q + offs_m, lse, mask=row_ok)


@triton.jit
def _text_query_attention_bwd_delta_kernel(
    O_ptr,
    DO_ptr,
    DELTA_ptr,
    stride_om,
    stride_oh,
    stride_dom,
    stride_doh,
    total_q,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < total_q
    o = tl.load(
        O_ptr + offs_m[:, None] * stride_om + h * stride_oh + offs_d[None, :], mask=row_ok[:, None], other=0.0
    ).to(tl.float32)
    do = tl.load(
        DO_ptr + offs_m[:, None] * stride_dom + h * stride_doh + offs_d[None, :], mask=row_ok[:, None], other=0.0
    ).to(tl.float32)
    tl.store(DELTA_ptr + h * total_q + offs_m, tl.sum(o * do, 1), mask=row_ok)


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
    stride_qm,
    stride_qh,
    stride_km,
    stride_kh,
    stride_vm,
    stride_vh,
    stride_dom,
    stride_doh,
    stride_dkm,
    stride_dkh,
    stride_dvm,
    stride_dvh,
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
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    k_start = tl.load(CUK_ptr + b).to(tl.int64)
    k_len = tl.load(CUK_ptr + b + 1).to(tl.int64) - k_start
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return
    q_start = tl.load(CUQ_ptr + b).to(tl.int64)
    q_len = tl.load(CUQ_ptr + b + 1).to(tl.int64) - q_start
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < k_len
    k = tl.load(
        K_ptr + (k_start + offs_n)[:, None] * stride_km + h * stride_kh + offs_d[None, :],
        mask=col_ok[:, None],
        other=0.0,
    )
    v = tl.load(
        V_ptr + (k_start + offs_n)[:, None] * stride_vm + h * stride_vh + offs_d[None, :],
        mask=col_ok[:, None],
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # queries before start_n - (Lk - Lq) see none of these keys
        lo = tl.maximum(start_n - (k_len - q_len), 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, q_len, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < q_len
        q = tl.load(
            Q_ptr + (q_start + rows)[:, None] * stride_qm + h * stride_qh + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        do = tl.load(
            DO_ptr + (q_start + rows)[:, None] * stride_dom + h * stride_doh + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        lse = tl.load(LSE_ptr + h * total_q + q_start + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA_ptr + h * total_q + q_start + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        ok = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= rows[:, None] + (k_len - q_len))
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(
        DK_ptr + (k_start + offs_n)[:, None] * stride_dkm + h * stride_dkh + offs_d[None, :],
        dk.to(DK_ptr.dtype.element_ty),
        mask=col_ok[:, None],
    )
    tl.store(
        DV_ptr + (k_start + offs_n)[:, None] * stride_dvm + h * stride_dvh + offs_d[None, :],
        dv.to(DV_ptr.dtype.element_ty),
        mask=col_ok[:, None],
    )


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
    stride_qm,
    stride_qh,
    stride_km,
    stride_kh,
    stride_vm,
    stride_vh,
    stride_dom,
    stride_doh,
    stride_dqm,
    stride_dqh,
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
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start = tl.load(CUQ_ptr + b).to(tl.int64)
    q_len = tl.load(CUQ_ptr + b + 1).to(tl.int64) - q_start
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    k_start = tl.load(CUK_ptr + b).to(tl.int64)
    k_len = tl.load(CUK_ptr + b + 1).to(tl.int64) - k_start
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    q = tl.load(
        Q_ptr + (q_start + offs_m)[:, None] * stride_qm + h * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        DO_ptr + (q_start + offs_m)[:, None] * stride_dom + h * stride_doh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    lse = tl.load(LSE_ptr + h * total_q + q_start + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA_ptr + h * total_q + q_start + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, q_len, k_len, 0, 1, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        k = tl.load(
            K_ptr + (k_start + cols)[:, None] * stride_km + h * stride_kh + offs_d[None, :],
            mask=col_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            V_ptr + (k_start + cols)[:, None] * stride_vm + h * stride_vh + offs_d[None, :],
            mask=col_ok[:, None],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        ok = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None] + (k_len - q_len))
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(
        DQ_ptr + (q_start + offs_m)[:, None] * stride_dqm + h * stride_dqh + offs_d[None, :],
        (dq * sm_scale).to(DQ_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


# ---------------------------------------------------------------------------------------------------------------
# Launchers. They take validated tensors (taste.ops checks arguments) and launch on the tensors' device; under
# TRITON_INTERPRET=1 they also run on CPU tensors (correctness only).


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get IEEE products (the fp32 tolerance); 16-bit inputs use the tensor cores natively.
    return "ieee" if dtype == torch.float32 else "tf32"


def _tiles(max_seqlen_q: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): one tile holds a whole utterance's queries up to 128 of them."""
    cap = 64 if (dtype == torch.float32 or head_dim > 64) else 128
    block_m = min(cap, max(16, triton.next_power_of_2(max(max_seqlen_q, 1))))
    block_n = 32 if (head_dim > 64 and dtype == torch.float32) else 64
    return block_m, block_n, 8 if block_m * head_dim >= 128 * 64 else 4


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def auto_num_splits(
    batch: int, heads: int, max_seqlen_q: int, max_seqlen_k: int, block_m: int, block_n: int, device: torch.device
) -> int:
    """Key splits so that the grid fills the GPU: only when (query tiles x batch x heads) is below the SM count,
    with at least four key blocks per split."""
    programs = triton.cdiv(max(max_seqlen_q, 1), block_m) * batch * heads
    sms = _num_sms(device)
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(max_seqlen_k, 4 * block_n)))


def text_query_attention_fwd(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    num_splits: int | None = None,
):
    """Returns out (Nq, H, D) in q.dtype and lse (H, Nq) float32."""
    total_q, heads, head_dim = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    block_m, block_n, warps = _tiles(max_seqlen_q, head_dim, q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0:
        return out, lse
    splits = num_splits or auto_num_splits(batch, heads, max_seqlen_q, max_seqlen_k, block_m, block_n, q.device)
    grid = (triton.cdiv(max(max_seqlen_q, 1), block_m), batch * heads, splits)
    if splits == 1:
        o_buf, l_buf = out, lse
    else:
        o_buf = torch.empty((splits, total_q, heads, head_dim), dtype=torch.float32, device=q.device)
        l_buf = torch.empty((splits, heads, total_q), dtype=torch.float32, device=q.device)
    _text_query_attention_fwd_kernel[grid](
        q,
        k,
        v,
        o_buf,
        l_buf,
        cu_seqlens_q,
        cu_seqlens_k,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        o_buf.stride(-3),
        o_buf.stride(-2),
        o_buf.stride(0) if splits > 1 else 0,
        l_buf.stride(0) if splits > 1 else 0,
        heads,
        total_q,
        splits,
        scale,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=head_dim,
        CAUSAL=int(causal),
        SPLIT=int(splits > 1),
        PRECISION=_precision(q.dtype),
        num_warps=warps,
        num_stages=2,
    )
    if splits > 1:
        merge_m = 64
        _text_query_attention_merge_kernel[(triton.cdiv(total_q, merge_m), heads)](
            o_buf,
            l_buf,
            out,
            lse,
            o_buf.stride(0),
            o_buf.stride(1),
            o_buf.stride(2),
            l_buf.stride(0),
            out.stride(0),
            out.stride(1),
            total_q,
            splits,
            BLOCK_M=merge_m,
            BLOCK_D=head_dim,
            num_warps=4,
        )
    return out, lse


def text_query_attention_bwd(
    do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float
):
    """Returns dq, dk, dv in the inputs' dtypes."""
    total_q, heads, head_dim = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if total_q == 0 or batch == 0:
        return dq, dk, dv
    do = do.contiguous()
    block_m, block_n, warps = _tiles(max_seqlen_q, head_dim, q.dtype)
    precision = _precision(q.dtype)
    delta = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    _text_query_attention_bwd_delta_kernel[(triton.cdiv(total_q, 64), heads)](
        out,
        do,
        delta,
        out.stride(0),
        out.stride(1),
        do.stride(0),
        do.stride(1),
        total_q,
        BLOCK_M=64,
        BLOCK_D=head_dim,
        num_warps=4,
    )
    # dK/dV: one program per key tile walks every query tile of its sequence (no atomics).
    dkdv_m = min(block_m, 64)
    _text_query_attention_bwd_dkdv_kernel[(triton.cdiv(max(max_seqlen_k, 1), block_n), batch * heads)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        cu_seqlens_q,
        cu_seqlens_k,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        do.stride(0),
        do.stride(1),
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        heads,
        total_q,
        scale,
        BLOCK_M=dkdv_m,
        BLOCK_N=block_n,
        BLOCK_D=head_dim,
        CAUSAL=int(causal),
        PRECISION=precision,
        num_warps=4,
        num_stages=2,
    )
    dq_m = min(block_m, 64)
    _text_query_attention_bwd_dq_kernel[(triton.cdiv(max(max_seqlen_q, 1), dq_m), batch * heads)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        cu_seqlens_q,
        cu_seqlens_k,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        do.stride(0),
        do.stride(1),
        dq.stride(0),
        dq.stride(1),
        heads,
        total_q,
        scale,
        BLOCK_M=dq_m,
        BLOCK_N=block_n,
        BLOCK_D=head_dim,
        CAUSAL=int(causal),
        PRECISION=precision,
        num_warps=4,
        num_stages=2,
    )
    return dq, dk, dv


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
