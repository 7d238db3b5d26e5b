"""Host work of the aggregator's CUDA code path, measured on any machine (a proxy for GPU runs that are host-bound).

    python bench/host_overhead.py [--batch 64] [--reps 15] [--sms 132] [--instructions N] [--json out.json]

On the H200 our aggregator at B=64 kept the GPU busy less than half of its wall time: the host issuing operators
was the bottleneck (bench/RESULTS.md). This script measures that host work without a GPU. It runs this process's
taste ops through their CUDA Python code (the K/V chunk loop, the launchers' tile and autotune bookkeeping) on CPU
tensors, with every Triton launch replaced by a counter, on a problem so small (d_model 32, 2 queries and 2 frames
per utterance) that the time left is the host's: Python, argument checks, operator dispatch. PyTorch SDPA on the
padded batch, as in bench/aggregator.py (2), runs its own CPU operators on the same problem. Whether a launch
splits its keys over the GPU (a small batch: float32 partials and a merge launch more) and whether it autotunes its
tiles (a large one) are decided as for the GPU problem of bench/aggregator.py on an H200 (``--sms``).

Per provider it prints the host time of one forward (median), the operators it issues (the profiler's top-level
events, and those our custom ops' Python issues inside them) and its Triton launches, which are not in the time
(each costs a few us more on a GPU host). A proxy: CPU operators cost the host less than their CUDA counterparts
(cuBLAS heuristics, kernel launches), so compare providers with each other, and GPU runs with GPU runs.

Host time on a shared 2-core machine drifts by several percent between runs. ``--instructions N`` counts instead:
each provider runs N forwards under valgrind's callgrind (and once without them, subtracted), which gives the same
count for the same code on any run (within about 1%; minutes per provider). Instructions are not time (a cache miss
costs more than an add), but a change that removes work shows up in them without noise.

This process is changed for good (our ops' CPU kernels are replaced): run it as a script, not from other code.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aggregator import make_problem, sdpa  # noqa: E402
from baselines import official_prefixed_ids, padded_aggregator  # noqa: E402
from common import _quiet_stderr  # noqa: E402

from taste import AggregatorConfig, TextQueryAggregator, ops, reference  # noqa: E402

FRAMES = 2  # per utterance; the CUDA default chunk (24576 frames, 16 utterances of 1500) is kept in utterances
CUDA_CHUNK_UTTERANCES = 16
H200_SMS = 132
# The GPU problem's shape (bench/aggregator.py: 20 heads, up to 140 text tokens + the 4-token prefix, 1500 frames):
# whether a launch splits its keys (and adds a merge launch) is decided as for it.
GPU_HEADS, GPU_QUERIES, GPU_FRAMES = 20, 144, 1500
PYTHON_OPS = ("taste::text_query_attention", "taste::text_query_cross_attention")  # their CUDA code is Python


def emulate_cuda_code_path(sms: int = H200_SMS) -> dict:
    """Routes taste's attention ops through their CUDA implementations on CPU tensors, whether called directly or
    through the op (taste._dispatch), Triton launches counted and skipped, value checks skipped as on CUDA tensors
    (they would sync), on a GPU of ``sms`` multiprocessors (which decides the key splits of small batches and their
    merge launches). Returns the launch counter."""
    import taste.kernels as kernels_package
    import taste.kernels.attention as kernels
    import triton

    import taste._dispatch as dispatch
    import taste.ops_attention as attention

    launches = {"n": 0}

    def count(*args, **kwargs):
        launches["n"] += 1

    class Stub:  # kernel[grid](...) counts
        def __getitem__(self, grid):
            return count

    class Settled(dict):  # every autotuned problem class has settled on a tile, as after the first call on a GPU
        def get(self, key, default=None):
            return {**triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3).all_kwargs(),
                    **kernels_package.COMPILE_OPTIONS}  # fmt: skip

    # The launchers' own host work (tile choice, launch_tuned, launch_fitting) runs; the kernels' launches count.
    tuner = kernels.tuned_fwd_kernel()
    tuner.fn = Stub()
    kernels.tuned_fwd_kernel = lambda tiles=None: tuner  # (built for the real kernel, before it is replaced below)
    kernels_package._SETTLED = Settled()
    kernels._text_query_attention_fwd_kernel = Stub()
    kernels._text_query_attention_merge_kernel = Stub()
    kernels.sm_count = lambda device: sms
    splits = kernels.auto_num_splits

    def gpu_keys(max_seqlen_k):  # the GPU problem's keys: the cross-attention's frames or the self-attention's tokens
        return GPU_FRAMES if max_seqlen_k == FRAMES else GPU_QUERIES

    def gpu_problem_splits(batch, heads, max_seqlen_q, max_seqlen_k, block_m, block_n, device):
        return splits(batch, GPU_HEADS, GPU_QUERIES, gpu_keys(max_seqlen_k), 128, block_n, device)

    def gpu_problem_autotunes(q, batch, max_seqlen_q, max_seqlen_k):  # bf16 on a GPU, TASTE_AUTOTUNE unset
        return batch * GPU_HEADS * GPU_QUERIES * gpu_keys(max_seqlen_k) >= kernels.AUTOTUNE_MIN_WORK

    kernels.auto_num_splits = gpu_problem_splits
    kernels.use_autotune = gpu_problem_autotunes
    attention._uses_triton = lambda q: True
    dispatch.on_cuda = lambda t: True  # direct calls (taste._dispatch) take the CUDA kernel too
    attention._check_offsets = lambda cu, name, total, max_len, batch: None
    TextQueryAggregator._check_values = lambda self, tokens, cu_seqlens, max_seqlen: None  # CPU tensors only
    torch.cuda.device = lambda device: contextlib.nullcontext()
    attention._attention.register_kernel("cpu")(attention._attention_cuda)
    attention._cross_attention.register_kernel("cpu")(attention._cross_attention_cuda)
    return launches


def providers(batch: int) -> dict:
    torch.manual_seed(0)
    config = AggregatorConfig.distil_large_v3(d_model=32, num_heads=1, ffn_dim=32, identity_v_proj=False)
    agg = TextQueryAggregator(config=config).eval().requires_grad_(False)
    agg.fold_kv = False  # CUDA never folds the K/V projections (ops.cross_attention_folds); these CPU tensors would
    p = make_problem(batch, 2, FRAMES, config.d_model, "cpu", torch.float32)
    ids = official_prefixed_ids(p["tok_pad"], config.prefix_ids)[:, :-1]
    prefix = len(config.prefix_ids)

    def with_sdpa():
        out = padded_aggregator(agg, ids, p["h_key"], p["h_val"], lambda q, k, v: sdpa(q, k, v, True), sdpa)
        return reference.segment_mean(reference.pack_offsets(out[:, prefix:], p["cu"], p["n"]), p["offsets"])

    def ours(chunk_frames):
        def run():
            agg.kv_chunk_frames = chunk_frames
            return ops.segment_mean(agg(p["tokens"], p["cu"], p["S"], p["h_key"], p["h_val"]), p["offsets"])

        return run

    return {
        "(2) pytorch sdpa padded": with_sdpa,
        f"(4) ours, K/V {CUDA_CHUNK_UTTERANCES} utterances at a time": ours(CUDA_CHUNK_UTTERANCES * FRAMES),
        "(5) ours, K/V at once": ours(None),
    }


def top_level_ops(fn) -> int:
    """Operators issued by one call of fn, counted under the profiler. Our ops take the direct calls that the timing
    sees (taste._dispatch dispatches through the op while a profiler runs, unless told otherwise as here)."""
    import taste._dispatch as dispatch

    profiling, dispatch.profiling = dispatch.profiling, lambda: False
    try:
        with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        dispatch.profiling = profiling

    def issued(e):  # called from Python: at the top, or inside one of our custom ops written in Python
        return e.cpu_parent is None or e.cpu_parent.name in PYTHON_OPS

    return sum(1 for e in prof.events() if issued(e))


def callgrind_instructions(args, provider: int, calls: int) -> int:
    """Instructions that this script executes under valgrind's callgrind with ``calls`` forwards of one provider
    (after 5 untimed ones): counted, not timed, so the same for the same code whatever else the machine runs."""
    child = ["--batch", str(args.batch), "--sms", str(args.sms), "--provider", str(provider), "--calls", str(calls)]
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, os.path.abspath(__file__)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # (string hashes decide dict and set layouts: the same every run)
    done = subprocess.run(cmd + child, capture_output=True, text=True, env=env)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"callgrind run failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def instructions_per_forward(args, count: int) -> list[float]:
    """Per provider: (instructions with ``args.instructions`` forwards - with none) / forwards. Runs 2 x ``count``
    callgrind processes, as many at a time as the machine has cores (each takes minutes: Python under valgrind)."""
    jobs = [(i, n) for i in range(count) for n in (0, args.instructions)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        totals = dict(zip(jobs, pool.map(lambda job: callgrind_instructions(args, *job), jobs)))
    return [(totals[(i, args.instructions)] - totals[(i, 0)]) / args.instructions for i in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="utterances (default 64, the GPU target's batch)")
    ap.add_argument("--reps", type=int, default=15, help="timed rounds of 20 forwards of each provider (median)")
    sms_help = "multiprocessors of the emulated GPU (default 132, an H200's; a small batch splits its keys over them)"
    ap.add_argument("--sms", type=int, default=H200_SMS, help=sms_help)
    ap.add_argument("--instructions", type=int, metavar="N", default=0,
                    help="count instructions instead of timing: N forwards of each provider under valgrind's callgrind "
                    "(minus a run without them; exact for the same code, unlike time on a shared machine)")  # fmt: skip
    ap.add_argument("--provider", type=int, default=None, help=argparse.SUPPRESS)  # (a callgrind child)
    ap.add_argument("--calls", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = ap.parse_args()
    if args.batch < 1 or args.reps < 1 or args.sms < 1 or args.instructions < 0:
        ap.error("--batch, --reps and --sms must be >= 1, --instructions >= 0")
    if args.instructions and not shutil.which("valgrind"):
        ap.error("--instructions needs valgrind (Debian: apt-get install valgrind)")
    torch.set_num_threads(1)
    launches = emulate_cuda_code_path(args.sms)
    if args.provider is not None:  # a callgrind child: warm up, then the counted forwards, nothing printed
        fn = list(providers(args.batch).values())[args.provider]
        with torch.no_grad():
            for _ in range(5 + args.calls):
                fn()
        return
    unit = "instructions" if args.instructions else "host time"
    print(f"bench/host_overhead.py: {unit} of one aggregator forward + word pooling, B={args.batch}, our ops on "
          f"their CUDA code path with CPU tensors (Triton launches counted, not run; {args.sms} SMs); "
          f"torch {torch.__version__}",
          flush=True)  # fmt: skip
    fns = providers(args.batch)
    rounds = {name: [] for name in fns}
    results = []
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(20):
                fn()
        for _ in range(0 if args.instructions else args.reps):  # round-robin: a drift of the machine shifts all alike
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                rounds[name].append((time.perf_counter() - t0) / 20 * 1e6)
        counted = instructions_per_forward(args, len(fns)) if args.instructions else None
        for i, (name, fn) in enumerate(fns.items()):
            launches["n"] = 0
            fn()
            count = launches["n"]
            cost = dict(instructions=counted[i]) if counted else dict(host_us=statistics.median(rounds[name]))
            results.append(dict(provider=name, **cost, operators=top_level_ops(fn), triton_launches=count))
    key = "instructions" if args.instructions else "host_us"
    base = results[0][key]
    print(f"| provider | {unit} per forward | vs (2) | operators | Triton launches |\n|---|---|---|---|---|")
    for r in results:
        cost = f"{r[key] / 1e6:.3f} M" if args.instructions else f"{r[key]:.0f} us"
        print(f"| {r['provider']} | {cost} | {r[key] / base:.3f}x | {r['operators']} | {r['triton_launches']} |")
    if args.json:
        with open(args.json, "w") as f:
            record = dict(batch=args.batch, sms=args.sms, torch=torch.__version__, python=sys.version.split()[0],
                          instructions_forwards=args.instructions, results=results)  # fmt: skip
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
