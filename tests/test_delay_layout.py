import pytest
import torch
from baselines import PAD_TEXT, official_prepare_single
from conftest import DEVICES, LENGTH_CASES, make_cu, needs_extension, random_word_ids

from taste import ops, reference


def test_worked_example_of_the_spec():
    # Spec 2.4: words w0=[t0,t1], w1=[t2], w2=[t3,t4], delay 1. Token k is packed index k; word w is global w.
    out = ops.delay_layout(torch.tensor([0, 0, 1, 2, 2]), make_cu([5]), delay=1)
    assert out.cu_seqlens.tolist() == [0, 7]
    assert out.input_token.tolist() == [-1, 0, 1, 2, 3, 4, -2]  # BOS t0 t1 t2 t3 t4 pad_text
    assert out.input_word.tolist() == [-1, -1, -1, 0, 1, 1, 2]  # - pad pad c0 c1 c1 c2
    assert out.label_token.tolist() == [0, 1, 2, 3, 4, -1, -1]  # t0..t4 ign ign
    assert out.label_word.tolist() == [-1, -1, 0, 1, -1, 2, -1]  # - - c0 c1 - c2 -


def test_single_word_and_empty_sequences_in_one_batch():
    # Sequence 0: one word of two tokens; sequence 1: empty; sequence 2: one token. Global words: 0, 1.
    out = ops.delay_layout(torch.tensor([0, 0, 0]), make_cu([2, 0, 1]), delay=1)
    assert out.cu_seqlens.tolist() == [0, 4, 6, 9]
    assert out.input_token.tolist() == [-1, 0, 1, -2, -1, -2, -1, 2, -2]
    assert out.input_word.tolist() == [-1, -1, -1, 0, -1, -1, -1, -1, 1]
    assert out.label_token.tolist() == [0, 1, -1, -1, -1, -1, 2, -1, -1]
    # The only code of a single-word utterance sits at position L (spec 2.4).
    assert out.label_word.tolist() == [-1, -1, 0, -1, -1, -1, -1, 1, -1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", LENGTH_CASES)
@pytest.mark.parametrize("delay", [0, 1, 2, 3])
def test_matches_reference(device, lengths, delay, gen):
    for dtype in (torch.int32, torch.int64):
        word_ids = random_word_ids(lengths, gen, dtype=dtype, device=device)
        out = ops.delay_layout(word_ids, make_cu(lengths, device), delay)
        ref = reference.delay_layout(word_ids, make_cu(lengths, device), delay)
        assert out.cu_seqlens.dtype == torch.int32 and out.input_token.dtype == torch.int64
        for name, a, b in zip(out._fields, out, ref):
            assert torch.equal(a, b), name
        assert out.input_token.numel() == sum(lengths) + len(lengths) * (delay + 1)


@pytest.mark.parametrize("lengths", LENGTH_CASES)
@pytest.mark.parametrize("delay", [1, 2])
def test_matches_the_official_per_sample_layout(lengths, delay, gen):
    """Gathering token ids and word codes through the layout gives the official per-sample tensors."""
    word_ids = random_word_ids(lengths, gen)
    cu = make_cu(lengths)
    tokens = torch.randint(0, 128000, (sum(lengths),), generator=gen)
    offsets = ops.word_offsets(word_ids, cu)
    codes = torch.randint(0, 512, (offsets.numel() - 1, 4), generator=gen)  # one code row per global word
    lay = ops.delay_layout(word_ids, cu, delay)
    word_start_codes = torch.full((sum(lengths), 4), -1)
    word_start_codes[offsets[:-1].long()] = codes

    def gather(index, table, fill):  # table[index], with `fill` where index < 0
        padded = torch.cat([table, table.new_full((1, *table.shape[1:]), fill)])
        return padded[torch.where(index >= 0, index, table.shape[0])]

    for b in range(len(lengths)):
        lo, hi = int(cu[b]), int(cu[b + 1])
        text, audio, text_labels, taste_labels = official_prepare_single(
            tokens[lo:hi], word_ids[lo:hi], word_start_codes[lo:hi], delay
        )
        rows = slice(int(lay.cu_seqlens[b]), int(lay.cu_seqlens[b + 1]))
        assert lay.input_token[rows][0] == -1  # BOS
        fed = lay.input_token[rows][1:]
        assert torch.equal(torch.where(fed == -2, PAD_TEXT, gather(fed, tokens, -1)), text)
        assert torch.equal(gather(lay.input_word[rows][1:], codes, -1), audio)
        assert torch.equal(gather(lay.label_token[rows], tokens, -1), text_labels)
        assert torch.equal(gather(lay.label_word[rows], codes, -1), taste_labels)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    args = (torch.tensor([0, 0, 1, 0, 1, 1, 2], device=device), make_cu([3, 0, 4], device), 2)
    torch.library.opcheck(torch.ops.taste.delay_layout, args)
