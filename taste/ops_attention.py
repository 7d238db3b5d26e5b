"""``taste.ops.text_query_attention``: packed variable-length attention, Triton on CUDA, reference elsewhere.

Registered with ``torch.library.custom_op`` (not ``triton_op``, see STYLE.md): the default kernel is the
plain-PyTorch reference (CPU and any device), the CUDA kernel launches ``taste.kernels.attention``. The
backward is a second custom op with the same split, so training works on both and compiles opaquely.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from taste import reference
from taste._dispatch import call

TRITON_HEAD_DIMS = (32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _autocast(device: torch.device, *tensors: Tensor | None) -> tuple[Tensor | None, ...] | None:
    """Under ``torch.autocast`` for ``device``: ``tensors`` in the autocast dtype, every floating one but float64 (as
    autocast casts the inputs of ``F.linear`` and ``F.scaled_dot_product_attention``; custom ops it does not reach).
    None where autocast is off."""
    kind = device.type
    if kind not in ("cuda", "cpu") or not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)  # fmt: skip


def _uses_triton(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in TRITON_DTYPES


@functools.cache  # (an import statement per launch costs the host about 0.6 us)
def _forward_kernels():
    """``taste.kernels.attention``, imported on first use: it imports Triton."""
    import taste.kernels.attention as kernels

    return kernels


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("taste::text_query_attention", mutates_args=())
def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    return reference.text_query_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale
    )


@_attention.register_kernel("cuda")
def _attention_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, want_lse=True):
    if not _uses_triton(q):
        return reference.text_query_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale
        )
    with torch.cuda.device(q.device):
        return _forward_kernels().text_query_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                           max_seqlen_k, causal, scale, want_lse=want_lse)  # fmt: skip


def _attention_cuda_output_only(*args):
    """The CUDA kernel of a direct call (taste._dispatch: no gradient to record), which makes no log-sum-exp."""
    return _attention_cuda(*args, want_lse=False)


@_attention.register_fake
def _attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))


@torch.library.custom_op("taste::text_query_attention_backward", mutates_args=())
def _attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return reference.text_query_attention_backward(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale
    )


@_attention_backward.register_kernel("cuda")
def _attention_backward_cuda(
    grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale
):
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
    if not _uses_triton(q):
        return reference.text_query_attention_backward(grad_out, q, k, v, out, lse, *args)
    from taste.kernels.attention_bwd import text_query_attention_bwd

    with torch.cuda.device(q.device):
        return text_query_attention_bwd(grad_out, q, k, v, out, lse, *args)


@_attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, scale)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _attention_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def _check_offsets(cu: Tensor, name: str, total: int, max_len: int, batch: int | None) -> None:
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise RuntimeError(f"taste: {name} must be a 1-D int32 tensor (B + 1,), got {cu.dtype} {tuple(cu.shape)}")
    if batch is not None and cu.numel() != batch + 1:
        raise RuntimeError(f"taste: {name} must have shape ({batch + 1},) like cu_seqlens_q, got {tuple(cu.shape)}")
    if cu.device.type != "cpu" or torch.compiler.is_compiling():
        return  # value checks would sync the device (STYLE.md); CPU tensors are checked
    offsets = cu.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise RuntimeError(
            f"taste: {name} must start at 0 and end at the number of rows ({total}), got {offsets[0]}..{offsets[-1]}"
        )
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if lengths and min(lengths) < 0:
        raise RuntimeError(f"taste: {name} must be non-decreasing")
    if lengths and max(lengths) > max_len:
        raise RuntimeError(f"taste: a sequence of {max(lengths)} rows in {name} exceeds its max_seqlen={max_len}")


def text_query_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention of each sequence's queries over the same sequence's keys, on packed batches.

    Args:
        q: ``(Nq, H, D)`` float16/bfloat16/float32 (float64 runs the reference).
        k, v: ``(Nk, H, D)``, same dtype and device.
        cu_seqlens_q, cu_seqlens_k: ``(B + 1,)`` int32 offsets of the sequences in q and in k/v.
        max_seqlen_q, max_seqlen_k: host ints bounding the sequence lengths (grid sizes; no sync).
        causal: mask aligned bottom-right as in flash-attention: query i sees keys ``j <= i + Lk - Lq``
            (for the aggregator's self-attention Lq = Lk and this is the usual lower triangle).
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``(Nq, H, D)`` in q.dtype; 0 for a query that sees no key. Differentiable in q, k and v (deterministic
        backward). On CUDA the Triton kernels need D in (32, 64, 128). Under ``torch.autocast`` q, k and v are
        first cast to its dtype, as for ``F.scaled_dot_product_attention``.
    """
    cast = _autocast(q.device, q, k, v)
    if cast is not None:
        q, k, v = cast
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3 or not t.is_floating_point():
            raise RuntimeError(
                f"taste: {name} must be a floating-point (rows, heads, head_dim) tensor, got {t.dtype} {tuple(t.shape)}"
            )
    if k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise RuntimeError(
            f"taste: k and v must have shape (Nk, H, D) with q's H and D {tuple(q.shape[1:])}, got "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise RuntimeError(f"taste: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.device != q.device:
            raise RuntimeError(f"taste: {name} must be on the same device as q ({q.device}), got {t.device}")
    if q.is_cuda and q.shape[-1] not in TRITON_HEAD_DIMS:
        raise RuntimeError(f"taste: head_dim must be one of {TRITON_HEAD_DIMS} on CUDA, got {q.shape[-1]}")
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise RuntimeError(f"taste: max_seqlen_q and max_seqlen_k must be >= 0, got {max_seqlen_q}, {max_seqlen_k}")
    _check_offsets(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, None)
    _check_offsets(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, cu_seqlens_q.shape[0] - 1)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
    return call(_attention, _attention_cuda_output_only, reference.text_query_attention, args, q, k, v, cu_seqlens_q,
                cu_seqlens_k)[0]  # fmt: skip


# ---- cross-attention with K/V projected from the encoder states a few sequences at a time (inference) ----


def uniform_offsets(count: int, length: int, device) -> Tensor:
    """``(count + 1,)`` int32 offsets of ``count`` sequences of ``length`` rows each, in one operator."""
    if length == 0:
        return torch.zeros(count + 1, device=device, dtype=torch.int32)
    return torch.arange(0, (count + 1) * length, length, device=device, dtype=torch.int32)


def _cross_attention_chunks(q, h_key, h_val, k_weight, k_bias, v_weight, v_bias, cu_seqlens_q, max_seqlen_q, chunk,
                            scale, triton_path: bool):  # fmt: skip
    """Projects K/V for ``chunk`` sequences, attends their queries, frees them; one output for the batch."""
    batch, frames = h_key.shape[:2]
    heads, head_dim = q.shape[1:]
    if batch == 0 or q.shape[0] == 0:
        return torch.zeros_like(q)
    if triton_path:
        text_query_attention_fwd = _forward_kernels().text_query_attention_fwd
    # Made once per call, not per chunk (on a GPU every op costs host time): each chunk's key offsets are a prefix of
    # one tensor (the kernel reads as many as it needs), its encoder states views from one split each, and the
    # kernel reads the chunk's query offsets from the batch's (its ``seqs``); no log-sum-exp is stored.
    cu_k_all = uniform_offsets(min(chunk, batch), frames, q.device)
    if chunk >= batch:  # one chunk: one call, straight to its output (on CUDA the plain launch, which may split keys)
        # (B, frames, H * D): the Triton kernel reads contiguous rows of H x D, whatever the shape says
        k, v = F.linear(h_key, k_weight, k_bias), F.linear(h_val, v_weight, v_bias)
        if triton_path:
            return text_query_attention_fwd(q, k, v, cu_seqlens_q, cu_k_all, max_seqlen_q, frames, False, scale,
                                            want_lse=False)[0]  # fmt: skip
        k, v = k.view(batch * frames, heads, head_dim), v.view(batch * frames, heads, head_dim)
        return reference.text_query_attention(q, k, v, cu_seqlens_q, cu_k_all, max_seqlen_q, frames, False, scale)[0]
    cu_host = None if triton_path else cu_seqlens_q.tolist()  # the reference reads offsets on the host
    out = torch.empty_like(q)  # every row is some sequence's
    for b0, hk, hv in zip(range(0, batch, chunk), h_key.split(chunk), h_val.split(chunk)):
        b1 = b0 + hk.shape[0]
        k, v = F.linear(hk, k_weight, k_bias), F.linear(hv, v_weight, v_bias)
        if triton_path:  # rows stay global: the kernel writes only the chunk's rows
            text_query_attention_fwd(q, k, v, cu_seqlens_q, cu_k_all, max_seqlen_q, frames, False, scale, out=out,
                                     seqs=(b0, b1))  # fmt: skip
        else:
            r0, r1 = cu_host[b0], cu_host[b1]
            k, v = k.view((b1 - b0) * frames, heads, head_dim), v.view((b1 - b0) * frames, heads, head_dim)
            out[r0:r1] = reference.text_query_attention(q[r0:r1], k, v, cu_seqlens_q[b0 : b1 + 1] - r0,
                                                        cu_k_all[: b1 - b0 + 1], max_seqlen_q, frames, False,
                                                        scale)[0]  # fmt: skip
        del k, v
    return out


def _cross_attention_reference(q, h_key, h_val, k_weight, k_bias, v_weight, v_bias, cu_seqlens_q, max_seqlen_q, chunk,
                               scale):  # fmt: skip
    return _cross_attention_chunks(q, h_key, h_val, k_weight, k_bias, v_weight, v_bias, cu_seqlens_q, max_seqlen_q,
                                   chunk, scale, triton_path=False)  # fmt: skip


def _check_cross_args(q, h_key, h_val, k_weight, v_weight, k_bias, v_bias, cu_seqlens_q, max_seqlen_q):
    """The argument checks shared by both cross-attentions; returns the named weight-side tensors."""
    if q.dim() != 3 or not q.is_floating_point():
        raise RuntimeError(f"taste: q must be a floating-point (rows, heads, head_dim) tensor, got {q.dtype} "
                           f"{tuple(q.shape)}")  # fmt: skip
    if h_key.dim() != 3 or h_key.shape != h_val.shape:
        raise RuntimeError(f"taste: h_key and h_val must both be (B, E, d_in), got {tuple(h_key.shape)} and "
                           f"{tuple(h_val.shape)}")  # fmt: skip
    width = q.shape[1] * q.shape[2]
    for name, w in (("k_weight", k_weight), ("v_weight", v_weight)):
        if w.shape != (width, h_key.shape[2]):
            raise RuntimeError(f"taste: {name} must be (H * D, d_in) = ({width}, {h_key.shape[2]}), got "
                               f"{tuple(w.shape)}")  # fmt: skip
    for name, bias in (("k_bias", k_bias), ("v_bias", v_bias)):
        if bias is not None and bias.shape != (width,):
            raise RuntimeError(f"taste: {name} must be (H * D,) = ({width},) or None, got {tuple(bias.shape)}")
    named = [("h_key", h_key), ("h_val", h_val), ("k_weight", k_weight), ("v_weight", v_weight),
             ("k_bias", k_bias), ("v_bias", v_bias)]  # fmt: skip
    for name, t in named:
        if t is not None and (t.dtype != q.dtype or t.device != q.device):
            raise RuntimeError(f"taste: {name} must have q's dtype and device ({q.dtype}, {q.device}), got "
                               f"{t.dtype}, {t.device}")  # fmt: skip
    if cu_seqlens_q.device != q.device:
        raise RuntimeError(f"taste: cu_seqlens_q must be on q's device ({q.device}), got {cu_seqlens_q.device}")
    if max_seqlen_q < 0:
        raise RuntimeError(f"taste: max_seqlen_q must be >= 0, got {max_seqlen_q}")
    _check_offsets(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, h_key.shape[0])
    return named


@torch.library.custom_op("taste::text_query_cross_attention", mutates_args=())
def _cross_attention(
    q: Tensor,
    h_key: Tensor,
    h_val: Tensor,
    k_weight: Tensor,
    k_bias: Tensor | None,
    v_weight: Tensor,
    v_bias: Tensor | None,
    cu_seqlens_q: Tensor,
    max_seqlen_q: int,
    chunk: int,
    scale: float,
) -> Tensor:
    return _cross_attention_reference(q, h_key, h_val, k_weight, k_bias, v_weight, v_bias, cu_seqlens_q, max_seqlen_q,
                                      chunk, scale)  # fmt: skip


@_cross_attention.register_kernel("cuda")
def _cross_attention_cuda(q, h_key, h_val, k_weight, k_bias, v_weight, v_bias, cu_seqlens_q, max_seqlen_q, chunk,
                          scale):  # fmt: skip
    args = (h_key, h_val, k_weight, k_bias, v_weight, v_bias, cu_seqlens_q, max_seqlen_q, chunk, scale)
    with torch.cuda.device(q.device):
        return _cross_attention_chunks(q.contiguous(), *args, triton_path=_uses_triton(q))


@_cross_attention.register_fake
def _cross_attention_fake(q, h_key, h_val, k_weight, k_bias, v_weight, v_bias, cu_seqlens_q, max_seqlen_q, chunk,
                          scale):  # fmt: skip
    return torch.empty_like(q)


def text_query_cross_attention(
    q: Tensor,
    h_key: Tensor,
    h_val: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    cu_seqlens_q: Tensor,
    max_seqlen_q: int,
    *,
    k_bias: Tensor | None = None,
    v_bias: Tensor | None = None,
    chunk_size: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """Inference cross-attention of packed text queries over dense encoder states, K/V made chunk by chunk.

    Equals ``text_query_attention(q, k, v, ...)`` with ``k = h_key @ k_weight.T + k_bias`` and
    ``v = h_val @ v_weight.T + v_bias`` for every frame of every sequence, but projects keys and values for
    ``chunk_size`` sequences at a time (cuBLAS / the CPU GEMM), attends those sequences' queries and frees them: peak
    memory holds one chunk's K/V instead of the batch's. No host sync on CUDA. Not differentiable (the aggregator
    takes the unchunked path when gradients are needed).

    Args:
        q: ``(Nq, H, D)`` packed, already projected queries; sequence b's rows are
            ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
        h_key, h_val: ``(B, E, d_in)`` encoder states (every sequence has E frames), q's dtype and device.
        k_weight, v_weight: ``(H * D, d_in)``; k_bias, v_bias: ``(H * D,)`` or None.
        cu_seqlens_q: ``(B + 1,)`` int32; max_seqlen_q: host int bounding the query lengths.
        chunk_size: sequences per chunk (default: all of them, one chunk).
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``(Nq, H, D)`` in q.dtype. Under ``torch.autocast`` every floating input is first cast to its dtype, as the
        projections and the attention would be.
    """
    cast = _autocast(q.device, q, h_key, h_val, k_weight, v_weight, k_bias, v_bias)
    if cast is not None:
        q, h_key, h_val, k_weight, v_weight, k_bias, v_bias = cast
    named = _check_cross_args(q, h_key, h_val, k_weight, v_weight, k_bias, v_bias, cu_seqlens_q, max_seqlen_q)
    if q.is_cuda and q.shape[-1] not in TRITON_HEAD_DIMS:
        raise RuntimeError(f"taste: head_dim must be one of {TRITON_HEAD_DIMS} on CUDA, got {q.shape[-1]}")
    if chunk_size is not None and chunk_size < 1:
        raise RuntimeError(f"taste: chunk_size must be >= 1 or None, got {chunk_size}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for _, t in named + [("q", q)]):
        raise RuntimeError("taste: text_query_cross_attention is inference only (no backward); call it under "
                           "torch.no_grad() or use text_query_attention on projected K/V")  # fmt: skip
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chunk = max(h_key.shape[0], 1) if chunk_size is None else int(chunk_size)
    args = (q, h_key, h_val, k_weight, k_bias, v_weight, v_bias, cu_seqlens_q, max_seqlen_q, chunk, scale)
    return call(_cross_attention, _cross_attention_cuda, _cross_attention_reference, args, q, h_key, h_val, k_weight,
                v_weight, k_bias, v_bias, cu_seqlens_q)  # fmt: skip


# ---- cross-attention with the key and value projections folded into the queries and outputs ----

FOLD_RATIO = 0.85  # measured on the CPU (bench/RESULTS.md): folding pays while max_seqlen_q x H < ~0.85-1.1 x d_in


def cross_attention_folds(max_seqlen_q: int, heads: int, d_in: int, frames: int, device: torch.device) -> bool:
    """Whether :func:`text_query_cross_attention_folded` is expected to beat projecting every frame's K/V, for
    sequences of at most ``max_seqlen_q`` queries in ``heads`` heads over ``frames`` encoder states of width
    ``d_in`` (host values only: no sync).

    Per frame of a sequence of ``L`` queries, projecting K and V costs ``2 x d_in x H x D`` multiply-adds and the
    attention ``2 x L x H x D``; folded, the attention costs ``2 x L x H x d_in`` and nothing is projected. With
    ``H x D = d_in`` (Whisper) folding does less work while ``L x (H - 1) < d_in``. The attention at width ``d_in``
    runs slower per multiply-add than the GEMMs it replaces and pads every sequence to ``max_seqlen_q`` queries, so
    the rule, measured on 2 CPU cores, is ``max_seqlen_q x H < FOLD_RATIO x d_in`` (about ``0.85 x D`` queries). On
    the CPU only: on CUDA the Triton kernel has no head dim of ``d_in``."""
    if device.type == "cuda" or frames == 0 or heads < 2:
        return False
    return max_seqlen_q * heads < FOLD_RATIO * d_in


def text_query_cross_attention_folded(
    q: Tensor,
    h_key: Tensor,
    h_val: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    cu_seqlens_q: Tensor,
    max_seqlen_q: int,
    *,
    k_bias: Tensor | None = None,
    v_bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The cross-attention of :func:`text_query_cross_attention`, computed without projecting any key or value.

    For head h with key rows ``W_k[h]`` ``(D, d_in)`` and value rows ``W_v[h]``, ``q_h . (W_k[h] x) = (q_h W_k[h])
    . x``: each query is mapped once into the encoder's width, attends over the raw states ``h_key`` (the H heads of
    a sequence are H x its queries over one shared head of width ``d_in``), and since a query's attention weights
    sum to one, ``sum_j p_j (W_v[h] x_j + b) = W_v[h] (sum_j p_j x_j) + b`` maps its output back. ``k_bias`` adds
    the same score to every key of a query, which the softmax cancels: it is accepted and exactly ignored. No K/V
    is made, and for a sequence of ``L`` queries each frame costs ``2 x L x H x d_in`` multiply-adds instead of
    ``2 x (d_in + L) x H x D``: fewer while sequences hold fewer queries than about a head dim
    (:func:`cross_attention_folds`).

    Differentiable (through ``text_query_attention`` and matrix products); any device where ``text_query_attention``
    takes head dim ``d_in`` (on CUDA: ``d_in`` in (32, 64, 128)). Arguments as :func:`text_query_cross_attention`
    (no ``chunk_size``: nothing per frame is made). Returns ``(Nq, H, D)`` in q.dtype, 0 where a sequence has no
    frames. Under ``torch.autocast`` every floating input is first cast to its dtype.
    """
    cast = _autocast(q.device, q, h_key, h_val, k_weight, v_weight, k_bias, v_bias)
    if cast is not None:
        q, h_key, h_val, k_weight, v_weight, k_bias, v_bias = cast
    _check_cross_args(q, h_key, h_val, k_weight, v_weight, k_bias, v_bias, cu_seqlens_q, max_seqlen_q)
    rows, heads, head_dim = q.shape
    batch, frames, d_in = h_key.shape
    if q.is_cuda and d_in not in TRITON_HEAD_DIMS:
        raise RuntimeError(f"taste: the folded cross-attention attends at the encoder width d_in, which on CUDA must "
                           f"be one of {TRITON_HEAD_DIMS}, got {d_in}")  # fmt: skip
    if frames == 0:  # no key anywhere: every output is 0 (the bias is not added to an empty attention)
        return torch.zeros_like(q)
    scale = head_dim**-0.5 if scale is None else float(scale)
    # (H, rows, D) @ (H, D, d_in) -> (rows, H, d_in): row-major, so sequence b's H x rows are contiguous
    k_rows, v_rows = (w.reshape(heads, head_dim, d_in) for w in (k_weight, v_weight))  # (views of nn.Linear weights)
    q_in = torch.bmm(q.transpose(0, 1), k_rows).transpose(0, 1).reshape(-1, 1, d_in)
    o_in = text_query_attention(
        q_in, h_key.reshape(batch * frames, 1, d_in), h_val.reshape(batch * frames, 1, d_in), cu_seqlens_q * heads,
        uniform_offsets(batch, frames, q.device), max_seqlen_q * heads, frames, scale=scale,
    )  # fmt: skip
    out = torch.bmm(o_in.reshape(rows, heads, d_in).transpose(0, 1), v_rows.transpose(1, 2))
    out = out.transpose(0, 1)  # (rows, H, D)
    return out if v_bias is None else out + v_bias.view(heads, head_dim)
