"""ONNX models run by PyTorch, with no onnx or onnxruntime package: a reader of the ONNX protobuf file and a module
that evaluates its graph node by node with torch operators.

The official release ships two CosyVoice front-end models only as ONNX files (``cosyvoice/speaker_embed.onnx``, the
CAM++ speaker encoder, and ``cosyvoice/speech_tokenizer_v1.onnx``). torch's TorchScript exporter, which such files
come from, folds batch norms into the convolutions and names their weights ``onnx::Conv_<n>`` (the public S3Tokenizer
converter maps such names by hand), so the weights cannot be mapped onto a PyTorch module by name; running the graph
itself is what reproduces the model. :class:`OnnxGraph` holds the initialisers as buffers
(``.to(device)`` moves them) and computes in the initialisers' dtypes, on any device.

The graph runs node by node. Exporters build every reshape's target from ``Shape`` with ``Gather``, ``Concat``,
``Unsqueeze`` and arithmetic (in CAM++'s file, about half of the nodes); here those values stay Python numbers
(:class:`HostValue`: shapes, small constants and what host operators make of them), so a graph on a GPU never
copies a shape to the device and back (no host sync), and ``torch.compile(graph, fullgraph=True)`` traces the whole
graph, its shapes as traced integers (each new input length compiles again).

Supported: the standard domain's operators in :data:`OPERATORS` (convolutions, pools, norms, matrix products,
elementwise arithmetic, reductions, and the shape operators that exporters emit), in the signatures of the opsets
before and after their inputs changed (tests cover opsets 6 to 20). An operator outside that list, a sub-graph
(``If``, ``Loop``) or external data raises a ``ValueError`` that names it.
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# TensorProto.DataType -> (numpy dtype of raw_data, torch dtype)
_DTYPES = {
    1: (np.float32, torch.float32),
    2: (np.uint8, torch.uint8),
    3: (np.int8, torch.int8),
    4: (np.uint16, torch.int32),
    5: (np.int16, torch.int16),
    6: (np.int32, torch.int32),
    7: (np.int64, torch.int64),
    9: (np.bool_, torch.bool),
    10: (np.float16, torch.float16),
    11: (np.float64, torch.float64),
    12: (np.uint32, torch.int64),
    13: (np.uint64, torch.int64),
    16: (np.uint16, torch.bfloat16),
}


# --------------------------------------------------------------------------------------------------------------
# The protobuf wire format (only what onnx.proto's ModelProto needs)
# --------------------------------------------------------------------------------------------------------------


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("not an ONNX file: a protobuf varint runs past the end")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("not an ONNX file: a protobuf varint is longer than 10 bytes")


def _fields(buf: memoryview):
    """(field number, wire type, value): an int for varints and fixed-width fields, a memoryview otherwise."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ValueError("not an ONNX file: a protobuf field runs past the end")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"not an ONNX file: protobuf wire type {wire} (field {number})")
        yield number, wire, value


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _ints(wire: int, value) -> list[int]:
    """A repeated int64 field's entries: one varint, or a packed run of them."""
    if wire == 0:
        return [_signed(value)]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(_signed(v))
    return out


def _floats(wire: int, value) -> list[float]:
    if wire == 5:
        return [struct.unpack("<f", value.to_bytes(4, "little"))[0]]
    return list(np.frombuffer(value, dtype="<f4").astype(float))


def _text(value) -> str:
    return bytes(value).decode("utf-8")


def _tensor(buf: memoryview) -> tuple[str, Tensor]:
    dims, dtype, name, raw, values, external = [], 1, "", None, [], False
    for number, wire, value in _fields(buf):
        if number == 1:
            dims += _ints(wire, value)
        elif number == 2:
            dtype = value
        elif number == 8:
            name = _text(value)
        elif number == 9:
            raw = value
        elif number in (5, 7, 11):  # int32_data, int64_data, uint64_data: varints, packed or not
            values += _ints(wire, value)
        elif number == 4:  # float_data
            values += _floats(wire, value)
        elif number == 10:  # double_data
            if wire == 2:
                values += list(np.frombuffer(value, dtype="<f8"))
            else:
                values.append(struct.unpack("<d", value.to_bytes(8, "little"))[0])
        elif number == 13 or (number == 14 and value == 1):  # external_data, data_location EXTERNAL
            external = True
    if external:
        raise ValueError(f"ONNX tensor {name!r} keeps its data in an external file, which is not supported")
    if dtype not in _DTYPES:
        raise ValueError(f"ONNX tensor {name!r} has data type {dtype}, which is not supported")
    np_dtype, torch_dtype = _DTYPES[dtype]
    if raw is not None:
        array = np.frombuffer(raw, dtype=np.dtype(np_dtype).newbyteorder("<")).astype(np_dtype)
    elif dtype in (10, 16):  # float16 / bfloat16 bits stored in int32_data
        array = np.asarray(values, dtype=np.uint16).view(np_dtype)
    else:
        array = np.asarray(values, dtype=np_dtype)
    if dtype == 16:
        t = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    elif dtype in (4, 12, 13):  # unsigned types torch lacks: widened
        t = torch.from_numpy(array.astype(np.int64)).to(torch_dtype)
    else:
        t = torch.from_numpy(array).to(torch_dtype)
    count = math.prod(dims)
    if t.numel() != count:
        raise ValueError(f"ONNX tensor {name!r}: {t.numel()} values for dims {dims}")
    return name, t.reshape(dims)


@dataclass
class OnnxNode:
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    name: str = ""
    domain: str = ""


def _attribute(buf: memoryview):
    name, scalar, ints, floats, strings, kind = "", None, [], [], [], 0
    for number, wire, value in _fields(buf):
        if number == 1:
            name = _text(value)
        elif number == 2:
            scalar = struct.unpack("<f", value.to_bytes(4, "little"))[0]
        elif number == 3:
            scalar = _signed(value)
        elif number == 4:
            scalar = bytes(value).decode("utf-8", errors="replace")
        elif number == 5:
            scalar = _tensor(value)[1]
        elif number in (6, 11):
            raise ValueError(f"ONNX attribute {name!r} holds a sub-graph (If / Loop / Scan), which is not supported")
        elif number == 7:
            floats += _floats(wire, value)
        elif number == 8:
            ints += _ints(wire, value)
        elif number == 9:
            strings.append(bytes(value).decode("utf-8", errors="replace"))
        elif number == 20:
            kind = value
    # AttributeType: FLOAT 1, INT 2, STRING 3, TENSOR 4, FLOATS 6, INTS 7, STRINGS 8
    if kind == 6 or (kind == 0 and floats):
        return name, floats
    if kind == 7 or (kind == 0 and ints):
        return name, ints
    if kind == 8 or (kind == 0 and strings):
        return name, strings
    return name, scalar


def _node(buf: memoryview) -> OnnxNode:
    node = OnnxNode("", [], [])
    for number, _, value in _fields(buf):
        if number == 1:
            node.inputs.append(_text(value))
        elif number == 2:
            node.outputs.append(_text(value))
        elif number == 3:
            node.name = _text(value)
        elif number == 4:
            node.op_type = _text(value)
        elif number == 5:
            key, v = _attribute(value)
            node.attrs[key] = v
        elif number == 7:
            node.domain = _text(value)
    return node


def _value_name(buf: memoryview) -> str:
    for number, _, value in _fields(buf):
        if number == 1:
            return _text(value)
    return ""


@dataclass
class OnnxModel:
    """What :func:`read_onnx` reads: the graph's nodes in order, its initialisers, inputs and outputs, and the opset
    of the standard domain."""

    nodes: list[OnnxNode]
    initializers: dict[str, Tensor]
    inputs: list[str]
    outputs: list[str]
    opset: int
    producer: str = ""


def read_onnx(path_or_bytes) -> OnnxModel:
    """Read an ONNX file (a path, or its bytes) with no onnx package."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = memoryview(path_or_bytes)
    else:
        path = os.fspath(path_or_bytes)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no ONNX file at {path!r}")
        with open(path, "rb") as f:
            data = memoryview(f.read())
    graph, opset, producer = None, None, ""
    for number, wire, value in _fields(data):
        if number == 7 and wire == 2:
            graph = value
        elif number == 8 and wire == 2:
            domain, version = "", 1
            for n, _, v in _fields(value):
                if n == 1:
                    domain = _text(v)
                elif n == 2:
                    version = v
            if domain in ("", "ai.onnx"):
                opset = version
        elif number == 2 and wire == 2:
            producer = _text(value)
    if graph is None:
        raise ValueError("not an ONNX model: no graph")
    nodes, inits, inputs, outputs = [], {}, [], []
    for number, _, value in _fields(graph):
        if number == 1:
            nodes.append(_node(value))
        elif number == 5:
            name, t = _tensor(value)
            inits[name] = t
        elif number == 11:
            inputs.append(_value_name(value))
        elif number == 12:
            outputs.append(_value_name(value))
        elif number == 15:
            raise ValueError("ONNX sparse initialisers are not supported")
    inputs = [n for n in inputs if n not in inits]  # IR < 4 lists initialisers among the inputs
    return OnnxModel(nodes, inits, inputs, outputs, opset if opset is not None else 1, producer)


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

# Inputs of binary elementwise operators where a host scalar goes in as a Python number (not a one-element device
# tensor: no copy to the device, and torch.compile sees a constant, e.g. an attention's scale). The other operand is
# then a tensor (else the node runs on the host), whose dtype the result keeps, as ONNX's equal input types want.
# (Not Where: with both branches numbers, torch would pick the result's dtype.)
_SCALAR_INPUTS = {op: (0, 1) for op in ("Add", "Div", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual",
                                        "Mul", "Pow", "Sub")}  # fmt: skip

# Inputs that operators read as Python numbers (shapes, axes, pads, counts): a host value is passed as it is there;
# everywhere else it becomes a tensor on the graph's device.
_NUMBER_INPUTS = {
    "ConstantOfShape": (0,),
    "CumSum": (1,),
    "Expand": (1,),
    "Pad": (1, 2, 3),
    "Range": (0, 1, 2),
    "Reshape": (1,),
    "Shape": (0,),
    "Size": (0,),
    "Slice": (1, 2, 3, 4),
    "Split": (1,),
    "Squeeze": (1,),
    "Tile": (1,),
    "TopK": (1,),
    "Unsqueeze": (1,),
}
_NUMBER_INPUTS.update((op, (1,)) for op in OPERATORS if op.startswith("Reduce"))  # (axes, from opset 13 or 18)


def find_onnx_file(path, names) -> str | None:
    """``path`` if it is an ``.onnx`` file, else the first of ``names`` (relative paths) inside the directory
    ``path``; None when there is none."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path if path.endswith(".onnx") else None
    for name in names:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def load_onnx_file(path, names, what: str) -> OnnxGraph:
    """The graph of ``path`` (an ``.onnx`` file, or a directory holding one of ``names``); ``what`` names the model
    in the error when there is none."""
    found = find_onnx_file(path, names)
    if found is None:
        raise FileNotFoundError(f"{os.fspath(path)!r} is not {what}'s ONNX file and holds none (looked for "
                                f"{', '.join(names)})")  # fmt: skip
    return OnnxGraph.from_file(found)


# --------------------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------------------


class OnnxGraph(nn.Module):
    """An ONNX model's graph as a PyTorch module: ``forward(*inputs)`` takes the graph's inputs in order and returns
    its output (a tuple when it has several). Initialisers are buffers; values that no later node reads are freed
    as the graph runs. Shapes and what the graph computes from them stay on the host (:class:`HostValue`)."""

    def __init__(self, model: OnnxModel):
        super().__init__()
        unsupported = sorted({n.op_type for n in model.nodes if n.domain not in ("", "ai.onnx")
                              or n.op_type not in OPERATORS})  # fmt: skip
        if unsupported:
            raise ValueError(f"ONNX operators not supported: {unsupported} (supported: taste.onnx.OPERATORS)")
        self.opset = model.opset
        self.input_names = list(model.inputs)
        self.output_names = list(model.outputs)
        constants = dict(model.initializers)
        self.nodes = []
        for node in model.nodes:  # Constant nodes become buffers too, so that .to(device) moves them
            if node.op_type == "Constant":
                constants[node.outputs[0]] = _constant([], node.attrs, model.opset)
            else:
                self.nodes.append(node)
        self._buffer_of = {}
        for i, (name, t) in enumerate(constants.items()):
            self._buffer_of[name] = f"init_{i}"
            self.register_buffer(f"init_{i}", t, persistent=False)
        for node in self.nodes:
            if node.op_type == "Split":  # the outputs count stands in for opset-18's num_outputs
                node.attrs.setdefault("_outputs", len(node.outputs))
            if node.op_type == "ConstantOfShape":  # the fill value as a Python number, read once
                value = node.attrs.get("value")
                node.attrs["_fill"] = (0.0, torch.float32) if value is None else (value.reshape(-1)[0].item(),
                                                                                   value.dtype)  # fmt: skip
        last_use: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for name in node.inputs:
                last_use[name] = i
        keep = set(self.output_names)
        self._free_after = []  # per node: the values no later node reads (once each: a node may read one twice)
        for i, node in enumerate(self.nodes):
            last = (n for n in node.inputs if n and last_use.get(n) == i and n not in keep and n not in self._buffer_of)
            self._free_after.append(list(dict.fromkeys(last)))
        known = set(self.input_names) | set(self._buffer_of) | {""}
        for node in self.nodes:
            missing = [n for n in node.inputs if n not in known]
            if missing:
                raise ValueError(f"ONNX node {node.name or node.op_type!r} reads {missing}, which nothing before it "
                                 "makes (the nodes must be in topological order)")  # fmt: skip
            known.update(node.outputs)
        lost = [n for n in self.output_names if n not in known]
        if lost:
            raise ValueError(f"ONNX graph outputs {lost} are made by no node")
        # Which values may be host values: small constants, shapes, and what host operators make of them alone
        # (ConstantOfShape and Range may still give a device tensor). A node runs on the host when its operator has
        # a host form and its inputs are host values when it runs; the rest get tensors wherever they read one.
        self._host_consts = {name: HostValue.of(t) for name, t in constants.items() if _host_constant(t)}
        host = set(self._host_consts) | {""}
        # Per node: whether it may run on host values, and its step: (node, operator, host operator or None, whether
        # the host operator takes tensors too, [(input to make a tensor of, or a Python number)], values to free).
        self._on_host, self._steps = [], []
        for node, free in zip(self.nodes, self._free_after):
            any_args = node.op_type in ("Shape", "Size")  # (they read only their input's shape)
            runs_on_host = node.op_type in HOST_OPERATORS and (any_args or all(n in host for n in node.inputs))
            if runs_on_host:
                host.update(node.outputs)
            numbers = _NUMBER_INPUTS.get(node.op_type, ())
            scalars = _SCALAR_INPUTS.get(node.op_type, ())
            to_device = [(i, i in scalars) for i, n in enumerate(node.inputs) if n and n in host and i not in numbers]
            self._on_host.append(runs_on_host)
            self._steps.append((node, OPERATORS[node.op_type], HOST_OPERATORS[node.op_type] if runs_on_host else None,
                                any_args, to_device, free))  # fmt: skip
        self._constants: dict[str, Tensor | HostValue] = {}
        self._bind_constants()

    def _bind_constants(self) -> None:
        """The constants as the nodes read them: small ones as host values holding their buffer (made again when
        ``.to()`` changes the buffers; values are re-read from a buffer only when its dtype changed)."""
        buffers = self._buffers
        for name, buffer in self._buffer_of.items():
            t = buffers[buffer]
            h = self._host_consts.get(name)
            if h is None:
                self._constants[name] = t
                continue
            if h.dtype != t.dtype:
                h = self._host_consts[name] = HostValue.of(t.cpu())
            self._constants[name] = HostValue(h.values, h.shape, h.dtype, t)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._bind_constants()
        return out

    @classmethod
    def from_file(cls, path) -> OnnxGraph:
        return cls(read_onnx(path))

    def forward(self, *inputs: Tensor):
        """Float32 convolutions run in float32, as onnxruntime runs them (cuDNN's TF32 is off for the call)."""
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            return self._run(inputs)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32

    def _run(self, inputs: tuple[Tensor, ...]):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the ONNX graph takes {len(self.input_names)} inputs ({self.input_names}), "
                             f"got {len(inputs)}")  # fmt: skip
        device = inputs[0].device if inputs else next(iter(self._buffers.values()), torch.empty(0)).device
        env: dict[str, Tensor | HostValue | None] = dict(self._constants)
        env[""] = None
        env.update(zip(self.input_names, inputs))
        opset = self.opset
        for node, fn, host_fn, any_args, to_device, free in self._steps:
            args = [env[n] for n in node.inputs]
            try:
                on_host = host_fn is not None
                if on_host and not any_args:  # (a host form runs when every input is a host value)
                    for v in args:
                        if v is not None and type(v) is not HostValue:
                            on_host = False
                            break
                if on_host:
                    out = _host_run(host_fn, fn, args, node.attrs, opset, device)
                else:
                    for i, scalar in to_device:
                        v = args[i]
                        if type(v) is HostValue:
                            args[i] = v.values[0] if scalar and not v.shape and v.buffer is None else v.tensor(device)
                    out = fn(args, node.attrs, opset)
            except Exception as e:
                shapes = [None if t is None else tuple(getattr(t, "shape", ())) for t in args]
                raise RuntimeError(f"ONNX node {node.name or '?'} ({node.op_type}) failed on inputs of shapes "
                                   f"{shapes}: {e}") from e  # fmt: skip
            if type(out) is tuple:
                for name, value in zip(node.outputs, out):
                    if name:
                        env[name] = value
            else:
                env[node.outputs[0]] = out
            for name in free:
                del env[name]
        outs = tuple(v.tensor(device) if type(v) is HostValue else v for v in (env[n] for n in self.output_names))
        return outs[0] if len(outs) == 1 else outs


def _host_constant(t: Tensor) -> bool:
    """Whether a constant is also a host value: small integers and booleans, and float scalars (a float vector is
    more likely a weight, which is better left on the device with what the graph does to it)."""
    return _small(t) and (t.numel() == 1 or not t.dtype.is_floating_point)


def _small(t: Tensor) -> bool:
    return t.numel() <= HOST_LIMIT and t.dtype in _HOST_DTYPES


def _host_run(host_fn, fn, args: list, attrs: dict, opset: int, device):
    """A node on host values: its host operator ``host_fn``, else (a case the host form does not take) its torch
    operator ``fn`` on CPU tensors, whose result stays on the host if it is small."""
    try:
        return host_fn(args, attrs, opset, device)
    except (_NoHost, ArithmeticError):
        pass
    cpu = [torch.tensor(v.values, dtype=v.dtype).reshape(v.shape) if type(v) is HostValue else v for v in args]
    out = fn(cpu, attrs, opset)
    outs = out if isinstance(out, tuple) else (out,)
    outs = tuple(HostValue.of(t) if _small(t) else t.to(device) for t in outs)
    return outs if isinstance(out, tuple) else outs[0]
