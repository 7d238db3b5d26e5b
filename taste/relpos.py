"""ESPnet / WeNet-style transformer encoders with relative-position self-attention (spec sections 1.7 and 1.8), the
building blocks of the unit decoder and of the flow-matching decoder's token encoder. Parameter names follow the
official checkpoint (``embed.out.{0,1}``,
``encoders.{i}.self_attn.{linear_q,linear_k,linear_v,linear_out,linear_pos,pos_bias_u,pos_bias_v}``,
``feed_forward.{w_1,w_2}``, ``norm_mha``/``norm_ff`` in the Conformer-style encoders, ``norm1``/``norm2`` in the
transformer "LLM", ``after_norm``).

Relative attention, per head: ``score(i, j) = ((q_i + u) . k_j + (q_i + v) . W_pos p(i - j)) / sqrt(d_k)`` where
``p(k)`` is the sinusoid of relative offset ``k`` (sin at even channels, cos at odd ones, as ESPnet's table) and
``W_pos`` is bias-free. ESPnet computes the second term over offsets ``+(T-1)..-(T-1)`` and aligns it with the
Transformer-XL ``rel_shift``; here the offset of each (query, key) pair is gathered directly from the table, which
gives the same scores (a causal encoder reads only offsets ``0..T-1``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taste import ops, reference


def relative_sinusoids(length: int, d_model: int, device=None, dtype=torch.float32, first: int = 0) -> Tensor:
    """``(length, d_model)``: ESPnet's positional table for offsets ``first..first+length-1`` (sin even, cos odd;
    a negative offset ``k`` has ``sin(k w)``, as ESPnet's ``pe_negative``)."""
    pos = torch.arange(first, first + length, dtype=torch.float64, device=device)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64, device=device) * -(math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table.to(dtype)


def causal_mask(lengths: Tensor, size: int) -> Tensor:
    """``(B, size, size)`` bool: query i may see key j when ``j <= i`` and ``j < length`` (padding keys hidden)."""
    j = torch.arange(size, device=lengths.device)
    return (j[None, :] <= j[:, None])[None] & (j < lengths[:, None])[:, None, :]


class RelPositionAttention(nn.Module):
    """ESPnet's relative-position self-attention (the formula in the module docstring), official parameter names.

    Attends through ``taste.ops.relpos_attention``: a block of queries at a time, keeping no ``(B, H, Tq, Tk)``
    tensor for the backward (which recomputes them). ``block_elements`` (attribute) sizes the blocks (None: the
    device's default); a problem that fits one block runs the whole-score formula, whose backward keeps each
    layer's probabilities, so ``2**62`` always does. Measured on 2 CPU cores at the official decoder's shapes (B=2,
    T=853, ``bench/relpos.py --decoder``): a training step's peak 1817 -> 1044 MB with blocks, its time
    4.36 -> 4.80 s. With attention dropout in training the formula runs either way."""

    block_elements: int | None = None

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.heads, self.d_k = heads, d_model // heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_k).transpose(1, 2)  # (B, H, T, d_k); B may be 0

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, T, d)`` -> keys and values ``(B, H, T, d_k)`` (what a KV cache stores)."""
        return self._heads(self.linear_k(x)), self._heads(self.linear_v(x))

    def project_positions(self, pos_table: Tensor) -> Tensor:
        """``pos_table (P, d)`` relative sinusoids -> ``(H, P, d_k)`` (``W_pos p(k)`` per head). It depends on the
        table alone: a KV-cached generation projects it once, not at every step (P x d x d multiply-adds a layer)."""
        return self.linear_pos(pos_table).view(-1, self.heads, self.d_k).transpose(0, 1)

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor, positions: Tensor, p: Tensor) -> Tensor:
        """Queries from ``x (B, Tq, d)`` over ``k, v (B, H, Tk, d_k)``.

        ``mask (B, Tq, Tk)`` bool (True = may attend); ``positions (B, Tq)`` int64 absolute index of each query
        (keys sit at 0..Tk-1); ``p (H, P, d_k)``: :meth:`project_positions` of a table with ``P >= max offset + 1``.
        """
        q = self._heads(self.linear_q(x))  # (B, H, Tq, d_k)
        qu, qv = q + self.pos_bias_u[:, None], q + self.pos_bias_v[:, None]
        if not (self.training and self.dropout.p > 0):
            out = ops.relpos_attention(qu, qv, k, v, p, positions, mask, block_elements=self.block_elements)
        else:  # (dropout acts on the whole probability tensor)
            out = reference.relpos_attention(qu, qv, k, v, p, positions, mask, self.dropout)
        return self.linear_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.d_k))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, activation: str, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, ffn_dim)
        self.w_2 = nn.Linear(ffn_dim, d_model)
        self.act = {"swish": F.silu, "relu": F.relu}[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(self.act(self.w_1(x))))


class Block(nn.Module):
    """Pre-LN block: attention then feed-forward, each with a residual. ``conformer`` picks the official
    parameter names of the Conformer-style encoders (norm_mha/norm_ff) over the transformer's (norm1/norm2)."""

    def __init__(self, d_model, heads, ffn_dim, activation, dropout, attn_dropout, *, conformer: bool):
        super().__init__()
        self.self_attn = RelPositionAttention(d_model, heads, attn_dropout)
        self.feed_forward = FeedForward(d_model, ffn_dim, activation, dropout)
        self._norms = ("norm_mha", "norm_ff") if conformer else ("norm1", "norm2")
        for name in self._norms:
            self.add_module(name, nn.LayerNorm(d_model, eps=1e-12))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask, positions, pos_table, cache: tuple[Tensor, Tensor] | None = None, projected=None):
        """Queries ``x (B, Tq, d)`` at ``positions (B, Tq)``. Without ``cache`` they attend among themselves
        (keys at 0..Tq-1). With ``cache = (k, v)`` preallocated ``(B, H, T_cap, d_k)`` buffers, this step's keys
        and values are written at ``positions`` first and the queries attend over the whole buffer (``mask``
        is then ``(B, Tq, T_cap)``): prefill and one-token steps are the same call. ``projected``: this layer's
        ``self_attn.project_positions(pos_table)``, made once for many calls (``pos_table`` is then unused)."""
        h = getattr(self, self._norms[0])(x)
        k, v = self.self_attn.project_kv(h)
        if cache is not None:
            index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            # (in the buffers' dtype: under autocast the projections give 16-bit rows for float32 buffers)
            cache[0].scatter_(2, index, k.to(cache[0].dtype))
            cache[1].scatter_(2, index, v.to(cache[1].dtype))
            k, v = cache
        p = self.self_attn.project_positions(pos_table) if projected is None else projected  # (H, P, d_k)
        x = x + self.dropout(self.self_attn.attend(h, k, v, mask, positions, p))
        return x + self.dropout(self.feed_forward(getattr(self, self._norms[1])(x)))


class RelPosEncoder(nn.Module):
    """Input layer (Linear + LayerNorm + dropout, ReLU for the transformer "LLM"), x sqrt(d_model), positional
    dropout, ``num_layers`` blocks, final LayerNorm. Works on padded ``(B, T, in_dim)`` batches. ``causal``: the
    unit decoder's encoders (``static_chunk_size = 1``); not causal: every query sees every key of its sequence
    (relative offsets ``-(T-1)..T-1``, as the flow-matching decoder's encoder, ``static_chunk_size = 0``)."""

    def __init__(self, in_dim, d_model, num_layers, heads, ffn_dim, *, activation, conformer, input_relu, dropout,
                 pos_dropout, attn_dropout, causal: bool = True):  # fmt: skip
        super().__init__()
        self.causal = causal
        layers = [nn.Linear(in_dim, d_model), nn.LayerNorm(d_model, eps=1e-5), nn.Dropout(dropout)]
        self.embed = nn.Module()
        self.embed.out = nn.Sequential(*layers, *([nn.ReLU()] if input_relu else []))
        self.pos_dropout = nn.Dropout(pos_dropout)
        self.xscale = math.sqrt(d_model)
        self.encoders = nn.ModuleList(
            Block(d_model, heads, ffn_dim, activation, dropout, attn_dropout, conformer=conformer)
            for _ in range(num_layers)
        )
        self.after_norm = nn.LayerNorm(d_model, eps=1e-5)

    def embed_input(self, x: Tensor) -> Tensor:
        return self.pos_dropout(self.embed.out(x) * self.xscale)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """``x (B, T, in_dim)``, ``lengths (B,)`` -> ``(B, T, d_model)`` (rows past a length are don't-care)."""
        t, d = x.shape[1], self.after_norm.normalized_shape[0]
        positions = torch.arange(t, device=x.device).expand(x.shape[0], -1)
        if self.causal:
            mask = causal_mask(lengths, t)
            table = relative_sinusoids(t, d, x.device, x.dtype)
        else:  # offsets -(T-1)..T-1 sit at rows 0..2T-2: query i over key j reads row i - j + T - 1
            mask = (torch.arange(t, device=x.device) < lengths[:, None])[:, None, :].expand(-1, t, -1)
            table = relative_sinusoids(2 * t - 1, d, x.device, x.dtype, first=1 - t)
            positions = positions + (t - 1)
        x = self.embed_input(x)
        for layer in self.encoders:
            x = layer(x, mask, positions, table)
        return self.after_norm(x)
