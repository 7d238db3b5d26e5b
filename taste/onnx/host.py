"""The operators that compute on host values (:data:`HOST_OPERATORS`), in Python numbers, as torch would."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from taste.onnx.operators import (
    _axes,
    _axis,
    _constant_of_shape,
    _flattened,
    _ints_of,
    _range,
    _reshape_target,
    _shape_dims,
    _slice_index,
    _squeezed,
    _unsqueezed,
)
from taste.onnx.reader import _DTYPES
from taste.onnx.values import HOST_LIMIT, HostValue, _NoHost

_HOST_DTYPES = (torch.int64, torch.int32, torch.bool, torch.float32, torch.float64, torch.float16)
_ROUND = {torch.float32: np.float32, torch.float16: np.float16}
_OVERFLOW = {torch.float32: 2.0**128 * (1 - 2.0**-25), torch.float16: 65520.0}  # the largest value + half a step


def _typed(v, dtype: torch.dtype):
    """``v`` as a value of ``dtype``: floats rounded to its precision (Python computes in double; one rounding
    after each +, -, *, / or sqrt gives the single-precision result exactly)."""
    if dtype.is_floating_point:
        v = torch.sym_float(v)
        rnd = _ROUND.get(dtype)
        if rnd is None or type(v) is not float:
            return v
        if abs(v) >= _OVERFLOW[dtype]:  # rounds beyond the dtype's largest value: inf, as a cast
            return math.copysign(math.inf, v)
        return float(rnd(v))
    if dtype == torch.bool:
        return bool(v)
    if type(v) is float:  # a float converted to an integer type truncates toward zero (C's cast)
        if not math.isfinite(v):
            raise _NoHost
        return int(v)
    return v


def _broadcast(x: list[HostValue]) -> tuple[tuple[int, ...], list[list]]:
    """The broadcast shape of ``x`` and each one's values repeated to it."""
    shapes = [h.shape for h in x]
    if all(s == shapes[0] for s in shapes):
        return shapes[0], [h.values for h in x]
    rank = max(len(s) for s in shapes)
    shape = []
    for d in range(rank):  # numpy's rule: sizes equal, or 1
        sizes = {s[d - rank + len(s)] for s in shapes if d - rank + len(s) >= 0} - {1}
        if len(sizes) > 1:
            raise _NoHost  # (torch then names the mismatch)
        shape.append(sizes.pop() if sizes else 1)
    shape = tuple(shape)
    n = math.prod(shape)
    cols = []
    for h in x:
        full = (1,) * (len(shape) - len(h.shape)) + h.shape
        if full == shape:
            cols.append(h.values)
        elif h.numel() == 1:
            cols.append(h.values * n)
        else:
            strides, acc = [], 1
            for size in reversed(full):
                strides.append(acc if size != 1 else 0)
                acc *= size
            strides.reverse()
            index = [sum(i * s for i, s in zip(at, strides)) for at in itertools.product(*map(range, shape))]
            cols.append([h.values[i] for i in index])
    return shape, cols


def _trunc_div(p, q):
    if q == 0:
        raise _NoHost  # integer division by zero: the torch operator says what it says
    return p // q if (p >= 0) == (q > 0) else -((-p) // q)


def _fdiv(p, q):
    if q == 0:
        raise _NoHost  # inf or nan: left to torch
    return p / q


def _host_map(fn, out_dtype: torch.dtype | None = None, floats: bool | None = None):
    """An elementwise host operator (numpy broadcasting); ``floats`` picks the inputs' kind it takes."""

    def run(x, a, opset, device):
        if any(h is None for h in x):
            raise _NoHost
        dtype = x[0].dtype
        if floats is not None and dtype.is_floating_point != floats:
            raise _NoHost
        shape, cols = _broadcast(x)
        out = out_dtype or dtype
        return HostValue([_typed(fn(*vs), out) for vs in zip(*cols)], shape, out)

    return run


def _host_div(x, a, opset, device):
    return _host_map(_fdiv if x[0].dtype.is_floating_point else _trunc_div)(x, a, opset, device)


def _host_mod(x, a, opset, device):
    if x[0].dtype.is_floating_point or a.get("fmod", 0):
        return _host_map(lambda p, q: p - q * _trunc_div(p, q), floats=False)(x, a, opset, device)
    return _host_map(lambda p, q: p % q if q != 0 else _trunc_div(p, q))(x, a, opset, device)


def _host_sqrt(v):
    return math.sqrt(v) if v >= 0 else math.nan


def _host_pow(p, q):
    if p < 0 or (p == 0 and q < 0):
        raise _NoHost  # (complex or infinite results: left to torch)
    return p**q if type(p) is int and type(q) is int and q >= 0 else math.pow(p, q)


def _host_cast(x, a, opset, device):
    dtype = _DTYPES.get(a["to"], (None, None))[1]
    if dtype not in _HOST_DTYPES:
        raise _NoHost
    h = x[0]
    return HostValue([_typed(v, dtype) for v in h.values], h.shape, dtype)


def _host_shape(x, a, opset, device):
    dims = _shape_dims(x, a, opset, x[0].shape)
    return HostValue(dims, (len(dims),), torch.int64)


def _host_gather(x, a, opset, device):
    data, idx = x[0], x[1]
    if len(data.shape) != 1:
        raise _NoHost
    n = data.shape[0]
    return HostValue([data.values[i + n if i < 0 else i] for i in idx.values], idx.shape, data.dtype)


def _host_concat(x, a, opset, device):
    parts = [h for h in x if h is not None]
    if any(len(h.shape) != 1 for h in parts):
        raise _NoHost
    return HostValue([v for h in parts for v in h.values], (sum(h.shape[0] for h in parts),), parts[0].dtype)


def _host_reshaped(target):
    """The host form of ``_reshaped(target)``: the same values in another shape (checked: else torch says why)."""

    def run(x, a, opset, device):
        h = x[0]
        shape = list(target(x, a, opset, h.shape))
        if -1 in shape:
            known = math.prod([s for s in shape if s != -1])
            shape[shape.index(-1)] = h.numel() // known if known else 0
        if math.prod(shape) != h.numel():
            raise _NoHost
        return HostValue(h.values, shape, h.dtype)

    return run


def _host_slice(x, a, opset, device):
    h = x[0]
    if len(h.shape) != 1:
        raise _NoHost
    index, flips = _slice_index(x, a, opset, h.shape)
    values = h.values[index[0]]
    if flips:
        values.reverse()
    return HostValue(values, (len(values),), h.dtype)


def _host_constant_of_shape(x, a, opset, device):
    shape = _ints_of(x[0])
    if math.prod(shape) > HOST_LIMIT:
        return _constant_of_shape(x, a, opset, device)
    fill, dtype = a["_fill"]
    return HostValue([fill] * math.prod(shape), shape, dtype)


def _host_reduce(fn, since: int = 18):
    """A reduction over a vector of integers (float sums are left to torch, which rounds as it goes)."""

    def run(x, a, opset, device):
        h = x[0]
        axes = _axes(x, a, opset, since)
        if h.dtype.is_floating_point or len(h.shape) != 1 or not h.values:
            raise _NoHost
        if axes and [_axis(d, 1) for d in axes] != [0]:
            raise _NoHost
        keep = bool(a.get("keepdims", 1))
        return HostValue([_typed(fn(h.values), h.dtype)], (1,) if keep else (), h.dtype)

    return run


def _host_variadic(fn, floats: bool | None = None):
    def run(x, a, opset, device):
        out = x[0]
        for h in x[1:]:
            out = _host_map(fn, floats=floats)([out, h], a, opset, device)
        return out

    return run


# The operators that run on host values. Each takes (inputs, attrs, opset, device); a value from shapes that grows
# past HOST_LIMIT elements (ConstantOfShape, Range) is made on ``device``.
HOST_OPERATORS = {
    "Abs": _host_map(abs),
    "Add": _host_map(lambda p, q: p + q),
    "And": _host_map(lambda p, q: p and q, torch.bool),
    "Cast": _host_cast,
    "Ceil": _host_map(lambda v: float(math.ceil(v)), floats=True),
    "Concat": _host_concat,
    "ConstantOfShape": _host_constant_of_shape,
    "Div": _host_div,
    "Equal": _host_map(lambda p, q: p == q, torch.bool),
    "Flatten": _host_reshaped(_flattened),
    "Floor": _host_map(lambda v: float(math.floor(v)), floats=True),
    "Gather": _host_gather,
    "Greater": _host_map(lambda p, q: p > q, torch.bool),
    "GreaterOrEqual": _host_map(lambda p, q: p >= q, torch.bool),
    "Identity": lambda x, a, opset, device: x[0],
    "Less": _host_map(lambda p, q: p < q, torch.bool),
    "LessOrEqual": _host_map(lambda p, q: p <= q, torch.bool),
    "Max": _host_variadic(max, floats=False),  # (torch's NaN rules for floats)
    "Min": _host_variadic(min, floats=False),
    "Mod": _host_mod,
    "Mul": _host_map(lambda p, q: p * q),
    "Neg": _host_map(lambda v: -v),
    "Not": _host_map(lambda v: not v, torch.bool),
    "Or": _host_map(lambda p, q: p or q, torch.bool),
    "Pow": _host_map(_host_pow),  # (in the base's dtype, as ONNX)
    "Range": _range,  # (a tensor on the device: masks over time are long)
    "ReduceMax": _host_reduce(max),
    "ReduceMin": _host_reduce(min),
    "ReduceProd": _host_reduce(math.prod),
    "ReduceSum": _host_reduce(sum, since=13),
    "Reshape": _host_reshaped(_reshape_target),
    "Shape": _host_shape,
    "Size": lambda x, a, opset, device: HostValue([x[0].numel()], (), torch.int64),
    "Slice": _host_slice,
    "Sqrt": _host_map(_host_sqrt, floats=True),
    "Squeeze": _host_reshaped(_squeezed),
    "Sub": _host_map(lambda p, q: p - q),
    "Sum": _host_variadic(lambda p, q: p + q),
    "Unsqueeze": _host_reshaped(_unsqueezed),
    "Where": lambda x, a, opset, device: _host_map(lambda c, p, q: p if c else q, x[1].dtype)(x, a, opset, device),
    "Xor": _host_map(lambda p, q: p != q, torch.bool),
}
