"""taste.ops.linear_cross_entropy (TASLM's text loss through the output layer, a block of rows at a time) against the
whole-logits formula of taste.reference, and what the blocks are for: memory."""

import common
import pytest
import torch

from taste import ops, reference


def problem(n=37, d=16, vocab=101, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(vocab, d, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    ref_h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[:5] = (h[:5].detach() @ weight.detach().T).argmax(-1)  # (some rows right, so accuracy is not 0)
    return h, weight, targets, ref_h


@pytest.mark.parametrize("kl_weight", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("block_elements", [1, 101 * 5, 10**6])  # one row a block, five rows, all rows at once
@pytest.mark.parametrize("train_weight", [True, False])  # (a trainable weight takes blocks of at least d = 16 rows)
def test_matches_the_whole_logits_formula(kl_weight, block_elements, train_weight):
    h, weight, targets, ref_h = problem()
    weight.requires_grad_(train_weight)
    wrt = (h, weight) if train_weight else (h,)
    want_loss, want_acc = reference.linear_cross_entropy(h, weight, targets, ref_h, kl_weight)
    want = torch.autograd.grad(want_loss, wrt)
    loss, acc = ops.linear_cross_entropy(h, weight, targets, ref_h=ref_h, kl_weight=kl_weight,
                                         block_elements=block_elements)  # fmt: skip
    got = torch.autograd.grad(loss, wrt)
    assert loss.dtype == acc.dtype == torch.float64 and 0 < float(acc) < 1
    torch.testing.assert_close(loss, want_loss, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(acc, want_acc)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("ignore_index", [-100, 7])  # (an id inside the vocabulary may be the one left out too)
@pytest.mark.parametrize("kl_weight", [0.0, 0.9])
def test_ignored_rows_count_nowhere(ignore_index, kl_weight):
    """Rows whose target is ignore_index: loss, accuracy and both gradients as F.cross_entropy(ignore_index=...) with
    the KL term averaged over the rows counted, equal to dropping those rows; with no row counted, a NaN loss and
    zero gradients, as PyTorch's."""
    h, weight, targets, ref_h = problem()
    targets[[0, 3, 10, 11, 12, 36]] = ignore_index
    keep = targets != ignore_index
    wrt = (h, weight)
    want_loss, want_acc = reference.linear_cross_entropy(h, weight, targets, ref_h, kl_weight, ignore_index)
    dropped_loss, dropped_acc = reference.linear_cross_entropy(h[keep], weight, targets[keep], ref_h[keep], kl_weight)
    torch.testing.assert_close(want_loss, dropped_loss, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(want_acc, dropped_acc)
    want = torch.autograd.grad(want_loss, wrt)
    for block_elements in (101 * 5, 10**6):
        loss, acc = ops.linear_cross_entropy(h, weight, targets, ref_h=ref_h, kl_weight=kl_weight,
                                             ignore_index=ignore_index, block_elements=block_elements)  # fmt: skip
        torch.testing.assert_close(loss, want_loss, atol=1e-13, rtol=1e-13)
        torch.testing.assert_close(acc, want_acc)
        got = torch.autograd.grad(loss, wrt)
        assert not got[0][~keep].any()  # (ignored rows get no gradient)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-13)
    none = torch.full_like(targets, ignore_index)
    loss, acc = ops.linear_cross_entropy(h, weight, none, ref_h=ref_h, kl_weight=kl_weight, ignore_index=ignore_index)
    assert loss.isnan() and acc.isnan()
    assert all(not g.any() for g in torch.autograd.grad(loss, wrt))


def test_a_trainable_weight_takes_blocks_of_at_least_d_rows(monkeypatch):
    import taste.ops_text_loss as text_loss

    seen = []
    op = text_loss._op
    monkeypatch.setattr(text_loss, "_op", lambda *args: seen.append(args[6]) or op(*args))
    h, weight, targets, _ = problem()  # d = 16, V = 101
    ops.linear_cross_entropy(h, weight, targets, block_elements=202)
    ops.linear_cross_entropy(h, weight.detach(), targets, block_elements=202)
    ops.linear_cross_entropy(h, weight, targets, block_elements=101 * 20)
    assert seen == [16, 2, 20]


def test_gradients_only_where_wanted_and_scaled():
    h, weight, targets, ref_h = problem()
    weight.requires_grad_(False)  # (a frozen output layer, as under LoRA: no (V, d) gradient is made)
    loss, _ = ops.linear_cross_entropy(h, weight, targets, block_elements=300)
    (3.0 * loss).backward()
    want_loss, _ = reference.linear_cross_entropy(h.detach().requires_grad_(), weight, targets)
    h_ref = h.detach().requires_grad_()
    (3.0 * reference.linear_cross_entropy(h_ref, weight, targets)[0]).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-13, rtol=1e-13)
    assert weight.grad is None
    with torch.no_grad():
        loss_no_grad, _ = ops.linear_cross_entropy(h, weight, targets, block_elements=300)
    torch.testing.assert_close(loss_no_grad, want_loss, atol=1e-13, rtol=1e-13)
    assert not loss_no_grad.requires_grad


def test_gradcheck_opcheck_and_compile():
    h, weight, targets, ref_h = problem(n=6, d=3, vocab=7)
    torch.autograd.gradcheck(lambda a, b: ops.linear_cross_entropy(a, b, targets, block_elements=14)[0], (h, weight))
    # (with the KL term only in h: the reference distribution is a fixed target, though made with the same weight)
    frozen = weight.detach()
    torch.autograd.gradcheck(
        lambda a: ops.linear_cross_entropy(a, frozen, targets, ref_h=ref_h, kl_weight=0.5, block_elements=14)[0], (h,)
    )
    some_ignored = torch.where(torch.arange(6) == 2, -100, targets)
    torch.library.opcheck(torch.ops.taste.linear_cross_entropy.default,
                          (h, weight, some_ignored, ref_h, 0.5, -100, 2, True, True))  # fmt: skip
    compiled = torch.compile(lambda *a: ops.linear_cross_entropy(*a, ref_h=ref_h, kl_weight=0.5, block_elements=14),
                             fullgraph=True, backend="aot_eager")  # fmt: skip
    loss, _ = compiled(h, weight, targets)
    torch.testing.assert_close(loss, reference.linear_cross_entropy(h, weight, targets, ref_h, 0.5)[0])
    loss.backward()
    assert h.grad is not None and weight.grad is not None


def test_under_autocast_and_in_float32():
    h, weight, targets, ref_h = problem(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = reference.linear_cross_entropy(h.bfloat16(), weight.bfloat16(), targets, ref_h.bfloat16(), 0.9)
        got, _ = ops.linear_cross_entropy(h, weight, targets, ref_h=ref_h, kl_weight=0.9, block_elements=500)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1.6e-2)
    # the gradients too, the weight's made from 16-bit products added into its float32 sum
    for a, b in zip(torch.autograd.grad(got, (h, weight)), torch.autograd.grad(want, (h, weight))):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)
    got32, acc32 = ops.linear_cross_entropy(h, weight, targets, ref_h=ref_h, kl_weight=0.9, block_elements=500)
    want32, _ = reference.linear_cross_entropy(h, weight, targets, ref_h, 0.9)
    torch.testing.assert_close(got32, want32, atol=1e-5, rtol=1.3e-6)
    assert acc32.dtype == torch.float32


def test_blocks_hold_less_memory_than_the_whole_logits():
    """Loss and backward at N=256, V=8192 (8 MB of float32 logits): the formula keeps logits-sized tensors for its
    backward; the blocks keep the (N, d) and (V, d) gradients only."""
    h, weight, targets, ref_h = problem(n=256, d=32, vocab=8192, dtype=torch.float32)

    def step(fn):
        return lambda: torch.autograd.grad(fn()[0], (h, weight))

    whole = common.peak_mb(step(lambda: reference.linear_cross_entropy(h, weight, targets, ref_h, 0.9)), "cpu")
    blocked = common.peak_mb(step(lambda: ops.linear_cross_entropy(h, weight, targets, ref_h=ref_h, kl_weight=0.9,
                                                                   block_elements=1 << 16)), "cpu")  # fmt: skip
    assert whole > 20 and blocked < 0.25 * whole, (whole, blocked)


def test_bad_input():
    h, weight, targets, ref_h = problem()
    with pytest.raises(ValueError, match=r"h must be \(N, d\) and weight \(V, d\)"):
        ops.linear_cross_entropy(h, weight[:, :3], targets)
    with pytest.raises(ValueError, match=r"one dtype outside torch.autocast, got h torch.float64, weight \S+$"):
        ops.linear_cross_entropy(h, weight.float(), targets)  # before: the product's "expected m1 and m2 to have ..."
    with pytest.raises(ValueError, match=r"weight torch.float64, ref_h torch.float32"):
        ops.linear_cross_entropy(h, weight, targets, ref_h=ref_h.float(), kl_weight=0.5)
    with pytest.raises(ValueError, match=r"targets must be \(37,\) int64"):
        ops.linear_cross_entropy(h, weight, targets.int())
    with pytest.raises(ValueError, match=r"kl_weight must be in \[0, 1\], got 1.5"):
        ops.linear_cross_entropy(h, weight, targets, ref_h=ref_h, kl_weight=1.5)
    with pytest.raises(ValueError, match="kl_weight > 0 needs ref_h"):
        ops.linear_cross_entropy(h, weight, targets, kl_weight=0.5)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V=101\) or equal ignore_index=-100, got ids "
                       r"in \[0, 101\] besides"):  # fmt: skip
        ops.linear_cross_entropy(h, weight, torch.cat([targets[:-1], torch.tensor([101])]))
    with pytest.raises(ValueError, match=r"ignore_index=-1, got ids in \[-100, "):
        ops.linear_cross_entropy(h, weight, torch.cat([targets[:-1], torch.tensor([-100])]), ignore_index=-1)
