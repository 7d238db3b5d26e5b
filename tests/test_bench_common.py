"""The benchmark plumbing's profiler summary (bench/common.py: --profile), on the CPU."""

import common
import pytest
import torch


def test_kernel_profile_names_where_the_time_goes():
    # The product makes 1536 multiply-adds per element of the (384, 384) result that the add and the sum then read,
    # on one thread: with the machine busy (another process's matmuls), OpenMP threads waiting for each other made a
    # 147k-element add take 8 ms, and a (384, 384) product came first in only 22 of 40 profiles; this setup, 40 of 40.
    a, b = torch.randn(384, 1536), torch.randn(1536, 384)

    def fn():
        return (a @ b).add_(1.0).sum()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prof = common.kernel_profile(fn, "cpu", calls=3)
    finally:
        torch.set_num_threads(threads)
    assert prof["unit"] == "cpu" and prof["us_per_call"] > 0
    names = [e["name"] for e in prof["entries"]]
    assert names[0] == "aten::mm", names  # the matmul dominates an add and a sum over the same 147k elements
    top = prof["entries"][0]
    assert top["count_per_call"] == 1 and 0.0 < top["share"] <= 1.0  # largest (names[0]); its share varies with load
    assert sum(e["share"] for e in prof["entries"]) <= 1.0 + 1e-9
    times = [e["us_per_call"] for e in prof["entries"]]
    assert times == sorted(times, reverse=True)


def test_measure_profiles_only_our_providers(monkeypatch, capsys):
    monkeypatch.setattr(common, "PROFILE", True)
    x = torch.randn(256, 256)
    rows = common.measure("case", {"baseline": lambda: x @ x, "ours": lambda: x @ x.T}, "cpu", reps=2)
    assert "profile" not in rows[0].extra
    # (the product's own kernel, not the matmul call around it, whose self time a busy machine can inflate)
    assert "aten::mm" in [e["name"] for e in rows[1].extra["profile"]["entries"][:2]]
    out = capsys.readouterr().out
    assert "profile of case | ours" in out and "% of its" in out
    assert 0 < rows[1].extra["profile"]["share_of_wall"]


def test_tuning_summary_lists_every_candidate_fastest_first(capsys):
    choices = {"(256, 2048)": "BLOCK_M: 128", "(128, 2048)": "BLOCK_M: 64"}
    timings = {"(256, 2048)": {"BLOCK_M: 64": 0.5, "BLOCK_M: 128": 0.25, "BLOCK_M: 256": float("inf")}}
    summary = common.tuning_summary("attention forward", choices, timings)
    assert summary["(256, 2048)"]["candidates_ms"]["BLOCK_M: 128"] == 0.25
    assert summary["(128, 2048)"] == {"kernel": "attention forward", "chosen": "BLOCK_M: 64", "candidates_ms": {}}
    common.print_tuning(summary)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "attention forward tiles chosen by the autotuner for (256, 2048): BLOCK_M: 128"
    assert "0.2500 ms  1.00x  BLOCK_M: 128" in lines[1] and "0.5000 ms  2.00x  BLOCK_M: 64" in lines[2]
    assert "inf ms   -    BLOCK_M: 256" in lines[3]
    assert lines[4].endswith("for (128, 2048): BLOCK_M: 64") and len(lines) == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_timing_separates_issuing_from_running():
    """A call that only issues a long kernel returns long before it ends: its host time is far below its
    back-to-back time per call, which is the kernel's."""
    a = torch.randn(4096, 4096, device="cuda")
    timing = common.host_timing(lambda: a @ a, calls=10)
    assert 0 < timing["host_us"] < 1e3 * timing["back_to_back_ms"]


def test_report_gives_the_kernels_bandwidth_beside_the_wall_times(capsys):
    """With a copy ceiling and profiled rows, the table is followed by each profiled row's bandwidth over its device
    time in kernels alone (a call's wall time also holds its host work)."""
    rows = [common.Row("attention B=64", "(2) sdpa", 1.0, 1.0), common.Row("attention B=64", "(4) ours", 0.5, 1.0)]
    rows[1].extra["profile"] = {"kernel_gbps": 3000.0}
    for r in rows:
        r.ratio = 1.0
    common.report("title", rows, "cpu", None, ceiling=4000.0)
    out = capsys.readouterr().out
    tail = out.split("device time in kernels alone")[1]
    assert "(4) ours" in tail and "3000 GB/s" in tail and "75% copy" in tail and "(2) sdpa" not in tail


def test_aggregator_bench_keeps_its_other_providers_when_compile_fails(capsys):
    """bench/aggregator.py --compile: (6) joins the providers when the compiled module runs, and a compilation that
    fails is reported and left out instead of ending the run (a GPU run would lose every other number)."""
    import aggregator

    from taste import AggregatorConfig, TextQueryAggregator

    agg = TextQueryAggregator(config=AggregatorConfig.tiny(identity_v_proj=False, vocab_size=50000)).eval()
    d = agg.config.d_model
    problem = aggregator.make_problem(2, 5, 8, d, "cpu", torch.float32)

    def broken(*args):
        raise RuntimeError("no backend")

    ok = aggregator.aggregator_providers(agg, problem, False, None, compiled=agg)
    assert "(6) ours compiled" in ok and torch.equal(ok["(6) ours compiled"](), ok["(4) ours packed"]())
    failed = aggregator.aggregator_providers(agg, problem, False, None, compiled=broken)
    assert "(6) ours compiled" not in failed and "(4) ours packed" in failed
    assert "skipped, torch.compile failed: RuntimeError: no backend" in capsys.readouterr().out


def test_host_overhead_proxy_runs_the_cuda_code_path(tmp_path):
    """bench/host_overhead.py: our providers go through the CUDA Python code (Triton launches counted): at B=40 the
    default chunks K/V 16 utterances at most at a time, i.e. three chunks per layer, against one for (5). At B=1 the
    GPU problem's cross-attention (20 heads, 1500 frames) splits its keys over an H200's 132 SMs: a merge launch
    after each."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "host_overhead.py"

    def run(batch, *extra):
        out = tmp_path / f"host{batch}.json"
        done = subprocess.run([sys.executable, str(script), "--batch", str(batch), "--reps", "1", "--json", str(out),
                               *extra], capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout, {r["provider"]: r for r in json.loads(out.read_text())["results"]}

    stdout, results = run(40)
    sdpa, chunked, whole = results.values()
    assert sdpa["triton_launches"] == 0 and whole["triton_launches"] == 4  # 2 layers x (self + cross)
    assert chunked["triton_launches"] == 2 + 2 * 3
    assert chunked["operators"] > whole["operators"] > 0 and all(r["host_us"] > 0 for r in results.values())
    assert "| (4) ours, K/V 16 utterances at a time |" in stdout
    _, results = run(1)
    assert [r["triton_launches"] for r in results.values()] == [0, 6, 6]  # 2 layers x (self + cross + merge)
    _, results = run(1, "--sms", "40")  # 40 programs fill a 40-SM GPU: no split
    assert [r["triton_launches"] for r in results.values()] == [0, 4, 4]
