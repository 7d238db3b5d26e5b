import pytest
import torch
from conftest import DEVICES, LENGTH_CASES, make_cu, needs_extension, random_word_ids

from taste import ops, reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", LENGTH_CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_matches_reference(device, lengths, dtype, gen):
    for p_new in (0.0, 0.45, 1.0):  # one word per sequence, mixed, one word per token
        word_ids = random_word_ids(lengths, gen, p_new=p_new, dtype=dtype, device=device)
        cu = make_cu(lengths, device)
        out = ops.word_offsets(word_ids, cu)
        assert out.dtype == torch.int32
        assert torch.equal(out, reference.word_offsets(word_ids, cu))
        expected_words = sum(int(word_ids[a:b].max()) + 1 for a, b in zip(cu[:-1], cu[1:]) if b > a)
        assert out.numel() == expected_words + 1


def test_known_example():
    # Two sequences; the second starts with word 0 again, so a new word starts at row 3 although ids repeat.
    word_ids = torch.tensor([0, 0, 1, 0, 1, 1, 2], dtype=torch.int32)
    assert ops.word_offsets(word_ids, make_cu([3, 0, 4])).tolist() == [0, 2, 3, 4, 6, 7]
    assert ops.word_offsets(torch.tensor([0, 0, 0]), make_cu([1, 1, 1])).tolist() == [0, 1, 2, 3]


def test_empty():
    assert ops.word_offsets(torch.zeros(0, dtype=torch.int64), make_cu([0, 0])).tolist() == [0]


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    word_ids = torch.tensor([0, 0, 1, 0, 1, 1, 2], device=device)
    torch.library.opcheck(
        torch.ops.taste.word_offsets,
        (word_ids, make_cu([3, 0, 4], device)),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
