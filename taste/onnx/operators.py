"""The ONNX operators as torch calls (:data:`OPERATORS`), device tensors in, device tensors out."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor

from taste.onnx.reader import _DTYPES
from taste.onnx.values import HostValue

# --------------------------------------------------------------------------------------------------------------
# Operators: fn(inputs (list of Tensor | None; a HostValue where they read numbers, see _NUMBER_INPUTS, or a
# Python number, see _SCALAR_INPUTS), attrs (dict), opset (int)) -> Tensor or tuple of Tensors
# --------------------------------------------------------------------------------------------------------------


def _ints_of(t) -> list[int] | None:
    """A shape-like input's integers (a :class:`HostValue`'s are read without touching a device)."""
    if t is None:
        return None
    if isinstance(t, HostValue):
        return list(t.values) if not t.dtype.is_floating_point else [int(v) for v in t.values]
    return [int(v) for v in t.reshape(-1).tolist()]


def _scalar(t):
    """A one-element input's Python number."""
    return t.values[0] if isinstance(t, HostValue) else t.item()


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes(x, attrs, opset, since: int):
    """Axes from the attribute (before opset ``since``) or the second input."""
    if opset >= since and len(x) > 1:
        return _ints_of(x[1])
    return attrs.get("axes")


def _conv(x, a, opset):
    inp, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    n = w.dim() - 2
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ValueError(f"Conv auto_pad={a['auto_pad']!r} is not supported")
    strides, dil = a.get("strides", [1] * n), a.get("dilations", [1] * n)
    pads = a.get("pads", [0] * (2 * n))
    begin, end = pads[:n], pads[n:]
    if begin != end:  # asymmetric: pad explicitly
        inp = F.pad(inp, [p for i in reversed(range(n)) for p in (begin[i], end[i])])
        begin = [0] * n
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return fn(inp, w, b, strides, begin, dil, a.get("group", 1))


def _conv_transpose(x, a, opset):
    inp, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    n = w.dim() - 2
    if "output_shape" in a or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ValueError("ConvTranspose with output_shape or auto_pad is not supported")
    strides, dil = a.get("strides", [1] * n), a.get("dilations", [1] * n)
    pads = a.get("pads", [0] * (2 * n))
    if pads[:n] != pads[n:]:
        raise ValueError(f"ConvTranspose with asymmetric pads {pads} is not supported")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    return fn(inp, w, b, strides, pads[:n], a.get("output_padding", [0] * n), a.get("group", 1), dil)


def _pool(kind):
    def run(x, a, opset):
        inp = x[0]
        k = a["kernel_shape"]
        n = len(k)
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise ValueError(f"{kind}Pool auto_pad={a['auto_pad']!r} is not supported")
        strides = a.get("strides", [1] * n)
        pads = a.get("pads", [0] * (2 * n))
        ceil = bool(a.get("ceil_mode", 0))
        if pads[:n] != pads[n:]:
            raise ValueError(f"{kind}Pool with asymmetric pads {pads} is not supported")
        if kind == "Max":
            if a.get("dilations", [1] * n) != [1] * n and n > 3:
                raise ValueError("MaxPool dilations beyond 3-D are not supported")
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
            return fn(inp, k, strides, pads[:n], a.get("dilations", [1] * n), ceil)
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        return fn(inp, k, strides, pads[:n], ceil, bool(a.get("count_include_pad", 0)))

    return run


def _batch_norm(x, a, opset):
    inp, scale, bias, mean, var = x[:5]
    return F.batch_norm(inp, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))


def _instance_norm(x, a, opset):
    return F.instance_norm(x[0], weight=x[1], bias=x[2], eps=a.get("epsilon", 1e-5))


def _layer_norm(x, a, opset):
    inp = x[0]
    axis = _axis(a.get("axis", -1), inp.dim())
    shape = inp.shape[axis:]
    return F.layer_norm(inp, shape, x[1] if len(x) > 1 else None, x[2] if len(x) > 2 else None, a.get("epsilon", 1e-5))


def _gemm(x, a, opset):
    A, B = x[0], x[1]
    if a.get("transA", 0):
        A = A.t()
    if a.get("transB", 0):
        B = B.t()
    y = a.get("alpha", 1.0) * (A @ B)
    if len(x) > 2 and x[2] is not None:
        y = y + a.get("beta", 1.0) * x[2]
    return y


def _softmax(fn):
    def run(x, a, opset):
        inp = x[0]
        axis = _axis(a.get("axis", -1 if opset >= 13 else 1), inp.dim())
        if opset >= 13:
            return fn(inp, dim=axis)
        flat = inp.reshape(math.prod(inp.shape[:axis]), -1)  # opsets < 13 coerce to 2-D at `axis`
        return fn(flat, dim=1).reshape(inp.shape)

    return run


def _reduce(fn, since: int = 18):
    def run(x, a, opset):
        inp = x[0]
        axes = _axes(x, a, opset, since)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return inp
            axes = list(range(inp.dim()))
        return fn(inp, [_axis(d, inp.dim()) for d in axes], keep)

    return run


def _arg(fn):
    def run(x, a, opset):
        inp = x[0]
        axis, keep = _axis(a.get("axis", 0), x[0].dim()), bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):
            flipped = fn(inp.flip(axis), dim=axis, keepdim=keep)
            return inp.shape[axis] - 1 - flipped
        return fn(inp, dim=axis, keepdim=keep)

    return run


# The shape operators' targets, from their input's shape (for tensors and host values alike)


def _reshape_target(x, a, opset, shape) -> list:
    """Reshape's target with its zeros (copy that dim, unless ``allowzero``) resolved; -1 left as it is."""
    target = _ints_of(x[1]) if opset >= 5 else list(a["shape"])
    if not a.get("allowzero", 0):
        target = [shape[i] if s == 0 else s for i, s in enumerate(target)]
    return target


def _flattened(x, a, opset, shape) -> tuple:
    axis = _axis(a.get("axis", 1), len(shape))
    return math.prod(shape[:axis]), math.prod(shape[axis:])


def _squeezed(x, a, opset, shape) -> list:
    axes = _axes(x, a, opset, 13)
    drop = {i for i, s in enumerate(shape) if s == 1} if axes is None else {_axis(d, len(shape)) for d in axes}
    return [s for i, s in enumerate(shape) if i not in drop]


def _unsqueezed(x, a, opset, shape) -> list:
    axes = _axes(x, a, opset, 13)
    out = list(shape)
    for d in sorted(_axis(d, len(shape) + len(axes)) for d in axes):
        out.insert(d, 1)
    return out


def _shape_dims(x, a, opset, shape) -> list:
    """Shape's output: the dims from ``start`` to ``end`` (opset 15; clamped as the operator says)."""
    rank = len(shape)
    start, end = a.get("start", 0), a.get("end", rank)
    start = max(0, min(rank, start + rank if start < 0 else start))
    end = max(0, min(rank, end + rank if end < 0 else end))
    return list(shape)[start:end]


def _reshaped(target):
    """The operator that reshapes its first input to ``target(x, a, opset, shape)``."""
    return lambda x, a, opset: x[0].reshape(target(x, a, opset, x[0].shape))


def _slice_index(x, a, opset, shape) -> tuple[tuple[slice, ...], list[int]]:
    """Slice's inputs as Python slices with positive steps over ``shape``, and the dims to flip after them."""
    if opset >= 10:
        starts, ends = _ints_of(x[1]), _ints_of(x[2])
        axes = _ints_of(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints_of(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    else:
        starts, ends = a["starts"], a["ends"]
        axes, steps = a.get("axes", list(range(len(starts)))), [1] * len(starts)
    index = [slice(None)] * len(shape)
    flips = []
    for s, e, d, st in zip(starts, ends, axes, steps):
        d = _axis(d, len(shape))
        size = shape[d]
        if st > 0:
            s = max(0, min(size, s + size if s < 0 else s))
            e = max(0, min(size, e + size if e < 0 else e))
            index[d] = slice(s, max(s, e), st)
        else:  # a negative step: take the reversed range, then flip
            s = max(-1, min(size - 1, s + size if s < 0 else s))
            e = max(-1, min(size - 1, e + size if e < 0 else e))
            lo = e + 1
            count = max(0, (s - lo) // -st + 1) if s >= lo else 0
            index[d] = slice(s - (count - 1) * -st, s + 1, -st) if count else slice(0, 0)
            flips.append(d)
    return tuple(index), flips


def _slice(x, a, opset):
    index, flips = _slice_index(x, a, opset, x[0].shape)
    out = x[0][index]
    return out.flip(flips) if flips else out


def _gather(x, a, opset):
    data, idx = x[0], x[1]
    axis = _axis(a.get("axis", 0), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx).long()
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))


def _gather_elements(x, a, opset):
    data, idx = x[0], x[1]
    axis = _axis(a.get("axis", 0), data.dim())
    return torch.gather(data, axis, torch.where(idx < 0, idx + data.shape[axis], idx).long())


def _concat(x, a, opset):
    parts = [t for t in x if t is not None]
    return torch.cat(parts, dim=_axis(a["axis"], parts[0].dim()))


def _split(x, a, opset):
    inp = x[0]
    axis = _axis(a.get("axis", 0), inp.dim())
    sizes = _ints_of(x[1]) if opset >= 13 and len(x) > 1 and x[1] is not None else a.get("split")
    if sizes is None:
        n = a.get("num_outputs", a.get("_outputs"))
        size = -(-inp.shape[axis] // n)
        sizes = [min(size, inp.shape[axis] - i * size) for i in range(n)]
    return tuple(torch.split(inp, sizes, dim=axis))


def _expand(x, a, opset):
    inp, shape = x[0], _ints_of(x[1])
    rank = max(inp.dim(), len(shape))
    shape = [1] * (rank - len(shape)) + shape
    have = [1] * (rank - inp.dim()) + list(inp.shape)
    target = [h if s == 1 else s for s, h in zip(shape, have)]
    return inp.reshape(have).expand(target)


def _pad(x, a, opset):
    inp = x[0]
    if opset >= 11:
        pads = _ints_of(x[1])
        value = _scalar(x[2]) if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
        axes = _ints_of(x[3]) if len(x) > 3 and x[3] is not None else list(range(inp.dim()))
    else:
        pads, value, axes = a["pads"], a.get("value", 0.0), list(range(inp.dim()))
    n = len(axes)
    full = [0] * (2 * inp.dim())
    for i, d in enumerate(axes):
        d = _axis(d, inp.dim())
        full[d], full[inp.dim() + d] = pads[i], pads[n + i]
    torch_pads = []
    for d in reversed(range(inp.dim())):
        torch_pads += [full[d], full[inp.dim() + d]]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:  # drop leading unpadded dims (torch pads from the last)
        torch_pads = torch_pads[:-2]
    mode = a.get("mode", "constant")
    if mode == "constant":
        return F.pad(inp, torch_pads, value=value)
    mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    lead = inp.dim() - len(torch_pads) // 2  # torch's non-constant pads need a batch and channel dim in front
    shaped = inp.reshape(1, -1, *inp.shape[lead:]) if lead < 2 else inp.reshape(-1, *inp.shape[lead - 1 :])
    out = F.pad(shaped, torch_pads, mode=mode)
    return out.reshape((*inp.shape[:lead], *out.shape[-(inp.dim() - lead) :]))


def _range(x, a, opset, device=None):
    """``device``: where to make it when no input is a tensor (all three host values)."""
    start, limit, delta = x[0], x[1], x[2]
    for t in x[:3]:  # (a loop, not next() over a generator: torch 2.8's dynamo takes no default there)
        if isinstance(t, Tensor):
            device = t.device
            break
    return torch.arange(_scalar(start), _scalar(limit), _scalar(delta), dtype=start.dtype, device=device)


def _constant_of_shape(x, a, opset, device=None):
    fill, dtype = a["_fill"]  # (OnnxGraph reads the value attribute once)
    return torch.full(_ints_of(x[0]), fill, dtype=dtype, device=x[0].device if device is None else device)


def _constant(x, a, opset):
    if "value" in a:
        return a["value"]
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    raise ValueError(f"Constant with attributes {sorted(a)} is not supported")


def _cast(x, a, opset):
    dtype = _DTYPES.get(a["to"])
    if dtype is None:
        raise ValueError(f"Cast to ONNX data type {a['to']} is not supported")
    return x[0].to(dtype[1])


def _clip(x, a, opset):
    lo = x[1] if opset >= 11 and len(x) > 1 else a.get("min")
    hi = x[2] if opset >= 11 and len(x) > 2 else a.get("max")
    out = x[0]
    if lo is not None:
        out = torch.maximum(out, torch.as_tensor(lo, dtype=out.dtype, device=out.device))
    if hi is not None:
        out = torch.minimum(out, torch.as_tensor(hi, dtype=out.dtype, device=out.device))
    return out


def _variadic(fn):
    def run(x, a, opset):
        out = x[0]
        for t in x[1:]:
            out = fn(out, t)
        return out

    return run


def _div(x, a, opset):
    p, q = x[0], x[1]
    if p.is_floating_point() if isinstance(p, Tensor) else isinstance(p, float):
        return p / q
    if not isinstance(p, Tensor):  # (a host number over a tensor)
        p = torch.tensor(p, dtype=q.dtype, device=q.device)
    return torch.div(p, q, rounding_mode="trunc")  # integer Div truncates, as C


def _mod(x, a, opset):
    if a.get("fmod", 0) or x[0].is_floating_point():
        return torch.fmod(x[0], x[1])
    return torch.remainder(x[0], x[1])


def _tile(x, a, opset):
    return x[0].repeat(_ints_of(x[1]))


def _transpose(x, a, opset):
    perm = a.get("perm") or list(reversed(range(x[0].dim())))
    return x[0].permute(perm)


def _matmul(x, a, opset):
    return torch.matmul(x[0], x[1])


def _where(x, a, opset):
    return torch.where(x[0], x[1], x[2])


def _prelu(x, a, opset):
    slope = x[1]
    return torch.where(x[0] >= 0, x[0], x[0] * slope)


def _gelu(x, a, opset):
    return F.gelu(x[0], approximate=a.get("approximate", "none"))


def _hard_sigmoid(x, a, opset):
    return (a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5)).clamp(0, 1)


def _cumsum(x, a, opset):
    inp, axis = x[0], _axis(int(_scalar(x[1])), x[0].dim())
    if a.get("reverse", 0):
        inp = inp.flip(axis)
    out = inp.cumsum(axis)
    if a.get("exclusive", 0):
        out = out - inp
    return out.flip(axis) if a.get("reverse", 0) else out


def _topk(x, a, opset):
    k = int(_scalar(x[1])) if opset >= 10 else a["k"]
    values, indices = torch.topk(x[0], k, dim=a.get("axis", -1), largest=bool(a.get("largest", 1)),
                                 sorted=bool(a.get("sorted", 1)))  # fmt: skip
    return values, indices


def _einsum(x, a, opset):
    return torch.einsum(a["equation"], *x)


def _unary(fn):
    return lambda x, a, opset: fn(x[0])


def _binary(fn):
    return lambda x, a, opset: fn(x[0], x[1])


def _scalar_attr(fn, key, default):
    return lambda x, a, opset: fn(x[0], a.get(key, default))


OPERATORS = {
    # elementwise
    "Abs": _unary(torch.abs),
    "Add": _binary(operator.add),  # (the operators, not torch.add: either side may be a host number)
    "And": _binary(torch.logical_and),
    "Ceil": _unary(torch.ceil),
    "Cos": _unary(torch.cos),
    "Div": _div,
    "Dropout": lambda x, a, opset: x[0],
    "Elu": _scalar_attr(lambda t, alpha: F.elu(t, alpha), "alpha", 1.0),
    "Equal": _binary(operator.eq),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Floor": _unary(torch.floor),
    "Gelu": _gelu,
    "Greater": _binary(operator.gt),
    "GreaterOrEqual": _binary(operator.ge),
    "HardSigmoid": _hard_sigmoid,
    "Identity": lambda x, a, opset: x[0],
    "IsNaN": _unary(torch.isnan),
    "LeakyRelu": _scalar_attr(F.leaky_relu, "alpha", 0.01),
    "Less": _binary(operator.lt),
    "LessOrEqual": _binary(operator.le),
    "Log": _unary(torch.log),
    "Max": _variadic(torch.maximum),
    "Mean": lambda x, a, opset: _variadic(torch.add)(x, a, opset) / len(x),
    "Min": _variadic(torch.minimum),
    "Mod": _mod,
    "Mul": _binary(operator.mul),
    "Neg": _unary(torch.neg),
    "Not": _unary(torch.logical_not),
    "Or": _binary(torch.logical_or),
    "Pow": _binary(lambda b, e: torch.pow(b, e).to(b.dtype) if isinstance(b, Tensor) else torch.pow(b, e)),
    "PRelu": _prelu,
    "Reciprocal": _unary(torch.reciprocal),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Sign": _unary(torch.sign),
    "Sin": _unary(torch.sin),
    "Softplus": _unary(F.softplus),
    "Sqrt": _unary(torch.sqrt),
    "Sub": _binary(operator.sub),
    "Sum": _variadic(torch.add),
    "Tanh": _unary(torch.tanh),
    "Where": _where,
    "Xor": _binary(torch.logical_xor),
    "Clip": _clip,
    "Cast": _cast,
    # neural network
    "AveragePool": _pool("Average"),
    "BatchNormalization": _batch_norm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Einsum": _einsum,
    "Gemm": _gemm,
    "GlobalAveragePool": lambda x, a, opset: x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda x, a, opset: x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True),
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
    "LogSoftmax": _softmax(torch.log_softmax),
    "MatMul": _matmul,
    "MaxPool": _pool("Max"),
    "Softmax": _softmax(torch.softmax),
    # reductions (axes an input from opset 18; ReduceSum from 13)
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
    "CumSum": _cumsum,
    "ReduceL2": _reduce(lambda t, d, k: torch.linalg.vector_norm(t, 2, dim=d, keepdim=k)),
    "ReduceMax": _reduce(lambda t, d, k: torch.amax(t, dim=d, keepdim=k)),
    "ReduceMean": _reduce(lambda t, d, k: torch.mean(t, dim=d, keepdim=k)),
    "ReduceMin": _reduce(lambda t, d, k: torch.amin(t, dim=d, keepdim=k)),
    "ReduceProd": _reduce(lambda t, d, k: _prod(t, d, k)),
    "ReduceSum": _reduce(lambda t, d, k: torch.sum(t, dim=d, keepdim=k), since=13),
    "ReduceSumSquare": _reduce(lambda t, d, k: torch.sum(t * t, dim=d, keepdim=k)),
    "TopK": _topk,
    # shapes and indexing
    "Concat": _concat,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Flatten": _reshaped(_flattened),
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "Pad": _pad,
    "Range": _range,
    "Reshape": _reshaped(_reshape_target),
    "Shape": lambda x, a, opset: torch.tensor(
        _shape_dims(x, a, opset, x[0].shape), dtype=torch.int64, device=x[0].device
    ),
    "Size": lambda x, a, opset: torch.tensor(x[0].numel(), dtype=torch.int64, device=x[0].device),
    "Slice": _slice,
    "Split": _split,
    "Squeeze": _reshaped(_squeezed),
    "Tile": _tile,
    "Transpose": _transpose,
    "Unsqueeze": _reshaped(_unsqueezed),
}


def _prod(t: Tensor, dims: list[int], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        t = torch.prod(t, dim=d, keepdim=keep)
    return t
