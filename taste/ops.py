"""The Python face of every taste op: typed wrappers, fake (meta) kernels and autograd formulas.

Ragged batches are packed (STYLE.md): ``(N, ...)`` rows plus ``cu_seqlens`` int32 ``(B + 1,)`` starting at 0.
Word segments are ``word_offsets`` int32 ``(W_total + 1,)`` over the packed rows. ``-1`` marks "none".

The kernels live in the compiled library ``taste._C`` (C++ for the CPU, CUDA for GPUs). If it cannot be
loaded (a source checkout, a failed build) this module warns once and every op runs the plain-PyTorch
reference of :mod:`taste.reference` instead, behind the same argument checks (:mod:`taste._fallback`);
:data:`HAS_EXTENSION` says which one is in use, and :data:`CUDA_ARCH_LIST` for which GPU architectures its CUDA
kernels were compiled (None without them). On a GPU that the list does not cover, the CUDA ops raise an error that
names the list and the rebuild command.

Value checks (offsets monotone and ending at N, word ids contiguous, lengths within T) always run on CPU
tensors. On CUDA tensors they would cost a device sync, so they run only in ops that sync anyway (``pack``,
``word_offsets``, ``segment_broadcast`` without ``num_rows``) or with ``TASTE_STRICT_CHECKS=1``; the CUDA
kernels never read or write outside their tensors, whatever the offsets hold.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from taste import _fallback

try:
    from taste import _C  # loading it registers torch.ops.taste.*

    HAS_EXTENSION = True
except ImportError as _err:  # pragma: no cover - exercised in a subprocess by the tests
    HAS_EXTENSION = False
    warnings.warn(
        f"taste: the compiled extension taste._C could not be loaded ({_err}); every op falls back to the "
        "plain-PyTorch reference in taste/reference.py (correct, slower). Reinstall with `pip install .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )

# TORCH_CUDA_ARCH_LIST of the build ("9.0+PTX", commas between entries), or None when taste._C has no CUDA kernels.
CUDA_ARCH_LIST: str | None = (getattr(_C, "cuda_arch_list", "") or None) if HAS_EXTENSION else None

_impl = torch.ops.taste if HAS_EXTENSION else _fallback  # the references, behind the compiled ops' argument checks

# The ops that taste._C compiles (schemas in csrc/ops.cpp); taste._fallback has a function of the same name for each.
COMPILED_OPS = ("pack", "pack_offsets", "unpack", "word_offsets", "segment_sum", "segment_mean", "segment_broadcast",
                "segment_mean_broadcast", "segment_sum_by_key", "prefix_layout", "delay_layout")  # fmt: skip

REFERENCES_ON_CUDA_WARNING = (
    "taste: taste._C was built without CUDA kernels ({why}), so on CUDA tensors the alignment ops run their PyTorch "
    "references: the same results, but slower, and their float segment sums and means not bitwise reproducible "
    "there (index_add's atomics). The Triton kernels are not affected.{how}"
)


def _references_on_cuda_warning() -> str:
    cuda = torch.version.cuda
    if cuda is None:  # a ROCm (or CPU-only) torch: setup.py builds no CUDA kernels for it
        return REFERENCES_ON_CUDA_WARNING.format(why="torch is not a CUDA build", how="")
    why = (f"no CUDA toolkit was found at build time, or its major version differed from torch's CUDA {cuda}, or "
           "TASTE_SKIP_CUDA_BUILD was set")  # fmt: skip
    how = (f" To compile the CUDA kernels, rebuild with a CUDA {cuda.split('.')[0]}.x toolkit: "
           "CUDA_HOME=/path/to/toolkit pip install --no-build-isolation --no-deps --force-reinstall .")  # fmt: skip
    return REFERENCES_ON_CUDA_WARNING.format(why=why, how=how)


def register_references_on_cuda(library: torch.library.Library) -> None:
    """Registers, in ``library`` (a ``torch.library.Library("taste", "IMPL")``), the references behind the compiled
    ops' argument checks (:mod:`taste._fallback`) as the CUDA kernels of every op of :data:`COMPILED_OPS`. Done at
    import for an extension without CUDA kernels (a machine without a CUDA toolkit, a toolkit of another major
    version than torch's, a ROCm torch): its ops then work on CUDA tensors instead of failing with torch's "Could
    not run 'taste::pack' with arguments from the 'CUDA' backend". The first such call warns once, saying how to
    build the kernels. Autograd and the fakes are registered for every backend, so nothing else
    changes."""
    warned = []

    def on_cuda(name):
        reference_op = getattr(_fallback, name)

        def kernel(*args, **kwargs):
            if not warned:
                warned.append(True)
                warnings.warn(_references_on_cuda_warning(), RuntimeWarning, stacklevel=2)
            return reference_op(*args, **kwargs)

        return kernel

    for name in COMPILED_OPS:
        library.impl(name, on_cuda(name), "CUDA")


if HAS_EXTENSION and CUDA_ARCH_LIST is None:
    _REFERENCES_ON_CUDA = torch.library.Library("taste", "IMPL")  # kept alive: the registrations live as long as it
    register_references_on_cuda(_REFERENCES_ON_CUDA)


def cuda_arch_covers(capability: tuple[int, int], arch_list: str | None = None) -> bool | None:
    """Whether CUDA kernels built for ``arch_list`` (TORCH_CUDA_ARCH_LIST syntax; default :data:`CUDA_ARCH_LIST`)
    run on a GPU of compute ``capability`` (major, minor). A cubin for X.Y (or the family build X.Yf) runs on X.Z
    with Z >= Y; PTX for X.Y on any later GPU, compiled when loading; X.Ya only on X.Y. None when the list has an
    entry this cannot read (a name like "Hopper") and none that covers the GPU; False when there is no list."""
    arch_list = CUDA_ARCH_LIST if arch_list is None else arch_list
    if not arch_list:
        return False
    major, minor = capability
    unreadable = False
    for entry in arch_list.replace(";", ",").replace(" ", ",").split(","):
        if not entry:
            continue
        parts = entry.removesuffix("+PTX").split(".")
        if len(parts) != 2 or not parts[0].isdigit() or not parts[1].rstrip("af").isdigit():
            unreadable = True
            continue
        e_major, e_minor, exact = int(parts[0]), int(parts[1].rstrip("af")), parts[1].endswith("a")
        if exact:  # architecture-specific code (9.0a) runs on that architecture only, PTX included
            if (e_major, e_minor) == (major, minor):
                return True
        elif (entry.endswith("+PTX") and (e_major, e_minor) <= (major, minor)) or (
            e_major == major and e_minor <= minor
        ):
            return True
    return None if unreadable else False


class DelayLayout(NamedTuple):
    """The TASLM input/label layout of a packed batch (see :func:`delay_layout`). Every field has M rows."""

    cu_seqlens: Tensor  # (B + 1,) int32: sequence b owns rows [cu_seqlens[b], cu_seqlens[b + 1])
    input_token: Tensor  # (M,) int64: packed index of the text token fed; -1 = BOS row, -2 = pad-text row
    input_word: Tensor  # (M,) int64: global word whose TASTE embedding is fed; -1 = pad-audio embedding
    label_token: Tensor  # (M,) int64: packed index of the text token to predict; -1 = no text label
    label_word: Tensor  # (M,) int64: global word whose codes are the TASTE target; -1 = no TASTE label


class PrefixLayout(NamedTuple):
    """A packed batch with the same prefix before every sequence (see :func:`prefix_layout`)."""

    cu_seqlens: Tensor  # (B + 1,) int32: prefixed sequence b owns rows [cu_seqlens[b], cu_seqlens[b + 1])
    ids: Tensor  # (M,) tokens' dtype: the prefix ids, then the sequence's tokens, for every sequence
    positions: Tensor  # (M,) int64: each row's index inside its prefixed sequence (0 at the first prefix id)
    token_rows: Tensor  # (N,) int64: the row where packed token n went (ids[token_rows] == tokens)


def pack(padded: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Packs the valid rows of a right-padded batch. Differentiable in ``padded``.

    Args:
        padded: ``(B, T, *)`` any dtype.
        lengths: ``(B,)`` int32/int64 on the same device, ``0 <= lengths[b] <= T``.

    Returns:
        ``packed (N, *)`` with ``N = lengths.sum()`` and ``cu_seqlens (B + 1,)`` int32. ``N`` is read back to
        the host (one sync on CUDA); use :func:`pack_offsets` when the offsets are already known.
    """
    return _impl.pack(padded, lengths)


def pack_offsets(padded: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    """:func:`pack` with known offsets: ``(B, T, *)`` -> ``(total, *)`` with ``total = cu_seqlens[-1]``; no sync."""
    return _impl.pack_offsets(padded, cu_seqlens, total)


def unpack(packed: Tensor, cu_seqlens: Tensor, max_len: int, pad_value: float = 0.0) -> Tensor:
    """Inverse of :func:`pack`. Differentiable in ``packed``.

    Args:
        packed: ``(N, *)`` any dtype.
        cu_seqlens: ``(B + 1,)`` int32, ends at ``N``; every length at most ``max_len``.
        max_len: padded length T of the output (a host int).
        pad_value: value of the rows past each sequence's end.

    Returns:
        ``(B, max_len, *)``.
    """
    return _impl.unpack(packed, cu_seqlens, max_len, pad_value)


def word_offsets(word_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Word segments of a packed batch, all sequences concatenated in order.

    Args:
        word_ids: ``(N,)`` int32/int64; within every sequence they start at 0 and step by 0 or 1.
        cu_seqlens: ``(B + 1,)`` int32, ends at ``N``.

    Returns:
        ``(W_total + 1,)`` int32: word ``w`` (global index) owns rows ``[out[w], out[w + 1])``; ``out[-1] = N``.
        ``W_total`` is read back to the host (one sync on CUDA).
    """
    return _impl.word_offsets(word_ids, cu_seqlens)


def segment_sum(x: Tensor, offsets: Tensor) -> Tensor:
    """Deterministic per-segment sums: ``(N, *)`` float -> ``(S, *)`` with ``S = len(offsets) - 1``.

    ``offsets`` is int32 ``(S + 1,)``, starts at 0, non-decreasing, ends at N. Empty segments give 0.
    Accumulates in float32 for half types. Differentiable.
    """
    return _impl.segment_sum(x, offsets)


def segment_mean(x: Tensor, offsets: Tensor) -> Tensor:
    """Per-segment means (the subword-to-word average): ``(N, *)`` -> ``(S, *)``; empty segments give 0.

    Same contract as :func:`segment_sum`; deterministic (no atomics on any device). Differentiable.
    """
    return _impl.segment_mean(x, offsets)


def segment_broadcast(y: Tensor, offsets: Tensor, num_rows: int | None = None) -> Tensor:
    """Copies each segment's row to all of its rows (the inverse of :func:`segment_mean`).

    Args:
        y: ``(S, *)`` any dtype, one row per segment.
        offsets: ``(S + 1,)`` int32 as for :func:`segment_sum`.
        num_rows: ``N = offsets[-1]`` when known on the host; otherwise it is read back (one sync on CUDA).

    Returns:
        ``(N, *)``. Differentiable in ``y``.
    """
    return _impl.segment_broadcast(y, offsets, num_rows)


def segment_mean_broadcast(x: Tensor, offsets: Tensor) -> Tensor:
    """Replaces every row by the mean of its segment: ``segment_broadcast(segment_mean(x))`` in one pass.

    This is the official subword-to-word averaging (spec section 1.5) with no loop and no host sync: one read
    and one write of ``x``. ``(N, *)`` float -> ``(N, *)``; same contract as :func:`segment_mean`.
    Differentiable (the map is a symmetric projection, so its backward is itself).
    """
    return _impl.segment_mean_broadcast(x, offsets)


def segment_sum_by_key(values: Tensor, keys: Tensor, num_keys: int) -> tuple[Tensor, Tensor]:
    """Deterministic per-key sums and counts (sort-based; the RVQ's EMA statistics).

    Args:
        values: ``(N, *)`` float.
        keys: ``(N,)`` int32/int64 in ``[-1, num_keys)``; rows with key -1 are ignored.
        num_keys: number of keys K.

    Returns:
        ``sums (K, *)`` in ``values.dtype`` and ``counts (K,)`` int64. Differentiable in ``values``.
    """
    return _impl.segment_sum_by_key(values, keys, num_keys)


def prefix_layout(tokens: Tensor, cu_seqlens: Tensor, prefix: Tensor) -> PrefixLayout:
    """Puts the same ``P`` ids before every sequence of a packed batch, in one kernel and with no host sync.

    Sequence b (``L`` tokens) becomes ``P + L`` rows: ``prefix``, then its tokens. The aggregator's Whisper prefix
    (spec section 1.4) is made this way; ``positions`` index its learned position table and ``token_rows`` picks the
    text tokens' outputs back out.

    Args:
        tokens: ``(N,)`` int32/int64 packed ids.
        cu_seqlens: ``(B + 1,)`` int32, ends at N.
        prefix: ``(P,)`` ids of tokens' dtype and device (P may be 0).

    Returns:
        :class:`PrefixLayout` with ``M = N + B * P`` rows; its offsets, ids and positions describe the prefixed batch.
    """
    return PrefixLayout(*_impl.prefix_layout(tokens, cu_seqlens, prefix))


def delay_layout(word_ids: Tensor, cu_seqlens: Tensor, delay: int = 1) -> DelayLayout:
    """The TASLM word-delay input/label layout (spec section 2.4) of a packed batch, with no loop over it.

    A sequence of L text tokens and W words becomes ``L + delay + 1`` rows. Row 0 feeds BOS; row ``p >= 1``
    feeds text position ``j = p - 1``: token j for ``j < L``, the pad-text embedding for the ``delay`` tail
    rows ``j >= L``. Tail row ``j`` counts as a one-row virtual word ``W + (j - L)``. The audio fed with
    position j is the TASTE embedding of word ``v(j) - delay`` (``v`` = word of j, virtual on the tail), or the
    pad-audio embedding when that is negative: every token of word w carries the word ``delay`` words back.
    Row p predicts what row ``p + 1`` is fed: text token p for ``p < L`` (rows L.. have no text label, which
    fixes the official 0-padding label bug), and the codes of word ``v(p) - delay`` when position p starts a
    (virtual) word and that word exists. For ``delay = 1`` this is the worked example of spec section 2.4.

    Args:
        word_ids: ``(N,)`` int32/int64 word ids of the packed text tokens (0-based per sequence, contiguous).
        cu_seqlens: ``(B + 1,)`` int32, ends at N.
        delay: word delay k >= 0.

    Returns:
        :class:`DelayLayout` with ``M = N + B * (delay + 1)`` rows. Word indices are global (the index into
        per-word rows of the whole batch, as produced by :func:`word_offsets`); token indices are packed.
    """
    return DelayLayout(*_impl.delay_layout(word_ids, cu_seqlens, delay))


def _trailing(t: Tensor, start: int) -> tuple:
    return tuple(t.shape[start:])


if HAS_EXTENSION:
    _ops = torch.ops.taste

    # ---- fakes: shapes and dtypes only, for torch.compile / meta tensors ----
    @torch.library.register_fake("taste::pack")
    def _pack_fake(padded, lengths):
        torch._check(padded.dim() >= 2, lambda: "taste: padded must have shape (B, T, ...)")
        total = torch.library.get_ctx().new_dynamic_size()
        cu = lengths.new_empty((lengths.shape[0] + 1,), dtype=torch.int32)
        return padded.new_empty((total, *_trailing(padded, 2))), cu

    @torch.library.register_fake("taste::pack_offsets")
    def _pack_offsets_fake(padded, cu_seqlens, total):
        return padded.new_empty((total, *_trailing(padded, 2)))

    @torch.library.register_fake("taste::unpack")
    def _unpack_fake(packed, cu_seqlens, max_len, pad_value=0.0):
        return packed.new_empty((cu_seqlens.shape[0] - 1, max_len, *_trailing(packed, 1)))

    @torch.library.register_fake("taste::word_offsets")
    def _word_offsets_fake(word_ids, cu_seqlens):
        # The size itself must be the unbacked symbol (W + 1 would leave W unrecoverable for the compiler).
        return cu_seqlens.new_empty((torch.library.get_ctx().new_dynamic_size(min=1),))

    @torch.library.register_fake("taste::segment_sum")
    def _segment_sum_fake(x, offsets):
        return x.new_empty((offsets.shape[0] - 1, *_trailing(x, 1)))

    torch.library.register_fake("taste::segment_mean")(_segment_sum_fake)

    @torch.library.register_fake("taste::segment_mean_broadcast")
    def _segment_mean_broadcast_fake(x, offsets):
        return torch.empty_like(x)

    @torch.library.register_fake("taste::segment_broadcast")
    def _segment_broadcast_fake(y, offsets, num_rows=None):
        rows = torch.library.get_ctx().new_dynamic_size() if num_rows is None else num_rows
        return y.new_empty((rows, *_trailing(y, 1)))

    @torch.library.register_fake("taste::segment_sum_by_key")
    def _segment_sum_by_key_fake(values, keys, num_keys):
        return values.new_empty((num_keys, *_trailing(values, 1))), keys.new_empty((num_keys,), dtype=torch.int64)

    @torch.library.register_fake("taste::prefix_layout")
    def _prefix_layout_fake(tokens, cu_seqlens, prefix):
        rows = tokens.shape[0] + (cu_seqlens.shape[0] - 1) * prefix.shape[0]
        long = torch.int64
        return (cu_seqlens.new_empty(cu_seqlens.shape), tokens.new_empty((rows,)),
                tokens.new_empty((rows,), dtype=long), tokens.new_empty(tokens.shape, dtype=long))  # fmt: skip

    @torch.library.register_fake("taste::delay_layout")
    def _delay_layout_fake(word_ids, cu_seqlens, delay=1):
        rows = word_ids.shape[0] + (cu_seqlens.shape[0] - 1) * (delay + 1)
        idx = [word_ids.new_empty((rows,), dtype=torch.int64) for _ in range(4)]
        return (cu_seqlens.new_empty(cu_seqlens.shape), *idx)

    # ---- autograd: every backward is made of taste ops, so double backward works too ----
    def _save_offsets(index: int):
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[index])
            ctx.rows = inputs[0].shape[0]
            ctx.max_len = inputs[0].shape[1] if inputs[0].dim() > 1 else 0

        return setup_context

    def _pack_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.max_len = inputs[0].shape[1]

    def _pack_backward(ctx, grad, _grad_cu):
        (cu,) = ctx.saved_tensors
        return _ops.unpack(grad, cu, ctx.max_len, 0.0), None

    def _pack_offsets_backward(ctx, grad):
        (cu,) = ctx.saved_tensors
        return _ops.unpack(grad, cu, ctx.max_len, 0.0), None, None

    def _unpack_backward(ctx, grad):
        (cu,) = ctx.saved_tensors
        return _ops.pack_offsets(grad, cu, ctx.rows), None, None, None

    def _segment_sum_backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        return _ops.segment_broadcast(grad, offsets, ctx.rows), None

    def _segment_mean_backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        counts = offsets.diff().clamp(min=1).to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        return _ops.segment_broadcast(grad / counts, offsets, ctx.rows), None

    def _segment_mean_broadcast_backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        return _ops.segment_mean_broadcast(grad, offsets), None

    def _segment_broadcast_backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        return _ops.segment_sum(grad, offsets), None, None

    def _by_key_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def _by_key_backward(ctx, grad_sums, _grad_counts):
        (keys,) = ctx.saved_tensors
        valid = (keys >= 0).view(-1, *([1] * (grad_sums.dim() - 1)))
        rows = grad_sums.index_select(0, keys.clamp(min=0).long())
        return torch.where(valid, rows, torch.zeros_like(rows)), None, None

    torch.library.register_autograd("taste::pack", _pack_backward, setup_context=_pack_setup)
    torch.library.register_autograd("taste::pack_offsets", _pack_offsets_backward, setup_context=_save_offsets(1))
    torch.library.register_autograd("taste::unpack", _unpack_backward, setup_context=_save_offsets(1))
    torch.library.register_autograd("taste::segment_sum", _segment_sum_backward, setup_context=_save_offsets(1))
    torch.library.register_autograd("taste::segment_mean", _segment_mean_backward, setup_context=_save_offsets(1))
    torch.library.register_autograd(
        "taste::segment_broadcast", _segment_broadcast_backward, setup_context=_save_offsets(1)
    )
    torch.library.register_autograd(
        "taste::segment_mean_broadcast", _segment_mean_broadcast_backward, setup_context=_save_offsets(1)
    )
    torch.library.register_autograd("taste::segment_sum_by_key", _by_key_backward, setup_context=_by_key_setup)


from taste.ops_attention import (  # noqa: E402,F401  (Triton custom op, see the module)
    cross_attention_folds,
    text_query_attention,
    text_query_cross_attention,
    text_query_cross_attention_folded,
)
from taste.ops_relpos import relpos_attention  # noqa: E402,F401  (the unit decoder's attention, see the module)
from taste.ops_rvq import (  # noqa: E402,F401  (Triton custom ops, see the module)
    RVQQuantization,
    rvq_decode,
    rvq_ema_statistics,
    rvq_encode,
    rvq_quantize,
)
from taste.ops_text_loss import linear_cross_entropy  # noqa: E402,F401  (TASLM's text loss, see the module)
