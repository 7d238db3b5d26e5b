"""What :mod:`taste.ops` runs when the compiled extension ``taste._C`` cannot be loaded: the references of
:mod:`taste.reference` behind the argument checks of the compiled ops (``csrc/common.cpp``), so that bad input
gets the same clear error either way instead of a silent wrong result or an indexing error from deep inside.

The same rules as the compiled ops: value checks (offsets monotone and ending at N, word ids contiguous, lengths
within T) run on CPU tensors, and on CUDA tensors only in the ops that read them back anyway (``pack``,
``word_offsets``, ``segment_broadcast`` without ``num_rows``) or with ``TASTE_STRICT_CHECKS=1``. Under
``torch.compile`` only the checks of shapes, dtypes and devices run, as the compiled ops' fake kernels do: values
are not known while tracing.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from taste import reference

_INT32_MAX = 2**31 - 1


def _fail(message: str):
    raise RuntimeError(f"taste: {message}")


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def _content_checks(t: Tensor) -> bool:
    return t.device.type == "cpu" or os.environ.get("TASTE_STRICT_CHECKS", "") not in ("", "0")


def _same_device(a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    if a.device != b.device:
        _fail(f"{b_name} must be on the same device as {a_name} ({a.device}), got {b.device}")


def _index_dtype(t: Tensor, name: str, allow_int64: bool) -> None:
    if allow_int64 and t.dtype not in (torch.int32, torch.int64):
        _fail(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
    if not allow_int64 and t.dtype != torch.int32:
        _fail(f"{name} must be an int32 tensor, got {t.dtype}")


def _float_dtype(t: Tensor, name: str) -> None:
    if not t.is_floating_point():
        _fail(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}")


def _offsets_tensor(offsets: Tensor, name: str) -> None:
    _index_dtype(offsets, name, allow_int64=False)
    if offsets.dim() != 1 or offsets.numel() < 1:
        _fail(f"{name} must be a 1-D tensor with at least one entry (segment count + 1), got shape "
              f"{list(offsets.shape)}")  # fmt: skip


def _first(mask: Tensor) -> int | None:
    """Index of the first True in a 1-D mask, None if there is none (one host read)."""
    hits = mask.nonzero()
    return int(hits[0, 0]) if hits.numel() else None


def _offsets_values(offsets: Tensor, name: str, total: int, max_len: int = -1, always: bool = False) -> None:
    """Starts at 0, never decreases, no segment longer than ``max_len`` (-1: any), ends at ``total`` (-1: any).
    Vectorised: the offsets of every word of a batch can be many."""
    if _tracing() or not (always or _content_checks(offsets)):
        return
    o = offsets.long()
    if int(o[0]) != 0:
        _fail(f"{name} must start at 0, got {name}[0]={int(o[0])}")
    steps = o.diff()
    i = _first((steps < 0) | (steps > max_len) if max_len >= 0 else steps < 0)
    if i is not None and int(steps[i]) < 0:
        _fail(f"{name} must be non-decreasing, got {name}[{i}]={int(o[i])} > {name}[{i + 1}]={int(o[i + 1])}")
    if i is not None:
        _fail(f"sequence {i} has length {int(steps[i])} (from {name}) which exceeds max_len={max_len}")
    if total >= 0 and int(o[-1]) != total:
        _fail(f"{name} must end at the number of rows ({total}), got {name}[{o.numel() - 1}]={int(o[-1])}")


def _word_ids_values(word_ids: Tensor, cu_seqlens: Tensor, always: bool = False) -> None:
    """Each sequence's word ids start at 0 and go up in steps of 0 or 1 (``cu_seqlens`` already checked)."""
    if _tracing() or not (always or _content_checks(word_ids)) or word_ids.numel() == 0:
        return
    wid, cu = word_ids.long(), cu_seqlens.long()
    lengths = cu.diff()
    first_rows = cu[:-1][lengths > 0]
    is_first = torch.zeros_like(wid, dtype=torch.bool).index_fill_(0, first_rows, True)
    steps = torch.cat([wid[:1], wid.diff()])
    n = _first(torch.where(is_first, wid != 0, (steps != 0) & (steps != 1)))
    if n is None:
        return
    b = int(torch.searchsorted(cu, n, right=True)) - 1  # the sequence that holds row n
    if bool(is_first[n]):
        _fail(f"word_ids of sequence {b} must start at 0, got word_ids[{n}]={int(wid[n])}")
    _fail(f"word_ids must be contiguous and non-decreasing within a sequence (steps of 0 or 1), got "
          f"word_ids[{n - 1}]={int(wid[n - 1])} then word_ids[{n}]={int(wid[n])} in sequence {b}")  # fmt: skip


def _segment_args(x: Tensor, x_name: str, offsets: Tensor, num_rows: int, always: bool = False) -> None:
    if x.dim() < 1:
        _fail(f"{x_name} must have shape (rows, ...), got a scalar")
    _offsets_tensor(offsets, "offsets")
    _same_device(x, x_name, offsets, "offsets")
    _offsets_values(offsets, "offsets", num_rows, always=always)


def _word_args(word_ids: Tensor, cu_seqlens: Tensor) -> None:
    _index_dtype(word_ids, "word_ids", allow_int64=True)
    if word_ids.dim() != 1:
        _fail(f"word_ids must be a 1-D (N,) tensor, got shape {list(word_ids.shape)}")
    _offsets_tensor(cu_seqlens, "cu_seqlens")
    _same_device(word_ids, "word_ids", cu_seqlens, "cu_seqlens")


def pack(padded: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    if padded.dim() < 2:
        _fail(f"padded must have shape (B, T, ...), got {list(padded.shape)}")
    _index_dtype(lengths, "lengths", allow_int64=True)
    _same_device(padded, "padded", lengths, "lengths")
    if lengths.dim() != 1 or lengths.shape[0] != padded.shape[0]:
        _fail(f"lengths must have shape (B,) = ({padded.shape[0]},) matching padded, got {list(lengths.shape)}")
    values = [] if _tracing() else lengths.tolist()  # the output size needs them on the host anyway
    for b, n in enumerate(values):
        if n < 0:
            _fail(f"lengths must be >= 0, got lengths[{b}]={n}")
        if n > padded.shape[1]:
            _fail(f"lengths[{b}]={n} exceeds the padded length T={padded.shape[1]}")
    if sum(values) > _INT32_MAX:
        _fail(f"the packed batch has {sum(values)} rows, more than int32 cu_seqlens can index")
    return reference.pack(padded, lengths)


def pack_offsets(padded: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    if padded.dim() < 2:
        _fail(f"padded must have shape (B, T, ...), got {list(padded.shape)}")
    _offsets_tensor(cu_seqlens, "cu_seqlens")
    _same_device(padded, "padded", cu_seqlens, "cu_seqlens")
    if cu_seqlens.shape[0] != padded.shape[0] + 1:
        _fail(f"cu_seqlens must have shape (B + 1,) = ({padded.shape[0] + 1},), got {list(cu_seqlens.shape)}")
    if total < 0:
        _fail(f"total must be >= 0, got {total}")
    _offsets_values(cu_seqlens, "cu_seqlens", total, padded.shape[1])
    return reference.pack_offsets(padded, cu_seqlens, total)


def unpack(packed: Tensor, cu_seqlens: Tensor, max_len: int, pad_value: float = 0.0) -> Tensor:
    if packed.dim() < 1:
        _fail("packed must have shape (N, ...), got a scalar")
    _offsets_tensor(cu_seqlens, "cu_seqlens")
    _same_device(packed, "packed", cu_seqlens, "cu_seqlens")
    if max_len < 0:
        _fail(f"max_len must be >= 0, got {max_len}")
    _offsets_values(cu_seqlens, "cu_seqlens", packed.shape[0], max_len)
    return reference.unpack(packed, cu_seqlens, max_len, pad_value)


def word_offsets(word_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
    _word_args(word_ids, cu_seqlens)
    _offsets_values(cu_seqlens, "cu_seqlens", word_ids.shape[0], always=True)  # the output size syncs anyway
    _word_ids_values(word_ids, cu_seqlens, always=True)
    return reference.word_offsets(word_ids, cu_seqlens)


def _reduce_args(x: Tensor, offsets: Tensor) -> None:
    _float_dtype(x, "x")
    _segment_args(x, "x", offsets, x.shape[0] if x.dim() >= 1 else -1)


def segment_sum(x: Tensor, offsets: Tensor) -> Tensor:
    _reduce_args(x, offsets)
    return reference.segment_sum(x, offsets)


def segment_mean(x: Tensor, offsets: Tensor) -> Tensor:
    _reduce_args(x, offsets)
    return reference.segment_mean(x, offsets)


def segment_mean_broadcast(x: Tensor, offsets: Tensor) -> Tensor:
    _reduce_args(x, offsets)
    return reference.segment_mean_broadcast(x, offsets)


def segment_broadcast(y: Tensor, offsets: Tensor, num_rows: int | None = None) -> Tensor:
    if y.dim() < 1:
        _fail("y must have shape (segments, ...), got a scalar")
    _offsets_tensor(offsets, "offsets")
    _same_device(y, "y", offsets, "offsets")
    if y.shape[0] != offsets.shape[0] - 1:
        _fail(f"y must have one row per segment ({offsets.shape[0] - 1} = len(offsets) - 1), got {y.shape[0]}")
    if num_rows is None and _tracing():
        _segment_args(y, "y", offsets, -1)  # (the values are not known while tracing)
        return reference.segment_broadcast(y, offsets, num_rows)
    rows = int(offsets[-1]) if num_rows is None else num_rows  # without num_rows the output size syncs anyway
    if rows < 0:
        _fail(f"num_rows must be >= 0, got {rows}")
    _segment_args(y, "y", offsets, rows, always=num_rows is None)
    return reference.segment_broadcast(y, offsets, num_rows)


def segment_sum_by_key(values: Tensor, keys: Tensor, num_keys: int) -> tuple[Tensor, Tensor]:
    if values.dim() < 1:
        _fail("values must have at least one dimension (N, ...), got a scalar")
    _float_dtype(values, "values")
    _index_dtype(keys, "keys", allow_int64=True)
    _same_device(values, "values", keys, "keys")
    if keys.dim() != 1 or keys.shape[0] != values.shape[0]:
        _fail(f"keys must have shape (N,) = ({values.shape[0]},) matching values, got {list(keys.shape)}")
    if num_keys < 0:
        _fail(f"num_keys must be >= 0, got {num_keys}")
    if not _tracing() and _content_checks(keys) and keys.numel() > 0:
        lo, hi = int(keys.min()), int(keys.max())
        if lo < -1 or hi >= num_keys:
            _fail(f"keys must lie in [-1, num_keys) = [-1, {num_keys}) (-1 = ignore), got values in [{lo}, {hi}]")
    return reference.segment_sum_by_key(values, keys, num_keys)


def prefix_layout(tokens: Tensor, cu_seqlens: Tensor, prefix: Tensor):
    _index_dtype(tokens, "tokens", allow_int64=True)
    if tokens.dim() != 1:
        _fail(f"tokens must be a 1-D (N,) tensor, got shape {list(tokens.shape)}")
    if prefix.dim() != 1 or prefix.dtype != tokens.dtype:
        _fail(f"prefix must be a 1-D (P,) tensor of tokens' dtype ({tokens.dtype}), got {prefix.dtype} of shape "
              f"{list(prefix.shape)}")  # fmt: skip
    _same_device(tokens, "tokens", prefix, "prefix")
    _offsets_tensor(cu_seqlens, "cu_seqlens")
    _same_device(tokens, "tokens", cu_seqlens, "cu_seqlens")
    _offsets_values(cu_seqlens, "cu_seqlens", tokens.shape[0])
    batch = cu_seqlens.shape[0] - 1
    if batch == 0 and tokens.shape[0] > 0:
        _fail(f"cu_seqlens has no sequence (shape (1,)) but tokens has {tokens.shape[0]} rows")
    if tokens.shape[0] + batch * prefix.shape[0] > _INT32_MAX:
        _fail(f"the prefixed batch has {tokens.shape[0] + batch * prefix.shape[0]} rows, more than int32 "
              "cu_seqlens can index")  # fmt: skip
    return reference.prefix_layout(tokens, cu_seqlens, prefix)


def delay_layout(word_ids: Tensor, cu_seqlens: Tensor, delay: int = 1):
    _word_args(word_ids, cu_seqlens)
    _offsets_values(cu_seqlens, "cu_seqlens", word_ids.shape[0])
    if delay < 0:
        _fail(f"delay must be >= 0, got {delay}")
    _word_ids_values(word_ids, cu_seqlens)
    return reference.delay_layout(word_ids, cu_seqlens, delay)
