"""taste.onnx on its own: the protobuf reader against the onnx package, and every operator, one node at a time, against
onnxruntime (graphs built with the onnx package), on device tensors and on host values."""

import math
import os

import numpy as np
import pytest
import torch

from taste.onnx import HOST_OPERATORS, OPERATORS, OnnxGraph, read_onnx
from taste.onnx.graph import _host_constant

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TINY = os.path.join(DATA, "campplus_tiny.onnx")
S3_TINY = os.path.join(DATA, "s3_tokenizer_tiny.onnx")


def test_reader_matches_the_onnx_package():
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    ours, theirs = read_onnx(TINY), onnx.load(TINY)
    assert ours.opset == next(o.version for o in theirs.opset_import if o.domain in ("", "ai.onnx"))
    assert [n.op_type for n in ours.nodes] == [n.op_type for n in theirs.graph.node]
    for a, b in zip(ours.nodes, theirs.graph.node):
        assert (a.inputs, a.outputs, a.name) == (list(b.input), list(b.output), b.name)
        for attr in b.attribute:
            value = onnx.helper.get_attribute_value(attr)
            if isinstance(value, onnx.TensorProto):
                assert torch.equal(a.attrs[attr.name], torch.from_numpy(numpy_helper.to_array(value).copy()))
            elif isinstance(value, bytes):
                assert a.attrs[attr.name] == value.decode()
            elif isinstance(value, float):
                assert a.attrs[attr.name] == pytest.approx(value)
            else:
                assert a.attrs[attr.name] == (list(value) if isinstance(value, (list, tuple)) else value), attr.name
    assert len(ours.initializers) == len(theirs.graph.initializer)
    for init in theirs.graph.initializer:
        assert torch.equal(ours.initializers[init.name], torch.from_numpy(numpy_helper.to_array(init).copy()))
    assert ours.inputs == ["input"] and ours.outputs == ["output"]


# --------------------------------------------------------------------------------------------------------------
# Operators one at a time against onnxruntime (graphs built with the onnx package)
# --------------------------------------------------------------------------------------------------------------

R = np.random.default_rng(0)


def f32(*shape):
    return R.standard_normal(shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


# (op, inputs, attributes, opset, number of outputs)
CASES = [
    ("Gemm", [f32(3, 4), f32(5, 4), f32(5)], {"transB": 1, "alpha": 0.5, "beta": 2.0}, 13, 1),
    ("MatMul", [f32(2, 3, 4), f32(4, 5)], {}, 13, 1),
    ("Softmax", [f32(2, 3, 4)], {"axis": 1}, 11, 1),
    ("Softmax", [f32(2, 3, 4)], {"axis": 1}, 13, 1),
    ("LogSoftmax", [f32(2, 5)], {}, 13, 1),
    ("LayerNormalization", [f32(2, 3, 4), f32(4), f32(4)], {"epsilon": 1e-3}, 17, 1),
    ("InstanceNormalization", [f32(2, 3, 5), f32(3), f32(3)], {}, 13, 1),
    ("BatchNormalization", [f32(2, 3, 5), f32(3), f32(3), f32(3), np.abs(f32(3)) + 0.5], {}, 15, 1),
    ("Split", [f32(7, 2), i64(2, 5)], {"axis": 0}, 13, 2),
    ("Split", [f32(2, 7)], {"axis": 1, "num_outputs": 3}, 18, 3),
    ("Split", [f32(6, 2)], {"axis": 0}, 11, 3),
    ("Pad", [f32(2, 3, 5), i64(0, 0, 2, 0, 0, 3)], {"mode": "reflect"}, 13, 1),
    ("Pad", [f32(2, 3, 5), i64(0, 1, 2, 1, 0, 3), np.array(1.5, np.float32)], {}, 13, 1),
    ("Pad", [f32(2, 3, 5), i64(1, 2, 0, 1, 1, 3)], {"mode": "edge"}, 13, 1),
    ("Slice", [f32(5, 6), i64(-1, 1), i64(-5, 6), i64(0, 1), i64(-2, 2)], {}, 13, 1),
    ("Slice", [f32(5, 6), i64(1), i64(100), i64(-1)], {}, 13, 1),
    ("Gather", [f32(3, 4), i64(-1, 0, 2).reshape(3, 1)], {"axis": 1}, 13, 1),
    ("Gather", [f32(3, 4), np.array(1, np.int64)], {"axis": 0}, 13, 1),
    ("GatherElements", [f32(3, 4), np.array([[0, -1], [2, 1], [3, 0]], np.int64)], {"axis": 1}, 13, 1),
    ("Squeeze", [f32(1, 3, 1, 2)], {"axes": [0, -2]}, 11, 1),
    ("Squeeze", [f32(1, 3, 1, 2), i64(2)], {}, 13, 1),
    ("Unsqueeze", [f32(3, 2), i64(0, -1)], {}, 13, 1),
    ("Unsqueeze", [f32(3, 2)], {"axes": [1]}, 11, 1),
    ("ReduceMean", [f32(2, 3, 4), i64(-1, 0)], {"keepdims": 0}, 18, 1),
    ("ReduceMean", [f32(2, 3, 4)], {"axes": [1]}, 13, 1),
    ("ReduceSum", [f32(2, 3, 4), i64(1)], {}, 13, 1),
    ("ReduceMax", [f32(2, 3, 4)], {"keepdims": 0}, 13, 1),
    ("ReduceProd", [f32(2, 3, 4)], {"axes": [2]}, 13, 1),
    ("ReduceL2", [f32(2, 3, 4)], {"axes": [1]}, 13, 1),
    ("ArgMax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], {"axis": 1, "select_last_index": 1}, 13, 1),
    ("ArgMin", [np.array([[1, 0, 0], [2, 2, 5]], np.float32)], {"axis": 1, "keepdims": 0}, 13, 1),
    (
        "MaxPool",
        [f32(1, 2, 7, 6)],
        {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 0], "ceil_mode": 1},
        13,
        1,
    ),  # fmt: skip
    ("AveragePool", [f32(1, 2, 250)], {"kernel_shape": [100], "strides": [100], "ceil_mode": 1}, 13, 1),
    ("AveragePool", [f32(1, 2, 9)], {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}, 13, 1),
    (
        "AveragePool",
        [f32(1, 2, 9)],
        {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "count_include_pad": 1},
        13,
        1,
    ),  # fmt: skip
    ("GlobalAveragePool", [f32(2, 3, 4, 5)], {}, 13, 1),
    (
        "Conv",
        [f32(1, 4, 9, 8), f32(6, 2, 3, 3), f32(6)],
        {"group": 2, "dilations": [2, 1], "strides": [1, 2], "pads": [1, 0, 2, 1]},
        13,
        1,
    ),  # fmt: skip
    (
        "ConvTranspose",
        [f32(1, 4, 9), f32(4, 3, 4), f32(6)],
        {"group": 2, "strides": [2], "pads": [1, 1], "output_padding": [1]},
        13,
        1,
    ),  # fmt: skip
    ("CumSum", [f32(3, 4), np.array(1, np.int64)], {"exclusive": 1, "reverse": 1}, 13, 1),
    ("TopK", [f32(3, 6), i64(2)], {"axis": 1}, 13, 2),
    ("Clip", [f32(3, 4), np.array(-0.5, np.float32)], {}, 13, 1),
    ("Clip", [f32(3, 4)], {"min": -0.2, "max": 0.3}, 6, 1),
    ("Mod", [i64(-7, 7, 5, -5), i64(3, -3, 3, 3)], {}, 13, 1),
    ("Mod", [f32(5), np.full(5, 0.7, np.float32)], {"fmod": 1}, 13, 1),
    ("Div", [i64(-7, 7, 6), i64(2, 2, -4)], {}, 13, 1),
    ("Expand", [f32(3, 1), i64(2, 1, 4)], {}, 13, 1),
    ("Tile", [f32(2, 3), i64(2, 1)], {}, 13, 1),
    ("Range", [np.array(1, np.int64), np.array(10, np.int64), np.array(3, np.int64)], {}, 13, 1),
    ("Where", [np.array([True, False, True]), f32(3), f32(2, 3)], {}, 13, 1),
    ("Cast", [f32(2, 3) * 4], {"to": 7}, 13, 1),
    ("Erf", [f32(2, 3)], {}, 13, 1),
    ("Gelu", [f32(2, 3)], {"approximate": "tanh"}, 20, 1),
    ("Flatten", [f32(2, 3, 4, 5)], {"axis": 2}, 13, 1),
    ("PRelu", [f32(2, 3, 4), f32(3, 1)], {}, 13, 1),
    ("LeakyRelu", [f32(2, 3)], {"alpha": 0.2}, 13, 1),
    ("HardSigmoid", [f32(2, 3)], {"alpha": 0.3}, 13, 1),
    ("Transpose", [f32(2, 3, 4)], {"perm": [2, 0, 1]}, 13, 1),
    ("Einsum", [f32(2, 3, 4), f32(2, 4, 5)], {"equation": "bij,bjk->bik"}, 13, 1),
    ("ConstantOfShape", [i64(2, 3)], {"value": np.array([7], np.int64)}, 13, 1),
    ("Shape", [f32(2, 3, 4, 5)], {"start": 1, "end": -1}, 15, 1),
    ("Reshape", [f32(2, 3, 4), i64(0, -1)], {}, 13, 1),
    ("Concat", [f32(2, 3), f32(2, 1)], {"axis": -1}, 13, 1),
    ("Max", [f32(2, 3), f32(3), f32(2, 1)], {}, 13, 1),
    ("Mean", [f32(2, 3), f32(3)], {}, 13, 1),
    ("Pow", [np.abs(f32(2, 3)), np.array(1.5, np.float32)], {}, 13, 1),
    ("Equal", [i64(1, 2, 3), i64(1, 0, 3)], {}, 13, 1),
]


def _onnx_model(op, inputs, attrs, opset, n_out, constants=False):
    """One node reading graph inputs, or (``constants``) initialisers: small ones are host values in taste.onnx."""
    import onnx
    from onnx import helper, numpy_helper

    names = [f"x{i}" for i in range(len(inputs))]
    outputs = [f"y{i}" for i in range(n_out)]
    attrs = {k: (numpy_helper.from_array(v) if isinstance(v, np.ndarray) else v) for k, v in attrs.items()}
    node = helper.make_node(op, names, outputs, **attrs)
    elem = lambda a: helper.np_dtype_to_tensor_dtype(a.dtype)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for n, a in zip(names, inputs)] if constants else []
    inputs = [] if constants else [helper.make_tensor_value_info(n, elem(a), a.shape) for n, a in zip(names, inputs)]
    graph = helper.make_graph([node], "g", inputs, [onnx.ValueInfoProto(name=o) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    return model


def _check_against_onnxruntime(case, constants):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    op, inputs, attrs, opset, n_out = case
    model = _onnx_model(op, inputs, attrs, opset, n_out, constants)
    data = model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    want = session.run(None, {} if constants else {f"x{i}": a for i, a in enumerate(inputs)})
    graph = OnnxGraph(read_onnx(data))
    got = graph() if constants else graph(*[torch.from_numpy(a.copy()) for a in inputs])
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        w = torch.from_numpy(np.asarray(w))
        assert isinstance(g, torch.Tensor) and g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape,
                                                                                           w.shape)  # fmt: skip
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, equal_nan=True)
    return graph


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_operator_matches_onnxruntime(case):
    _check_against_onnxruntime(case, constants=False)


def sc(value):
    """A float32 scalar (float constants are host values only as scalars)."""
    return np.array(value, dtype=np.float32)


# Host values: operators on small constants run on Python numbers (what exporters do with shapes), or, where the
# host form does not take a case (a float reduction, a rank-2 Gather, Expand), the torch operator on CPU tensors.
HOST_CASES = [
    ("Add", [sc(0.1), sc(0.2)], {}, 13, 1),  # float32 rounding
    ("Sub", [i64(5, -3), np.array(7, np.int64)], {}, 13, 1),
    ("Mul", [sc(1 / 3), sc(3.0)], {}, 13, 1),
    ("Mul", [sc(3e38), sc(-2)], {}, 13, 1),  # float32 overflow: -inf
    ("Div", [sc(1), sc(3)], {}, 13, 1),
    ("Div", [sc(-1), sc(0)], {}, 13, 1),  # by zero: torch's fallback (-inf; 0 / 0 below: nan)
    ("Div", [sc(0), sc(0)], {}, 13, 1),
    ("Div", [i64(-7, 7, 6, -6), i64(2, 2, -4, -4)], {}, 13, 1),
    ("Div", [np.array([3, 8], np.int32), np.array([2, 3], np.int32)], {}, 13, 1),
    ("Mod", [i64(-7, 7, 5, -5), i64(3, -3, 3, 3)], {}, 13, 1),
    ("Mod", [i64(-7, 7, 5, -5), i64(3, -3, 3, 3)], {"fmod": 1}, 13, 1),
    ("Pow", [sc(64.0), sc(0.5)], {}, 13, 1),
    ("Pow", [sc(2.0), sc(-1.5)], {}, 13, 1),
    ("Pow", [i64(3, 2), i64(4, 0)], {}, 13, 1),
    ("Pow", [i64(4, 9), sc(0.5)], {}, 13, 1),  # (the base's dtype)
    ("Sqrt", [sc(80.0)], {}, 13, 1),
    ("Sqrt", [sc(-1.0)], {}, 13, 1),
    ("Sqrt", [np.array(2.0, np.float64)], {}, 13, 1),
    ("Neg", [i64(3, -4)], {}, 13, 1),
    ("Abs", [sc(-2.5)], {}, 13, 1),
    ("Floor", [sc(-2.5)], {}, 13, 1),
    ("Ceil", [sc(-2.5)], {}, 13, 1),
    ("Cast", [sc(-2.7)], {"to": 7}, 13, 1),  # toward zero
    ("Cast", [sc(0.0)], {"to": 9}, 13, 1),
    ("Cast", [i64(3, 16777217)], {"to": 1}, 13, 1),  # rounded to float32
    ("Cast", [i64(3, 70000, 65519, 65520)], {"to": 10}, 13, 1),  # float16: 65504, then inf
    ("Cast", [np.array([True, False])], {"to": 6}, 13, 1),
    ("Equal", [i64(1, 2, 3), np.array(2, np.int64)], {}, 13, 1),
    ("Less", [i64(1, 2, 3).reshape(3, 1), i64(2, 3)], {}, 13, 1),  # broadcast to (3, 2)
    ("Greater", [sc(1), sc(1.5)], {}, 13, 1),
    ("LessOrEqual", [i64(1, 2), i64(2, 2)], {}, 13, 1),
    ("GreaterOrEqual", [i64(1, 2), i64(2, 2)], {}, 13, 1),
    ("Not", [np.array([True, False])], {}, 13, 1),
    ("And", [np.array([True, False, True]), np.array([True, True, False])], {}, 13, 1),
    ("Or", [np.array([True, False, False]), np.array(False)], {}, 13, 1),
    ("Xor", [np.array([True, False, True]), np.array([True, True, False])], {}, 13, 1),
    ("Where", [np.array([True, False]), i64(-1, -1), i64(4, 5)], {}, 13, 1),
    ("Where", [np.array([[True], [False]]), i64(1, 2), np.array(0, np.int64)], {}, 13, 1),
    ("Where", [np.array(True), sc(0.5), sc(2.0)], {}, 13, 1),
    ("Max", [i64(1, 7), i64(3, 2), np.array(5, np.int64)], {}, 13, 1),
    ("Min", [i64(1, 7), i64(3, 2)], {}, 13, 1),
    ("Max", [sc(np.nan), sc(3)], {}, 13, 1),  # float: torch's NaN rule
    ("Sum", [sc(0.1), sc(0.2), sc(0.3)], {}, 13, 1),
    ("Identity", [i64(1, 2)], {}, 13, 1),
    ("Shape", [i64(1, 2, 3).reshape(3, 1)], {}, 13, 1),
    ("Shape", [i64(1, 2, 3).reshape(3, 1)], {"start": -1}, 15, 1),
    ("Size", [i64(1, 2, 3).reshape(3, 1)], {}, 13, 1),
    ("Gather", [i64(10, 20, 30), i64(-1, 0, 2, 1).reshape(2, 2)], {}, 13, 1),
    ("Gather", [i64(10, 20, 30), np.array(-2, np.int64)], {}, 13, 1),
    ("Gather", [i64(1, 2, 3, 4).reshape(2, 2), i64(1)], {"axis": 1}, 13, 1),
    ("Concat", [i64(1), i64(2, 3), np.zeros(0, np.int64)], {"axis": 0}, 13, 1),
    ("Concat", [i64(1, 2).reshape(1, 2), i64(3, 4).reshape(1, 2)], {"axis": 1}, 13, 1),
    ("Unsqueeze", [np.array(4, np.int64), i64(0)], {}, 13, 1),
    ("Unsqueeze", [i64(4, 5)], {"axes": [0, 2]}, 11, 1),
    ("Squeeze", [i64(4).reshape(1, 1)], {}, 13, 1),
    ("Squeeze", [i64(4, 5).reshape(1, 2), i64(0)], {}, 13, 1),
    ("Reshape", [i64(1, 2, 3, 4, 5, 6), i64(0, -1)], {}, 13, 1),
    ("Reshape", [i64(1, 2, 3, 4, 5, 6).reshape(1, 6), i64(0, 2, -1)], {}, 13, 1),
    ("Reshape", [np.zeros((0, 3), np.int64), i64(0, 3)], {"allowzero": 1}, 14, 1),
    ("Flatten", [i64(1, 2, 3, 4).reshape(2, 1, 2)], {"axis": 2}, 13, 1),
    ("Slice", [i64(1, 2, 3, 4, 5), i64(-1), i64(-100), i64(0), i64(-2)], {}, 13, 1),
    ("Slice", [i64(1, 2, 3, 4, 5), i64(1), i64(9223372036854775807)], {}, 13, 1),
    ("Slice", [i64(1, 2, 3, 4, 5)], {"starts": [1], "ends": [3]}, 9, 1),
    ("ConstantOfShape", [i64(2, 3)], {"value": np.array([7], np.int64)}, 13, 1),
    ("ConstantOfShape", [i64(9, 9)], {"value": np.array([0.5], np.float32)}, 13, 1),  # 81 elements: the device
    ("ConstantOfShape", [i64(2)], {}, 13, 1),
    ("Range", [np.array(1, np.int64), np.array(10, np.int64), np.array(3, np.int64)], {}, 13, 1),
    ("Range", [sc(0.5), sc(-1), sc(-0.5)], {}, 13, 1),
    ("ReduceProd", [i64(2, 3, 4)], {"keepdims": 0}, 13, 1),
    ("ReduceProd", [i64(2, 3, 4)], {}, 13, 1),
    ("ReduceSum", [i64(2, 3, 4), i64(0)], {}, 13, 1),
    ("ReduceMax", [i64(2, 9, 4)], {"keepdims": 0}, 13, 1),
    ("ReduceMin", [i64(2, 9, 4), i64(0)], {}, 18, 1),
    ("Expand", [i64(1, 2).reshape(2, 1), i64(2, 3)], {}, 13, 1),
    ("Tile", [i64(1, 2), i64(3)], {}, 13, 1),
    ("Split", [i64(1, 2, 3, 4, 5), i64(2, 3)], {"axis": 0}, 13, 2),  # no host form: the device operator
]


@pytest.mark.parametrize("case", CASES + HOST_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES + HOST_CASES)])  # fmt: skip
def test_operator_on_constants_matches_onnxruntime(case):
    """Every operator with its inputs as initialisers: small ones are host values, which the host operators take
    (their Python arithmetic in the dtype's precision) and the rest read as tensors."""
    graph = _check_against_onnxruntime(case, constants=True)
    small = all(_host_constant(torch.from_numpy(a.copy())) for a in case[1])
    assert graph._on_host[0] == (case[0] in ("Shape", "Size") or (small and case[0] in HOST_OPERATORS))


def test_every_operator_is_tested():
    assert set(OPERATORS) - {c[0] for c in CASES} <= {
        "Abs",
        "Add",
        "And",
        "Ceil",
        "Cos",
        "Dropout",
        "Elu",
        "Exp",
        "Floor",
        "Greater",
        "GreaterOrEqual",
        "Identity",
        "IsNaN",
        "Less",
        "LessOrEqual",
        "Log",
        "Min",
        "Mul",
        "Neg",
        "Not",
        "Or",
        "Reciprocal",
        "Relu",
        "Sigmoid",
        "Sign",
        "Sin",
        "Softplus",
        "Sqrt",
        "Sub",
        "Sum",
        "Tanh",
        "Xor",
        "Constant",
        "Size",
        "GlobalMaxPool",
        "ReduceMin",
        "ReduceSumSquare",
    }  # fmt: skip  (one-line torch functions; Constant, Shape and the rest run in the CAM++ graphs above)


def test_unsupported_and_bad_files(tmp_path):
    model = read_onnx(TINY)
    model.nodes[3].op_type = "Resize"
    with pytest.raises(ValueError, match=r"ONNX operators not supported: \['Resize'\]"):
        OnnxGraph(model)
    model = read_onnx(TINY)
    model.nodes.reverse()
    with pytest.raises(ValueError, match="topological order"):
        OnnxGraph(model)
    with pytest.raises(ValueError, match="not an ONNX"):
        read_onnx(b"\x0a\xff\xff\xff\xff")
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        read_onnx(str(tmp_path / "missing.onnx"))
    graph = OnnxGraph.from_file(TINY)
    with pytest.raises(ValueError, match=r"takes 1 inputs \(\['input'\]\), got 2"):
        graph(torch.zeros(1, 5, 80), torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"ONNX node .* failed on inputs of shapes"):
        graph(torch.zeros(1, 5, 7))
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones(3, np.float32), "w")
    weight.data_location = onnx.TensorProto.EXTERNAL
    graph_proto = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                                    [helper.make_tensor_value_info("x", 1, [3])],
                                    [helper.make_tensor_value_info("y", 1, [3])], [weight])  # fmt: skip
    with pytest.raises(ValueError, match="external file"):
        read_onnx(helper.make_model(graph_proto).SerializeToString())


def test_graph_moves_and_casts():
    """Initialisers and Constant nodes are buffers: .double() runs the graph in float64."""
    graph = OnnxGraph.from_file(TINY).double()
    x = torch.randn(1, 120, 80, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(graph(x.double()).float(), OnnxGraph.from_file(TINY)(x), atol=2e-5, rtol=1e-5)
    assert math.isfinite(float(graph(x.double()).sum()))


def test_host_scalars_meet_tensors():
    """Values made from an input's shape meet the input itself: scalars on either side of a binary operator (passed
    as Python numbers), a Where between two of them, in float32, float16 and int32, against onnxruntime."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    for elem, np_type in ((TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16),
                          (TensorProto.INT32, np.int32)):  # fmt: skip
        c = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
        nodes = [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "one"], ["width"]),  # 7
            helper.make_node("Cast", ["width"], ["w"], to=elem),
            helper.make_node("Div", ["x", "w"], ["a"]),
            helper.make_node("Sub", ["w", "x"], ["b"]),
            helper.make_node("Mul", ["w", "x"], ["m"]),
            helper.make_node("Less", ["x", "w"], ["lt"]),
            helper.make_node("Sub", ["w", "w"], ["z"]),
            helper.make_node("Where", ["lt", "w", "z"], ["wh"]),  # two computed host scalars around a device mask
            helper.make_node("Add", ["a", "b"], ["ab"]),
            helper.make_node("Add", ["ab", "m"], ["abm"]),
            helper.make_node("Add", ["abm", "wh"], ["y"]),
        ]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, [2, 7])],
                                  [helper.make_tensor_value_info("y", elem, [2, 7])],
                                  [c("one", 1)])  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = min(model.ir_version, 10)
        x = (np.arange(14).reshape(2, 7) * 1.5 - 4).astype(np_type)
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        got = OnnxGraph(read_onnx(model.SerializeToString()))(torch.from_numpy(x))
        assert got.dtype == torch.from_numpy(x).dtype, (np_type, got.dtype)
        torch.testing.assert_close(got, torch.from_numpy(want[0]), atol=1e-2, rtol=1e-3)
