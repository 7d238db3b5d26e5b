"""The benchmark plumbing's profiler summary (bench/common.py: --profile), on the CPU."""

import common
import torch


def test_kernel_profile_names_where_the_time_goes():
    a, b = torch.randn(384, 384), torch.randn(384, 384)

    def fn():
        return (a @ b).add_(1.0).sum()

    prof = common.kernel_profile(fn, "cpu", calls=3)
    assert prof["unit"] == "cpu" and prof["us_per_call"] > 0
    names = [e["name"] for e in prof["entries"]]
    assert names[0] == "aten::mm", names  # the matmul dominates an add and a sum over the same 147k elements
    top = prof["entries"][0]
    assert top["count_per_call"] == 1 and 0.5 < top["share"] <= 1.0
    assert sum(e["share"] for e in prof["entries"]) <= 1.0 + 1e-9
    times = [e["us_per_call"] for e in prof["entries"]]
    assert times == sorted(times, reverse=True)


def test_measure_profiles_only_our_providers(monkeypatch, capsys):
    monkeypatch.setattr(common, "PROFILE", True)
    x = torch.randn(256, 256)
    rows = common.measure("case", {"baseline": lambda: x @ x, "ours": lambda: x @ x.T}, "cpu", reps=2)
    assert "profile" not in rows[0].extra
    assert rows[1].extra["profile"]["entries"][0]["name"] == "aten::mm"
    out = capsys.readouterr().out
    assert "profile of case | ours" in out and "% of its" in out
    assert 0 < rows[1].extra["profile"]["share_of_wall"]
