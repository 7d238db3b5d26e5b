"""Bad input gets an error that names the argument and what was expected."""

import pytest
import torch
from conftest import HAS_CUDA, make_cu

from taste import ops

I32 = torch.int32


def cu(*values):
    return torch.tensor(values, dtype=I32)


CASES = [
    # pack / pack_offsets / unpack
    ("lengths larger than T", lambda: ops.pack(torch.zeros(2, 3), torch.tensor([3, 4])), r"lengths\[1\]=4 exceeds"),
    ("negative lengths", lambda: ops.pack(torch.zeros(2, 3), torch.tensor([1, -1])), r"lengths must be >= 0"),
    ("float lengths", lambda: ops.pack(torch.zeros(2, 3), torch.tensor([1.0, 2.0])), r"lengths must be an int32"),
    ("lengths of wrong size", lambda: ops.pack(torch.zeros(2, 3), torch.tensor([1])), r"lengths must have shape"),
    ("1-D padded", lambda: ops.pack(torch.zeros(3), torch.tensor([1])), r"padded must have shape \(B, T"),
    ("int64 cu_seqlens", lambda: ops.unpack(torch.zeros(3), torch.tensor([0, 3]), 4), r"cu_seqlens must be an int32"),
    ("offsets not ending at N", lambda: ops.unpack(torch.zeros(3), cu(0, 2), 4), r"must end at the number of rows"),
    ("cu_seqlens not starting at 0", lambda: ops.unpack(torch.zeros(3), cu(1, 3), 4), r"cu_seqlens must start at 0"),
    ("decreasing cu_seqlens", lambda: ops.unpack(torch.zeros(3), cu(0, 3, 2, 3), 4), r"must be non-decreasing"),
    ("sequence longer than max_len", lambda: ops.unpack(torch.zeros(5), cu(0, 5), 4), r"exceeds max_len=4"),
    ("2-D cu_seqlens", lambda: ops.unpack(torch.zeros(3), cu(0, 3).view(1, 2), 4), r"must be a 1-D tensor"),
    ("pack_offsets total mismatch", lambda: ops.pack_offsets(torch.zeros(1, 4), cu(0, 3), 2), r"must end at the"),
    # word_offsets / delay_layout
    ("gapped word ids", lambda: ops.word_offsets(torch.tensor([0, 2]), cu(0, 2)), r"contiguous and non-decreasing"),
    ("decreasing word ids", lambda: ops.word_offsets(torch.tensor([0, 1, 0]), cu(0, 3)), r"word_ids\[1\]=1 then"),
    ("word ids not from 0", lambda: ops.word_offsets(torch.tensor([0, 1, 1]), cu(0, 1, 3)), r"sequence 1 must start"),
    ("float word ids", lambda: ops.word_offsets(torch.tensor([0.0]), cu(0, 1)), r"word_ids must be an int32 or"),
    ("offsets beyond word ids", lambda: ops.word_offsets(torch.tensor([0, 0]), cu(0, 3)), r"must end at the number"),
    ("delay layout gaps", lambda: ops.delay_layout(torch.tensor([0, 0, 3]), cu(0, 3)), r"contiguous and non-decr"),
    ("negative delay", lambda: ops.delay_layout(torch.tensor([0]), cu(0, 1), -1), r"delay must be >= 0"),
    # segment ops
    ("integer x", lambda: ops.segment_mean(torch.ones(3, 2, dtype=torch.long), cu(0, 3)), r"x must be a floating"),
    ("offsets not ending at N", lambda: ops.segment_sum(torch.ones(3, 2), cu(0, 2)), r"offsets must end at the"),
    ("fused: bad offsets", lambda: ops.segment_mean_broadcast(torch.ones(3, 2), cu(0, 4)), r"offsets must end at"),
    ("unsorted offsets", lambda: ops.segment_mean(torch.ones(3, 2), cu(0, 2, 1, 3)), r"offsets must be non-decr"),
    ("y rows vs segments", lambda: ops.segment_broadcast(torch.ones(3, 2), cu(0, 2, 3)), r"one row per segment"),
    ("num_rows mismatch", lambda: ops.segment_broadcast(torch.ones(2, 2), cu(0, 2, 3), 4), r"must end at the"),
    ("keys out of range", lambda: ops.segment_sum_by_key(torch.ones(2, 2), torch.tensor([0, 5]), 4), r"\[-1, 4\)"),
    ("keys below -1", lambda: ops.segment_sum_by_key(torch.ones(2, 2), torch.tensor([-2, 0]), 4), r"keys must lie"),
    ("keys of wrong size", lambda: ops.segment_sum_by_key(torch.ones(2, 2), torch.tensor([0]), 4), r"keys must have"),
    ("integer values", lambda: ops.segment_sum_by_key(torch.ones(2, dtype=I32), torch.tensor([0, 1]), 2), r"values"),
]


@pytest.mark.parametrize("what,call,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(what, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: ops.pack(torch.zeros(2, 3, device="cuda"), torch.tensor([1, 2])),
        lambda: ops.unpack(torch.zeros(3, device="cuda"), make_cu([3]), 4),
        lambda: ops.segment_mean(torch.ones(3, 2, device="cuda"), make_cu([3])),
        lambda: ops.word_offsets(torch.tensor([0, 0], device="cuda"), make_cu([2])),
        lambda: ops.delay_layout(torch.tensor([0, 0], device="cuda"), make_cu([2])),
        lambda: ops.segment_sum_by_key(torch.ones(2, 2, device="cuda"), torch.tensor([0, 1]), 2),
    ],
)
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_device_mix_is_refused(call):
    with pytest.raises(RuntimeError, match=r"must be on the same device as"):
        call()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_cuda_validates_where_it_syncs():
    with pytest.raises(RuntimeError, match=r"contiguous and non-decreasing"):
        ops.word_offsets(torch.tensor([0, 2], device="cuda"), make_cu([2], "cuda"))
    with pytest.raises(RuntimeError, match=r"sequence 1 must start at 0"):
        ops.word_offsets(torch.tensor([0, 1, 1], device="cuda"), make_cu([1, 2], "cuda"))
    with pytest.raises(RuntimeError, match=r"lengths\[0\]=5 exceeds"):
        ops.pack(torch.zeros(1, 3, device="cuda"), torch.tensor([5], device="cuda"))
    with pytest.raises(RuntimeError, match=r"offsets must start at 0"):
        ops.segment_broadcast(torch.ones(1, 2, device="cuda"), torch.tensor([1, 2], dtype=I32, device="cuda"))


def _configs():
    import numpy as np

    import taste
    from taste.encoder import EncoderConfig
    from taste.generate import GenerationConfig
    from taste.tokenizer import QuantizerConfig

    return [  # (what, make, error, message): each failed deep inside before, or passed and failed later, or never
        ("heads 0", lambda: taste.AggregatorConfig.tiny(num_heads=0), ValueError, "num_heads must be >= 1, got 0"),
        ("prefix outside the vocabulary", lambda: taste.AggregatorConfig.tiny(prefix_ids=(1000, 1, 2, 3)), ValueError,
         r"prefix_ids must lie in \[0, vocab_size=1000\), got \(1000, 1, 2, 3\)"),
        ("no room after the prefix", lambda: taste.AggregatorConfig.tiny(max_positions=4), ValueError,
         r"max_positions \(4\) must exceed the 4 prefix tokens"),
        ("a string width", lambda: taste.AggregatorConfig.tiny(d_model="64"), TypeError,
         r"d_model must be int, got '64' \(str\)"),
        ("64 mel bins", lambda: EncoderConfig(n_mels=64), ValueError, "n_mels must be 80 or 128"),
        ("no window", lambda: EncoderConfig(window_seconds=0.0), ValueError, "window_seconds must be > 0"),
        ("decoder heads 0", lambda: taste.UnitDecoderConfig.tiny(heads=0), ValueError, "heads must be >= 1, got 0"),
        ("dropout 1", lambda: taste.UnitDecoderConfig.tiny(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
        ("EOS ratios crossed", lambda: taste.UnitDecoderConfig.tiny(min_len_ratio=30.0), ValueError,
         "need 0 <= min_len_ratio <= max_len_ratio and max_len_ratio > 0, got 30.0 and 20.0"),
        ("decoder top_k 0", lambda: taste.UnitDecoderConfig.tiny(top_k=0), ValueError, "top_k must be >= 1, got 0"),
        ("a bool codebook size", lambda: QuantizerConfig(codebook_size=True), TypeError,
         r"codebook_size must be int, got True \(bool\)"),
        ("a string tokenizer flag", lambda: taste.TasteConfig.tiny(freeze_encoder="yes"), TypeError,
         "freeze_encoder must be bool"),
        ("negative loss weight", lambda: taste.SpokenLMConfig.tiny(text_weight=-1.0), ValueError,
         "text_weight must be >= 0, got -1.0"),
        ("LoRA dropout 1", lambda: taste.SpokenLMConfig.tiny(lora_dropout=1.0), ValueError,
         r"lora_dropout must be in \[0, 1\)"),
        ("a string token budget", lambda: GenerationConfig(max_new_tokens="5"), TypeError,
         r"max_new_tokens must be int \| None, got '5' \(str\)"),
        ("NumPy integers do", lambda: GenerationConfig(max_new_tokens=np.int64(5)), None, None),
        ("lists do for tuples", lambda: taste.AggregatorConfig.tiny(prefix_ids=[996, 997, 998, 999]), None, None),
        ("ints do for floats", lambda: taste.UnitDecoderConfig.tiny(max_len_ratio=20), None, None),
    ]  # fmt: skip


@pytest.mark.parametrize("what, make, error, message", _configs(), ids=[c[0] for c in _configs()])
def test_configs_check_their_fields(what, make, error, message):
    if error is None:
        make()
    else:
        with pytest.raises(error, match=message):
            make()
