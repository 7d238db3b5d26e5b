"""``taste.ops.linear_cross_entropy``: TASLM's text loss (spec 2.6) from the last hidden states, through the output
layer, a block of rows at a time, without the ``(N, V)`` logits of the whole batch.

With Llama-3's 128,256-token vocabulary the logits dwarf everything else a TASLM training step holds: the unfused
loss keeps the float32 logits, their log-softmax for the cross-entropy's backward and, with the KL term of the
official recipe, the reference model's log-probabilities and the model's again (``bench/RESULTS.md``). Here each
block of rows makes its logits, its share of the loss and accuracy and, when gradients are wanted, its gradients
with respect to the hidden states and the output weight, all in the forward (the loss is a scalar: the backward only
scales them), then frees the block. Plain PyTorch on every device; a ``torch.library.custom_op`` for
``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taste import reference
from taste.ops_attention import _autocast

BLOCK_ELEMENTS = 1 << 24  # elements of one block's (rows, V) float32 logits: 64 MB, 130 rows of Llama-3's vocabulary


def _block(h, weight, targets, ref_h, kl_weight: float, ignore_index: int, lo: int, hi: int):
    """Rows ``lo:hi``: their summed loss terms, correct count and the loss's gradient w.r.t. their logits (not yet
    divided by the number of counted rows). Rows whose target is ``ignore_index`` add nothing and get no gradient."""
    logits = (h[lo:hi] @ weight.T).to(reference._acc_dtype(h.dtype))  # (rows, V)
    t = targets[lo:hi]
    keep = t != ignore_index
    target = torch.where(keep, t, 0)[:, None]  # (an ignored row gathers column 0, weighted by 0 below)
    weight_row = keep[:, None].to(logits.dtype)  # (rows, 1): 1 counted, 0 ignored
    correct = (logits.argmax(-1) == t).logical_and_(keep).sum()
    shifted = logits.sub_(logits.amax(-1, keepdim=True))  # (in place; the log-sum-exp by hand saves two passes)
    target_shifted = shifted.gather(1, target)
    grad = shifted.exp() if kl_weight > 0 else shifted.exp_()  # (the KL needs the shifted logits after this)
    sums = grad.sum(-1, keepdim=True)
    total = (1.0 - kl_weight) * ((sums.log() - target_shifted) * weight_row).sum()
    grad.mul_(weight_row / sums)  # softmax; ignored rows 0
    if kl_weight > 0:  # KL(ref || p) = sum ref_p (ref_logp - logp), logp = shifted - log(sums)
        ref_logp = (ref_h[lo:hi] @ weight.T).to(logits.dtype).log_softmax(-1)
        ref_p = ref_logp.exp()
        total = total + kl_weight * ((ref_p * ref_logp.sub_(shifted).add_(sums.log())).sum(-1) * weight_row[:, 0]).sum()
        grad.addcmul_(ref_p, weight_row, value=-kl_weight)
    grad.scatter_add_(1, target, weight_row * -(1.0 - kl_weight))
    return total, correct, grad


def _forward(h: Tensor, weight: Tensor, targets: Tensor, ref_h: Tensor | None, kl_weight: float, ignore_index: int,
             block_rows: int, grad_h: bool, grad_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    n = h.shape[0]
    acc = reference._acc_dtype(h.dtype)
    count = (targets != ignore_index).sum().to(acc)  # the rows counted (a device scalar: no host sync)
    scale = 1.0 / count.clamp(min=1)  # (no row counted: the loss is 0 / 0 = NaN and the gradients 0, as PyTorch's)
    total = torch.zeros((), dtype=acc, device=h.device)
    correct = torch.zeros((), dtype=torch.long, device=h.device)
    dh = torch.empty_like(h) if grad_h else h.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grad_weight else weight.new_empty(0)
    for lo in range(0, n, block_rows):
        hi = min(lo + block_rows, n)
        part, right, grad = _block(h, weight, targets, ref_h, kl_weight, ignore_index, lo, hi)
        total += part.to(acc)
        correct += right
        if grad_h:
            dh[lo:hi] = (grad.to(weight.dtype) @ weight * scale).to(h.dtype)
        if grad_weight:
            if h.dtype == acc:  # into dw in place: no (V, d) product and quotient per block
                dw.addmm_(grad.T, h[lo:hi])
            else:  # 16-bit rows: the product at their precision (as the unfused loss's backward), added widened
                dw.add_(grad.T.to(h.dtype) @ h[lo:hi])
    if grad_weight:
        dw.mul_(scale)  # (once, here: a block's alpha would have to be a host number)
    return total / count, correct.to(acc) / count, dh, dw.to(weight.dtype)


_op = torch.library.custom_op("taste::linear_cross_entropy", mutates_args=())(_forward)


@_op.register_fake
def _fake(h, weight, targets, ref_h, kl_weight, ignore_index, block_rows, grad_h, grad_weight):
    acc = reference._acc_dtype(h.dtype)
    scalar = h.new_empty((), dtype=acc)
    dh = torch.empty_like(h) if grad_h else h.new_empty(0)
    return scalar, scalar.clone(), dh, weight.new_empty(weight.shape if grad_weight else (0,))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3])
    ctx.grad_h, ctx.grad_weight = inputs[7], inputs[8]


def _backward(ctx, grad_loss, _grad_acc, _grad_dh, _grad_dw):
    dh, dw = ctx.saved_tensors
    grad_h = dh * grad_loss.to(dh.dtype) if ctx.grad_h else None
    grad_weight = dw * grad_loss.to(dw.dtype) if ctx.grad_weight else None
    return grad_h, grad_weight, None, None, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ref_h: Tensor | None = None,
    kl_weight: float = 0.0,
    ignore_index: int = -100,
    block_elements: int = BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """``(1 - kl_weight) * CE(h W^T, targets) + kl_weight * KL(softmax(ref_h W^T) || softmax(h W^T))``, both averaged
    over the rows, and the top-1 accuracy, without the ``(N, V)`` logits of all rows at once. Rows whose target is
    ``ignore_index`` count nowhere (as ``F.cross_entropy``'s ``ignore_index``; with none counted the loss is NaN and
    the gradients 0, as there).

    Args:
        h: ``(N, d)`` hidden states whose logits predict ``targets``.
        weight: ``(V, d)`` the output layer (bias-free, as Llama's ``lm_head``).
        targets: ``(N,)`` int64 ids in ``[0, V)``, or ``ignore_index``.
        ref_h: ``(N, d)`` the reference model's states at the same rows (the KL term), needed when ``kl_weight > 0``.
        kl_weight: in ``[0, 1]``.
        ignore_index: the target of rows to leave out (padding, prompt rows), -100 as in PyTorch and transformers.
        block_elements: about how many logits one block of rows holds (``rows x V``), float32. With a trainable
            ``weight`` a block has at least ``d`` rows: each block adds into the ``(V, d)`` weight gradient, and
            smaller blocks would spend their time reading and writing it (on 2 CPU cores, 130 rows of Llama-3's
            vocabulary at d 512 took 1.23x the unfused loss's time, 480 rows 1.02x).

    Returns:
        ``(loss, accuracy)`` scalars in float32 (float64 for float64 states). Differentiable in ``h`` and
        ``weight``: their gradients are made in the forward, block by block, when grad mode is on and either needs
        one (kept until the backward: ``(N, d)`` and, for a trainable weight, ``(V, d)``). Under ``torch.autocast``
        the products run in its dtype, the softmax in float32.
    """
    cast = _autocast(h.device, h, weight, ref_h)
    if cast is not None:
        h, weight, ref_h = cast
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or not h.is_floating_point():
        raise ValueError(f"h must be (N, d) and weight (V, d) floating point, got h {h.dtype} {tuple(h.shape)}, "
                         f"weight {weight.dtype} {tuple(weight.shape)}")  # fmt: skip
    if weight.dtype != h.dtype or (ref_h is not None and ref_h.dtype != h.dtype):
        other = "" if ref_h is None else f", ref_h {ref_h.dtype}"
        raise ValueError(f"h, weight and ref_h must have one dtype outside torch.autocast, got h {h.dtype}, weight "
                         f"{weight.dtype}{other}")  # fmt: skip
    if targets.shape != h.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"targets must be ({h.shape[0]},) int64, got {targets.dtype} {tuple(targets.shape)}")
    if not 0.0 <= kl_weight <= 1.0:
        raise ValueError(f"kl_weight must be in [0, 1], got {kl_weight}")
    if kl_weight > 0 and (ref_h is None or ref_h.shape != h.shape):
        shape = None if ref_h is None else tuple(ref_h.shape)
        raise ValueError(f"kl_weight > 0 needs ref_h of h's shape {tuple(h.shape)}, got {shape}")
    if block_elements < 1:
        raise ValueError(f"block_elements must be >= 1, got {block_elements}")
    if targets.device.type == "cpu" and targets.numel() and not torch.compiler.is_compiling():
        counted = targets[targets != ignore_index]
        if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= weight.shape[0]):
            raise ValueError(f"targets must lie in [0, V={weight.shape[0]}) or equal ignore_index={ignore_index}, "
                             f"got ids in [{int(counted.min())}, {int(counted.max())}] besides")  # fmt: skip
    want = torch.is_grad_enabled()
    grad_h, grad_weight = want and h.requires_grad, want and weight.requires_grad
    rows = max(1, block_elements // max(1, weight.shape[0]))
    if grad_weight:  # every block adds its rows' product into the whole (V, d) gradient, a pass over it each time:
        rows = max(rows, weight.shape[1])  # at least d rows, so the block's logits are no larger than that gradient
    loss, accuracy, _, _ = _op(h.contiguous(), weight, targets, ref_h if kl_weight > 0 else None, float(kl_weight),
                               int(ignore_index), rows, grad_h, grad_weight)  # fmt: skip
    return loss, accuracy.detach()
