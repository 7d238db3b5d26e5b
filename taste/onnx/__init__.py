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

The package: :mod:`taste.onnx.reader` (the protobuf file), :mod:`taste.onnx.values` (host values),
:mod:`taste.onnx.operators` (torch operators), :mod:`taste.onnx.host` (operators on host values),
:mod:`taste.onnx.graph` (the module and the file loaders).
"""

from __future__ import annotations

from taste.onnx.graph import OnnxGraph, find_onnx_file, load_onnx_file
from taste.onnx.host import HOST_OPERATORS
from taste.onnx.operators import OPERATORS
from taste.onnx.reader import OnnxModel, OnnxNode, read_onnx
from taste.onnx.values import HOST_LIMIT, HostValue

__all__ = ["HOST_LIMIT", "HOST_OPERATORS", "OPERATORS", "HostValue", "OnnxGraph", "OnnxModel", "OnnxNode",
           "find_onnx_file", "load_onnx_file", "read_onnx"]  # fmt: skip
