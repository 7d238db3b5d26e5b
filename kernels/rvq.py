"""Triton kernels of the residual vector quantizer: every stage of the encoder in one kernel, and the decoder.

Encoder: one program owns BLOCK_M rows. For each stage the program walks the codebook in BLOCK_K tiles, keeps the
running (min distance, argmin) per row, then gathers the winning codewords. The (N, K) distance matrix never exists
in memory. Distances are ||c||^2 - 2 r.c (the row's ||r||^2 is the same for every code); ties go to the lowest index,
as torch.argmin. Two layouts of the residual, by the constexpr BLOCK_DS:
- 0: the rows' whole residual (BLOCK_M, d) stays in registers through all stages, one dot per code tile;
- a slice width: the residual lives in a float32 scratch (N, d) in global memory (the program's own rows, cached),
  and each code tile's products accumulate over d in BLOCK_DS slices, as a GEMM walks its K dimension. Far fewer
  registers, so larger code and row tiles build without spilling (`python bench/compile_kernels.py`). The residual
  itself is computed with the same operations in the same order either way; the products' summation order differs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import (
    COMPILE_OPTIONS,
    autotune_enabled,
    autotuned,
    cdiv,
    launch_fitting,
    launch_tuned,
    next_power_of_2,
    shrinking,
    tuned_choices,
    tuning_timings,
)


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
    RS_ptr,  # float32 (N, d) residual scratch of the sliced layout (may be QT_ptr itself when that is float32)
    stride_rm,
    NUM_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EXACT: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    d_ok = offs_d < dim
    num_stages = tl.load(NS_ptr)
    if BLOCK_DS == 0:
        _encode_whole_rows(X_ptr, CB_ptr, CN_ptr, IDX_ptr, ERR_ptr, rows, row_ok, offs_d, d_ok, num_stages,
                           codebook_size, stride_xm, stride_cbq, stride_cbk, stride_cnq, stride_im, stride_em,
                           NUM_Q, BLOCK_M, BLOCK_K, EXACT)  # fmt: skip
    else:
        _encode_sliced(X_ptr, CB_ptr, CN_ptr, IDX_ptr, ERR_ptr, RS_ptr, rows, row_ok, num_stages, dim,
                       codebook_size, stride_xm, stride_cbq, stride_cbk, stride_cnq, stride_im, stride_em, stride_rm,
                       NUM_Q, BLOCK_M, BLOCK_K, BLOCK_D, BLOCK_DS, EXACT)  # fmt: skip
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
def _best_of_tile(dist, k0, best, best_idx):
    """Folds one code tile's (BLOCK_M, BLOCK_K) distances into the running minimum and its index."""
    tile_best = tl.min(dist, 1)
    tile_idx = tl.argmin(dist, 1).to(tl.int32) + k0  # lowest index among equal minima
    better = tile_best < best  # strict: an earlier tile keeps a tie
    return tl.where(better, tile_best, best), tl.where(better, tile_idx, best_idx)


@triton.jit
def _stage_rows(q, num_stages, BLOCK_M: tl.constexpr):
    """Whether stage ``q`` is active, for each of the tile's rows (the same for all), for load masks. A block, not a
    scalar: Triton 3.9's interpreter turns a scalar comparison and'ed with a block mask into integers that
    ``tl.load`` refuses."""
    return tl.full([BLOCK_M], q, tl.int32) < num_stages


@triton.jit
def _encode_whole_rows(X_ptr, CB_ptr, CN_ptr, IDX_ptr, ERR_ptr, rows, row_ok, offs_d, d_ok, num_stages, codebook_size,
                       stride_xm, stride_cbq, stride_cbk, stride_cnq, stride_im, stride_em, NUM_Q: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr):  # fmt: skip
    """Every stage with the rows' whole residual in registers; stores the indices and the squared residual norms."""
    offs_k = tl.arange(0, BLOCK_K)
    x = tl.load(X_ptr + rows[:, None] * stride_xm + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    residual = x.to(tl.float32)
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
            best, best_idx = _best_of_tile(dist, k0, best, best_idx)
        active = q < num_stages
        chosen = tl.load(
            CB_ptr + q * stride_cbq + best_idx[:, None] * stride_cbk + offs_d[None, :],
            mask=(row_ok & _stage_rows(q, num_stages, BLOCK_M))[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        residual -= chosen
        tl.store(IDX_ptr + rows * stride_im + q, tl.where(active, best_idx, -1).to(tl.int64), mask=row_ok)
        tl.store(ERR_ptr + rows * stride_em + q, tl.where(active, tl.sum(residual * residual, 1), 0.0), mask=row_ok)


@triton.jit
def _encode_sliced(X_ptr, CB_ptr, CN_ptr, IDX_ptr, ERR_ptr, RS_ptr, rows, row_ok, num_stages, dim, codebook_size,
                   stride_xm, stride_cbq, stride_cbk, stride_cnq, stride_im, stride_em, stride_rm,
                   NUM_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DS: tl.constexpr, EXACT: tl.constexpr):  # fmt: skip
    """Every stage with the residual in the float32 scratch RS, read in BLOCK_DS-wide slices; stores the indices and
    the squared residual norms. RS rows belong to this program alone."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_s = tl.arange(0, BLOCK_DS)
    for d0 in tl.static_range(0, BLOCK_D, BLOCK_DS):
        cols = d0 + offs_s
        ok = row_ok[:, None] & (cols < dim)[None, :]
        x = tl.load(X_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0)
        tl.store(RS_ptr + rows[:, None] * stride_rm + cols[None, :], x.to(tl.float32), mask=ok)
    tl.debug_barrier()  # the scratch is read back below in other threads' layout
    for q in tl.static_range(NUM_Q):
        best = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
        for k0 in range(0, codebook_size, BLOCK_K):
            codes = k0 + offs_k
            k_ok = codes < codebook_size
            prod = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            # A loop over d, not unrolled: unrolled, the compiler hoists the code tiles' residual loads out of the
            # loop over codes and holds the whole residual in registers again.
            for ds in range(0, dim, BLOCK_DS):
                cols = ds + offs_s
                c_ok = cols < dim
                r = tl.load(RS_ptr + rows[:, None] * stride_rm + cols[None, :], mask=row_ok[:, None] & c_ok[None, :],
                            other=0.0)  # fmt: skip
                c = tl.load(CB_ptr + q * stride_cbq + codes[:, None] * stride_cbk + cols[None, :],
                            mask=k_ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
                if EXACT:
                    prod += tl.dot(r, tl.trans(c.to(tl.float32)), input_precision="ieee")
                else:
                    prod += tl.dot(r.to(CB_ptr.dtype.element_ty), tl.trans(c), input_precision="tf32")
            norm = tl.load(CN_ptr + q * stride_cnq + codes, mask=k_ok, other=float("inf"))
            best, best_idx = _best_of_tile(norm[None, :] - 2.0 * prod, k0, best, best_idx)
        active = q < num_stages
        stage_rows = _stage_rows(q, num_stages, BLOCK_M)[:, None]
        tl.store(IDX_ptr + rows * stride_im + q, tl.where(active, best_idx, -1).to(tl.int64), mask=row_ok)
        tl.debug_barrier()  # every thread's reads of this stage's residual come before its update
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for d0 in tl.static_range(0, BLOCK_D, BLOCK_DS):
            cols = d0 + offs_s
            ok = row_ok[:, None] & (cols < dim)[None, :]
            r = tl.load(RS_ptr + rows[:, None] * stride_rm + cols[None, :], mask=ok, other=0.0)
            chosen = tl.load(CB_ptr + q * stride_cbq + best_idx[:, None] * stride_cbk + cols[None, :],
                             mask=ok & stage_rows, other=0.0).to(tl.float32)  # fmt: skip
            r -= chosen
            tl.store(RS_ptr + rows[:, None] * stride_rm + cols[None, :], r, mask=ok)
            sq += tl.sum(r * r, 1)
        tl.store(ERR_ptr + rows * stride_em + q, tl.where(active, sq, 0.0), mask=row_ok)
        tl.debug_barrier()  # the updated residual is read in the next stage


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


# Encoder tiles tried by the autotuner on large problems with d <= 256, by mode: (BLOCK_M, BLOCK_K, BLOCK_DS,
# num_warps, num_stages[, maxnreg]). The first is the fixed choice for d 256. Kept few: every candidate compiles during
# the first large call. What the sm_90 builds show (`python bench/compile_kernels.py`, and the SASS, bench/RESULTS.md):
# - The exact mode's float32 products run on the CUDA cores as FFMA fed from shared memory. With the whole residual
#   in registers (BLOCK_DS 0) every tile loads 0.77 floats per FMA, which caps the FMA units at about a third; wider
#   tiles spill. 64 x 32 (112 bytes of stack on Triton 3.6) and 32 x 32 (136) are no longer tried; 32 x 64 with 4
#   warps and 16 x 32 with 3 stages spilled kilobytes. (32, 64, 0, 8, 2, 128): the fixed tile capped at 128 registers
#   (120-160 bytes of stack) fits 2 blocks per SM, not 1.
# - The sliced layout (BLOCK_DS 32) builds 64 x 128, 64 x 64 and 32 x 128 code tiles without a stack on Triton 3.6 and
#   3.8 (194-226 registers), at 0.38-0.51 floats per FMA; 32 x 128 with 4 warps fits 2 blocks per SM (64 x 128 capped
#   at 128 registers would too, but keeps 288-320 bytes of stack). In the fast mode its 64-row tiles use the
#   warpgroup MMA (wgmma) without a stack, where the whole-row 64 x 32 tile spills 208-256 bytes.
ENCODE_TILE_NAMES = ("BLOCK_M", "BLOCK_K", "BLOCK_DS")  # then num_warps, num_stages[, maxnreg]; BLOCK_DS 0: whole rows
ENCODE_TILES = {
    "exact": ((32, 64, 0, 8, 2), (16, 64, 0, 4, 2), (32, 64, 0, 8, 2, 128), (64, 128, 32, 8, 2), (64, 64, 32, 8, 2),
              (32, 128, 32, 4, 2)),
    "fast": ((32, 64, 0, 8, 2), (16, 64, 0, 4, 2), (32, 64, 0, 4, 2), (32, 32, 0, 4, 2), (64, 32, 0, 8, 2),
             (16, 32, 0, 4, 3), (64, 128, 32, 8, 2), (64, 64, 32, 8, 2)),
}  # fmt: skip
AUTOTUNE_MIN_WORK = 2**22  # rows x codes x stages at which tuning pays for itself


def tuned_encode_kernel(mode: str):
    key = ("n_bucket", "dim", "codebook_size", "NUM_Q", "BLOCK_D", "EXACT")
    return autotuned(_rvq_encode_fwd_kernel, ENCODE_TILES[mode], ENCODE_TILE_NAMES, key)


def tuned_tiles() -> dict[str, str]:
    """What the autotuner picked so far, by its key: for benchmark reports."""
    return {k: v for mode in ENCODE_TILES for k, v in tuned_choices(tuned_encode_kernel(mode)).items()}


def tuned_timings() -> dict[str, dict[str, float]]:
    """Every candidate's median milliseconds at each tuning so far, by key: for benchmark reports."""
    return {k: v for mode in ENCODE_TILES for k, v in tuning_timings(tuned_encode_kernel(mode)).items()}


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
    block_d = max(16, next_power_of_2(dim))  # tl.dot needs K >= 16 on GPUs
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

    # The sliced tiles keep the residual in a float32 scratch: the output itself where that is float32 (each program
    # writes its rows' output after its last read of their residual).
    def scratch():
        return quantized if quantized.dtype == torch.float32 else torch.empty((n, dim), device=x.device)

    if autotune:
        grid = lambda meta: (cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
        buffer = scratch()
        n_bucket = next_power_of_2(n)
        key = (x.device, x.dtype, codebooks.dtype, n_bucket, dim, k, tuple(flags.items()))
        launch_tuned(tuned_encode_kernel("fast" if fast else "exact"), key, grid, *args, n_bucket, buffer,
                     buffer.stride(0), **flags)  # fmt: skip
    else:

        def launch(tile):
            buffer = scratch() if tile["BLOCK_DS"] else quantized
            _rvq_encode_fwd_kernel[(cdiv(n, tile["BLOCK_M"]),)](
                *args, 0, buffer, buffer.stride(0) if tile["BLOCK_DS"] else 0, **flags, **tile, **COMPILE_OPTIONS
            )

        wide = block_d >= 512
        tile = dict(BLOCK_M=16 if wide else 32, BLOCK_K=32 if wide else 64, BLOCK_DS=0,
                    num_warps=8 if block_d >= 256 else 4, num_stages=2)  # fmt: skip
        # Whole rows hold (BLOCK_K, d) code tiles in shared memory; where the GPU has too little of it (99 KB on Ada,
        # 64 KB on Turing: a d 256 tile needs 96 KB), the sliced layout's 32-wide slices need 16 KB.
        sliced = dict(BLOCK_M=64, BLOCK_K=64, BLOCK_DS=min(32, block_d), num_warps=8, num_stages=2)
        tiles = shrinking(tile, {}) + [sliced]
        launch_fitting(launch, tiles, ("rvq encode", x.device, x.dtype, codebooks.dtype, tuple(flags.items())))
    return indices, quantized, sq_err


def rvq_decode_fwd(indices, codebooks, weights=None, out_dtype=None):
    """sum over stages of weights[:, q] * codebooks[q, indices[:, q]]; index -1 contributes 0. (N, d)."""
    n, nq = indices.shape
    dim = codebooks.shape[-1]
    out = torch.empty((n, dim), dtype=out_dtype or codebooks.dtype, device=codebooks.device)
    if n == 0:
        return out
    block_d = next_power_of_2(dim)
    block_m = max(1, min(64, 8192 // block_d))
    _rvq_decode_fwd_kernel[(cdiv(n, block_m),)](
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
        **COMPILE_OPTIONS,
    )
    return out
