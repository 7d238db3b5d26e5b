"""When an eager call of one of taste's Python custom ops may run its implementation directly.

A ``torch.library.custom_op`` call passes through two layers of Python before its kernel runs: the autograd layer
(even with nothing to record) and the device kernel's wrapper, with an aliasing check of the outputs. Measured on
the CPU machine (``bench/host_overhead.py``, B=64): calling the implementations directly takes 130-145 us, 12%,
off the host time of one aggregator forward, whose CUDA calls were bound by the host on the H200. The direct call
runs the same function the op's kernel would, so it is taken only where the op's dispatch would add nothing:

- no gradient to record (grad mode off, or no input that requires it; no forward-mode dual level open);
- not traced: not inside ``torch.compile``, no functorch transform (vmap, grad), only plain tensors and
  parameters (no fake, meta-functional or other subclass tensors);
- no mode that intercepts operators (TorchDispatchMode, TorchFunctionMode: FakeTensorMode, FlopCounterMode,
  ``with torch.device(...)``);
- no profiler running, so that traces keep naming the op.

``TASTE_DIRECT_CALLS=0`` in the environment (read at import) always dispatches through the op.
"""

from __future__ import annotations

import os

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor, nn

ENABLED = os.environ.get("TASTE_DIRECT_CALLS", "1") != "0"
_PLAIN = (Tensor, nn.Parameter)


def profiling() -> bool:
    """Whether a profiler is running (then ops dispatch, so that traces name them). ``bench/host_overhead.py`` replaces
    it to count the operators that direct calls issue."""
    return torch._C._autograd._profiler_enabled()


def direct_call_ok(*tensors: Tensor | None) -> bool:
    """Whether an op called on ``tensors`` (None entries ignored) may skip its dispatch (see the module)."""
    if not ENABLED or torch.compiler.is_compiling() or profiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or (grad and t.requires_grad):
            return False
    return True


def on_cuda(t: Tensor) -> bool:
    """Which kernel a direct call runs: the op's CUDA kernel for a CUDA tensor, else its default kernel
    (``bench/host_overhead.py`` makes CPU tensors take the CUDA kernel)."""
    return t.is_cuda


def call(op, cuda_kernel, default_kernel, args: tuple, *tensors: Tensor | None):
    """``op(*args)``; or, where :func:`direct_call_ok` holds for ``tensors``, the kernel that the op would run for
    the device of ``tensors[0]``, called directly."""
    if direct_call_ok(*tensors):
        return (cuda_kernel if on_cuda(tensors[0]) else default_kernel)(*args)
    return op(*args)
