"""Plain-PyTorch truth for every taste op, with the same signatures as :mod:`taste.ops`.

These are the definitions the compiled kernels are tested against, and the fallback when ``taste._C`` is
missing. They are vectorised (no loop over the batch) but favour obviousness over speed, and they do not
validate their inputs: :mod:`taste.ops` documents the contracts.
"""

from __future__ import annotations

import math

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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of 16-bit floats accumulate in float32 and round once, as the compiled kernels do."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _segment_sums(x: Tensor, offsets: Tensor) -> Tensor:
    lengths = _lengths(offsets)
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
    acc = _acc_dtype(x.dtype)
    return torch.zeros((lengths.numel(), *x.shape[1:]), dtype=acc, device=x.device).index_add(0, segment, x.to(acc))


def segment_sum(x: Tensor, offsets: Tensor) -> Tensor:
    return _segment_sums(x, offsets).to(x.dtype)


def segment_mean(x: Tensor, offsets: Tensor) -> Tensor:
    sums = _segment_sums(x, offsets)
    counts = _lengths(offsets).clamp(min=1).to(sums.dtype)
    return (sums / counts.view(-1, *([1] * (x.dim() - 1)))).to(x.dtype)


def segment_mean_broadcast(x: Tensor, offsets: Tensor) -> Tensor:
    return segment_broadcast(segment_mean(x, offsets), offsets, x.shape[0])


def segment_broadcast(y: Tensor, offsets: Tensor, num_rows: int | None = None) -> Tensor:
    return torch.repeat_interleave(y, _lengths(offsets), dim=0, output_size=num_rows)


def segment_sum_by_key(values: Tensor, keys: Tensor, num_keys: int) -> tuple[Tensor, Tensor]:
    valid = keys >= 0
    k = keys[valid].long()
    acc = _acc_dtype(values.dtype)
    sums = torch.zeros((num_keys, *values.shape[1:]), dtype=acc, device=values.device)
    return sums.index_add(0, k, values[valid].to(acc)).to(values.dtype), torch.bincount(k, minlength=num_keys)


def prefix_layout(tokens: Tensor, cu_seqlens: Tensor, prefix: Tensor):
    """See :func:`taste.ops.prefix_layout`; returns the same four tensors as a tuple."""
    dev = tokens.device
    n, batch, p = tokens.numel(), cu_seqlens.numel() - 1, prefix.numel()
    lengths = cu_seqlens.long().diff()
    cu_out = cu_seqlens + p * torch.arange(batch + 1, device=dev, dtype=cu_seqlens.dtype)
    seq = torch.repeat_interleave(torch.arange(batch, device=dev), lengths, output_size=n)  # (N,)
    token_rows = torch.arange(n, device=dev) + p * (seq + 1)
    prefix_rows = (cu_out[:-1, None].long() + torch.arange(p, device=dev)).flatten()  # (B * P,)
    ids = tokens.new_empty(n + batch * p)
    ids[token_rows] = tokens
    ids[prefix_rows] = prefix.repeat(batch)
    seq_out = torch.repeat_interleave(torch.arange(batch, device=dev), lengths + p, output_size=ids.numel())
    positions = torch.arange(ids.numel(), device=dev) - cu_out.long()[seq_out]
    return cu_out, ids, positions, token_rows


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


# ---- text-query attention (the aggregator's attention; taste.kernels.attention is the CUDA path) ----


def _to_padded(t, cu, max_len, lengths, pad_value=0.0):
    """Packed (N, H, ...) -> (B, H, max_len, ...); a view when every sequence fills max_len."""
    if all(n == max_len for n in lengths):
        return t.view(len(lengths), max_len, *t.shape[1:]).transpose(1, 2)
    return unpack(t, cu, max_len, pad_value).transpose(1, 2)


def _from_padded(t, cu, total, lengths):
    """(B, H, M, ...) -> packed (N, H, ...); a reshape when every sequence fills M."""
    t = t.transpose(1, 2)
    if all(n == t.shape[1] for n in lengths):
        return t.reshape(total, *t.shape[2:])
    return pack_offsets(t, cu, total)


def _padded_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """(B, H, M, D) views of q, k, v (copies only where a sequence is shorter than its max), the additive mask
    (None where is_causal or no mask is needed), and which query rows see no key (None when every row sees one)."""
    # Host lists: free on CPU, the device this path is for (on CUDA it is the float64 fallback).
    lq, lk = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    batch = len(lq)

    qp = _to_padded(q, cu_seqlens_q, max_seqlen_q, lq)
    kp, vp = (_to_padded(t, cu_seqlens_k, max_seqlen_k, lk) for t in (k, v))
    if (causal and lq == lk) or (not causal and all(n == max_seqlen_k for n in lk)):
        # is_causal (top-left) equals bottom-right when Lq = Lk, and a row never reaches keys past its length.
        no_key = None
        if any(a > 0 and b == 0 for a, b in zip(lq, lk)):
            no_key = torch.tensor([b == 0 for b in lk], device=q.device)[:, None].expand(batch, max_seqlen_q)
        return qp, kp, vp, None, causal, no_key
    lq_t, lk_t = _lengths(cu_seqlens_q), _lengths(cu_seqlens_k)
    rows = torch.arange(max_seqlen_q, device=q.device)
    cols = torch.arange(max_seqlen_k, device=q.device)
    ok = cols[None, None, :] < lk_t[:, None, None]
    if causal:  # bottom-right alignment: query i sees keys j <= i + (Lk - Lq)
        ok = ok & (cols[None, None, :] <= rows[None, :, None] + (lk_t - lq_t)[:, None, None])
    mask = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill(~ok, float("-inf"))[:, None]
    return qp, kp, vp, mask, False, ~ok.any(-1)


def _unit_stride(t: Tensor) -> Tensor:
    """``t`` with its last dim contiguous (a copy only where it is not). PyTorch's CPU flash-attention kernels read
    q, k and v as if the head dim had stride 1, whatever the strides say (torch 2.14: q; 2.13: q, k and v); the
    public ``scaled_dot_product_attention`` makes its inputs contiguous before calling them, and so must we."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _cpu_attention_kernel(q) -> bool:
    """Whether PyTorch's memory-efficient CPU attention kernel applies (it exists for CPU tensors only)."""
    return q.device.type == "cpu"


def _scores(qp, kp, mask, is_causal, scale):
    """(B, H, Mq, Mk) masked scores in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if qp.dtype == torch.float64 else torch.float32
    s = (qp.to(dtype) @ kp.to(dtype).transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(dtype)
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def text_query_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, scale=None):
    """Softmax attention of packed queries (Nq, H, D) over packed keys/values (Nk, H, D), per sequence.

    Returns (out (Nq, H, D) in q.dtype, lse (H, Nq) float32, float64 for float64 inputs; +inf where a query
    sees no key, whose output is 0). Runs PyTorch's memory-efficient CPU attention kernel (the one behind
    scaled_dot_product_attention) on padded views: no (B, H, Mq, Mk) tensor is held.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[0] == 0 or k.shape[0] == 0:  # nothing to attend (PyTorch's CPU kernel divides by zero on 0 keys)
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return torch.zeros_like(q), torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=lse_dtype, device=q.device)
    qp, kp, vp, mask, is_causal, no_key = _padded_attention_args(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal
    )
    if _cpu_attention_kernel(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _unit_stride(qp), _unit_stride(kp), _unit_stride(vp), 0.0, is_causal, attn_mask=mask, scale=scale
        )  # (B, H, Mq, D), (B, H, Mq)
    else:  # other devices (float64 on CUDA): the plain formula, with the full score tensor
        s = _scores(qp, kp, mask, is_causal, scale)
        lse = torch.logsumexp(s, -1)
        out = (torch.exp(s - lse[..., None]).nan_to_num(0.0) @ vp.to(s.dtype)).to(q.dtype)
    if no_key is not None:
        lse = lse.masked_fill(no_key[:, None], float("inf"))
    lq = cu_seqlens_q.diff().tolist()
    out = _from_padded(out, cu_seqlens_q, q.shape[0], lq)  # (Nq, H, D)
    return out, _from_padded(lse, cu_seqlens_q, q.shape[0], lq).t().contiguous()  # (H, Nq)


def text_query_cross_attention(q, h_key, h_val, k_weight, k_bias, v_weight, v_bias, cu_seqlens_q, max_seqlen_q,
                               scale=None):  # fmt: skip
    """Cross-attention of packed queries (Nq, H, D) over K/V projected from dense states h_key/h_val (B, E, d_in):
    every frame projected at once (the definition that the chunked op must equal)."""
    batch, frames = h_key.shape[:2]
    k = torch.nn.functional.linear(h_key, k_weight, k_bias).reshape(batch * frames, *q.shape[1:])
    v = torch.nn.functional.linear(h_val, v_weight, v_bias).reshape(batch * frames, *q.shape[1:])
    cu_k = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * frames
    return text_query_attention(q, k, v, cu_seqlens_q, cu_k, max_seqlen_q, frames, False, scale)[0]


def text_query_attention_backward(
    grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, scale=None
):
    """Gradients (dq, dk, dv) of :func:`text_query_attention` from its saved out and lse."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[0] == 0 or k.shape[0] == 0:  # no query sees a key: no gradient anywhere
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    qp, kp, vp, mask, is_causal, _ = _padded_attention_args(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal
    )
    lq, lk = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    gp = _to_padded(grad_out, cu_seqlens_q, max_seqlen_q, lq)
    op = _to_padded(out, cu_seqlens_q, max_seqlen_q, lq)
    lp = _to_padded(lse.t(), cu_seqlens_q, max_seqlen_q, lq, float("inf"))  # +inf: padded rows get no gradient
    if _cpu_attention_kernel(q):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            gp.contiguous(), *map(_unit_stride, (qp, kp, vp)), op.contiguous(), lp.contiguous(), 0.0, is_causal,
            attn_mask=mask, scale=scale,
        )  # fmt: skip
    else:  # the flash-attention backward formulas, with the full score tensor
        s = _scores(qp, kp, mask, is_causal, scale)
        p = torch.exp(s - lp[..., None].to(s.dtype))  # lse = +inf (no key, padding) gives 0
        g = gp.to(s.dtype)
        dv = p.transpose(-1, -2) @ g
        ds = p * (g @ vp.to(s.dtype).transpose(-1, -2) - (g * op.to(s.dtype)).sum(-1, keepdim=True))
        dq, dk = ds @ kp.to(s.dtype) * scale, ds.transpose(-1, -2) @ qp.to(s.dtype) * scale
        dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    return (
        _from_padded(dq, cu_seqlens_q, q.shape[0], lq),
        _from_padded(dk, cu_seqlens_k, k.shape[0], lk),
        _from_padded(dv, cu_seqlens_k, v.shape[0], lk),
    )


# ---- residual vector quantization (taste.kernels.rvq is the CUDA path) ----


def rvq_encode(x, codebooks, num_stages, fast=False, row_chunk: int = 2048):
    """Greedy residual nearest-codeword search over the stages of codebooks (Q, K, d) for rows x (N, d).

    Returns indices (N, Q) int64 (-1 for stages >= num_stages), quantized (N, d) in x.dtype (the sum of the
    chosen codewords) and the squared residual norm after each stage (N, Q) (0 where inactive), float32
    (float64 for float64 x). Distances ||c||^2 - 2 r.c in float32 (float64); ties go to the lowest index.
    `fast` changes nothing here (CPU products are exact). Rows are processed in chunks: no (N, K) matrix.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, q_total = x.shape[0], codebooks.shape[0]
    stages = max(0, min(int(num_stages), q_total))
    cb = codebooks.to(acc)
    norms = (cb * cb).sum(-1)  # (Q, K)
    indices = torch.full((n, q_total), -1, dtype=torch.int64, device=x.device)
    quantized = torch.zeros(x.shape, dtype=acc, device=x.device)
    sq_err = torch.zeros((n, q_total), dtype=acc, device=x.device)
    for r0 in range(0, n, row_chunk):
        residual = x[r0 : r0 + row_chunk].to(acc)
        for s in range(stages):
            idx = torch.addmm(norms[s], residual, cb[s].T, alpha=-2.0).argmin(-1)  # (rows,) ||c||^2 - 2 r.c
            chosen = cb[s][idx]
            residual = residual - chosen
            quantized[r0 : r0 + row_chunk] += chosen
            indices[r0 : r0 + row_chunk, s] = idx
            sq_err[r0 : r0 + row_chunk, s] = (residual * residual).sum(-1)
    return indices, quantized.to(x.dtype), sq_err


def rvq_decode(indices, codebooks, weights=None):
    """Sum over stages of weights[:, q] * codebooks[q, indices[:, q]] (weights default 1); -1 contributes 0."""
    if codebooks.shape[0] == 0:
        return codebooks.new_zeros((indices.shape[0], codebooks.shape[-1]))
    out = None
    for s in range(codebooks.shape[0]):
        idx = indices[:, s]
        scale = (idx >= 0).to(codebooks.dtype)
        if weights is not None:
            scale = scale * weights[:, s].to(codebooks.dtype)
        rows = codebooks[s][idx.clamp(min=0)].mul_(scale[:, None])  # (the gather is a new tensor: scaled in place)
        out = rows if out is None else out.add_(rows)  # (stage 0's rows start the sum: no zeros to add them to)
    return out


def per_head_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a (B, H, M, K) @ b (H, K, N) -> (B, H, M, N)`` with the heads as the batch of one matmul: broadcasting
    ``b`` over B would copy it B times (a position table as large as the keys, at every generation step)."""
    batch, heads, m, _ = a.shape
    out = torch.matmul(a.transpose(0, 1).reshape(heads, batch * m, a.shape[-1]), b)  # (H, B * M, N)
    return out.view(heads, batch, m, b.shape[-1]).transpose(0, 1)


def relpos_attention(qu, qv, k, v, p, positions, mask, dropout=None):
    """The unit decoder's relative-position attention (``taste.ops.relpos_attention``) over whole score tensors:
    ``softmax((qu k^T + gather(qv p^T, positions_i - j)) / sqrt(d_k))`` over the keys ``mask`` allows, probabilities
    in float32 at least, then ``dropout`` (a function, or None) on them, then the values."""
    ac = qu @ k.transpose(-1, -2)  # (B, H, Tq, Tk)
    by_offset = per_head_matmul(qv, p.transpose(-1, -2))  # (B, H, Tq, P)
    offset = (positions[:, :, None] - torch.arange(k.shape[2], device=k.device)).clamp(0, p.shape[1] - 1)
    bd = by_offset.gather(-1, offset[:, None].expand(-1, qu.shape[1], -1, -1))  # (B, H, Tq, Tk)
    scores = ((ac + bd) / math.sqrt(qu.shape[-1])).to(_acc_dtype(qu.dtype))
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    if dropout is not None:
        probs = dropout(probs)
    return probs.to(v.dtype) @ v


def linear_cross_entropy(h, weight, targets, ref_h=None, kl_weight=0.0, ignore_index=-100):
    """``taste.ops.linear_cross_entropy`` on the whole ``(N, V)`` logits: ``(loss, accuracy)``. The KL's reference
    distribution is a fixed target (no gradient through ``ref_h`` or through ``weight`` on its side). Rows whose
    target is ``ignore_index`` count nowhere."""
    logits = (h @ weight.T).to(_acc_dtype(h.dtype))
    keep = targets != ignore_index
    count = keep.sum().to(logits.dtype)
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index)
    if kl_weight > 0:
        ref = (ref_h @ weight.T).detach().to(logits.dtype).log_softmax(-1)
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref, log_target=True, reduction="none").sum(-1)
        loss = kl_weight * (kl * keep).sum() / count + (1 - kl_weight) * loss
    return loss, ((logits.argmax(-1) == targets) & keep).sum().to(logits.dtype) / count
