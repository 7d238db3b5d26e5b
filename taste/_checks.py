"""Argument checks the modules share, worded in their callers' terms."""

from __future__ import annotations

from torch import Tensor


def check_id_range(ids: Tensor, size: int, name: str, size_name: str = "vocab_size") -> None:
    """Raises unless every id lies in ``[0, size)`` (what an embedding reports as "index out of range in self").

    Reads the values back: call it on CPU tensors and outside ``torch.compile`` only. Floating-point ids are left to
    the dtype checks of whatever takes them.
    """
    if ids.numel() and not ids.is_floating_point() and not ids.is_complex():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= size:
            raise ValueError(f"{name} must lie in [0, {size_name}={size}), got ids in [{lo}, {hi}]")
