"""ONNX Runtime plumbing for post-training int8: graph rewrites, name mapping, op census.

The functions here work on ONNX graphs exported by `spiralkit.export.onnx.export_onnx`
(torch's ``torch.export``-based exporter), which records for every node the PyTorch module
it came from (``pkg.torch.onnx.name_scopes`` metadata) and keeps parameter names for the
weight initializers (``"fc1.weight"``). `nodes_of_modules` uses both to turn PyTorch module
name patterns into the ONNX node names ONNX Runtime's quantizer understands.
"""

from __future__ import annotations

import ast
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader
from torch import Tensor

from spiralkit.export.onnx import INPUT_NAME, SCOPES_KEY, ort_session

__all__ = [
    "BatchReader",
    "gemm_to_matmul",
    "integer_ops",
    "is_integer_op",
    "module_names_of_node",
    "nodes_of_modules",
]

# Contrib and standard op types that compute on integers but follow no naming rule below.
_INTEGER_OPS = frozenset({"QGemm", "QAttention", "QEmbedLayerNormalization", "QOrderedMatMul", "NhwcMaxPool"})


# --------------------------------------------------------------------------- op census


def is_integer_op(op_type: str) -> bool:
    """Whether ONNX Runtime runs ``op_type`` as an integer kernel.

    True for the ``QLinear*`` ops (``QLinearConv``, ``QLinearMatMul``, ``QLinearAdd``, ...),
    the ``*Integer*`` ops (``ConvInteger``, ``MatMulInteger``, ``MatMulIntegerToFloat``),
    the ``DynamicQuantize*`` fusions (``DynamicQuantizeMatMul``, ``DynamicQuantizeLSTM``,
    ``DynamicQuantizeLinear``) and a few contrib ops (``QGemm``, ``QAttention``, the uint8
    ``NhwcMaxPool``). ``QuantizeLinear``/``DequantizeLinear`` only convert; they do not count.
    """
    return (
        op_type.startswith("QLinear")
        or "Integer" in op_type
        or op_type.startswith("DynamicQuantize")
        or op_type in _INTEGER_OPS
    )


def integer_ops(path: Path) -> Counter[str]:
    """The integer kernels ONNX Runtime really runs for an ONNX file.

    The file is loaded into a CPU session with all graph optimisations (the same settings
    `spiralkit.export.onnx.OrtModel` uses), which fuses ``DequantizeLinear → op →
    QuantizeLinear`` patterns into integer kernels; the optimised graph is saved to a
    temporary file and its integer op types counted (see `is_integer_op`). A model whose
    Q/DQ pairs merely wrap float ops shows none.

    Args:
        path: The ``.onnx`` file.

    Returns:
        Op type → number of nodes, integer kernels only (empty for a float model).
    """
    with tempfile.TemporaryDirectory(prefix="spiralkit-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(Path(path), threads=1, optimized_path=optimized)
        graph = onnx.load(str(optimized), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node if is_integer_op(node.op_type))


# --------------------------------------------------------------------------- calibration


class BatchReader(CalibrationDataReader):
    """Feeds ONNX Runtime's calibrators one batch at a time from in-memory tensors.

    Args:
        batches: The calibration inputs, shaped like the model input: float tensors (fed as
            float32), or integer ones such as token ids (fed with their own dtype).
        input_name: The model's input name.
    """

    def __init__(self, batches: Sequence[Tensor], *, input_name: str = INPUT_NAME) -> None:
        self._batches = [np.ascontiguousarray((b if not b.is_floating_point() else b.float()).detach().cpu().numpy())
                         for b in batches]
        self._input_name = input_name
        self._iter: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next ``{input_name: batch}``, or None when all batches were read."""
        batch = next(self._iter, None)
        return None if batch is None else {self._input_name: batch}

    def rewind(self) -> None:
        """Start again from the first batch (some calibrators read the data twice)."""
        self._iter = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


# --------------------------------------------------------------------------- module names


def module_names_of_node(node: onnx.NodeProto, initializers: set[str]) -> set[str]:
    """The PyTorch module names an ONNX node came from.

    Two sources, because the exporter's graph optimiser merges nodes: the module scopes the
    exporter records (a convolution with a folded BatchNorm is recorded under the BatchNorm)
    and the parameter names of the node's weight inputs (``"layer1.0.conv1.weight"`` →
    ``"layer1.0.conv1"``). Every enclosing module is included (``"layer1"``, ``"layer1.0"``).

    Args:
        node: A node of an exported graph.
        initializers: Names of the graph's initializers.

    Returns:
        Module names (the root module's empty name excluded).
    """
    names: set[str] = set()
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            # The last scope is the traced op itself (e.g. "linear_1"), not a module.
            names.update(_literal_list(prop.value)[:-1])
    for name in node.input:
        if name in initializers and "." in name:
            names.add(name.rsplit(".", 1)[0])
    return {scope for name in names for scope in _enclosing(name)}


def _literal_list(text: str) -> list[str]:
    """Parse the exporter's ``"['', 'layer1', ...]"`` metadata; [] when malformed."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(item) for item in value] if isinstance(value, list) else []


def _enclosing(name: str) -> Iterator[str]:
    """``"a.b.c"`` → ``"a"``, ``"a.b"``, ``"a.b.c"``."""
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if prefix:
            yield prefix


def nodes_of_modules(model: onnx.ModelProto, patterns: Iterable[str]) -> dict[str, list[str]]:
    """For each module name pattern (``fnmatch``), the ONNX nodes that came from matching modules.

    A node matches when any module it came from (see `module_names_of_node`) matches, so
    ``"layer1"`` selects every node inside ``layer1`` and ``"fc*"`` every node of ``fc1``,
    ``fc2``, ...

    Args:
        model: An exported ONNX model.
        patterns: Module name patterns, matched case-sensitively.

    Returns:
        Pattern → node names (possibly empty), in graph order.
    """
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    modules = [(node.name, module_names_of_node(node, initializers)) for node in graph.node]
    return {
        pattern: [name for name, names in modules if any(fnmatchcase(m, pattern) for m in names)]
        for pattern in patterns
    }


# --------------------------------------------------------------------------- rewrites


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(A, W, C)`` nodes with a constant ``W`` as ``MatMul`` (+ ``Add``), in place.

    ONNX Runtime's dynamic quantizer handles ``MatMul`` but not ``Gemm``, which is what the
    exporter emits for ``nn.Linear`` on 2-D inputs. Only plain Gemms are rewritten
    (``alpha = beta = 1``, ``transA = 0``); ``transB = 1`` is absorbed by transposing the
    weight initializer. The MatMul keeps the Gemm's name and metadata, so module-name
    mapping (`nodes_of_modules`) still finds it; the bias Add is named ``"<gemm>_bias"``.

    Args:
        model: The model to modify.

    Returns:
        How many Gemm nodes were rewritten.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    rewritten: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or not plain or node.input[1] not in initializers:
            rewritten.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            weight = _transposed(graph, initializers[weight], shared=uses[weight] > 1)
        rewritten.extend(_matmul_nodes(node, weight))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(rewritten)
    return count


def _transposed(graph: onnx.GraphProto, init: onnx.TensorProto, *, shared: bool) -> str:
    """Transpose a 2-D weight initializer (in place, or as a new one when others use it)."""
    array = numpy_helper.to_array(init).T.copy()
    name = f"{init.name}__transposed" if shared else init.name
    new = numpy_helper.from_array(array, name)
    if shared:
        graph.initializer.append(new)
    else:
        init.CopyFrom(new)
    return name


def _matmul_nodes(gemm: onnx.NodeProto, weight: str) -> list[onnx.NodeProto]:
    """The MatMul (and bias Add) replacing ``gemm``."""
    has_bias = len(gemm.input) > 2 and gemm.input[2] != ""
    product = f"{gemm.output[0]}__matmul" if has_bias else gemm.output[0]
    matmul = onnx.helper.make_node("MatMul", [gemm.input[0], weight], [product], name=gemm.name)
    matmul.metadata_props.extend(gemm.metadata_props)
    if not has_bias:
        return [matmul]
    add = onnx.helper.make_node("Add", [product, gemm.input[2]], [gemm.output[0]], name=f"{gemm.name}_bias")
    add.metadata_props.extend(gemm.metadata_props)
    return [matmul, add]
