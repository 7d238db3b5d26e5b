import pytest
import torch
from conftest import DEVICES, LENGTH_CASES, make_cu, needs_extension

from taste import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool]


def _padded(lengths, trailing, dtype, device, gen):
    T = max(lengths, default=0) + 2
    x = torch.randn(len(lengths), T, *trailing, generator=gen) * 5
    return (x > 0 if dtype == torch.bool else x.to(dtype)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", LENGTH_CASES)
@pytest.mark.parametrize("trailing", [(), (3,), (2, 5), (1280,)])
def test_pack_unpack_match_reference(device, lengths, trailing, gen):
    for dtype in DTYPES:
        padded = _padded(lengths, trailing, dtype, device, gen)
        for len_dtype in (torch.int32, torch.int64):
            lens = torch.tensor(lengths, dtype=len_dtype, device=device)
            packed, cu = ops.pack(padded, lens)
            ref_packed, ref_cu = reference.pack(padded, lens)
            assert cu.dtype == torch.int32 and torch.equal(cu, ref_cu)
            assert packed.dtype == dtype and torch.equal(packed, ref_packed)
            assert torch.equal(ops.pack_offsets(padded, cu, packed.shape[0]), packed)
        for pad in (0.0, -1.0, 3.0):
            out = ops.unpack(packed, cu, padded.shape[1] + 1, pad)
            assert torch.equal(out, reference.unpack(packed, cu, padded.shape[1] + 1, pad))


@pytest.mark.parametrize("device", DEVICES)
def test_unpack_of_pack_restores_valid_rows(device, gen):
    lengths = [5, 0, 9, 1]
    padded = torch.randn(4, 9, 6, generator=gen).to(device)
    packed, cu = ops.pack(padded, torch.tensor(lengths, device=device))
    assert packed.shape == (sum(lengths), 6)
    out = ops.unpack(packed, cu, 9, pad_value=float("nan"))
    for b, n in enumerate(lengths):
        assert torch.equal(out[b, :n], padded[b, :n])
        assert torch.isnan(out[b, n:]).all()


def test_pack_non_contiguous_input(gen):
    padded = torch.randn(6, 3, 10, generator=gen).transpose(0, 1)  # (3, 6, 10) view
    lens = torch.tensor([6, 2, 0])
    assert torch.equal(ops.pack(padded, lens)[0], reference.pack(padded, lens)[0])


def test_pack_empty_batch():
    packed, cu = ops.pack(torch.zeros(0, 4, 2), torch.zeros(0, dtype=torch.int64))
    assert packed.shape == (0, 2) and cu.tolist() == [0]
    assert ops.unpack(packed, cu, 4).shape == (0, 4, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, gen):
    lengths = [3, 0, 1, 4]
    padded = torch.randn(4, 4, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    lens = torch.tensor(lengths, device=device)
    assert torch.autograd.gradcheck(lambda x: ops.pack(x, lens)[0], (padded,))
    cu = make_cu(lengths, device)
    assert torch.autograd.gradcheck(lambda x: ops.pack_offsets(x, cu, 8), (padded,))
    packed = torch.randn(8, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.unpack(x, cu, 5, 2.0), (packed,))
    assert torch.autograd.gradgradcheck(lambda x: ops.unpack(x, cu, 5, 2.0), (packed,))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    lengths = [3, 0, 1, 4]
    padded = torch.randn(4, 5, 3, generator=gen).to(device).requires_grad_()
    cu = make_cu(lengths, device)
    torch.library.opcheck(torch.ops.taste.pack_offsets, (padded, cu, 8))
    torch.library.opcheck(torch.ops.taste.unpack, (torch.randn(8, 3, device=device, requires_grad=True), cu, 6, 0.5))
    # pack's output size is data-dependent: the dynamic-shape AOT check needs a graph break, so test the rest.
    torch.library.opcheck(
        torch.ops.taste.pack,
        (padded, torch.tensor(lengths, device=device)),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
