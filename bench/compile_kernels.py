"""Compile every Triton kernel configuration the package launches, for a GPU architecture, on any machine.

Triton's interpreter (how the tests run the kernels without a GPU) checks what a kernel computes, not whether it
compiles: a GPU build can still fail (an op the GPU backend rejects, a tile whose shared memory exceeds the
card's), and register spills only show there. This script drives the real launchers in ``taste.kernels`` with
small CPU tensors shaped like each case, but instead of launching, compiles the kernel for the target
(``--arch``, default 90: H100/H200) through Triton's own compiler and ptxas, no GPU or driver needed. Autotuned
launches compile every candidate tile. It prints one row per configuration (registers, spilled bytes, shared
memory) and exits 1 if any configuration fails to compile or needs more shared memory than the architecture
gives one block.

    python bench/compile_kernels.py                 # everything (about half an hour on 2 cores, less when cached)
    python bench/compile_kernels.py --level quick   # the TASTE shapes and every autotune candidate (5 min)
    python bench/compile_kernels.py --level smoke   # the TASTE shapes' fixed tiles (what the tests run, 1 min)
    python bench/compile_kernels.py --json out.json

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the kernels the compiler needs).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial

import torch

# Shared memory one block may use (opt-in maximum), by compute capability: CUDA programming guide, table
# "Technical Specifications per Compute Capability".
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
                120: 99 * 1024}  # fmt: skip
# Per SM, same table: (32-bit registers, shared memory in bytes, resident threads, resident blocks).
SM_LIMITS = {75: (65536, 64 * 1024, 1024, 16), 80: (65536, 164 * 1024, 2048, 32), 86: (65536, 100 * 1024, 1536, 16),
             89: (65536, 100 * 1024, 1536, 24), 90: (65536, 228 * 1024, 2048, 32),
             100: (65536, 228 * 1024, 2048, 32)}  # fmt: skip


def blocks_per_sm(arch: int, registers: int, shared: int, num_warps: int) -> int | None:
    """How many blocks of a kernel fit on one SM at once (the occupancy limit set by registers, shared memory and
    threads): registers are allocated per warp in units of 256 (8 per thread), and each block reserves 1 KB of
    shared memory. None for an architecture not in SM_LIMITS."""
    if arch not in SM_LIMITS:
        return None
    regs_sm, shared_sm, threads_sm, blocks_sm = SM_LIMITS[arch]
    threads = 32 * num_warps
    by_regs = regs_sm // (-(-registers // 8) * 8 * threads)
    by_shared = shared_sm // (shared + 1024)
    return min(by_regs, by_shared, threads_sm // threads, blocks_sm)


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: says which GPU to compile for; nothing is ever launched."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def _cuobjdump(path: str, flag: str = "-res-usage") -> str:
    from triton import knobs

    return subprocess.run([knobs.nvidia.cuobjdump.path, flag, path], capture_output=True, text=True, check=True).stdout


def _cuobjdump_cubin(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return _cuobjdump(path, flag)


# Floats that one shared-memory load instruction of each width brings to a thread.
_LDS_FLOATS = {"LDS": 1, "LDS.U8": 1, "LDS.S8": 1, "LDS.U16": 1, "LDS.S16": 1, "LDS.64": 2, "LDS.128": 4}


def sass_counts(sass: str) -> dict:
    """Static counts from a kernel's SASS (``cuobjdump -sass``): FFMA instructions, the floats its shared-memory
    loads (LDS) bring per thread, and their ratio. For products on the CUDA cores the ratio bounds the FMA units:
    an SM's shared memory delivers 32 four-byte words per clock against 128 FMA lanes, so at r floats per FFMA
    they can be at most 1 / (4 r) busy (more where a load is broadcast to several threads)."""
    ffma = lds = 0
    for op in re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass):
        if op.startswith("FFMA"):
            ffma += 1
        elif op.split(".")[0] == "LDS":
            lds += _LDS_FLOATS.get(op, 1)
    return {"ffma": ffma, "lds_floats": lds, "lds_floats_per_ffma": round(lds / ffma, 2) if ffma else None}


def _tensor_cores(ptx: str) -> str:
    """Which tensor-core instructions the kernel's dots compiled to: Blackwell's tcgen05 MMA, Hopper's warpgroup
    MMA, the older per-warp MMA, or none (products on the CUDA cores, or no dot at all)."""
    return next((kind for kind in ("tcgen05.mma", "wgmma", "mma.sync") if kind in ptx), "none")


def _kernel_name(symbol: str) -> str:
    """The ``..._kernel`` component of an Itanium-mangled nested name (``_ZN5taste17_copy_rows_kernelI...``)."""
    pos = 3 if symbol.startswith("_ZN") else 2
    while (digits := re.match(r"\d+", symbol[pos:])) is not None:
        start = pos + len(digits.group())
        pos = start + int(digits.group())
        if symbol[start:pos].endswith("_kernel"):
            return symbol[start:pos]
    return symbol


def extension_rows(arch: int) -> list[dict]:
    """Registers, stack and static shared memory of every CUDA C++ kernel in the built ``taste._C`` (nvcc compiled
    them with the package; cuobjdump reads the library). Empty when it has no code for ``arch``, or no CUDA kernels at
    all (a CPU-only torch or ``TASTE_SKIP_CUDA_BUILD=1``)."""
    import importlib.util

    from taste import ops

    spec = importlib.util.find_spec("taste._C")
    if spec is None or spec.origin is None or ops.CUDA_ARCH_LIST is None:  # no CUDA kernels (cuobjdump would fail)
        return []
    rows = []
    # cuobjdump lists each embedded cubin ("Fatbin elf code: ... arch = sm_90") with its functions' usage.
    for cubin in _cuobjdump(spec.origin).split("Fatbin elf code:")[1:]:
        if not re.search(rf"arch = sm_{arch}a?\n", cubin):
            continue
        for name, reg, stack, shared in re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+)", cubin):
            rows.append({
                "case": "taste._C (CUDA C++)", "kernel": _kernel_name(name), "symbol": name,
                "registers": int(reg), "stack_bytes": int(stack), "shared_bytes": int(shared), "ok": True,
            })  # fmt: skip
    return rows


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack bytes per thread (register spills and local arrays) of a compiled kernel,
    read from its cubin by cuobjdump (Triton ships one): what the driver would report, without a driver."""
    usage = re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump_cubin(cubin, "-res-usage"))
    return {"registers": int(usage.group(1)), "stack_bytes": int(usage.group(2))}


@contextlib.contextmanager
def compile_only(arch: int, record: list, label: list, verbose: bool = False, shared_limit: int | None = None,
                 sass: bool = False):  # fmt: skip
    """Inside: every Triton launch compiles for ``arch`` instead of running, and appends a row to ``record``;
    an autotuned launch compiles each of its candidate configurations. ``label[0]`` names the current case.
    ``sass``: also the static counts of :func:`sass_counts`."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction

    jit_run, tuner_run = JITFunction.run, Autotuner.run
    limit = shared_limit or SHARED_LIMIT.get(arch)

    def run(self, *args, grid, warmup, **kwargs):
        row = {"case": label[0], "kernel": self.fn.__name__}
        row.update({k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages", "maxnreg")})
        started = time.perf_counter()
        try:
            compiled = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - the report names every failure, then the script exits 1
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
            record.append(row)
            return None
        row["compile_s"] = round(time.perf_counter() - started, 2)
        row["hash"] = compiled.hash
        row["shared_bytes"] = compiled.metadata.shared
        row.update(_resource_usage(compiled.asm["cubin"]), tensor_cores=_tensor_cores(compiled.asm["ptx"]))
        if sass:
            row.update(sass_counts(_cuobjdump_cubin(compiled.asm["cubin"], "-sass")))
        row["blocks_per_sm"] = blocks_per_sm(arch, row["registers"], row["shared_bytes"], compiled.metadata.num_warps)
        row["ok"] = limit is None or row["shared_bytes"] <= limit
        if verbose:
            print(f"  {row['case']}: {row['kernel']} {row['compile_s']} s", file=sys.stderr, flush=True)
        record.append(row)
        if not row["ok"]:
            # What the GPU's driver would do: refuse it before launching (the launcher may then take smaller tiles).
            row["error"] = f"shared memory {row['shared_bytes']} B > {limit} B per block on sm_{arch}"
            row["refused"] = True
            raise OutOfResources(row["shared_bytes"], limit, "shared memory")
        return compiled

    def tuner(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        for config in self.configs:
            try:
                self.fn.run(*args, **kwargs, **config.all_kwargs(), warmup=True)
            except OutOfResources:
                pass  # Triton's tuner skips a candidate that does not fit

    active = driver._active  # None until something asked for the real driver (there may be none)
    driver.set_active(CompileOnlyDriver(arch))
    JITFunction.run, Autotuner.run = run, tuner
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        driver._active = active


def _ragged(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu


# What each --level compiles: the launchers' choices along each axis. "smoke" (what the tests run) is the TASTE
# shapes with their fixed tiles; "quick" adds causal attention and every autotune candidate; "full" every dtype,
# head dim, query tile size and RVQ width class.
LEVELS = {
    "smoke": dict(dtypes=(torch.bfloat16, torch.float32), head_dims=(64,), q_lens=(100,), causal=(False,),
                  dims=(256,), autotune=False),
    "quick": dict(dtypes=(torch.bfloat16, torch.float32), head_dims=(64,), q_lens=(100,), causal=(False, True),
                  dims=(256,), autotune=True),
    "full": dict(dtypes=(torch.bfloat16, torch.float16, torch.float32), head_dims=(32, 64, 128),
                 q_lens=(9, 40, 100), causal=(False, True), dims=(8, 64, 256, 512), autotune=True),
}  # fmt: skip


def attention_cases(level: dict):
    """(label, thunk) for the forward (fixed tiles, key splits with their merge, autotune candidates) and the
    backward. Query lengths 9, 40 and 100 give query tiles of 16, 64 and 128 rows (before the caps)."""
    from taste.kernels.attention import text_query_attention_fwd
    from taste.kernels.attention_bwd import text_query_attention_bwd

    axes = (level["dtypes"], level["head_dims"], level["q_lens"], level["causal"])
    for dtype, d, lq, causal in itertools.product(*axes):
        heads, lk = 2, 150
        cu_q, cu_k = _ragged([lq, lq // 2]), _ragged([lk, lk])
        q = torch.randn(int(cu_q[-1]), heads, d, dtype=dtype)
        k = torch.randn(int(cu_k[-1]), heads, d, dtype=dtype)
        v = torch.randn_like(k)
        name = f"attention {str(dtype)[6:]} D{d} Lq{lq}{' causal' if causal else ''}"
        common = (q, k, v, cu_q, cu_k, lq, lk, causal, d**-0.5)
        yield name + " fwd", partial(text_query_attention_fwd, *common, autotune=False)
        yield name + " fwd split", partial(text_query_attention_fwd, *common, num_splits=2, autotune=False)
        # the chunked cross-attention's launch: sequence 1 alone into a given output, no log-sum-exp stored
        yield name + " fwd chunk", partial(text_query_attention_fwd, *common, out=torch.empty_like(q), seqs=(1, 2),
                                           autotune=False)  # fmt: skip
        if level["autotune"] and dtype != torch.float32 and lq == 100:
            yield name + " fwd autotune", partial(text_query_attention_fwd, *common, autotune=True)
        out, lse = torch.zeros_like(q), torch.zeros(heads, q.shape[0])
        yield name + " bwd", partial(text_query_attention_bwd, torch.randn_like(q), q, k, v, out, lse, *common[3:])


def rvq_cases(level: dict):
    """(label, thunk) for the encoder (fixed tiles for every BLOCK_D class, autotune candidates at the TASTE
    size, exact and fast) and the decoder."""
    from taste.kernels.rvq import rvq_decode_fwd, rvq_encode_fwd

    for dtype, dim, fast in itertools.product(level["dtypes"], level["dims"], (False, True)):
        n, nq, k = 37, 4, 512
        x = torch.randn(n, dim, dtype=dtype)
        books = torch.randn(nq, k, dim, dtype=dtype)
        norms = books.float().pow(2).sum(-1)
        stages = torch.tensor(nq, dtype=torch.int32)
        name = f"rvq {str(dtype)[6:]} d{dim}{' fast' if fast else ''}"
        args = (x, books, norms, stages, fast)
        yield name + " encode", partial(rvq_encode_fwd, *args, autotune=False)
        if level["autotune"] and dim == 256:
            yield name + " encode autotune", partial(rvq_encode_fwd, *args, autotune=True)
        if not fast:
            idx = torch.randint(-1, k, (n, nq))
            yield name + " decode", partial(rvq_decode_fwd, idx, books)
            yield name + " decode weighted", partial(rvq_decode_fwd, idx, books, torch.rand(n, nq))


def accept_refused(record: list) -> None:
    """A build over the GPU's shared memory is refused at launch (Triton's OutOfResources). That is no failure where
    the same case launched the same kernel with another tile that fits: the launcher's smaller fixed tiles
    (kernels.launch_fitting) or another autotune candidate. Marks those rows ok, with a note."""
    fitted = {(r["case"], r["kernel"]) for r in record if r["ok"]}
    for r in record:
        if r.get("refused") and (r["case"], r["kernel"]) in fitted:
            r["ok"] = True
            r["note"] = "refused, another tile taken"


def unsupported_triton() -> str | None:
    """Why this Triton cannot run the script, or None: it swaps in a compile-only driver through
    ``driver._active`` / ``driver.set_active``, which Triton 3.6-3.9 have and 3.4 (torch 2.8's) lacks."""
    import triton
    from triton.runtime import driver

    if not (hasattr(driver, "_active") and hasattr(driver, "set_active")):
        return f"bench/compile_kernels.py needs Triton's driver._active and driver.set_active (Triton 3.6-3.9 have " \
            f"them), which Triton {triton.__version__} lacks"  # fmt: skip
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--level", choices=tuple(LEVELS), default="full", help="how many configurations (see LEVELS)")
    parser.add_argument("--shared-limit", type=int, help="bytes of shared memory per block (default: the arch's)")
    parser.add_argument("--only", choices=("attention", "rvq"), help="one family of kernels")
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--verbose", action="store_true", help="name each configuration as it compiles")
    parser.add_argument("--extension", action="store_true", help="also list the CUDA C++ kernels of taste._C")
    parser.add_argument("--sass", action="store_true", help="also count FFMA and shared-memory loads in the SASS")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels that this script compiles")
    if reason := unsupported_triton():
        parser.error(reason)
    import triton
    from triton.runtime.errors import OutOfResources

    import taste  # noqa: F401  (registers taste.kernels in a source checkout)

    families = {"attention": attention_cases, "rvq": rvq_cases}
    record, label = [], [""]
    started = time.perf_counter()
    with compile_only(args.arch, record, label, args.verbose, args.shared_limit, args.sass):
        for family, cases in families.items():
            if args.only in (None, family):
                for label[0], thunk in cases(LEVELS[args.level]):
                    try:
                        thunk()
                    except OutOfResources:
                        pass  # no tile of the launch fits: its rows say so
    accept_refused(record)
    seen, rows = set(), []
    for row in record:  # a launcher may compile the same kernel for several cases: report it once
        key = row.get("hash") or row.get("error")
        if key not in seen:
            seen.add(key)
            rows.append(row)
    if args.extension:
        rows += extension_rows(args.arch)
    print(f"# Triton {triton.__version__}, torch {torch.__version__}, sm_{args.arch}: {len(rows)} configurations, "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    columns = ("case", "kernel", "tiles", "warps", "stages", "tensor cores", "registers", "stack B", "shared B",
               "blocks/SM", "compile s") + (("FFMA", "shared floats/FFMA") if args.sass else ())  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        tiles = " ".join(f"{k}={v}" for k, v in r.items() if (k.startswith("BLOCK") or k == "maxnreg") and v)
        usage = (r.get("registers"), r.get("stack_bytes"), r.get("shared_bytes"))
        mark = f" ({r['note']})" if r.get("note") else "" if r["ok"] else f" **FAILED: {r['error']}**"
        launch = " | ".join(str(r.get(k) or "-") for k in ("num_warps", "num_stages", "tensor_cores"))
        extra = f" {r.get('ffma', '-')} | {r.get('lds_floats_per_ffma') or '-'} |" if args.sass else ""
        print(f"| {r['case']} | {r['kernel']} | {tiles} | {launch} | {usage[0]} | {usage[1]} | {usage[2]}{mark} | "
              f"{r.get('blocks_per_sm') or '-'} | {r.get('compile_s', '-')} |{extra}")  # fmt: skip
    failed = [r for r in rows if not r["ok"]]
    spilled = [r for r in rows if r.get("stack_bytes", 0) > 0]
    refused = [r for r in rows if r.get("refused") and r["ok"]]
    print(f"# {len(failed)} failed, {len(spilled)} with a stack (register spills), {len(refused)} over the shared "
          "memory and replaced by a smaller tile")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "rows": rows}, f, indent=1)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
