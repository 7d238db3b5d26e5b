import pytest
import torch
from conftest import DEVICES, assert_close, needs_extension

from taste import ops, reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,num_keys,trailing", [(0, 4, (3,)), (1, 1, (5,)), (6400, 512, (256,)), (333, 7, ())])
def test_matches_float64_reference(device, n, num_keys, trailing, gen):
    keys = torch.randint(-1, num_keys, (n,), generator=gen).to(device)
    values64 = torch.randn(n, *trailing, generator=gen, dtype=torch.float64).to(device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for key_dtype in (torch.int64, torch.int32):
            sums, counts = ops.segment_sum_by_key(values64.to(dtype), keys.to(key_dtype), num_keys)
            ref_sums, ref_counts = reference.segment_sum_by_key(values64.to(dtype).double(), keys, num_keys)
            assert sums.dtype == dtype and counts.dtype == torch.int64
            assert torch.equal(counts, ref_counts)
            # A key's sum has up to ~n/num_keys terms rounded once at the end: the dtype's tolerance holds.
            assert_close(sums, ref_sums, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_ignores_minus_one_and_is_bitwise_deterministic(device, gen):
    keys = torch.tensor([2, -1, 0, 2, 2, -1], device=device)
    values = torch.arange(12.0, device=device).view(6, 2)
    sums, counts = ops.segment_sum_by_key(values, keys, 4)
    assert counts.tolist() == [1, 0, 3, 0]
    assert sums.tolist() == [[4, 5], [0, 0], [0 + 6 + 8, 1 + 7 + 9], [0, 0]]
    big_keys = torch.randint(0, 3, (20000,), generator=gen).to(device)  # long sums in float32
    big = torch.randn(20000, 64, generator=gen).to(device)
    first = ops.segment_sum_by_key(big, big_keys, 3)[0]
    for _ in range(3):
        assert torch.equal(ops.segment_sum_by_key(big, big_keys, 3)[0], first)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_opcheck(device, gen):
    keys = torch.tensor([1, -1, 0, 1, 3, 3, -1], device=device)
    values = torch.randn(7, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: ops.segment_sum_by_key(v, keys, 5)[0], (values,))
    torch.library.opcheck(torch.ops.taste.segment_sum_by_key, (values.float().detach().requires_grad_(), keys, 5))
