"""Experimental: text-query cross-attention whose K/V tiles are projected from the encoder states inside the
kernel (K = h_key W_k^T, V = h_val W_v^T + b_v, per head), so K and V never touch memory. Forward only.

Measured against the unfused path (cuBLAS projections + taste.kernels.attention) by bench/aggregator.py; the
issue keeps it only if it is faster there (see bench/RESULTS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from taste.kernels.attention import _precision, _tiles


@triton.jit
def _text_query_attention_fused_kv_fwd_kernel(
    Q_ptr,
    HK_ptr,
    HV_ptr,
    WK_ptr,
    WV_ptr,
    BV_ptr,
    O_ptr,
    CUQ_ptr,
    CUK_ptr,
    stride_qm,
    stride_qh,
    stride_hkm,
    stride_hvm,
    stride_wk,
    stride_wv,
    stride_om,
    stride_oh,
    num_heads,
    d_model,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
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
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < q_len
    q = tl.load(
        Q_ptr + (q_start + offs_m)[:, None] * stride_qm + h * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    bias_v = tl.load(BV_ptr + h * BLOCK_D + offs_d).to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for kk in range(0, d_model, BLOCK_K):
            hk = tl.load(
                HK_ptr + (k_start + cols)[:, None] * stride_hkm + (kk + offs_k)[None, :],
                mask=col_ok[:, None],
                other=0.0,
            )
            wk = tl.load(WK_ptr + (h * BLOCK_D + offs_d)[None, :] * stride_wk + (kk + offs_k)[:, None])
            k += tl.dot(hk, wk, input_precision=PRECISION)
            hv = tl.load(
                HV_ptr + (k_start + cols)[:, None] * stride_hvm + (kk + offs_k)[None, :],
                mask=col_ok[:, None],
                other=0.0,
            )
            wv = tl.load(WV_ptr + (h * BLOCK_D + offs_d)[None, :] * stride_wv + (kk + offs_k)[:, None])
            v += tl.dot(hv, wv, input_precision=PRECISION)
        k = k.to(q.dtype)
        v = (v + bias_v[None, :]).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        O_ptr + (q_start + offs_m)[:, None] * stride_om + h * stride_oh + offs_d[None, :],
        out.to(O_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def text_query_attention_fused_kv(
    q, h_key, h_val, w_k, w_v, b_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, scale: float
):
    """q (Nq, H, D) already projected; h_key/h_val (Nk, d_model); w_k/w_v (H*D, d_model); b_v (H*D,).
    Returns (Nq, H, D) = softmax(q (h_key W_k^T)^T) (h_val W_v^T + b_v) per sequence and head."""
    total_q, heads, head_dim = q.shape
    d_model = h_key.shape[1]
    block_m, block_n, warps = _tiles(max_seqlen_q, head_dim, q.dtype)
    block_k = 32 if q.dtype == torch.float32 else 64
    assert d_model % block_k == 0, f"d_model must be a multiple of {block_k}"
    out = torch.empty_like(q)
    batch = cu_seqlens_q.shape[0] - 1
    if total_q == 0 or batch == 0:
        return out
    h_key, h_val, w_k, w_v = (t.contiguous() for t in (h_key, h_val, w_k, w_v))
    grid = (triton.cdiv(max(max_seqlen_q, 1), block_m), batch * heads)
    _text_query_attention_fused_kv_fwd_kernel[grid](
        q,
        h_key,
        h_val,
        w_k,
        w_v,
        b_v,
        out,
        cu_seqlens_q,
        cu_seqlens_k,
        q.stride(0),
        q.stride(1),
        h_key.stride(0),
        h_val.stride(0),
        w_k.stride(0),
        w_v.stride(0),
        out.stride(0),
        out.stride(1),
        heads,
        d_model,
        scale,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=head_dim,
        BLOCK_K=block_k,
        PRECISION=_precision(q.dtype),
        num_warps=warps,
        num_stages=2,
    )
    return out
