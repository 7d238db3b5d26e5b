"""Benchmark of the alignment ops against the official-style per-sample loops (spec section 6) and PyTorch.

    python bench/packing.py [--device cpu|cuda] [--batch 64] [--dim 1280] [--json out.json]

Problem: B utterances of ~100 tokens (60-140) and ~30 words each, D features. Providers per case: the
official-style loop (or torch.nn.utils.rnn for pack/unpack), plain PyTorch (taste.reference and built-ins),
ours (taste.ops). Targets (issue 2, CPU): word pooling >= 15x and delay layout >= 30x the official style;
pack/unpack no slower than torch.nn.utils.rnn.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.nn.utils.rnn import pad_sequence, unpad_sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import official_prepare_batch, official_word_average, official_word_spans  # noqa: E402
from common import copy_ceiling_gbps, measure, parse, parser, report  # noqa: E402

from taste import ops, reference  # noqa: E402


def make_batch(batch: int, dim: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(60, 141, (batch,), generator=gen)
    n = int(lengths.sum())
    T = int(lengths.max())
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    starts = torch.rand(n, generator=gen) < 0.3  # ~3.3 tokens per word -> ~30 words per utterance
    starts[cu[:-1].long()] = True
    seq_first = torch.repeat_interleave(cu[:-1].long(), lengths)
    csum = starts.long().cumsum(0)
    word_ids = csum - csum[seq_first] + starts[seq_first].long() - 1  # 0-based within each sequence
    x = torch.randn(n, dim, generator=gen).to(dtype)
    mask = torch.arange(T) < lengths[:, None]
    x_pad = torch.zeros(batch, T, dim, dtype=dtype)
    x_pad[mask] = x
    wid_pad = torch.zeros(batch, T, dtype=torch.long)
    wid_pad[mask] = word_ids
    tokens = torch.randint(0, 128000, (n,), generator=gen)
    tok_pad = torch.zeros(batch, T, dtype=torch.long)
    tok_pad[mask] = tokens
    d = dict(
        lengths=lengths,
        cu=cu,
        word_ids=word_ids.to(torch.int32),
        x=x,
        x_pad=x_pad,
        wid_pad=wid_pad,
        tokens=tokens,
        tok_pad=tok_pad,
        n=n,
        T=T,
    )
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=1280)
    args = parse(p)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    b = make_batch(args.batch, args.dim, dev, dtype)
    n, T, B, D, esize = b["n"], b["T"], args.batch, args.dim, b["x"].element_size()
    offsets = ops.word_offsets(b["word_ids"], b["cu"])
    W = offsets.numel() - 1
    lengths_host = b["lengths"].cpu()
    rows = []

    # Word pooling: every subword gets its word's mean (the aggregator's output -> word-level embeddings).
    rows += measure(
        f"word pooling B={B} N={n} W={W} D={D}",
        {
            "official (span loop, padded)": lambda: official_word_average(b["x_pad"], b["wid_pad"], b["lengths"]),
            "pytorch (index_add, packed)": lambda: reference.segment_broadcast(
                reference.segment_mean(b["x"], offsets), offsets, n
            ),
            "ours (segment_mean+broadcast)": lambda: ops.segment_broadcast(
                ops.segment_mean(b["x"], offsets), offsets, n
            ),
            "ours (segment_mean_broadcast)": lambda: ops.segment_mean_broadcast(b["x"], offsets),
        },
        dev,
        args.reps,
        bytes_moved=2 * n * D * esize,
    )
    seg_lengths = offsets.diff()
    rows += measure(
        f"word means B={B} N={n} W={W} D={D}",
        {
            "pytorch segment_reduce": lambda: torch.segment_reduce(b["x"], "mean", lengths=seg_lengths, unsafe=True),
            "pytorch (index_add)": lambda: reference.segment_mean(b["x"], offsets),
            "ours (segment_mean)": lambda: ops.segment_mean(b["x"], offsets),
        },
        dev,
        args.reps,
        bytes_moved=(n + W) * D * esize,
    )

    # TASLM word-delay layout, materialised: text ids, audio code rows, text labels, TASTE labels.
    codes = torch.randint(0, 512, (W, 4), device=dev)
    codes_ext = torch.cat([codes, codes.new_full((1, 4), -1)])  # row -1 = "no code"
    tokens_ext = torch.cat([b["tokens"], b["tokens"].new_full((1,), -1)])
    starts_codes = torch.full((n, 4), -1, dtype=torch.long, device=dev)
    starts_codes[offsets[:-1].long()] = codes
    starts_pad = torch.full((B, T, 4), -1, dtype=torch.long, device=dev)
    starts_pad[torch.arange(T, device=dev) < b["lengths"][:, None]] = starts_codes

    def layout_gathers(lay):
        text = torch.where(lay.input_token >= 0, tokens_ext[lay.input_token], lay.input_token)
        return text, codes_ext[lay.input_word], tokens_ext[lay.label_token], codes_ext[lay.label_word]

    rows += measure(
        f"delay layout + gathers B={B} N={n}",
        {
            "official (per-sample loop)": lambda: official_prepare_batch(
                b["tok_pad"], b["wid_pad"], starts_pad, lengths_host
            ),
            "pytorch (vectorised reference)": lambda: layout_gathers(
                ops.DelayLayout(*reference.delay_layout(b["word_ids"], b["cu"], 1))
            ),
            "ours (delay_layout)": lambda: layout_gathers(ops.delay_layout(b["word_ids"], b["cu"], 1)),
        },
        dev,
        args.reps,
    )
    rows += measure(
        f"word offsets B={B} N={n}",
        {
            "official (run-length loop)": lambda: official_word_spans(b["wid_pad"], b["lengths"]),
            "pytorch (vectorised reference)": lambda: reference.word_offsets(b["word_ids"], b["cu"]),
            "ours (word_offsets)": lambda: ops.word_offsets(b["word_ids"], b["cu"]),
        },
        dev,
        args.reps,
    )
    rows += measure(
        f"pack B={B} T={T} D={D}",
        {
            "torch.nn.utils.rnn unpad+cat": lambda: torch.cat(
                unpad_sequence(b["x_pad"], lengths_host, batch_first=True)
            ),
            "pytorch (mask index)": lambda: reference.pack(b["x_pad"], b["lengths"]),
            "ours (pack)": lambda: ops.pack(b["x_pad"], b["lengths"]),
            "ours (pack_offsets, no sync)": lambda: ops.pack_offsets(b["x_pad"], b["cu"], n),
        },
        dev,
        args.reps,
        bytes_moved=2 * n * D * esize,
    )
    split = lengths_host.tolist()
    rows += measure(
        f"unpack B={B} T={T} D={D}",
        {
            "torch.nn.utils.rnn split+pad": lambda: pad_sequence(
                torch.split(b["x"], split), batch_first=True, padding_value=0.0
            ),
            "pytorch (mask index)": lambda: reference.unpack(b["x"], b["cu"], T),
            "ours (unpack)": lambda: ops.unpack(b["x"], b["cu"], T),
        },
        dev,
        args.reps,
        bytes_moved=(n + B * T) * D * esize,
    )

    # RVQ EMA statistics: per-code sums and counts of 6400 rows x 256 dims over 512 codes.
    gen = torch.Generator().manual_seed(1)
    keys = torch.randint(0, 512, (6400,), generator=gen).to(dev)
    vals = torch.randn(6400, 256, generator=gen).to(dev)

    def onehot_matmul():  # vector-quantize-pytorch style: a dense (N, K) one-hot
        onehot = torch.nn.functional.one_hot(keys, 512).to(vals.dtype)
        return onehot.t() @ vals, onehot.sum(0)

    rows += measure(
        "segment_sum_by_key N=6400 d=256 K=512",
        {
            "one-hot matmul (vq-pytorch style)": onehot_matmul,
            "pytorch (index_add + bincount)": lambda: reference.segment_sum_by_key(vals, keys, 512),
            "ours (sorted, deterministic)": lambda: ops.segment_sum_by_key(vals, keys, 512),
        },
        dev,
        args.reps,
        bytes_moved=(6400 * 256 + 512 * 256) * 4,
    )
    ceiling = copy_ceiling_gbps(dev) if dev == "cuda" else None
    report(f"bench/packing.py on {dev}, {dtype} (extension: {ops.HAS_EXTENSION})", rows, dev, args.json, ceiling)


if __name__ == "__main__":
    main()
