"""Triton kernels of the residual vector quantizer: every stage of the encoder in one kernel, and the decoder.

Encoder: one program owns BLOCK_M rows. Their residual stays in registers through all stages; for each stage the
program walks the codebook in BLOCK_K tiles, keeps the running (min distance, argmin) per row, then gathers the
winning codewords. The (N, K) distance matrix never exists in memory. Distances are ||c||^2 - 2 r.c (the row's
||r||^2 is the same for every code); ties go to the lowest index, as torch.argmin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import autotune_enabled, autotuned, tuned_choices


@triton.jit
def _rvq_encode_fwd_kernel(
    X_ptr,
    CB_ptr,
    CN_ptr,
    NS_ptr,
    IDX_ptr,
    QT_ptr,
    ERR_ptr,
    n_rows,
    dim,
    codebook_size,
    stride_xm,
    stride_cbq,
    stride_cbk,
    stride_cnq,
    stride_im,
    stride_qm,
    stride_em,
    n_bucket,  # the autotuner's key (problem size class); unused by the kernel
    NUM_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EXACT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    d_ok = offs_d < dim
    x = tl.load(X_ptr + rows[:, None] * stride_xm + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    residual = x.to(tl.float32)
    num_stages = tl.load(NS_ptr)
    for q in tl.static_range(NUM_Q):
        best = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
        # Exact: float32 operands with IEEE products. Fast: the codebook's dtype on the tensor cores (tf32 for
        # float32), float32 accumulation either way.
        r_op = residual if EXACT else residual.to(CB_ptr.dtype.element_ty)
        for k0 in range(0, codebook_size, BLOCK_K):
            codes = k0 + offs_k
            k_ok = codes < codebook_size
            c = tl.load(
                CB_ptr + q * stride_cbq + codes[:, None] * stride_cbk + offs_d[None, :],
                mask=k_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            norm = tl.load(CN_ptr + q * stride_cnq + codes, mask=k_ok, other=float("inf"))
            if EXACT:
                prod = tl.dot(r_op, tl.trans(c.to(tl.float32)), input_precision="ieee")
            else:
                prod = tl.dot(r_op, tl.trans(c), input_precision="tf32")
            dist = norm[None, :] - 2.0 * prod  # (BLOCK_M, BLOCK_K)
            tile_best = tl.min(dist, 1)
            tile_idx = tl.argmin(dist, 1).to(tl.int32) + k0  # lowest index among equal minima
            better = tile_best < best  # strict: an earlier tile keeps a tie
            best_idx = tl.where(better, tile_idx, best_idx)
            best = tl.where(better, tile_best, best)
        active = q < num_stages
        chosen = tl.load(
            CB_ptr + q * stride_cbq + best_idx[:, None] * stride_cbk + offs_d[None, :],
            mask=(row_ok & active)[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        residual -= chosen
        tl.store(IDX_ptr + rows * stride_im + q, tl.where(active, best_idx, -1).to(tl.int64), mask=row_ok)
        tl.store(ERR_ptr + rows * stride_em + q, tl.where(active, tl.sum(residual * residual, 1), 0.0), mask=row_ok)
    # The sum of the chosen codewords is gathered again here, from the indices just stored (the codebooks are small
    # and cached), rather than kept in registers through every stage: that (BLOCK_M, BLOCK_D) accumulator made the
    # compiler spill. Same order of additions as summing stage by stage, so the same bits.
    tl.debug_barrier()  # the indices were stored by other threads of this program
    quantized = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for q in tl.static_range(NUM_Q):
        idx = tl.load(IDX_ptr + rows * stride_im + q, mask=row_ok, other=-1)
        quantized += tl.load(
            CB_ptr + q * stride_cbq + idx[:, None] * stride_cbk + offs_d[None, :],
            mask=(idx >= 0)[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
    tl.store(
        QT_ptr + rows[:, None] * stride_qm + offs_d[None, :],
        quantized.to(QT_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _rvq_decode_fwd_kernel(
    IDX_ptr,
    CB_ptr,
    W_ptr,
    OUT_ptr,
    n_rows,
    dim,
    stride_im,
    stride_cbq,
    stride_cbk,
    stride_wm,
    stride_om,
    NUM_Q: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    d_ok = offs_d < dim
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for q in tl.static_range(NUM_Q):
        idx = tl.load(IDX_ptr + rows * stride_im + q, mask=row_ok, other=-1)
        use = row_ok & (idx >= 0)
        c = tl.load(
            CB_ptr + q * stride_cbq + tl.where(use, idx, 0)[:, None] * stride_cbk + offs_d[None, :],
            mask=use[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_WEIGHTS:
            c = c * tl.load(W_ptr + rows * stride_wm + q, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        acc += c
    tl.store(
        OUT_ptr + rows[:, None] * stride_om + offs_d[None, :],
        acc.to(OUT_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


# Encoder tiles tried by the autotuner on large problems with d <= 256, by mode: (BLOCK_M, BLOCK_K, num_warps,
# num_stages). The first is the fixed choice for d 256. Kept few and of moderate size: every candidate compiles
# during the first large call. The exact mode's products run on the CUDA cores and need more registers: its sm_90
# builds of (32, 64, 4, 2) and (16, 32, 4, 3) spill (32 registers and a 13 KB stack per thread; a 2 KB stack), as
# `python bench/compile_kernels.py` shows, so it does not try them.
# (32, 64, 8, 2, 128): the fixed tile capped at 128 registers (120-160 bytes of stack) fits 2 blocks per SM, not 1.
ENCODE_TILES = {
    "exact": ((32, 64, 8, 2), (16, 64, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 64, 8, 2, 128)),
    "fast": ((32, 64, 8, 2), (16, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2), (16, 32, 4, 3)),
}
AUTOTUNE_MIN_WORK = 2**22  # rows x codes x stages at which tuning pays for itself


def tuned_encode_kernel(mode: str):
    key = ("n_bucket", "dim", "codebook_size", "NUM_Q", "BLOCK_D", "EXACT")
    return autotuned(_rvq_encode_fwd_kernel, ENCODE_TILES[mode], ("BLOCK_M", "BLOCK_K"), key)


def tuned_tiles() -> dict[str, str]:
    """What the autotuner picked so far, by its key: for benchmark reports."""
    return {k: v for mode in ENCODE_TILES for k, v in tuned_choices(tuned_encode_kernel(mode)).items()}


# The widest codeword the encoder takes: a program keeps (BLOCK_M, d) residuals in registers and (BLOCK_K, d) code
# tiles in shared memory. At d 1280 (BLOCK_D 2048) even its smallest tile needs 384 KB of shared memory, over the
# 227 KB of an sm_90 block (`python bench/compile_kernels.py`); taste.ops takes PyTorch's matmuls there instead.
MAX_DIM = 512


def rvq_encode_fwd(x, codebooks, code_norms, num_stages, fast: bool, autotune: bool | None = None):
    """x (N, d); codebooks (Q, K, d); code_norms (Q, K) float32; num_stages int32 0-dim tensor on x's device.
    Returns indices (N, Q) int64 (-1 for stages >= num_stages), quantized (N, d) in x.dtype, and the squared
    norm of the residual after every stage, (N, Q) float32 (0 for inactive stages). d must be at most MAX_DIM."""
    n, dim = x.shape
    nq, k, _ = codebooks.shape
    if dim > MAX_DIM:
        raise ValueError(f"rvq_encode_fwd: codeword dim d={dim} is above the kernel's MAX_DIM={MAX_DIM}")
    if not fast and codebooks.dtype != torch.float32:
        # The exact mode multiplies in float32 anyway; 16-bit codebooks converted inside the kernel made the sm_90
        # build spill everything (32 registers, a 10 KB stack per thread). Exact conversion: the same results.
        codebooks = codebooks.float()
    indices = torch.empty((n, nq), dtype=torch.int64, device=x.device)
    quantized = torch.empty_like(x)
    sq_err = torch.empty((n, nq), dtype=torch.float32, device=x.device)
    if n == 0:
        return indices, quantized, sq_err
    block_d = max(16, triton.next_power_of_2(dim))  # tl.dot needs K >= 16 on GPUs
    if autotune is None:  # large problems of the TASTE size pick their tiles by measurement
        autotune = x.is_cuda and block_d <= 256 and n * k * nq >= AUTOTUNE_MIN_WORK and autotune_enabled()
    args = (
        x,
        codebooks,
        code_norms,
        num_stages,
        indices,
        quantized,
        sq_err,
        n,
        dim,
        k,
        x.stride(0),
        codebooks.stride(0),
        codebooks.stride(1),
        code_norms.stride(0),
        indices.stride(0),
        quantized.stride(0),
        sq_err.stride(0),
    )
    flags = dict(NUM_Q=nq, BLOCK_D=block_d, EXACT=int(not fast))
    if autotune:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
        tuned_encode_kernel("fast" if fast else "exact")[grid](*args, triton.next_power_of_2(n), **flags)
    else:
        block_m = 16 if block_d >= 512 else 32
        block_k = 32 if block_d >= 512 else 64
        _rvq_encode_fwd_kernel[(triton.cdiv(n, block_m),)](
            *args, 0, BLOCK_M=block_m, BLOCK_K=block_k, **flags, num_warps=8 if block_d >= 256 else 4, num_stages=2
        )
    return indices, quantized, sq_err


def rvq_decode_fwd(indices, codebooks, weights=None, out_dtype=None):
    """sum over stages of weights[:, q] * codebooks[q, indices[:, q]]; index -1 contributes 0. (N, d)."""
    n, nq = indices.shape
    dim = codebooks.shape[-1]
    out = torch.empty((n, dim), dtype=out_dtype or codebooks.dtype, device=codebooks.device)
    if n == 0:
        return out
    block_d = triton.next_power_of_2(dim)
    block_m = max(1, min(64, 8192 // block_d))
    _rvq_decode_fwd_kernel[(triton.cdiv(n, block_m),)](
        indices,
        codebooks,
        weights if weights is not None else codebooks,
        out,
        n,
        dim,
        indices.stride(0),
        codebooks.stride(0),
        codebooks.stride(1),
        weights.stride(0) if weights is not None else 0,
        out.stride(0),
        NUM_Q=nq,
        HAS_WEIGHTS=int(weights is not None),
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=8 if block_m * block_d >= 8192 else 4,  # 4 warps spill a full tile with weights (sm_90 build)
    )
    return out
