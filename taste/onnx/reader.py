"""The ONNX protobuf file read without the onnx package: :func:`read_onnx` -> :class:`OnnxModel`."""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

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
