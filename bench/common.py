"""Shared benchmark plumbing: timing (median of many after warm-up), peak memory, the device copy ceiling, and
the printed table / JSON that every `python bench/<op>.py` writes."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Row:
    case: str  # the problem, e.g. "word pooling B=64"
    provider: str
    median_ms: float
    peak_mb: float
    bytes_moved: int = 0  # minimum bytes read + written, for GB/s
    ratio: float | None = None  # time of the case's first (official-style) provider / this time
    gbps: float | None = None
    extra: dict = field(default_factory=dict)


_STEADY_ALLOCATOR = False
PROFILE = False  # --profile (set by parse): measure() also reports where ours' time goes


def steady_cpu_allocator() -> bool:
    """Makes glibc malloc serve every size from its heap and keep freed memory (mallopt M_MMAP_MAX=0 and a
    large M_TRIM_THRESHOLD), so that repeated calls reuse pages, as in a running training loop.

    Otherwise every fresh CPU tensor above 32 MB is mmap'd and faults in 4 KiB pages (about 0.4 ms per MB here),
    a cost of the OS that is the same for every provider and drowns the kernels. Returns whether it applied.
    """
    global _STEADY_ALLOCATOR
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        _STEADY_ALLOCATOR = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        _STEADY_ALLOCATOR = False
    return _STEADY_ALLOCATOR


def parser(doc: str) -> argparse.ArgumentParser:
    """The benchmarks' shared options; ``--help`` describes the script by the first paragraph of ``doc``."""
    p = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions (default: by time budget)")
    p.add_argument("--fresh-pages", action="store_true", help="CPU: leave malloc as it is (see steady_cpu_allocator)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile our providers: the kernels or operators that take the time",
    )
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    global PROFILE
    args = p.parse_args()
    PROFILE = args.profile
    if args.device == "cpu" and not args.fresh_pages:
        steady_cpu_allocator()
    return args


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_providers(fns: list, device: str, reps: int = 0, budget_s: float = 1.0) -> list[float]:
    """Median wall time in ms of each fn, after warm-up; CUDA events on a GPU.

    The providers are timed round-robin (one call of each per round), so that a slow drift of the machine
    (other load, clocks) shifts them all alike instead of favouring whichever ran in a quiet moment.
    """
    for fn in fns:
        for _ in range(2):
            fn()
    sync(device)
    if reps <= 0:  # enough rounds to fill the budget, between 5 and 200
        round_ms = sum(_time_once(fn, device) for fn in fns)
        reps = int(min(200, max(5, budget_s * 1e3 / max(round_ms, 1e-3))))
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            times[i].append(_time_once(fn, device))
    return [statistics.median(t) for t in times]


def no_grad_call(fn, *args):
    """fn(*args) without autograd: the forward-only providers."""
    with torch.no_grad():
        return fn(*args)


def time_ms(fn, device: str, reps: int = 0) -> float:
    return time_providers([fn], device, reps)[0]


def peak_mb(fn, device: str) -> float:
    """Peak memory allocated by one call of fn() above what was allocated before it, in MB."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    # CPU: replay the allocator's alloc (+bytes) / free (-bytes) events that the profiler recorded, in time order.
    with (
        _quiet_stderr(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # the profiler's internals moved: report no number rather than a wrong one
        return float("nan")
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the profiler's start/stop lines, which its C++ side prints straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def copy_ceiling_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth (bytes read + written per second), the ceiling for memory-bound ops."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def kernel_profile(fn, device: str, calls: int = 5, top: int = 8, warmup: bool = True) -> dict:
    """Where the time of one call of fn goes, from torch.profiler over `calls` calls (after one more to warm up).

    On a GPU: the device time of every kernel, copy and fill it runs (Triton kernels under their own names). On the
    CPU: the self time of every operator. Returns {"unit": "device"|"cpu", "us_per_call": total, "entries": the `top`
    largest as {"name", "us_per_call", "count_per_call", "share"}}, largest first."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    if warmup:
        fn()
    sync(device)
    with _quiet_stderr(), torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    timed = []
    for e in prof.key_averages():
        if device == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:  # CPU-side ops: their kernels are listed themselves
                continue
            us = e.self_device_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            timed.append((us / calls, e.count / calls, e.key))
    timed.sort(reverse=True)
    total = sum(t[0] for t in timed)
    entries = [dict(name=k, us_per_call=us, count_per_call=n, share=us / total) for us, n, k in timed[:top]]
    return {"unit": "device" if device == "cuda" else "cpu", "us_per_call": total, "entries": entries}


def host_timing(fn, calls: int = 20) -> dict:
    """On a GPU, how much of a call is the host's: ``host_us``, the median time for ``fn()`` to return when the GPU
    is idle at its start (the host's work of issuing it: Python, argument checks, launches, and any sync inside),
    and ``back_to_back_ms``, the time per call of ``calls`` calls issued without a sync between them (the host runs
    ahead while the GPU works, as in a model; the median timing of :func:`time_providers` syncs after every call).
    A median wall time close to ``host_us`` says the call is bound by the host, not by its kernels."""
    host = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return {"host_us": statistics.median(host), "back_to_back_ms": start.elapsed_time(end) / calls}


def profile_row(row: Row, fn, device: str) -> None:
    """--profile for one timed provider (already warm): :func:`kernel_profile` into row.extra["profile"], printed with
    the share of the row's median wall time that it accounts for (on a GPU, how busy the device was: well below 100%
    means the call waits on the host, launches or syncs)."""
    try:  # a profiler problem must not cost the run its timings
        prof = kernel_profile(fn, device, calls=5 if row.median_ms < 200 else 1, warmup=False)  # generations once
    except Exception as e:  # noqa: BLE001
        print(f"  profile of {row.case} | {row.provider} failed: {type(e).__name__}: {e}")
        return
    prof["share_of_wall"] = prof["us_per_call"] * 1e-3 / row.median_ms
    row.extra["profile"] = prof
    kind = "device time in kernels" if prof["unit"] == "device" else "CPU self time in operators"
    print(f"  profile of {row.case} | {row.provider}: {prof['us_per_call']:.1f} us of {kind} per call "
          f"({100 * prof['share_of_wall']:.0f}% of its {row.median_ms:.3f} ms); the largest:")  # fmt: skip
    for e in prof["entries"]:
        print(f"    {100 * e['share']:5.1f}% {e['us_per_call']:10.1f} us  x{e['count_per_call']:<5g} {e['name'][:90]}")
    if device == "cuda" and row.bytes_moved and prof["us_per_call"] > 0:
        prof["kernel_gbps"] = row.bytes_moved / (prof["us_per_call"] * 1e-6) / 1e9
        print(f"    kernels alone: {prof['kernel_gbps']:.0f} GB/s (the case's bytes over the device time in kernels)")
    if device == "cuda":
        try:
            host = host_timing(fn, calls=20 if row.median_ms < 50 else 3)
        except Exception as e:  # noqa: BLE001 - as above
            print(f"    host timing failed: {type(e).__name__}: {e}")
            return
        prof.update(host)
        print(f"    host: {host['host_us']:.1f} us to issue one call from an idle GPU; "
              f"{host['back_to_back_ms']:.3f} ms per call back to back")  # fmt: skip


def measure(case: str, providers: dict, device: str, reps: int = 0, bytes_moved: int = 0) -> list[Row]:
    """Times every provider of one case; the first provider is the baseline of the ratio column. With --profile,
    our providers (names containing "ours") are also profiled (:func:`kernel_profile`, kept in the row's extra)."""
    times = time_providers(list(providers.values()), device, reps)
    rows = [Row(case, name, ms, peak_mb(fn, device), bytes_moved) for (name, fn), ms in zip(providers.items(), times)]
    for r in rows:  # progress, in case a time limit stops the run before the table
        print(f"  {case} | {r.provider}: {r.median_ms:.3f} ms, {r.peak_mb:.1f} MB", flush=True)
    if PROFILE:
        for r, fn in zip(rows, providers.values()):
            if "ours" in r.provider:
                profile_row(r, fn, device)
    base = rows[0].median_ms
    for r in rows:
        r.ratio = base / r.median_ms
        if device == "cuda" and bytes_moved:
            r.gbps = bytes_moved / (r.median_ms * 1e-3) / 1e9
    return rows


def environment(device: str) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "steady_cpu_allocator": _STEADY_ALLOCATOR,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def tuning_summary(what: str, choices: dict[str, str], timings: dict[str, dict[str, float]]) -> dict:
    """What an autotuner picked for each key and, where the tuning ran in this process (or read Triton's on-disk
    cache), every candidate's median time: the landscape that says which tile features pay on this GPU. For the
    JSON (report's ``extra``) and :func:`print_tuning`."""
    return {key: {"kernel": what, "chosen": chosen, "candidates_ms": timings.get(key, {})} for key, chosen in
            choices.items()}  # fmt: skip


def print_tuning(summary: dict) -> None:
    """Prints a :func:`tuning_summary`: the pick per key, then the candidates, fastest first, with their time
    relative to the fastest."""
    for key, entry in summary.items():
        print(f"{entry['kernel']} tiles chosen by the autotuner for {key}: {entry['chosen']}")
        times = entry["candidates_ms"]
        best = min(times.values(), default=0.0)
        for config, ms in sorted(times.items(), key=lambda kv: kv[1]):
            rel = f"{ms / best:5.2f}x" if 0 < best and ms != float("inf") else "  -  "
            print(f"    {ms:9.4f} ms {rel}  {config}")


def report(title: str, rows: list[Row], device: str, json_path: str | None, ceiling: float | None = None,
           extra: dict | None = None) -> None:  # fmt: skip
    """Prints the table (with GB/s and % of ``ceiling``, the measured copy, where given) and writes the JSON, with
    ``extra`` (e.g. autotuner summaries) as more top-level entries."""
    env = environment(device)
    print(f"\n{title}\n{' '.join(f'{k}={v}' for k, v in env.items())}")
    if ceiling:
        print(f"measured device copy: {ceiling:.0f} GB/s")
    header = f"{'case':<34} {'provider':<30} {'median ms':>10} {'peak MB':>9} {'speed-up':>9}"
    if ceiling:
        header += f" {'GB/s':>8} {'% copy':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        line = f"{r.case:<34} {r.provider:<30} {r.median_ms:>10.3f} {r.peak_mb:>9.1f} {r.ratio:>8.1f}x"
        if ceiling and r.gbps:
            line += f" {r.gbps:>8.0f} {100 * r.gbps / ceiling:>6.0f}%"
        print(line)
    by_kernels = [r for r in rows if r.extra.get("profile", {}).get("kernel_gbps")]
    if ceiling and by_kernels:
        print("device time in kernels alone (--profile; the table's times include each call's host work):")
        for r in by_kernels:
            gbps = r.extra["profile"]["kernel_gbps"]
            print(f"  {r.case:<34} {r.provider:<30} {gbps:>8.0f} GB/s {100 * gbps / ceiling:>6.0f}% copy")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(
                {"title": title, "env": env, "copy_gbps": ceiling, "rows": [asdict(r) for r in rows], **(extra or {})},
                f,
                indent=1,
            )
        print(f"wrote {json_path}", file=sys.stderr)
