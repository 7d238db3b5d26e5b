"""The graph as a module (:class:`OnnxGraph`): node by node, host values on the host, tensors on the device;
and the loaders of the release's ONNX files."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from taste.onnx.host import _HOST_DTYPES, HOST_OPERATORS
from taste.onnx.operators import OPERATORS, _constant
from taste.onnx.reader import OnnxModel, read_onnx
from taste.onnx.values import HOST_LIMIT, HostValue, _NoHost

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
