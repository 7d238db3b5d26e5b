"""Triton kernels of the text-query attention: packed variable-length queries over packed keys.

Built for the TASTE shape: few queries per utterance (10-200 text tokens) over many keys (1500 encoder frames).
One program owns a BLOCK_M tile of one sequence's queries for one head, and BLOCK_M covers a whole utterance's
queries where it can, so K/V of an utterance are read once per head. When the grid would not fill the GPU (one
utterance), the key range is split across programs and the partial results are merged by their log-sum-exp.
The backward kernels (deterministic) are in :mod:`taste.kernels.attention_bwd`.

Conventions: q (Nq, H, D), k/v (Nk, H, D), all contiguous (the launchers make them so), cu_seqlens int32 (B + 1,),
out (Nq, H, D), lse float32 (H, Nq) with +inf for a query that sees no key (its output is 0). Causal masking is
aligned bottom-right, as in flash-attention: query i of a sequence sees keys j <= i + (Lk - Lq).
"""

from __future__ import annotations

import functools

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
    sm_count,
    tuned_choices,
    tuning_timings,
)

# fmt: off  (kernel signatures stay compact)


@triton.jit
def _seq(CU_ptr, b):
    """(first row, length) of sequence b."""
    start = tl.load(CU_ptr + b).to(tl.int64)
    return start, tl.load(CU_ptr + b + 1).to(tl.int64) - start


@triton.jit
def _tile(PTR, rows, ok, h, num_heads, BLOCK_D: tl.constexpr):
    """The (len(rows), D) tile of head h of a contiguous (N, H, D) tensor; 0 where not ok."""
    offs = (rows * num_heads + h)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    return tl.load(PTR + offs, mask=ok[:, None], other=0.0)


@triton.jit
def _store_tile(PTR, rows, ok, h, num_heads, value, BLOCK_D: tl.constexpr):
    offs = (rows * num_heads + h)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    tl.store(PTR + offs, value.to(PTR.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _visible(rows, cols, row_ok, col_ok, shift, CAUSAL: tl.constexpr):
    """(rows, cols) pairs where the query sees the key; shift = Lk - Lq aligns causality bottom-right."""
    ok = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + shift)
    return ok


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
def _unmasked_end(lo, hi, start_m, shift, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the whole key blocks from lo that every row of the query tile at start_m sees (they need no mask):
    all of [lo, hi) but its last partial block; with causal masking only keys up to start_m + shift (those the
    tile's first row sees)."""
    full = hi
    if CAUSAL:
        full = tl.minimum(hi, start_m + shift + 1)
    return lo + tl.maximum(full - lo, 0) // BLOCK_N * BLOCK_N


@triton.jit
def _kv_block(K_ptr, V_ptr, k_start, start_n, hi, h, num_heads, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              MASKED: tl.constexpr):  # fmt: skip
    """(cols, col_ok, K tile, V tile) of the key block at start_n; MASKED=False: the whole block is below hi."""
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < hi
    if MASKED:
        k = _tile(K_ptr, k_start + cols, col_ok, h, num_heads, BLOCK_D)
        v = _tile(V_ptr, k_start + cols, col_ok, h, num_heads, BLOCK_D)
    else:
        offs = ((k_start + cols) * num_heads + h)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
        k = tl.load(K_ptr + offs)
        v = tl.load(V_ptr + offs)
    return cols, col_ok, k, v


@triton.jit
def _fwd_block(
    q, acc, m_i, l_i, K_ptr, V_ptr, k_start, start_n, rows, row_ok, hi, shift, h, num_heads, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    PRECISION: tl.constexpr, RAW_MAX: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax. MASKED=False: every (row, key) pair is visible (no mask computed,
    unmasked loads); rows past the sequence read zeros and are never stored. RAW_MAX (qk_scale >= 0, unmasked
    blocks): the row maximum is taken over the unscaled scores and scaled once. Rounding is monotonic, so it is
    exactly the maximum of the scaled scores, and the scaling then fuses into the exponent's FMA: one multiply
    per row instead of one per score (the sm_90 build's hot loop loses 26-27 of its 311-316 instructions)."""
    cols, col_ok, k, v = _kv_block(K_ptr, V_ptr, k_start, start_n, hi, h, num_heads, BLOCK_N, BLOCK_D, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        s = tl.where(_visible(rows, cols, row_ok, col_ok, shift, CAUSAL), s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp2(s - m_use[:, None])
    elif RAW_MAX:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = m_new
        p = tl.exp2(s * qk_scale - m_use[:, None])
    else:
        s = s * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["seq_base", "store_lse"])  # (one build for every chunk, LSE stored or not)
def _text_query_attention_fwd_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,
    O_ptr,
    LSE_ptr,
    CUQ_ptr,
    CUK_ptr,
    seq_base,  # program b attends sequence seq_base + b of CUQ_ptr (and sequence b of CUK_ptr)
    store_lse,  # 0: the log-sum-exp is not wanted (inference into a given output), LSE_ptr unused
    num_heads,
    total_q,
    num_splits,
    sm_scale,
    q_bucket,  # the autotuner's key (problem size class); unused by the kernel
    k_bucket,
    b_bucket,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    RAW_MAX: tl.constexpr,  # sm_scale >= 0 (see _fwd_block)
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    b, h = pid_bh // num_heads, pid_bh % num_heads
    q_start, q_len = _seq(CUQ_ptr, seq_base + b)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    k_start, k_len = _seq(CUK_ptr, b)
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q = _tile(Q_ptr, q_start + rows, row_ok, h, num_heads, BLOCK_D)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): the softmax runs in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = k_len - q_len
    lo, hi = _key_range(start_m, q_len, k_len, split, num_splits, BLOCK_M, BLOCK_N, CAUSAL)
    mid = _unmasked_end(lo, hi, start_m, shift, BLOCK_N, CAUSAL)
    for start_n in range(lo, mid, BLOCK_N):
        acc, m_i, l_i = _fwd_block(q, acc, m_i, l_i, K_ptr, V_ptr, k_start, start_n, rows, row_ok, hi, shift, h,
                                   num_heads, qk_scale, BLOCK_N, BLOCK_D, CAUSAL, False, PRECISION,
                                   RAW_MAX)  # fmt: skip
    for start_n in range(mid, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(q, acc, m_i, l_i, K_ptr, V_ptr, k_start, start_n, rows, row_ok, hi, shift, h,
                                   num_heads, qk_scale, BLOCK_N, BLOCK_D, CAUSAL, True, PRECISION,
                                   RAW_MAX)  # fmt: skip
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    # Natural-log LSE; with splits a split without keys reports -inf (weight 0 in the merge), else +inf = no key.
    # store_lse is a runtime flag, not a constexpr: the sm_90 build of the float32 tile without the store kept 32
    # bytes of stack, with it none; the masked store costs a few instructions per tile.
    lse = (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) / 1.4426950408889634
    if SPLIT:
        lse = tl.where(has_key, lse, float("-inf"))
    else:
        lse = tl.where(has_key, lse, float("inf"))
    _store_tile(O_ptr + split * total_q * num_heads * BLOCK_D, q_start + rows, row_ok, h, num_heads, out, BLOCK_D)
    lse_ok = row_ok & (tl.full([BLOCK_M], store_lse, tl.int32) != 0)  # a block, see kernels/rvq.py _stage_rows
    tl.store(LSE_ptr + (split * num_heads + h) * total_q + q_start + rows, lse, mask=lse_ok)


@triton.jit(do_not_specialize=["store_lse"])
def _text_query_attention_merge_kernel(
    OP_ptr,
    LP_ptr,
    O_ptr,
    LSE_ptr,
    store_lse,  # 0: only the output is wanted, LSE_ptr unused (a runtime flag, as in the forward kernel)
    num_heads,
    total_q,
    num_splits,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < total_q
    lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        lse_s = tl.load(LP_ptr + (s * num_heads + h) * total_q + rows, mask=row_ok, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse_s)
    use = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        w = tl.exp(tl.load(LP_ptr + (s * num_heads + h) * total_q + rows, mask=row_ok, other=float("-inf")) - use)
        acc += w[:, None] * _tile(OP_ptr + s * total_q * num_heads * BLOCK_D, rows, row_ok, h, num_heads, BLOCK_D)
        weight += w
    has_key = weight > 0.0
    _store_tile(O_ptr, rows, row_ok, h, num_heads, acc / tl.where(has_key, weight, 1.0)[:, None], BLOCK_D)
    lse = tl.where(has_key, use + tl.log(tl.where(has_key, weight, 1.0)), float("inf"))
    tl.store(LSE_ptr + h * total_q + rows, lse, mask=row_ok & (tl.full([BLOCK_M], store_lse, tl.int32) != 0))


# fmt: on
# ---------------------------------------------------------------------------------------------------------------
# Launchers. They take validated tensors (taste.ops checks arguments) and launch on the tensors' device; under
# TRITON_INTERPRET=1 they also run on CPU tensors (correctness only).


@functools.cache  # (host time: the same few dicts for every launch)
def _fwd_flags(head_dim: int, causal: bool, split: bool, dtype: torch.dtype, raw_max: bool) -> tuple[dict, tuple]:
    """The forward kernel's constexpr keywords and their items (for cache keys). Shared: not to be modified.
    ``raw_max``: whether the kernel may take row maxima over unscaled scores (see _fwd_block): for scales >= 0."""
    flags = dict(BLOCK_D=head_dim, CAUSAL=int(causal), SPLIT=int(split), PRECISION=_precision(dtype),
                 RAW_MAX=int(raw_max))  # fmt: skip
    return flags, tuple(flags.items())


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get IEEE products (the fp32 tolerance); 16-bit inputs use the tensor cores natively.
    return "ieee" if dtype == torch.float32 else "tf32"


# float32 tiles by head dim: (largest BLOCK_M, BLOCK_N) of the forward, (BLOCK_M, BLOCK_N) of the backward, all
# with 8 warps. IEEE float32 products run on the CUDA cores, whose operand layouts hold far more per thread than the
# tensor cores'; these are the largest tiles whose sm_90 builds keep everything in registers (`python
# bench/compile_kernels.py`): the 64 x 64 4-warp tiles used before spilled 1.3 KB per thread in the forward and
# over 10 KB (all but 32 registers) in the backward.
FP32_TILES = {32: ((64, 64), (32, 32)), 64: ((64, 32), (32, 32)), 128: ((32, 16), (16, 16))}


# Where the fixed tiles stop shrinking when a GPU's shared memory cannot hold them (kernels.launch_fitting; 16: the
# smallest side of a tl.dot on GPUs).
MIN_BLOCKS = {"BLOCK_N": 16, "BLOCK_M": 16}


@functools.cache  # (host time: every launch asks, with a handful of distinct arguments)
def _tiles(max_seqlen_q: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Forward (BLOCK_M, BLOCK_N, num_warps): one tile holds a whole utterance's queries, up to 128 of them."""
    fitted = max(16, next_power_of_2(max(max_seqlen_q, 1)))
    if dtype == torch.float32:
        (cap, block_n), _ = FP32_TILES[head_dim]
        return min(cap, fitted), block_n, 8
    block_m = min(64 if head_dim > 64 else 128, fitted)
    return block_m, 64, 8 if block_m * head_dim >= 128 * 64 else 4


@functools.cache  # (host time: the list is the same for every launch of a problem class)
def fixed_fwd_tiles(max_seqlen_q: int, head_dim: int, dtype: torch.dtype) -> tuple[dict, ...]:
    """The forward's fixed launch tile (:func:`_tiles`, two pipeline stages) and the smaller ones that
    :func:`launch_fitting` falls back to. Shared: not to be modified."""
    block_m, block_n, warps = _tiles(max_seqlen_q, head_dim, dtype)
    return tuple(shrinking(dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=2), MIN_BLOCKS))


def bwd_tiles(max_seqlen_q: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Backward (BLOCK_M, BLOCK_N, num_warps), for the dK/dV and the dQ kernels. 16-bit head dim 128 takes 32-key
    blocks: at 64 its sm_90 dK/dV build kept 80-248 bytes of stack per thread, at 32 16-56 (`bench/RESULTS.md`)."""
    if dtype == torch.float32:
        _, (block_m, block_n) = FP32_TILES[head_dim]
        return block_m, block_n, 8
    block_m, block_n, _ = _tiles(max_seqlen_q, head_dim, dtype)
    return min(block_m, 64), 32 if head_dim > 64 else block_n, 4


# Forward tiles tried by the autotuner on large 16-bit problems (the aggregator's batches): (BLOCK_M, BLOCK_N,
# num_warps, num_stages[, maxnreg]). The first is the fixed choice of _tiles for head_dim 64.
# (256, 64): one program for an utterance of up to 256 rows (with the 4-token prefix, some pass 128).
# maxnreg 128: the sm_90 builds of the first tile (157 registers) and of (64, 64, 4, 3) (148) allow 1 and 3 blocks
# per SM; capped at 128 registers (no stack on Triton 3.6, 40 bytes on 3.8) they allow 2 and 4, more loads in
# flight for this memory-bound kernel (`python bench/compile_kernels.py`); the tuner measures whether that pays.
FWD_TILES = ((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3),
             (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4), (256, 64, 8, 2), (128, 64, 8, 2, 128),
             (64, 64, 4, 3, 128))  # fmt: skip
AUTOTUNE_MIN_WORK = 2**25  # batch x heads x max_seqlen_q x max_seqlen_k at which tuning pays for itself


def tuned_fwd_kernel(tiles=FWD_TILES):
    # The key: power-of-two classes of the query and key lengths and of the batch (how many programs fill the GPU:
    # a batch of 8 and one of 64 may want different tiles), and what changes the code.
    key = ("q_bucket", "k_bucket", "b_bucket", "num_heads", "num_splits", "BLOCK_D", "CAUSAL", "SPLIT")
    return autotuned(_text_query_attention_fwd_kernel, tiles, ("BLOCK_M", "BLOCK_N"), key)


def tuned_tiles() -> dict[str, str]:
    """What the autotuner picked so far, by its key (problem class): for benchmark reports."""
    return tuned_choices(tuned_fwd_kernel())


def tuned_timings() -> dict[str, dict[str, float]]:
    """Every candidate's median milliseconds at each tuning so far, by key: for benchmark reports."""
    return tuning_timings(tuned_fwd_kernel())


def use_autotune(q: torch.Tensor, batch: int, max_seqlen_q: int, max_seqlen_k: int) -> bool:
    """Autotune the forward tiles on CUDA for 16-bit problems of at least AUTOTUNE_MIN_WORK score entries, unless
    TASTE_AUTOTUNE=0; smaller ones are launch-bound and keep the fixed tiles (no tuning pause)."""
    if not q.is_cuda or q.dtype == torch.float32 or not autotune_enabled():
        return False
    return batch * q.shape[1] * max_seqlen_q * max_seqlen_k >= AUTOTUNE_MIN_WORK


def auto_num_splits(batch, heads, max_seqlen_q, max_seqlen_k, block_m, block_n, device) -> int:
    """Key splits so that the grid fills the GPU: only when (query tiles x batch x heads) is below the SM count,
    with at least four key blocks per split."""
    programs = cdiv(max(max_seqlen_q, 1), block_m) * batch * heads
    sms = sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(cdiv(2 * sms, programs), cdiv(max_seqlen_k, 4 * block_n)))


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
    out=None,
    lse=None,
    autotune: bool | None = None,
    seqs: tuple[int, int] | None = None,
    want_lse: bool = True,
):
    """Returns out (Nq, H, D) in q.dtype and lse (H, Nq) float32. k and v hold Nk rows of H x D: (Nk, H, D), or any
    contiguous shape with those elements (the chunked cross-attention passes (B, E, H * D) projections as they are).

    With ``out`` given, the kernel writes into it (and into ``lse`` if given: None stores no log-sum-exp and
    returns None for it), only the rows of the sequences it attends, and never splits the key range. ``seqs =
    (b0, b1)`` (only with ``out``) then attends sequences b0..b1-1 of ``cu_seqlens_q``, the whole batch's offsets
    (rows stay global), while k/v and ``cu_seqlens_k`` hold only those sequences' keys (``cu_seqlens_k`` may be
    longer: its first b1 - b0 + 1 entries are read). This is how a batch is processed a few sequences at a time into
    one output, with no per-chunk offsets made on the host. Without ``out``, ``want_lse=False`` makes and stores no
    log-sum-exp (None is returned for it): inference, where no backward needs it.
    ``autotune``: pick the tiles by measurement (default: :func:`use_autotune`); False: the fixed tiles.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    total_q, heads, head_dim = q.shape
    given = out is not None
    seq_base, batch = 0, cu_seqlens_q.shape[0] - 1
    if seqs is not None:
        if not given:
            raise ValueError("text_query_attention_fwd: seqs needs out (the rows written are the batch's)")
        if not 0 <= seqs[0] <= seqs[1] <= batch:  # (the kernel would read offsets past the tensor)
            raise ValueError(f"text_query_attention_fwd: seqs must satisfy 0 <= b0 <= b1 <= {batch}, got {seqs}")
        seq_base, batch = seqs[0], seqs[1] - seqs[0]
    block_m, block_n, _ = _tiles(max_seqlen_q, head_dim, q.dtype)
    if not given:
        out = torch.empty_like(q)
        lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device) if want_lse else None
    if total_q == 0 or batch == 0:
        return out, lse
    splits = 1 if given else num_splits
    splits = splits or auto_num_splits(batch, heads, max_seqlen_q, max_seqlen_k, block_m, block_n, q.device)
    o_buf, l_buf = out, lse
    if splits > 1:  # per-split partial results in float32, merged below
        o_buf = torch.empty((splits, total_q, heads, head_dim), dtype=torch.float32, device=q.device)
        l_buf = torch.empty((splits, heads, total_q), dtype=torch.float32, device=q.device)
    store_lse = l_buf is not None  # (key splits always store their partial log-sum-exps, for the merge)
    args = (q, k, v, o_buf, l_buf if store_lse else o_buf, cu_seqlens_q, cu_seqlens_k, seq_base, int(store_lse),
            heads, total_q, splits, scale)  # fmt: skip
    flags, flag_items = _fwd_flags(head_dim, causal, splits > 1, q.dtype, scale >= 0)
    if use_autotune(q, batch, max_seqlen_q, max_seqlen_k) if autotune is None else autotune:
        buckets = (next_power_of_2(max_seqlen_q), next_power_of_2(max_seqlen_k), next_power_of_2(batch))
        grid = lambda meta: (cdiv(max(max_seqlen_q, 1), meta["BLOCK_M"]), batch * heads, splits)  # noqa: E731
        key = (q.device, q.dtype, buckets, heads, splits, flag_items)
        launch_tuned(tuned_fwd_kernel(), key, grid, *args, *buckets, **flags)
    else:

        def launch(tile):
            grid = (cdiv(max(max_seqlen_q, 1), tile["BLOCK_M"]), batch * heads, splits)
            _text_query_attention_fwd_kernel[grid](*args, 0, 0, 0, **flags, **tile, **COMPILE_OPTIONS)

        tiles = fixed_fwd_tiles(max_seqlen_q, head_dim, q.dtype)
        launch_fitting(launch, tiles, ("fwd", q.device, q.dtype, flag_items))
    if splits > 1:
        _text_query_attention_merge_kernel[(cdiv(total_q, 64), heads)](
            o_buf, l_buf, out, l_buf if lse is None else lse, int(lse is not None), heads, total_q, splits,
            BLOCK_M=64, BLOCK_D=head_dim, num_warps=4, **COMPILE_OPTIONS,
        )  # fmt: skip
    return out, lse
