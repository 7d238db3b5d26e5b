"""Residual vector quantization ops: ``rvq_encode`` / ``rvq_quantize`` / ``rvq_decode`` / ``rvq_ema_statistics``.

``taste::rvq_encode`` and ``taste::rvq_decode`` are ``torch.library.custom_op``s whose CUDA kernels launch
``taste.kernels.rvq`` and whose default kernels are the references in :mod:`taste.reference`. The encoder's
autograd is the straight-through estimator of vector-quantize-pytorch's ResidualVQ plus the gradient of the
per-stage commitment errors, written with the decode op (no (N, K) tensor anywhere).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from taste import reference
from taste._dispatch import call

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _err_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Outputs (quantized, indices, sq_err): the float output first, which opcheck's gradient check needs.
def _rvq_encode_reference(x, codebooks, num_stages, fast):
    idx, quantized, sq_err = reference.rvq_encode(x, codebooks, num_stages, fast)
    return quantized, idx, sq_err


@torch.library.custom_op("taste::rvq_encode", mutates_args=())
def _rvq_encode(x: Tensor, codebooks: Tensor, num_stages: Tensor, fast: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _rvq_encode_reference(x, codebooks, num_stages, fast)


@_rvq_encode.register_kernel("cuda")
def _rvq_encode_cuda(x, codebooks, num_stages, fast):
    from taste.kernels.rvq import MAX_DIM, rvq_encode_fwd

    if x.dtype not in TRITON_DTYPES or codebooks.dtype not in TRITON_DTYPES or x.shape[-1] > MAX_DIM:
        return _rvq_encode_reference(x, codebooks, num_stages, fast)

    wide = codebooks.float()  # no copy for float32; the exact mode multiplies 16-bit codebooks in float32 too
    norms = wide.square().sum(-1)  # (Q, K)
    with torch.cuda.device(x.device):
        idx, quantized, sq_err = rvq_encode_fwd(
            x.contiguous(), (codebooks if fast else wide).contiguous(), norms, num_stages.to(torch.int32), fast
        )
    return quantized, idx, sq_err


@_rvq_encode.register_fake
def _rvq_encode_fake(x, codebooks, num_stages, fast):
    n, q = x.shape[0], codebooks.shape[0]
    idx = x.new_empty((n, q), dtype=torch.int64)
    return torch.empty_like(x), idx, x.new_empty((n, q), dtype=_err_dtype(x))


@torch.library.custom_op("taste::rvq_decode", mutates_args=())
def _rvq_decode(indices: Tensor, codebooks: Tensor, weights: Tensor | None) -> Tensor:
    return reference.rvq_decode(indices, codebooks, weights)


@_rvq_decode.register_kernel("cuda")
def _rvq_decode_cuda(indices, codebooks, weights):
    if codebooks.dtype not in TRITON_DTYPES:
        return reference.rvq_decode(indices, codebooks, weights)
    from taste.kernels.rvq import rvq_decode_fwd

    with torch.cuda.device(codebooks.device):
        w = None if weights is None else weights.contiguous()
        return rvq_decode_fwd(indices.contiguous(), codebooks.contiguous(), w)


@_rvq_decode.register_fake
def _rvq_decode_fake(indices, codebooks, weights):
    return codebooks.new_empty((indices.shape[0], codebooks.shape[-1]))


def _encode_setup(ctx, inputs, output):
    x, codebooks, num_stages, _fast = inputs
    ctx.save_for_backward(x, codebooks, num_stages, output[1])


def _encode_backward(ctx, grad_quantized, _grad_idx, grad_sq_err):
    x, codebooks, num_stages, indices = ctx.saved_tensors
    q_total = codebooks.shape[0]
    active = torch.arange(q_total, device=x.device) < num_stages  # (Q,)
    # Straight-through, as vector-quantize-pytorch's ResidualVQ: every active stage passes its output's
    # gradient to its residual input, and each residual is x minus detached codewords.
    grad_x = grad_quantized * active.sum().to(grad_quantized.dtype) if grad_quantized is not None else None
    if grad_sq_err is not None:
        # d||r_i||^2/dx = 2 r_i, r_i = x - sum_{j<=i} c_j: sum_i g_i r_i = (sum_i g_i) x - sum_j (sum_{i>=j} g_i) c_j.
        g = torch.where(active, grad_sq_err, 0.0)
        tail = g.flip(1).cumsum(1).flip(1)
        term = 2.0 * (g.sum(1, keepdim=True) * x - _rvq_decode(indices, codebooks, tail).to(x.dtype))
        grad_x = term if grad_x is None else grad_x + term
    return grad_x, None, None, None


_rvq_encode.register_autograd(_encode_backward, setup_context=_encode_setup)


def _check_codebooks(x: Tensor, codebooks: Tensor, x_name: str = "x") -> None:
    if codebooks.dim() != 3 or not codebooks.is_floating_point():
        raise RuntimeError(
            f"taste: codebooks must be a floating-point (Q, K, d) tensor, got {codebooks.dtype} "
            f"{tuple(codebooks.shape)}"
        )
    if x.dim() != 2 or not x.is_floating_point():
        raise RuntimeError(f"taste: {x_name} must be a floating-point (N, d) tensor, got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] != codebooks.shape[2]:
        raise RuntimeError(
            f"taste: {x_name} has d={x.shape[1]} but codebooks are (Q, K, d) = {tuple(codebooks.shape)}: d must match"
        )
    if x.device != codebooks.device:
        raise RuntimeError(
            f"taste: codebooks must be on the same device as {x_name} ({x.device}), got {codebooks.device}"
        )


def _stages(num_stages, q_total: int, device) -> Tensor:
    if num_stages is None:
        num_stages = q_total
    if isinstance(num_stages, Tensor):
        if num_stages.numel() != 1 or num_stages.is_floating_point():
            raise RuntimeError(
                f"taste: num_stages must be an int or a one-element integer tensor, got "
                f"{num_stages.dtype} {tuple(num_stages.shape)}"
            )
        return num_stages.reshape(()).to(device=device, dtype=torch.int32)
    if not 0 <= int(num_stages) <= q_total:
        raise RuntimeError(f"taste: num_stages must be in [0, {q_total}], got {num_stages}")
    # A fill on the device, not torch.tensor(..., device=...): that copies from pageable host memory, which the CUDA
    # driver may serialise with the stream, and the encoder runs at every TASLM generation step.
    # int32, what the CUDA kernel reads: no conversion kernel per call.
    return torch.full((), int(num_stages), dtype=torch.int32, device=device)


def rvq_encode(x: Tensor, codebooks: Tensor, num_stages: int | Tensor | None = None, *, fast: bool = False):
    """All stages of residual vector quantization in one pass.

    Args:
        x: ``(N, d)`` float rows (after the input projection).
        codebooks: ``(Q, K, d)`` float, stage q's K codewords.
        num_stages: stages to run (default Q): an int, or a one-element tensor on x's device (no host sync, e.g.
            a quantizer-dropout depth drawn on the GPU). Stages beyond it give index -1 and add nothing.
        fast: tf32 / 16-bit products on CUDA (float32 accumulation) instead of exact float32 products.

    Returns:
        ``indices (N, Q)`` int64 (ties go to the lowest index, as torch.argmin) and ``quantized (N, d)``, the sum
        of the chosen codewords, with the straight-through gradient to x.
    """
    _check_codebooks(x, codebooks)
    quantized, idx, _ = _encode(x, codebooks, _stages(num_stages, codebooks.shape[0], x.device), fast)
    return idx, quantized


def _encode(x, codebooks, num_stages, fast):
    """The rvq_encode op, or its kernel called directly where the op's dispatch would add nothing (taste._dispatch:
    no gradient to record, no tracing)."""
    args = (x, codebooks, num_stages, fast)
    return call(_rvq_encode, _rvq_encode_cuda, _rvq_encode_reference, args, x, codebooks, num_stages)


class RVQQuantization(NamedTuple):
    indices: Tensor  # (N, Q) int64, -1 for inactive stages
    quantized: Tensor  # (N, d), straight-through
    commit_loss: Tensor  # () sum over stages of the mean squared distance (residual input vs chosen codeword)
    stage_losses: Tensor  # (Q,) each stage's term, 0 for inactive stages


def rvq_quantize(x: Tensor, codebooks: Tensor, num_stages: int | Tensor | None = None, *, fast: bool = False):
    """:func:`rvq_encode` plus the commitment loss of vector-quantize-pytorch (mean over rows and dims of
    ``(sg(c_i) - r_{i-1})^2`` per stage, summed), differentiable in x. Returns :class:`RVQQuantization`."""
    _check_codebooks(x, codebooks)
    quantized, idx, sq_err = _encode(x, codebooks, _stages(num_stages, codebooks.shape[0], x.device), fast)
    stage_losses = sq_err.sum(0) / max(x.shape[0] * x.shape[1], 1)
    return RVQQuantization(idx, quantized, stage_losses.sum(), stage_losses)


def _check_indices(indices: Tensor, codebooks: Tensor, rows: int | None = None) -> None:
    """``indices`` as codes of ``codebooks``: int64/int32 ``(N, Q)`` (N = ``rows`` where given) on their device, and
    on CPU tensors every value in ``[-1, K)`` (on CUDA that check would sync)."""
    if indices.dim() != 2 or indices.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(
            f"taste: indices must be an int64/int32 (N, Q) tensor, got {indices.dtype} {tuple(indices.shape)}"
        )
    n = indices.shape[0] if rows is None else rows
    if indices.shape != (n, codebooks.shape[0]) or indices.device != codebooks.device:
        raise RuntimeError(
            f"taste: indices must be ({'N' if rows is None else rows}, Q={codebooks.shape[0]}) on {codebooks.device}, "
            f"got {tuple(indices.shape)} on {indices.device}"
        )
    if indices.device.type == "cpu" and indices.numel() and not torch.compiler.is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= codebooks.shape[1]:
            raise RuntimeError(f"taste: indices must lie in [-1, K={codebooks.shape[1]}), got [{lo}, {hi}]")


def rvq_decode(indices: Tensor, codebooks: Tensor) -> Tensor:
    """``(N, Q)`` indices -> ``(N, d)``: the sum of the indexed codewords of every stage; -1 contributes 0."""
    _check_codebooks(torch.empty(0, codebooks.shape[-1], device=codebooks.device), codebooks)
    _check_indices(indices, codebooks)
    args = (indices.long(), codebooks, None)
    return call(_rvq_decode, _rvq_decode_cuda, reference.rvq_decode, args, codebooks, args[0])


def rvq_ema_statistics(x: Tensor, indices: Tensor, codebooks: Tensor) -> tuple[Tensor, Tensor]:
    """Per-stage EMA statistics before the moving average: ``counts (Q, K)`` (rows assigned to each code) and
    ``sums (Q, K, d)`` (the sum of the stage's input residuals assigned to each code), float32 (float64 where x is).
    Deterministic (segment_sum_by_key); all-reduce both across ranks before the update in distributed training."""
    counts, sums, _ = ema_statistics_and_inputs(x, indices, codebooks)
    return counts, sums


def ema_statistics_and_inputs(x: Tensor, indices: Tensor, codebooks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`rvq_ema_statistics` and the ``(Q, N, d)`` stage inputs they were summed from (each stage's input
    residual: x less the earlier stages' chosen codewords, subtracted in stage order as the encoder does).

    Every stage at once, in few operators (on a GPU each costs the host more than its kernel takes at TASTE's
    sizes): the stage inputs come from one gather of the earlier stages' codewords and one in-place add a stage, and
    one sort-based segment sum takes every stage's rows, with stage s's codes as keys ``s * K + code``. A stable sort
    keeps each key's rows in order, so the sums are those of one call per stage, bit for bit."""
    from taste.ops import segment_sum_by_key

    _check_codebooks(x, codebooks)
    _check_indices(indices, codebooks, x.shape[0])  # (a code >= K would count for the next stage's key)
    q, k, d = codebooks.shape
    wide = _err_dtype(x)
    stage_idx = indices.t()  # (Q, N)
    used = stage_idx >= 0
    keys = torch.where(used, stage_idx + torch.arange(0, q * k, k, device=indices.device)[:, None], -1)
    inputs = torch.empty((q, x.shape[0], d), dtype=wide, device=x.device)
    inputs[0] = x.detach()
    if q > 1:
        # Stages 1..Q-1 start as minus the codeword of the stage before (0 where it was skipped), then add the
        # previous stage's input: x + (-c0) + (-c1) ..., bit for bit x - c0 - c1 ... in the rows' own precision
        # (not cumsum, which on the CPU accumulates float32 in float64).
        earlier = codebooks.reshape(q * k, d).to(wide)[keys[:-1].clamp(min=0)]  # (Q - 1, N, d)
        inputs[1:] = earlier.mul_(torch.where(used[:-1], -1.0, 0.0).to(wide)[..., None])
        for s in range(1, q):
            inputs[s].add_(inputs[s - 1])
    sums, counts = segment_sum_by_key(inputs.view(q * x.shape[0], d), keys.reshape(-1), q * k)
    return counts.view(q, k).to(wide), sums.view(q, k, d), inputs
