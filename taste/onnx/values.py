"""Host values (:class:`HostValue`): shapes and what exporters compute from them, kept as Python numbers."""

from __future__ import annotations

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------------------
# Host values: shapes, and what exporters compute from them, as Python numbers
# --------------------------------------------------------------------------------------------------------------

HOST_LIMIT = 64  # elements: a larger value made from shapes (a mask, a filled tensor) is made on the device


class HostValue:
    """A small value known on the host: a shape (``Shape``, ``Size``), a small constant, or what the graph computes
    from them (exporters build every reshape's target with ``Gather``, ``Concat``, ``Unsqueeze``, arithmetic...).
    Kept as Python numbers, such values never make a round trip through the device (no host sync per shape operator
    on a GPU; none of the device's per-operator cost on a CPU), and under ``torch.compile`` they are the traced
    (symbolic) sizes. ``values`` are flat, in row-major order; ``buffer`` is a constant's tensor."""

    __slots__ = ("values", "shape", "dtype", "buffer")

    def __init__(self, values, shape, dtype: torch.dtype, buffer: Tensor | None = None):
        self.values, self.shape, self.dtype, self.buffer = list(values), tuple(shape), dtype, buffer

    @classmethod
    def of(cls, t: Tensor, buffer: Tensor | None = None) -> HostValue:
        return cls(t.reshape(-1).tolist(), t.shape, t.dtype, buffer)

    def numel(self) -> int:
        return len(self.values)

    def tensor(self, device) -> Tensor:
        if self.buffer is not None:
            return self.buffer
        return torch.tensor(self.values, dtype=self.dtype, device=device).reshape(self.shape)

    def __repr__(self) -> str:
        return f"HostValue({self.values}, shape={self.shape}, dtype={self.dtype})"


class _NoHost(Exception):
    """A host operator that does not take these values: the torch operator then runs on CPU tensors."""
