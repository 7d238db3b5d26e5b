"""The Triton kernels build for a real GPU (sm_90), not only run in the interpreter: bench/compile_kernels.py.

The interpreter (how the other kernel tests run without a GPU) never compiles a kernel, so a kernel that the GPU
backend rejects, a tile over the card's shared memory, or a configuration whose registers spill would pass every
other test here. This compiles the launchers' configurations at the TASTE shapes with Triton's compiler and
ptxas, which need no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "compile_kernels.py")


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except ImportError:
        return False


def _unsupported() -> str | None:
    if not _has_nvidia_backend():
        return "needs Triton with its NVIDIA backend"
    from compile_kernels import unsupported_triton  # bench/ is on the path (conftest)

    return unsupported_triton()


_WHY_NOT = _unsupported()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for this process
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--level", "smoke", "--extension", "--sass", "--json", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    return proc, rows


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("sm90"))


def test_every_kernel_compiles_for_sm90(smoke):
    proc, rows = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = {r["kernel"] for r in rows}
    for name in ("fwd", "merge", "bwd_delta", "bwd_dkdv", "bwd_dq"):
        assert f"_text_query_attention_{name}_kernel" in kernels
    assert {"_rvq_encode_fwd_kernel", "_rvq_decode_fwd_kernel"} <= kernels
    assert all(r["ok"] and 0 < r["registers"] <= 255 for r in rows)
    assert all(r["shared_bytes"] <= 227 * 1024 for r in rows)


def test_16bit_attention_runs_on_hopper_tensor_cores(smoke):
    """bf16 dots compile to wgmma (warpgroup MMA), not the older per-warp mma.sync, in all three kernels (the
    forward's fixed, split and chunked launches)."""
    _, rows = smoke
    dots = [r for r in rows if r["case"].startswith("attention bfloat16") and r["kernel"].endswith(("fwd_kernel",
            "dkdv_kernel", "dq_kernel"))]  # fmt: skip
    assert len(dots) == 5 and all(r["tensor_cores"] == "wgmma" for r in dots), dots


def test_cuda_cpp_kernels_keep_their_registers(smoke):
    """The nvcc-built kernels of taste._C, read from the installed library."""
    _, rows = smoke
    ext = [r for r in rows if r["case"].startswith("taste._C")]
    if not ext:
        pytest.skip("taste._C has no sm_90 code (built without CUDA)")
    assert {"segment_reduce_kernel", "delay_layout_kernel", "_copy_rows_kernel"} <= {r["kernel"] for r in ext}
    assert all(r["stack_bytes"] == 0 for r in ext), [r for r in ext if r["stack_bytes"]]


# The Triton releases whose builds the register budgets below were measured with (torch 2.11's and 2.14's). Another
# release allocates registers its own way: Triton 3.9 (2026-11) spills 40 bytes per thread in the bf16 backward's
# dK/dV tile and 344 in the float32 one, which 3.6 and 3.8 build without a stack.
REGISTERS_MEASURED_WITH = {(3, 6), (3, 8)}


def test_configurations_keep_their_registers(smoke):
    """What the GPU targets time (bf16 attention, the float32 RVQ) has no stack at all; nothing has more than a
    few bytes (float32 attention and the exact encoder on 16-bit inputs used to spill 10-16 KB per thread)."""
    import triton

    version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    if version not in REGISTERS_MEASURED_WITH:
        pytest.skip(f"register budgets were measured with Triton 3.6 and 3.8, not {triton.__version__}")
    _, rows = smoke
    rows = [r for r in rows if not r["case"].startswith("taste._C")]
    hot = [r for r in rows if r["case"].startswith(("attention bfloat16", "rvq float32"))]
    assert len(hot) >= 8 and all(r["stack_bytes"] == 0 for r in hot), hot
    assert all(r["stack_bytes"] <= 128 for r in rows), [r for r in rows if r["stack_bytes"] > 128]


def test_tiles_over_the_shared_memory_are_replaced(tmp_path):
    """A GPU with less shared memory than the fixed tiles need (here 40000 bytes a block; Turing has 65536) refuses
    their builds, as Triton does at launch, and the launchers take smaller tiles (kernels.launch_fitting): the
    backward's 41 KB tile goes, a smaller one builds, and the script passes."""
    proc, rows = _run(tmp_path, "--only", "attention", "--shared-limit", "40000")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    refused = [r for r in rows if r.get("refused")]
    assert refused and all(r["ok"] and r["shared_bytes"] > 40000 for r in refused)
    for r in refused:
        assert any(o["kernel"] == r["kernel"] and o["case"] == r["case"] and not o.get("refused") for o in rows), r
    assert all(r["shared_bytes"] <= 40000 for r in rows if not r.get("refused"))
    assert "replaced by a smaller tile" in proc.stdout


def test_shared_memory_over_the_limit_fails(tmp_path):
    """The check can fail: with a limit below every encoder tile (the sliced one needs 12-16 KB), the script names it
    and exits 1."""
    proc, rows = _run(tmp_path, "--only", "rvq", "--shared-limit", "8000")
    assert proc.returncode == 1
    failed = [r for r in rows if not r["ok"]]
    assert failed and all("shared memory" in r["error"] for r in failed)
    assert "FAILED: shared memory" in proc.stdout


def test_blocks_per_sm_follows_the_occupancy_rules():
    from compile_kernels import blocks_per_sm

    assert blocks_per_sm(90, 157, 49152, 8) == 1  # 160 registers x 256 threads: one block's worth of 65536
    assert blocks_per_sm(90, 128, 98304, 8) == 2  # registers allow 2; shared memory (2 x 97 KB) too
    assert blocks_per_sm(90, 148, 57344, 4) == 3  # registers allow 3, shared memory 4
    assert blocks_per_sm(90, 32, 256, 4) == 16  # threads: 2048 / 128
    assert blocks_per_sm(86, 32, 60000, 4) == 1  # 100 KB of shared memory per SM on sm_86
    assert blocks_per_sm(75, 32, 0, 4) == 8  # sm_75: 1024 threads per SM
    assert blocks_per_sm(70, 32, 0, 4) is None  # an architecture without a table


def test_sass_counts_read_ffma_and_shared_loads():
    from compile_kernels import sass_counts  # bench/ is on sys.path (conftest)

    sass = """
        /*0100*/                   LDS.128 R4, [R2] ;
        /*0110*/                   LDS R8, [R2+0x10] ;
        /*0120*/              @!P0 LDS.64 R10, [R2+0x20] ;
        /*0130*/                   FFMA R12, R4, R8, R12 ;
        /*0140*/                   FFMA.FTZ R13, R5, R8, R13 ;
        /*0150*/                   LDSM.16.M88.4 R16, [R3] ;
        /*0160*/                   HMMA.1684.F32.TF32 R20, R16, R18, R20 ;
        /*0170*/                   FADD R1, R1, R2 ;
    """
    assert sass_counts(sass) == {"ffma": 2, "lds_floats": 7, "lds_floats_per_ffma": 3.5}
    assert sass_counts("/*0000*/ HMMA.16816.F32 R0, R4, R8, R0 ;")["lds_floats_per_ffma"] is None


def test_exact_rvq_products_run_on_the_cuda_cores(smoke):
    """The exact encoder's float32 products are FFMA fed from shared memory (--sass), the figure of merit of its
    tiles (bench/RESULTS.md); the fast mode's are tensor-core MMAs."""
    _, rows = smoke
    exact = [r for r in rows if r["case"] == "rvq float32 d256 encode"]
    fast = [r for r in rows if r["case"] == "rvq float32 d256 fast encode"]
    assert exact and all(r["ffma"] > 1000 and 0 < r["lds_floats_per_ffma"] < 2 for r in exact), exact
    assert fast and all(r["tensor_cores"] != "none" and r["ffma"] < exact[0]["ffma"] // 4 for r in fast), fast
