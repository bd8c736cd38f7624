"""ONNX Runtime plumbing: graph rewrites, name mapping, op census, and int4/int8 ``MatMulNBits``.

The functions here work on ONNX graphs exported by `spiralkit.export.onnx.export_onnx`
(torch's ``torch.export``-based exporter), which records for every node the PyTorch module
it came from (``pkg.torch.onnx.name_scopes`` metadata) and keeps parameter names for the
weight initializers (``"fc1.weight"``). `nodes_of_modules` uses both to turn PyTorch module
name patterns into the ONNX node names ONNX Runtime's quantizer understands.

Weight-only models (`spiralkit.quant.weight_only`) export with every `WeightOnlyLinear` as
ONNX Runtime's block-quantized matrix product, the ``com.microsoft`` contrib op
``MatMulNBits`` (`export_weight_only_onnx`): its CPU kernel reads the packed 4-bit (or
8-bit) codes directly instead of a float weight. ``optimized_ops`` shows what ONNX Runtime
really runs.
"""

from __future__ import annotations

import ast
import copy
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxscript
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader
from torch import Tensor, nn

from spiralkit.export.onnx import INPUT_NAME, SCOPES_KEY, export_onnx, ort_session
from spiralkit.quant.affine import QuantError
from spiralkit.quant.weight_only import WeightOnlyConv2d, WeightOnlyLinear, unpack_int4

__all__ = [
    "MATMUL_NBITS",
    "BatchReader",
    "MatMulNBitsLinear",
    "export_weight_only_onnx",
    "gemm_to_matmul",
    "integer_ops",
    "is_integer_op",
    "matmul_nbits_linear",
    "module_names_of_node",
    "nodes_of_modules",
    "optimized_ops",
    "to_matmul_nbits_",
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


def optimized_ops(path: Path) -> Counter[str]:
    """The op types ONNX Runtime really runs for an ONNX file, after its graph optimisations.

    The file is loaded into a CPU session with all graph optimisations (the same settings
    `spiralkit.export.onnx.OrtModel` uses), which fuses patterns (``DequantizeLinear → op →
    QuantizeLinear`` into integer kernels, a ``MatMulNBits`` and its bias ``Add`` into one
    node); the optimised graph is saved to a temporary file and its op types counted.

    Args:
        path: The ``.onnx`` file.

    Returns:
        Op type → number of nodes of the optimised graph.
    """
    with tempfile.TemporaryDirectory(prefix="spiralkit-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(Path(path), threads=1, optimized_path=optimized)
        graph = onnx.load(str(optimized), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


def integer_ops(path: Path) -> Counter[str]:
    """The integer kernels ONNX Runtime really runs for an ONNX file.

    The op types of the optimised graph (`optimized_ops`) that are integer kernels (see
    `is_integer_op`). A model whose Q/DQ pairs merely wrap float ops shows none.

    Args:
        path: The ``.onnx`` file.

    Returns:
        Op type → number of nodes, integer kernels only (empty for a float model).
    """
    return Counter({op: n for op, n in optimized_ops(path).items() if is_integer_op(op)})


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


# --------------------------------------------------------------------------- MatMulNBits

MATMUL_NBITS = "MatMulNBits"
MS_DOMAIN = "com.microsoft"
_MIN_BLOCK = 16  # ONNX Runtime: block_size is a power of two >= 16
_ACCURACY_LEVELS = frozenset({0, 1, 2, 3, 4})  # unset, fp32, fp16, bf16, int8 (ONNX Runtime's contrib op doc)


@torch.library.custom_op("spiralkit::matmul_nbits", mutates_args=())
def _matmul_nbits(x: Tensor, b: Tensor, scales: Tensor, k: int, n: int, bits: int, block_size: int,
                  accuracy_level: int) -> Tensor:
    """PyTorch reference of ``MatMulNBits``: ``x · ((codes − 2^(bits−1)) · scale)ᵀ`` (in ``x``'s precision)."""
    return x @ _dequantize_blocks(b, scales, k=k, n=n, bits=bits, block_size=block_size).to(x.dtype).T


@_matmul_nbits.register_fake
def _(x: Tensor, b: Tensor, scales: Tensor, k: int, n: int, bits: int, block_size: int, accuracy_level: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], n))


def _dequantize_blocks(b: Tensor, scales: Tensor, *, k: int, n: int, bits: int, block_size: int) -> Tensor:
    """The float ``(n, k)`` weight that ``MatMulNBits`` inputs ``b``, ``scales`` stand for."""
    blocks = scales.shape[1]
    if bits == 4:
        codes = torch.stack([b & 0xF, b >> 4], dim=-1)  # the low nibble holds the first code
    else:
        codes = b
    offset = 1 << (bits - 1)  # ONNX Runtime's default zero point
    values = (codes.reshape(n, blocks, block_size).float() - offset) * scales.reshape(n, blocks, 1).float()
    return values.reshape(n, blocks * block_size)[:, :k]


def _matmul_nbits_schema() -> onnx.defs.OpSchema:
    """The part of ``com.microsoft.MatMulNBits``'s schema spiralkit writes (A, B, scales; no zero points)."""
    param, attr, integer = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute, onnx.defs.OpSchema.AttrType.INT
    return onnx.defs.OpSchema(
        MATMUL_NBITS, MS_DOMAIN, 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1")],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], "activations"), ("T2", ["tensor(uint8)"], "packed codes")],
        attributes=[*(attr(name, integer, required=True) for name in ("K", "N", "bits", "block_size")),
                    attr("accuracy_level", integer, required=False)],
    )


_MATMUL_NBITS_OP = onnxscript.values.Op(onnxscript.values.Opset(MS_DOMAIN, 1), MATMUL_NBITS, _matmul_nbits_schema())


def _translate_matmul_nbits(x: Any, b: Any, scales: Any, k: int, n: int, bits: int, block_size: int,
                            accuracy_level: int) -> Any:
    """The ONNX node of one ``spiralkit::matmul_nbits`` call (the exporter's custom translation)."""
    return _MATMUL_NBITS_OP(x, b, scales, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level)


_TRANSLATIONS = {torch.ops.spiralkit.matmul_nbits.default: _translate_matmul_nbits}


class MatMulNBitsLinear(nn.Module):
    """A weight-only Linear in ONNX Runtime's ``MatMulNBits`` layout; exports as that one node.

    ``MatMulNBits`` (ONNX Runtime contrib op, ``com.microsoft``) multiplies ``A (…, K)`` by a
    weight ``(N, K)`` stored block-wise along ``K``: ``B`` is ``uint8`` ``(N, k_blocks,
    block_size · bits / 8)`` with *unsigned* codes (4-bit: two per byte, the first in the low
    nibble), ``scales`` is ``(N, k_blocks)``, and ``W = (code − zero_point) · scale``. Without
    a zero-point input ONNX Runtime takes ``2^(bits−1)`` (8 for 4 bits, 128 for 8 bits), so
    spiralkit's symmetric signed codes ``q`` (``[−7, 7]`` or ``[−127, 127]``) are stored as
    ``q + 2^(bits−1)`` and need none: the weight is exactly the dequantized `WeightOnlyLinear`
    weight ``q · s``. A last block shorter than ``block_size`` is padded with the zero code.

    ``accuracy_level`` is the node's attribute of that name: 0 (unset) or 1 multiply in
    float32 (ONNX Runtime unpacks the codes block by block); 4 lets ONNX Runtime quantize
    ``A`` to int8 per block and multiply in integers where the CPU has a kernel for it
    (faster, not exact: outputs then differ from the PyTorch product by the int8 rounding
    of the activations).

    Built by `matmul_nbits_linear`; ``forward`` computes the product in PyTorch (float).
    """

    b: Tensor
    scales: Tensor

    def __init__(self, b: Tensor, scales: Tensor, bias: Tensor | None, *, in_features: int, bits: int,
                 block_size: int, accuracy_level: int = 0) -> None:
        super().__init__()
        self.register_buffer("b", b)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.in_features = in_features
        self.out_features = int(b.shape[0])
        self.bits = bits
        self.block_size = block_size
        self.accuracy_level = accuracy_level

    def forward(self, x: Tensor) -> Tensor:
        """``x Wᵀ + b`` through ``spiralkit::matmul_nbits`` (the op the exporter writes as ``MatMulNBits``)."""
        y = _matmul_nbits(x, self.b, self.scales, self.in_features, self.out_features, self.bits, self.block_size,
                          self.accuracy_level)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> Tensor:
        """The float weight ``(out, in)`` the codes stand for."""
        return _dequantize_blocks(self.b, self.scales, k=self.in_features, n=self.out_features, bits=self.bits,
                                  block_size=self.block_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, block_size={self.block_size}, accuracy_level={self.accuracy_level}")


def matmul_nbits_linear(layer: WeightOnlyLinear, *, name: str = "linear", accuracy_level: int = 0) -> MatMulNBitsLinear:
    """Re-lay a `WeightOnlyLinear`'s codes and scales for ``MatMulNBits`` (the same weight, exactly).

    Args:
        layer: A weight-only Linear quantized per group of ``group_size`` input weights.
        name: The layer's name, for error messages.
        accuracy_level: ``MatMulNBits``'s attribute (0, 1: float32; 4: int8 activations).

    Raises:
        QuantError: The layer has one scale per output channel, or its group size is not a
            power of two >= 16 (``MatMulNBits``'s block sizes).
    """
    config = layer.config
    block = config.group_size
    if block is None or block < _MIN_BLOCK or block & (block - 1):
        got = "one scale per output channel" if block is None else f"group_size={block}"
        raise QuantError(
            f"layer {name!r}: ONNX Runtime's MatMulNBits needs int{config.bits} weights quantized per group of a "
            f"power-of-two size >= {_MIN_BLOCK} along the input (e.g. group_size: 32), got {got}"
        )
    n, k = layer.out_features, layer.in_features
    blocks = -(-k // block)
    offset = 1 << (config.bits - 1)
    signed = unpack_int4(layer.qweight, n * k) if config.bits == 4 else layer.qweight
    codes = torch.full((n, blocks * block), offset, dtype=torch.int16)
    codes[:, :k] = signed.reshape(n, k).to(torch.int16) + offset
    if config.bits == 4:
        pairs = codes.reshape(n, blocks, block // 2, 2)
        packed = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    else:
        packed = codes.reshape(n, blocks, block).to(torch.uint8)
    scales = layer.scale.detach().reshape(n, blocks).float().contiguous()
    return MatMulNBitsLinear(packed, scales, layer.bias, in_features=k, bits=config.bits, block_size=block,
                             accuracy_level=accuracy_level)


def _float_conv(layer: WeightOnlyConv2d) -> nn.Conv2d:
    """A float Conv2d with the dequantized weight (ONNX Runtime has no int4 convolution)."""
    out_channels, in_per_group, kh, kw = layer.weight_shape
    conv = nn.Conv2d(in_per_group * layer.groups, out_channels, (kh, kw), stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(layer.weight)
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
    return conv


def to_matmul_nbits_(model: nn.Module, *, accuracy_level: int = 0) -> dict[str, str]:
    """Replace weight-only layers in place by what ONNX Runtime runs them as.

    Every `WeightOnlyLinear` becomes a `MatMulNBitsLinear` (same weight, exactly); every
    `WeightOnlyConv2d` a float ``nn.Conv2d`` with the dequantized weight, since ONNX Runtime
    has no block-quantized convolution.

    Args:
        model: Modified in place (a container; the model itself cannot be replaced).
        accuracy_level: Of every ``MatMulNBits`` (see `MatMulNBitsLinear`).

    Returns:
        Layer name → ``"MatMulNBits"`` or ``"Conv"`` (float), for each replaced layer.

    Raises:
        QuantError: A layer's groups do not fit ``MatMulNBits`` (see `matmul_nbits_linear`).
    """
    replaced: dict[str, str] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, WeightOnlyLinear):
                setattr(parent, child_name, matmul_nbits_linear(child, name=name, accuracy_level=accuracy_level))
                replaced[name] = MATMUL_NBITS
            elif isinstance(child, WeightOnlyConv2d):
                setattr(parent, child_name, _float_conv(child))
                replaced[name] = "Conv"
    return replaced


def export_weight_only_onnx(model: nn.Module, example: Tensor, path: Path, *, accuracy_level: int = 0,
                            opset: int | None = None) -> Path:
    """Export a weight-only model with each `WeightOnlyLinear` as one ``MatMulNBits`` node.

    ``model`` is not modified: a copy has its layers replaced (`to_matmul_nbits_`) and is
    exported by `spiralkit.export.onnx.export_onnx` (one self-contained file, dynamic batch)
    with ``spiralkit::matmul_nbits`` translated to ``com.microsoft.MatMulNBits``. Check what
    ONNX Runtime runs with `optimized_ops`.

    Args:
        model: A model holding `WeightOnlyLinear` layers (from `quantize_weights_`, GPTQ, ...).
        example: An example input batch.
        path: Destination ``.onnx`` file.
        accuracy_level: ``MatMulNBits``'s attribute: 0 (float32, matches the PyTorch model)
            or 4 (int8 activations where the CPU has the kernel; see `MatMulNBitsLinear`).
        opset: ONNX opset version; None takes the exporter's default.

    Returns:
        ``path``.

    Raises:
        QuantError: ``model`` holds no `WeightOnlyLinear`, or one whose groups do not fit
            ``MatMulNBits``.
        ExportError: The exporter fails.
    """
    if accuracy_level not in _ACCURACY_LEVELS:
        raise QuantError(f"MatMulNBits accuracy_level must be one of {sorted(_ACCURACY_LEVELS)}, got {accuracy_level}")
    runnable = copy.deepcopy(model)
    replaced = to_matmul_nbits_(runnable, accuracy_level=accuracy_level)
    if MATMUL_NBITS not in replaced.values():
        raise QuantError(f"{type(model).__name__} holds no WeightOnlyLinear layer to export as MatMulNBits "
                         "(quantize it with quantize_weights_ first)")
    return export_onnx(runnable, example, path, opset=opset, translations=_TRANSLATIONS)
