"""Without the compiled extension every op runs its reference behind the same argument checks (taste._fallback):
bad input gets the same clear error, good input the same result. Here the fallback is swapped in for taste.ops'
implementation, so this runs in every build."""

from functools import partial

import pytest
import torch
from conftest import make_cu, random_word_ids
from test_bad_input import CASES

from taste import _fallback, ops


@pytest.fixture
def fallback(monkeypatch):
    monkeypatch.setattr(ops, "_impl", _fallback)


@pytest.mark.parametrize("what,call,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_the_same_clear_error(fallback, what, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def _every_op(gen):
    """One valid call of every op, on a ragged batch with an empty sequence."""
    lengths = [3, 0, 5, 1]
    cu = make_cu(lengths)
    padded = torch.randn(4, 6, 2, generator=gen)
    word_ids = random_word_ids(lengths, gen)
    x = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    offsets = ops.word_offsets(word_ids, cu)
    words = offsets.numel() - 1
    return {
        "pack": ops.pack(padded, torch.tensor(lengths)),
        "pack_offsets": ops.pack_offsets(padded, cu, 9),
        "unpack": ops.unpack(x, cu, 6, -1.0),
        "word_offsets": offsets,
        "segment_sum": ops.segment_sum(x, offsets),
        "segment_mean": ops.segment_mean(x, offsets),
        "segment_mean_broadcast": ops.segment_mean_broadcast(x, offsets),
        "segment_broadcast": ops.segment_broadcast(x[:words], offsets),
        "segment_broadcast rows": ops.segment_broadcast(x[:words], offsets, 9),
        "segment_sum_by_key": ops.segment_sum_by_key(x, torch.tensor([0, -1, 2, 2, 1, 0, -1, 3, 3]), 5),
        "prefix_layout": tuple(ops.prefix_layout(word_ids.long(), cu, torch.tensor([7, 8]))),
        "delay_layout": tuple(ops.delay_layout(word_ids, cu, 2)),
    }


def test_good_input_gives_the_extensions_results(monkeypatch):
    want = _every_op(torch.Generator().manual_seed(0))
    monkeypatch.setattr(ops, "_impl", _fallback)
    got = _every_op(torch.Generator().manual_seed(0))
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, atol=1e-12, rtol=1e-12, msg=name)


def test_value_checks_on_cuda_tensors_only_where_they_sync_or_when_strict(monkeypatch):
    """The compiled ops' rule: a CUDA tensor's values are checked only by the ops that read them back anyway, or
    with TASTE_STRICT_CHECKS=1 (here the device is faked: only the rule is under test)."""
    bad = torch.tensor([1, 3], dtype=torch.int32)  # does not start at 0
    monkeypatch.setattr(_fallback, "_content_checks", lambda t: False)  # as for a CUDA tensor without strict checks
    _fallback._offsets_values(bad, "offsets", 3)  # skipped
    with pytest.raises(RuntimeError, match="offsets must start at 0"):
        _fallback._offsets_values(bad, "offsets", 3, always=True)  # what word_offsets and segment_broadcast use
    monkeypatch.undo()
    monkeypatch.setenv("TASTE_STRICT_CHECKS", "1")
    assert _fallback._content_checks(torch.empty(0, device="meta"))
    monkeypatch.setenv("TASTE_STRICT_CHECKS", "0")
    assert not _fallback._content_checks(torch.empty(0, device="meta"))


def _error(call):
    try:
        call()
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def test_value_errors_match_the_extensions_word_for_word(monkeypatch, gen):
    """Random offsets and word ids, valid and not: the fallback raises where the extension raises, with the same
    message (the first violation, by the same rule)."""
    if not ops.HAS_EXTENSION:
        pytest.skip("compares with the compiled extension")
    raised = 0
    for _ in range(300):
        lengths = torch.randint(0, 4, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
        cu = make_cu(lengths)
        word_ids = random_word_ids(lengths, gen)
        if torch.rand(1, generator=gen) < 0.5 and word_ids.numel():  # a bad word id somewhere
            word_ids[torch.randint(0, word_ids.numel(), (1,), generator=gen)] += int(
                torch.randint(-2, 3, (1,), generator=gen)
            )
        if torch.rand(1, generator=gen) < 0.5:  # bad offsets somewhere
            cu[torch.randint(0, cu.numel(), (1,), generator=gen)] += int(torch.randint(-2, 3, (1,), generator=gen))
        x = torch.randn(word_ids.numel(), 2, generator=gen)
        calls = [
            partial(ops.word_offsets, word_ids, cu),
            partial(ops.delay_layout, word_ids, cu),
            partial(ops.unpack, x, cu, 2),
            partial(ops.segment_sum, x, cu),
            partial(ops.segment_broadcast, torch.randn(cu.numel() - 1, 2), cu),
            partial(ops.prefix_layout, word_ids, cu, torch.tensor([7], dtype=word_ids.dtype)),
        ]
        for call in calls:
            want = _error(call)
            with monkeypatch.context() as m:
                m.setattr(ops, "_impl", _fallback)
                assert _error(call) == want, (lengths, cu.tolist(), word_ids.tolist())
            raised += want is not None
    assert raised > 300  # the invalid cases did reach the checks
