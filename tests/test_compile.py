"""The ops chain under torch.compile(fullgraph=True, dynamic=True): the fakes give the right shapes, no graph
breaks, and the compiled result (values and gradients) equals eager."""

import pytest
import torch
from conftest import DEVICES, TORCH_VERSION, make_cu, random_word_ids

from taste import ops


def word_pooling(padded, lengths, word_ids, cu_seqlens, total: int, max_len: int):
    packed = ops.pack_offsets(padded, cu_seqlens, total)  # (N, D)
    offsets = ops.word_offsets(word_ids, cu_seqlens)  # (W + 1,)
    words = ops.segment_mean(packed, offsets)  # (W, D)
    per_token = ops.segment_broadcast(words, offsets, total)  # (N, D)
    layout = ops.delay_layout(word_ids, cu_seqlens, 1)
    fed = torch.where((layout.input_word >= 0)[:, None], words[layout.input_word.clamp(min=0)], 0.0)
    sums, counts = ops.segment_sum_by_key(per_token, word_ids, max_len)
    repacked, _ = ops.pack(padded, lengths)
    return ops.unpack(per_token + repacked, cu_seqlens, max_len), fed, sums, counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.skipif(TORCH_VERSION < (2, 10), reason="torch 2.8 and 2.9 cannot trace this chain (README, versions)")
def test_chain_compiles_fullgraph_dynamic(device, gen):
    """Measured on torch 2.8 and 2.9: word_offsets' data-dependent size stops dynamo unless
    ``torch._dynamo.config.capture_dynamic_output_shape_ops`` is set, and with it (2.8) the guard on that size fails
    in AOT autograd's broadcasting; 2.10 and later compile it as it is."""
    torch._dynamo.reset()
    compiled = torch.compile(word_pooling, fullgraph=True, dynamic=True, backend="aot_eager")
    for lengths in ([5, 0, 3], [9, 1, 4, 2, 7]):  # a second shape reuses the dynamic graph
        T = max(lengths)
        cu = make_cu(lengths, device)
        padded = torch.randn(len(lengths), T, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_()
        word_ids = random_word_ids(lengths, gen, device=device)
        args = (padded, torch.tensor(lengths, device=device), word_ids, cu, sum(lengths), T)
        eager = word_pooling(*args)
        got = compiled(*args)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        grad_c = torch.autograd.grad(got[0].sum() + got[1].sum() + got[2].sum(), padded)[0]
        grad_e = torch.autograd.grad(eager[0].sum() + eager[1].sum() + eager[2].sum(), padded)[0]
        torch.testing.assert_close(grad_c, grad_e, atol=1e-12, rtol=0)
