"""The headline benchmark: the TASTE aggregator (text-query cross-attention over the speech encoder) + word pooling.

    python bench/aggregator.py [--device cpu|cuda] [--train] [--batch 1 8 64] [--json out.json]

Providers, side by side on the same weights and inputs:
  (1) official-style eager: padded batch with prefix and EOS, full attention-probability tensors, Python-loop
      word averaging (spec 1.4 / 1.5);
  (2) PyTorch SDPA on the padded batch (causal mask for self-attention) + vectorised pooling;
  (3) FlexAttention (compiled) on the padded batch + vectorised pooling, where the installed torch has it;
  (4) ours: taste.TextQueryAggregator on packed rows (Triton text_query_attention on CUDA) + ops.segment_mean;
      at inference it makes the cross-attention K/V for at most --kv-chunk-frames frames at a time, or on the CPU
      folds the K/V projections into the queries where utterances are short (ops.cross_attention_folds);
  (5) where (4) chunks or folds: ours with every utterance's K/V projected at once (what that saves);
  (6) with --compile: (4) under torch.compile (fullgraph; on a GPU mode="reduce-overhead", whose CUDA graphs
      replay the whole forward with no host work per kernel), compiled once per batch size before timing. On a
      GPU its peak memory is not reported (nan): the graphs' memory pool is taken while recording, not per call.
Two cases per batch size: the whole aggregator (2 layers incl. K/V projections of 1500 frames), and the
attention + pooling part alone (one cross-attention over precomputed K/V, then word pooling). In that part (1)-(3)
get K/V in the head-major (B, H, E, D) layout they attend in, made before timing, and (4) the packed (N, H, D) rows
that a projection writes: PyTorch's CPU flash kernel, which ours calls on the CPU, reads those strided and takes
about 1.3x as long (bench/RESULTS.md); in the whole aggregator every provider attends to the projections' layout.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import (  # noqa: E402
    eager_attention,
    official_prefixed_ids,
    official_word_average,
    padded_aggregator,
)
from common import (  # noqa: E402
    copy_ceiling_gbps,
    measure,
    no_grad_call,
    parse,
    parser,
    print_tuning,
    report,
    tuning_summary,
)

from taste import AggregatorConfig, TextQueryAggregator, ops, reference  # noqa: E402

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # older torch
    flex_attention = None

GPU_PROBLEM = dict(d_model=1280, heads=20, ffn=5120, frames=1500, queries=100, batches=(1, 8, 64))
CPU_PROBLEM = dict(d_model=512, heads=8, ffn=2048, frames=1500, queries=50, batches=(1, 8))


def make_problem(batch, queries, frames, d_model, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(queries * 0.6), int(queries * 1.4) + 1, (batch,), generator=gen)
    n, S = int(lengths.sum()), int(lengths.max())
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    starts = torch.rand(n, generator=gen) < 0.3  # ~3.3 subwords per word
    starts[cu[:-1].long()] = True
    seq_first = torch.repeat_interleave(cu[:-1].long(), lengths)
    csum = starts.long().cumsum(0)
    word_ids = csum - csum[seq_first] + starts[seq_first].long() - 1
    tokens = torch.randint(0, 50000, (n,), generator=gen)
    mask = torch.arange(S) < lengths[:, None]
    tok_pad = torch.zeros(batch, S, dtype=torch.long)
    tok_pad[mask] = tokens
    wid_pad = torch.zeros(batch, S, dtype=torch.long)
    wid_pad[mask] = word_ids
    h_key = torch.randn(batch, frames, d_model, generator=gen).to(dtype)
    h_val = torch.randn(batch, frames, d_model, generator=gen).to(dtype)
    p = dict(
        tokens=tokens,
        cu=cu,
        tok_pad=tok_pad,
        wid_pad=wid_pad,
        lengths=lengths,
        word_ids=word_ids.int(),
        h_key=h_key,
        h_val=h_val,
    )
    p = {k: v.to(device) for k, v in p.items()}
    p.update(n=n, S=S, offsets=ops.word_offsets(p["word_ids"], p["cu"]))
    return p


def sdpa(q, k, v, causal=False):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def aggregator_providers(agg, p, train, flex, compiled=None):
    P = len(agg.config.prefix_ids)
    ids_official = official_prefixed_ids(p["tok_pad"], agg.config.prefix_ids)
    ids = ids_official[:, :-1]  # no EOS: it is causally inert (spec 1.4)
    causal_mask = torch.ones(ids_official.shape[1], ids_official.shape[1], dtype=torch.bool, device=ids.device).tril()

    def official():
        out = padded_aggregator(
            agg,
            ids_official,
            p["h_key"],
            p["h_val"],
            lambda q, k, v: eager_attention(q, k, v, causal_mask),
            eager_attention,
        )
        return official_word_average(out[:, P:-1], p["wid_pad"], p["lengths"])

    def pooled(out):  # (B, S, d) padded -> word means (W, d), vectorised
        return reference.segment_mean(reference.pack_offsets(out[:, P:], p["cu"], p["n"]), p["offsets"])

    def with_sdpa():
        return pooled(padded_aggregator(agg, ids, p["h_key"], p["h_val"], lambda q, k, v: sdpa(q, k, v, True), sdpa))

    def ours():
        out = agg(p["tokens"], p["cu"], p["S"], p["h_key"], p["h_val"])
        return ops.segment_mean(out, p["offsets"])

    providers = {"(1) official-style eager": official, "(2) pytorch sdpa padded": with_sdpa}
    if flex is not None:
        block = create_block_mask(
            lambda b, h, qi, ki: qi >= ki, None, None, ids.shape[1], ids.shape[1], device=ids.device
        )
        providers["(3) flex_attention padded"] = lambda: pooled(
            padded_aggregator(agg, ids, p["h_key"], p["h_val"], lambda q, k, v: flex(q, k, v, block_mask=block), flex)
        )
    providers["(4) ours packed"] = ours
    frames, chunk = p["h_key"].shape[1], agg.resolved_kv_chunk_frames(p["h_key"].device)
    chunks = not train and chunk and chunk // frames < p["lengths"].numel()
    cfg = agg.config
    # (training here leaves the encoder states frozen, as TASTE does: the aggregator then projects K/V)
    folds = not train and ops.cross_attention_folds(p["S"] + P, cfg.num_heads, cfg.d_model, frames, p["h_key"].device)
    if chunks or folds:

        def at_once():  # the same module with every utterance's K/V projected at once
            saved = agg.kv_chunk_frames, agg.fold_kv
            agg.kv_chunk_frames, agg.fold_kv = None, False
            try:
                return ours()
            finally:
                agg.kv_chunk_frames, agg.fold_kv = saved

        providers["(5) ours, K/V at once"] = at_once
    steps = {name: _step(fn, train) for name, fn in providers.items()}
    if compiled is not None:
        step = _step(
            lambda: ops.segment_mean(compiled(p["tokens"], p["cu"], p["S"], p["h_key"], p["h_val"]), p["offsets"]),
            train,
        )
        try:  # compiles here; a failure must not cost the run the other providers' numbers
            step()
            steps["(6) ours compiled"] = step
        except Exception as e:  # noqa: BLE001
            print(f"  (6) ours compiled: skipped, torch.compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return steps


def attention_providers(agg, p, train, flex):
    """One cross-attention over precomputed K/V, then word pooling."""
    layer = agg.layers[0].encoder_attn
    H, B, S, E = agg.config.num_heads, p["lengths"].numel(), p["S"], p["h_key"].shape[1]
    with torch.no_grad():
        q_packed = layer.q_proj(agg.embed_tokens(p["tokens"])).view(p["n"], H, -1)
        k_packed = layer.k_proj(p["h_key"]).view(B * E, H, -1)
        v_packed = layer.v_proj(p["h_val"]).view(B * E, H, -1)
    q_pad = reference.unpack(q_packed, p["cu"], S).transpose(1, 2).contiguous()  # (B, H, S, Dh)
    k_pad = k_packed.view(B, E, H, -1).transpose(1, 2).contiguous()
    v_pad = v_packed.view(B, E, H, -1).transpose(1, 2).contiguous()
    tensors = [q_pad, k_pad, v_pad, q_packed, k_packed, v_packed]
    if train:
        for t in tensors:
            t.requires_grad_()
    cu_k = torch.arange(B + 1, device=q_packed.device, dtype=torch.int32) * E

    def merged(o):  # (B, H, S, Dh) -> (B, S, H*Dh)
        return o.transpose(1, 2).reshape(B, S, -1)

    def pooled(o):
        return reference.segment_mean(reference.pack_offsets(merged(o), p["cu"], p["n"]), p["offsets"])

    providers = {
        "(1) official-style eager": lambda: official_word_average(
            merged(eager_attention(q_pad, k_pad, v_pad)), p["wid_pad"], p["lengths"]
        ),
        "(2) pytorch sdpa padded": lambda: pooled(sdpa(q_pad, k_pad, v_pad)),
    }
    if flex is not None:
        providers["(3) flex_attention padded"] = lambda: pooled(flex(q_pad, k_pad, v_pad))
    providers["(4) ours packed"] = lambda: ops.segment_mean(
        ops.text_query_attention(q_packed, k_packed, v_packed, p["cu"], cu_k, S, E).view(p["n"], -1), p["offsets"]
    )
    bytes_moved = (2 * q_packed.numel() + k_packed.numel() + v_packed.numel()) * q_packed.element_size()
    return {name: _step(fn, train) for name, fn in providers.items()}, bytes_moved


def _step(fn, train):
    if not train:
        return lambda: no_grad_call(fn)
    return lambda: fn().float().square().mean().backward()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--train", action="store_true", help="forward + backward instead of forward")
    p.add_argument("--batch", type=int, nargs="+", help="utterances per batch (default: 1 8 64 on GPU, 1 8 on CPU)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compilation takes ~30 s on CPU)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="add (6): ours under torch.compile (CUDA graphs on a GPU); one compilation per batch size",
    )
    p.add_argument("--kv-chunk-frames", type=int, default=None,
                   help="ours at inference: K/V made for at most this many frames at a time (default: the module's, "
                        "0: all at once); where it chunks, (5) measures all K/V at once beside it")  # fmt: skip
    p.add_argument("--full-size", action="store_true",
                   help="on the CPU too, the GPU default's model (d_model 1280, 20 heads: TASTE's)")  # fmt: skip
    p.add_argument("--queries", type=int, default=None,
                   help="mean text tokens per utterance (default: ~100 on GPU, ~50 on CPU), +-40%%")  # fmt: skip
    args = parse(p)
    dev = args.device
    prob = dict(GPU_PROBLEM if dev == "cuda" or args.full_size else CPU_PROBLEM)
    if args.queries is not None:
        if args.queries < 1:
            p.error(f"--queries must be >= 1, got {args.queries}")
        prob["queries"] = args.queries
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    mode = "forward+backward" if args.train else "forward"
    print(
        f"bench/aggregator.py: {mode} on {dev} ({dtype}); problem: d_model {prob['d_model']}, {prob['heads']} heads x "
        f"{prob['d_model'] // prob['heads']}, {prob['frames']} keys, ~{prob['queries']} queries per utterance"
        + (
            ""
            if prob["d_model"] == GPU_PROBLEM["d_model"]
            else " (a smaller model than TASTE's, the GPU default: d_model 1280)"
        ),
        flush=True,
    )
    torch.manual_seed(0)
    config = AggregatorConfig.distil_large_v3(
        d_model=prob["d_model"], num_heads=prob["heads"], ffn_dim=prob["ffn"], identity_v_proj=False
    )
    agg = TextQueryAggregator(config=config).to(dev, dtype)
    if args.kv_chunk_frames is not None:
        agg.kv_chunk_frames = args.kv_chunk_frames or None
    if not args.train:
        agg.requires_grad_(False)
    flex = None
    if flex_attention is not None and not args.no_flex:
        flex = torch.compile(flex_attention, dynamic=True)  # one compilation for every batch size
    compiled = None
    if args.compile:
        compiled = torch.compile(agg, fullgraph=True, dynamic=False,
                                 mode="reduce-overhead" if dev == "cuda" else None)  # fmt: skip
    rows = []
    for batch in args.batch or (prob["batches"] if dev == "cuda" else CPU_PROBLEM["batches"]):
        problem = make_problem(batch, prob["queries"], prob["frames"], prob["d_model"], dev, dtype)
        label = f"B={batch} N={problem['n']}"
        cases = aggregator_providers(agg, problem, args.train, flex, compiled)
        case_rows = measure(f"aggregator+pooling {label}", cases, dev, args.reps)
        for r in case_rows:  # CUDA graphs replay in a private pool allocated while recording: no peak to read per call
            if r.provider == "(6) ours compiled" and dev == "cuda":
                r.peak_mb = float("nan")
        rows += case_rows
        providers, nbytes = attention_providers(agg, problem, args.train, flex)
        rows += measure(f"attention+pooling {label}", providers, dev, args.reps, bytes_moved=nbytes)
    ceiling = copy_ceiling_gbps(dev) if dev == "cuda" else None
    extra = {}
    if dev == "cuda":  # large 16-bit problems pick their forward tiles by measurement
        from taste.kernels.attention import tuned_tiles, tuned_timings

        extra["autotune"] = tuning_summary("attention forward", tuned_tiles(), tuned_timings())
    report(f"bench/aggregator.py {mode} on {dev}, {dtype}", rows, dev, args.json, ceiling, extra)
    print_tuning(extra.get("autotune", {}))


if __name__ == "__main__":
    main()
