"""segment_sum / segment_mean / segment_broadcast / segment_mean_broadcast: subword-to-word pooling and back."""

import pytest
import torch
from conftest import DEVICES, LENGTH_CASES, assert_close, make_cu, needs_extension, random_word_ids

from taste import ops, reference

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _word_batch(lengths, gen, device):
    word_ids = random_word_ids(lengths, gen, device=device)
    return ops.word_offsets(word_ids, make_cu(lengths, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", LENGTH_CASES)
@pytest.mark.parametrize("trailing", [(), (3,), (1280,), (4, 6)])
def test_sum_and_mean_match_float64_reference(device, lengths, trailing, gen):
    offsets = _word_batch(lengths, gen, device)
    x64 = torch.randn(sum(lengths), *trailing, generator=gen, dtype=torch.float64).to(device)
    for dtype in FLOATS:
        x = x64.to(dtype)
        assert_close(ops.segment_sum(x, offsets), reference.segment_sum(x.double(), offsets), dtype)
        assert_close(ops.segment_mean(x, offsets), reference.segment_mean(x.double(), offsets), dtype)
        expected = reference.segment_mean_broadcast(x.double(), offsets)
        assert_close(ops.segment_mean_broadcast(x, offsets), expected, dtype)
        assert ops.segment_mean(x, offsets).dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_empty_segments_give_zero_and_broadcast_skips_them(device):
    offsets = torch.tensor([0, 0, 2, 2, 3, 3], dtype=torch.int32, device=device)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], device=device)
    assert ops.segment_mean(x, offsets).tolist() == [[0, 0], [2, 3], [0, 0], [5, 6], [0, 0]]
    assert ops.segment_sum(x, offsets).tolist() == [[0, 0], [4, 6], [0, 0], [5, 6], [0, 0]]
    assert ops.segment_mean_broadcast(x, offsets).tolist() == [[2, 3], [2, 3], [5, 6]]
    y = torch.arange(10.0, device=device).view(5, 2)
    assert ops.segment_broadcast(y, offsets).tolist() == [[2, 3], [2, 3], [6, 7]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", LENGTH_CASES)
def test_broadcast_matches_reference(device, lengths, gen):
    offsets = _word_batch(lengths, gen, device)
    words = offsets.numel() - 1
    for y in (torch.randn(words, 7, generator=gen).to(device), torch.randint(-1, 512, (words, 4), generator=gen)):
        y = y.to(device)
        expected = reference.segment_broadcast(y, offsets)
        assert torch.equal(ops.segment_broadcast(y, offsets), expected)
        assert torch.equal(ops.segment_broadcast(y, offsets, sum(lengths)), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_mean_then_broadcast_is_the_official_word_average(device, gen):
    # Spec 1.5: every subword position of a word carries the word's mean (single-subword words unchanged).
    word_ids = torch.tensor([0, 0, 0, 1, 2, 2, 0, 1, 1], device=device)
    cu = make_cu([6, 3], device)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64).to(device)
    offsets = ops.word_offsets(word_ids, cu)
    pooled = ops.segment_broadcast(ops.segment_mean(x, offsets), offsets, 9)
    expected = x.clone()
    for lo, hi in [(0, 3), (4, 6), (7, 9)]:
        expected[lo:hi] = x[lo:hi].mean(0)
    torch.testing.assert_close(pooled, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ops.segment_mean_broadcast(x, offsets), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device, gen):
    offsets = _word_batch([300, 1, 250], gen, device)
    x = torch.randn(551, 96, generator=gen).to(device)
    assert torch.equal(ops.segment_mean(x, offsets), ops.segment_mean(x, offsets))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, gen):
    offsets = torch.tensor([0, 2, 2, 3, 7], dtype=torch.int32, device=device)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    for fn, arg in [
        (lambda t: ops.segment_sum(t, offsets), x),
        (lambda t: ops.segment_mean(t, offsets), x),
        (lambda t: ops.segment_mean_broadcast(t, offsets), x),
        (lambda t: ops.segment_broadcast(t, offsets, 7), y),
        (lambda t: ops.segment_broadcast(t, offsets), y),
    ]:
        assert torch.autograd.gradcheck(fn, (arg,))
        assert torch.autograd.gradgradcheck(fn, (arg,))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    offsets = torch.tensor([0, 2, 2, 3, 7], dtype=torch.int32, device=device)
    x = torch.randn(7, 3, generator=gen).to(device).requires_grad_()
    y = torch.randn(4, 3, generator=gen).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.taste.segment_sum, (x, offsets))
    torch.library.opcheck(torch.ops.taste.segment_mean, (x, offsets))
    torch.library.opcheck(torch.ops.taste.segment_mean_broadcast, (x, offsets))
    torch.library.opcheck(torch.ops.taste.segment_broadcast, (y, offsets, 7))
    torch.library.opcheck(
        torch.ops.taste.segment_broadcast,
        (y, offsets, None),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096,), (4096, 2)])
def test_reference_sums_16bit_values_in_float32(dtype, shape, gen):
    """The references (the fallback without taste._C) round a 16-bit sum once, as the kernels do. Accumulated in
    bf16 (as index_add does for 1-D rows), a sum of 4096 values in [0, 1) stopped at 256."""
    x = torch.rand(*shape, generator=gen, dtype=torch.float64)
    offsets = make_cu([4096])
    exact = x.to(dtype).double().sum(0, keepdim=True)
    for op, want in ((reference.segment_sum, exact), (reference.segment_mean, exact / 4096)):
        got = op(x.to(dtype), offsets)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want.to(dtype), atol=0, rtol=0)
    keys = torch.zeros(4096, dtype=torch.long)
    torch.testing.assert_close(reference.segment_sum_by_key(x.to(dtype), keys, 1)[0], exact.to(dtype), atol=0, rtol=0)
