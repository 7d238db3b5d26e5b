"""Plain-PyTorch truth for every taste op, with the same signatures as :mod:`taste.ops`.

These are the definitions the compiled kernels are tested against, and the fallback when ``taste._C`` is
missing. They are vectorised (no loop over the batch) but favour obviousness over speed, and they do not
validate their inputs: :mod:`taste.ops` documents the contracts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _lengths(cu_seqlens: Tensor) -> Tensor:
    return cu_seqlens.long().diff()


def _valid_mask(lengths: Tensor, max_len: int) -> Tensor:
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]  # (B, max_len)


def _cu_from_lengths(lengths: Tensor) -> Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = lengths.cumsum(0)
    return cu


def pack(padded: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    lengths = lengths.long()
    return padded[_valid_mask(lengths, padded.shape[1])], _cu_from_lengths(lengths)


def pack_offsets(padded: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    return padded[_valid_mask(_lengths(cu_seqlens), padded.shape[1])]


def unpack(packed: Tensor, cu_seqlens: Tensor, max_len: int, pad_value: float = 0.0) -> Tensor:
    lengths = _lengths(cu_seqlens)
    out = packed.new_full((lengths.numel(), max_len, *packed.shape[1:]), pad_value)
    out[_valid_mask(lengths, max_len)] = packed
    return out


def word_offsets(word_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
    n = word_ids.numel()
    starts = torch.ones(n, dtype=torch.bool, device=word_ids.device)
    starts[1:] = word_ids[1:] != word_ids[:-1]
    starts[cu_seqlens[:-1][_lengths(cu_seqlens) > 0].long()] = True  # a new sequence always starts a word
    rows = torch.arange(n + 1, device=word_ids.device)
    return torch.cat([rows[:-1][starts], rows[-1:]]).to(torch.int32)


def segment_sum(x: Tensor, offsets: Tensor) -> Tensor:
    lengths = _lengths(offsets)
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
    return x.new_zeros((lengths.numel(), *x.shape[1:])).index_add(0, segment, x)


def segment_mean(x: Tensor, offsets: Tensor) -> Tensor:
    counts = _lengths(offsets).clamp(min=1).to(x.dtype)
    return segment_sum(x, offsets) / counts.view(-1, *([1] * (x.dim() - 1)))


def segment_mean_broadcast(x: Tensor, offsets: Tensor) -> Tensor:
    return segment_broadcast(segment_mean(x, offsets), offsets, x.shape[0])


def segment_broadcast(y: Tensor, offsets: Tensor, num_rows: int | None = None) -> Tensor:
    return torch.repeat_interleave(y, _lengths(offsets), dim=0, output_size=num_rows)


def segment_sum_by_key(values: Tensor, keys: Tensor, num_keys: int) -> tuple[Tensor, Tensor]:
    valid = keys >= 0
    k = keys[valid].long()
    sums = values.new_zeros((num_keys, *values.shape[1:])).index_add(0, k, values[valid])
    return sums, torch.bincount(k, minlength=num_keys)


def delay_layout(word_ids: Tensor, cu_seqlens: Tensor, delay: int = 1):
    """See :func:`taste.ops.delay_layout`; returns the same five tensors as a tuple."""
    dev = word_ids.device
    cu = cu_seqlens.long()
    lengths = cu.diff()
    batch, n = lengths.numel(), word_ids.numel()
    wid = word_ids.long()
    words = torch.zeros_like(lengths)
    if n:
        words = torch.where(lengths > 0, wid[(cu[1:] - 1).clamp(min=0)] + 1, words)
    base = words.cumsum(0) - words  # global index of each sequence's first word
    out_len = lengths + delay + 1
    cu_out = _cu_from_lengths(out_len)
    seq = torch.repeat_interleave(torch.arange(batch, device=dev), out_len)  # (M,)
    p = torch.arange(seq.numel(), device=dev) - cu_out.long()[seq]
    L, start, W, first = lengths[seq], cu[seq], words[seq], base[seq]

    def virtual_word(j):  # word of text position j; tail positions j >= L are one-row words W, W+1, ...
        inside = (j >= 0) & (j < L)
        w = wid[(start + j).clamp(0, max(n - 1, 0))] if n else torch.zeros_like(j)
        return torch.where(inside, w, W + j - L), inside

    neg = torch.full_like(p, -1)
    j_in = p - 1  # text position fed at row p
    v_in, inside_in = virtual_word(j_in)
    input_token = torch.where(p == 0, neg, torch.where(inside_in, start + j_in, neg - 1))
    input_word = torch.where((p >= 1) & (v_in - delay >= 0), first + v_in - delay, neg)
    label_token = torch.where(p < L, start + p, neg)
    v_lab, inside_lab = virtual_word(p)
    prev, _ = virtual_word(p - 1)
    word_start = ~inside_lab | (p == 0) | (v_lab != prev)
    label_word = torch.where((p < L + delay) & word_start & (v_lab - delay >= 0), first + v_lab - delay, neg)
    return cu_out, input_token, input_word, label_token, label_word
