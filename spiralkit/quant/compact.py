"""The compact artefact: a pruned (and quantized) model in as few bytes as it takes.

Deep Compression style (Han et al. 2016, "Deep Compression: Compressing Deep Neural Networks
with Pruning, Trained Quantization and Huffman Coding"): sparsity, low-bit weights and
entropy coding, each stored separately so each is cheap.

Per floating-point tensor of the state dict:

* **positions** of the non-zeros, whichever is smallest of: none (dense), relative-index
  gaps (one ``uint8`` per non-zero holding the distance to the previous one; a ``0`` byte is
  a filler meaning "255 further, no element here", so gaps ≥ 256 cost extra bytes), or a
  bitmask (``np.packbits``, one bit per element);
* **values** of the stored elements: for a Linear/Conv weight given ``bits`` = b, the b-bit
  codes of a uniform quantizer, bit-packed (`pack_bits`), plus its scale(s); otherwise the
  raw bytes in the tensor's own dtype.

Zeros are never quantized: they are encoded by the positions and come back as exactly
``+0.0`` — pruned weights stay pruned. The quantizer, its bfloat16 scale and why it is
idempotent are described in `spiralkit.quant.nonzero`: `quantize_nonzero_` (the in-memory
version, for evaluating the accuracy of exactly the weights that get saved) can be applied
before `save_compressed` without changing what is saved.

Non-quantized tensors (biases, batch-norm statistics, integer buffers) are stored raw: their
round trip is bit-exact (``−0.0`` loads as ``+0.0``).

Four sections — all positions, all codes, all scales, all raw values — are each compressed
as one zstd frame (level 19, with a checksum); grouping similar bytes lets zstd's Huffman
and FSE stages, the entropy coding, fit each kind of data. The codes section has two
layouts: b bits per code, bit-packed (`pack_bits`), or one code per byte. Bit-packing is
smaller before entropy coding, but codes straddling byte boundaries hide their distribution
from zstd's byte-wise Huffman coder; after magnitude pruning the surviving codes are far from
uniform, and one code per byte then compresses better (LeNet-300-100, 92 % pruned, 5 bits:
5.9 KB against 8.3 KB). The writer compresses both and keeps the smaller.

File layout: ``b"SPIRALKC"``, a little-endian ``uint32`` header length, the UTF-8 JSON
header (``format``, ``version``, the `ModelSpec` — name and kwargs, never a checkpoint —,
the codec, the code layout, the sections' raw and stored sizes, one record per tensor), then
the sections' zstd frames in order. The model is rebuilt with `load_model` from the spec:
nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from pydantic import ValidationError
from torch import Tensor, nn

from spiralkit.errors import ModelError
from spiralkit.export.weights import atomic_write_bytes
from spiralkit.models.loading import ModelSpec, imports_code, load_model
from spiralkit.quant.affine import PerChannel, PerTensor, QuantError, check_bits
from spiralkit.quant.nonzero import (
    BitsArg,
    NonzeroGranularity,
    check_granularity,
    weight_bits,
    weight_codes,
    weight_values,
)

__all__ = [
    "COMPACT_FORMAT_VERSION",
    "compressed_size",
    "decode_gaps",
    "encode_gaps",
    "load_compressed",
    "pack_bits",
    "save_compressed",
    "unpack_bits",
]

COMPACT_FORMAT_VERSION = 1
_MAGIC = b"SPIRALKC"
_FORMAT = "spiralkit-compact"
_ZSTD_LEVEL = 19
_MAX_GAP = 255
_SECTIONS = ("index", "codes", "scales", "raw")
_PART_SECTION = {"index": "index", "codes": "codes", "scale": "scales", "values": "raw"}
_CODE_LAYOUTS = ("bytes", "packed")


# --------------------------------------------------------------------------- bit streams


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned ``bits``-bit codes into a byte string, most significant bit first.

    ``n`` codes take ``ceil(n · bits / 8)`` bytes; the last byte is padded with zero bits.

    Args:
        codes: Integers in ``[0, 2^bits − 1]``.
        bits: Bits per code, 2..8.

    Raises:
        QuantError: ``bits`` is out of range or a code does not fit.
    """
    check_bits(bits)
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise QuantError(f"pack_bits: codes must be in [0, {(1 << bits) - 1}], got [{codes.min()}, {codes.max()}]")
    columns = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(columns.reshape(-1)).tobytes()


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    """Exact inverse of `pack_bits`: ``count`` codes as ``uint8``.

    Raises:
        QuantError: ``bits`` is out of range or ``data`` has the wrong length.
    """
    check_bits(bits)
    if count < 0 or len(data) != math.ceil(count * bits / 8):
        raise QuantError(f"unpack_bits: {len(data)} bytes do not hold exactly {count} codes of {bits} bits")
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits).reshape(count, bits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, 8 - bits :] = stream
    return np.packbits(padded, axis=1).reshape(-1)


def encode_gaps(positions: np.ndarray) -> np.ndarray:
    """Relative indices of sorted positions: one ``uint8`` gap each, with filler entries.

    The gap of position ``p_i`` is ``d_i = p_i − p_{i−1}`` (``p_{−1} = −1``, so ``d ≥ 1``).
    A gap ``d > 255`` is written as ``(d − 1) // 255`` filler bytes ``0`` (each meaning
    "advance 255") followed by the remainder in ``1..255``.

    Args:
        positions: Strictly increasing non-negative integers.

    Returns:
        The ``uint8`` stream.
    """
    positions = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1)
    fillers = (gaps - 1) // _MAX_GAP
    ends = np.cumsum(fillers + 1) - 1
    stream = np.zeros(int(ends[-1]) + 1 if ends.size else 0, dtype=np.uint8)
    stream[ends] = gaps - _MAX_GAP * fillers
    return stream


def decode_gaps(stream: np.ndarray) -> np.ndarray:
    """Exact inverse of `encode_gaps`: the positions as ``int64``."""
    stream = np.asarray(stream, dtype=np.uint8)
    steps = np.where(stream == 0, _MAX_GAP, stream.astype(np.int64))
    return (np.cumsum(steps) - 1)[stream != 0]


# --------------------------------------------------------------------------- encoding


@dataclass
class _Payload:
    """The sections being built (codes in both layouts) and the per-tensor records."""

    sections: dict[str, bytearray] = field(
        default_factory=lambda: {name: bytearray() for name in ("index", "scales", "raw", *_CODE_LAYOUTS)}
    )
    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, section: str, data: bytes) -> list[int]:
        """Append ``data`` to ``section``; return ``[offset, length]`` in it."""
        ref = [len(self.sections[section]), len(data)]
        self.sections[section].extend(data)
        return ref


def _raw_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _positions(mask: np.ndarray) -> tuple[str, bytes]:
    """The shorter encoding of the non-zero positions: ``"gaps"`` or ``"bitmask"``."""
    gaps = encode_gaps(np.flatnonzero(mask)).tobytes()
    bitmask = np.packbits(mask).tobytes()
    return ("gaps", gaps) if len(gaps) <= len(bitmask) else ("bitmask", bitmask)


def _encode_tensor(
    payload: _Payload, name: str, tensor: Tensor, bits: int | None, granularity: NonzeroGranularity
) -> None:
    """Add one tensor's parts to the payload and its record to the header."""
    tensor = tensor.detach().cpu()
    record: dict[str, Any] = {"name": name, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
    parts: dict[str, Any] = {}
    record["parts"] = parts
    payload.records.append(record)
    if not tensor.is_floating_point() or tensor.dim() == 0:
        record["index"] = "dense"
        parts["values"] = payload.add("raw", _raw_bytes(tensor))
        return
    flat = tensor.reshape(-1)
    mask = (flat != 0).numpy()
    value_bits = bits if bits is not None else tensor.element_size() * 8
    index, index_bytes = _positions(mask)
    if len(index_bytes) + math.ceil(int(mask.sum()) * value_bits / 8) >= math.ceil(flat.numel() * value_bits / 8):
        index, mask = "dense", np.ones_like(mask)  # the positions would cost more than they save
    else:
        parts["index"] = payload.add("index", index_bytes)
    record["index"] = index
    keep = torch.from_numpy(mask)
    if bits is None:
        parts["values"] = payload.add("raw", _raw_bytes(flat[keep]))
        return
    codes, scale = weight_codes(tensor, bits, granularity, name=name)
    stored = codes.reshape(-1)[keep].numpy().astype(np.int16) + _code_offset(bits)
    parts["codes"] = {
        "bytes": payload.add("bytes", stored.astype(np.uint8).tobytes()),
        "packed": payload.add("packed", pack_bits(stored, bits)),
    }
    parts["scale"] = payload.add("scales", _raw_bytes(scale.to(torch.bfloat16)))
    record.update(bits=bits, axis=None if isinstance(granularity, PerTensor) else 0)


def _code_offset(bits: int) -> int:
    """``Q = 2^(b−1) − 1``: codes ``−Q..Q`` are stored as ``0..2Q``."""
    return (1 << (bits - 1)) - 1


def _compress(data: bytes) -> bytes:
    if not data:
        return b""
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True).compress(data)


def _finish(payload: _Payload) -> tuple[str, list[dict[str, Any]], bytes]:
    """Pick the smaller code layout; return it, the section table and the frames."""
    candidates = {layout: _compress(bytes(payload.sections[layout])) for layout in _CODE_LAYOUTS}
    layout = min(_CODE_LAYOUTS, key=lambda name: len(candidates[name]))
    for record in payload.records:
        if "codes" in record.get("parts", {}):
            record["parts"]["codes"] = record["parts"]["codes"][layout]
    frames = {
        "index": _compress(bytes(payload.sections["index"])),
        "codes": candidates[layout],
        "scales": _compress(bytes(payload.sections["scales"])),
        "raw": _compress(bytes(payload.sections["raw"])),
    }
    sizes = {"codes": len(payload.sections[layout])}
    table = [
        {"name": name, "size": sizes.get(name, len(payload.sections.get(name, b""))), "stored": len(frames[name])}
        for name in _SECTIONS
    ]
    return layout, table, b"".join(frames[name] for name in _SECTIONS)


def _unique_entries(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors to store, and tied names → the stored name they share memory with."""
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple[Any, ...], str] = {}
    for name, tensor in state.items():
        if tensor.numel():
            storage = tensor.untyped_storage().data_ptr()
            view = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if view in views:
                aliases[name] = views[view]
                continue
            views[view] = name
        unique[name] = tensor
    return unique, aliases


def _encode(
    model: nn.Module, *, spec: ModelSpec, bits: BitsArg, exclude: Sequence[str], granularity: NonzeroGranularity
) -> bytes:
    """The complete file content (see the module docstring)."""
    granularity = check_granularity(granularity)
    bits_by_name = weight_bits(model, bits, exclude)
    spec = spec.model_copy(update={"checkpoint": None})
    state = model.state_dict()
    _check_spec_builds(spec, state)
    unique, aliases = _unique_entries(state)
    payload = _Payload()
    for name, tensor in unique.items():
        group = [name, *(alias for alias, target in aliases.items() if target == name)]
        tensor_bits = next((bits_by_name[n] for n in group if bits_by_name.get(n) is not None), None)
        _encode_tensor(payload, name, tensor, tensor_bits, granularity)
    payload.records.extend({"name": alias, "alias": target} for alias, target in aliases.items())
    layout, table, frames = _finish(payload)
    header = {
        "format": _FORMAT,
        "version": COMPACT_FORMAT_VERSION,
        "model": spec.model_dump(mode="json", exclude={"checkpoint"}),
        "codec": {"name": "zstd", "level": _ZSTD_LEVEL},
        "code_layout": layout,
        "sections": table,
        "tensors": payload.records,
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return _MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + frames


def _check_spec_builds(spec: ModelSpec, state: Mapping[str, Tensor]) -> None:
    """Fail at save time, not at load time, when the spec builds a different architecture."""
    built = load_model(spec).state_dict()
    mismatched = [
        f"{key!r} ({tuple(built[key].shape)} built vs {tuple(tensor.shape)} saved)"
        for key, tensor in state.items()
        if key in built and built[key].shape != tensor.shape
    ]
    missing = sorted(set(built) ^ set(state))
    if missing or mismatched:
        problems = [f"keys only in one of them: {missing[:5]}"] if missing else []
        problems += [f"shape mismatch {', '.join(mismatched[:5])}"] if mismatched else []
        raise ModelError(
            f"model spec {spec.name!r} {spec.kwargs} does not build the model being saved: {'; '.join(problems)}"
        )


def save_compressed(
    model: nn.Module,
    path: Path,
    *,
    spec: ModelSpec,
    bits: BitsArg = None,
    exclude: Sequence[str] = (),
    granularity: NonzeroGranularity = PerTensor(),
) -> int:
    """Write the compact artefact of ``model`` (see the module docstring), atomically.

    Args:
        model: The (pruned) model; not modified. Quantized weights are computed from its
            current float weights (so calling `quantize_nonzero_` first changes nothing).
        path: Destination file.
        spec: How to rebuild the architecture (its checkpoint, if any, is not stored).
        bits: ``None`` (weights kept in float: exact round trip), one bit width for every
            Linear/Conv weight, or layer name → bits (unlisted layers stay in float).
        exclude: ``fnmatch`` patterns of layer names kept in float.
        granularity: `PerTensor` or `PerChannel` (axis 0) scales for quantized weights.

    Returns:
        The file size in bytes.

    Raises:
        QuantError: Bad bits, a pattern or key naming no layer, NaN/inf in a quantized weight.
        ModelError: The spec does not build a model with this state dict's keys and shapes.
    """
    data = _encode(model, spec=spec, bits=bits, exclude=exclude, granularity=granularity)
    atomic_write_bytes(Path(path), data)
    return len(data)


def compressed_size(
    model: nn.Module,
    *,
    spec: ModelSpec,
    bits: BitsArg = None,
    exclude: Sequence[str] = (),
    granularity: NonzeroGranularity = PerTensor(),
) -> int:
    """The size in bytes of the file `save_compressed` would write, without writing it."""
    return len(_encode(model, spec=spec, bits=bits, exclude=exclude, granularity=granularity))


# --------------------------------------------------------------------------- decoding


def load_compressed(path: Path, *, allow_imports: bool = False) -> nn.Module:
    """Rebuild the model of a compact artefact, in eval mode.

    Weights equal what `save_compressed` encoded bit for bit: raw tensors exactly, quantized
    weights ``q·s`` (what `quantize_nonzero_` computes), zeros ``+0.0``.

    Args:
        path: The file.
        allow_imports: Allow a ``"package.module:function"`` model spec, which imports and
            calls code named by the file. Off by default: zoo and ``torchvision:`` names only.

    Returns:
        The model, in ``eval()`` mode.

    Raises:
        ModelError: The file is missing, not a compact artefact, of an unsupported version,
            corrupt, or its spec needs imports that were not allowed; naming the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"compact model file not found: {path}") from None
    except OSError as exc:
        raise ModelError(f"cannot read compact model file {path}: {exc.strerror or exc}") from None
    header, frames = _read(path, data)
    spec = _spec_from_header(header, path, allow_imports=allow_imports)
    try:
        model = load_model(spec)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    expected = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict(keep_vars=False).items()}
    _check_records(header, expected, path)  # every declared size against the model, before allocating
    sections = _sections(header, frames, path, limit=_section_limit(expected))
    state = _decode_state(header, sections, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path}: the stored weights do not fit the model {spec.name!r}: {exc}") from exc
    return model.eval()


def _section_limit(expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """The most bytes any section of a valid file for this model can hold (a generous bound).

    Raw values take at most ``numel·itemsize`` bytes per tensor, codes one byte per element,
    positions at most ``numel + numel/255`` bytes (gaps) and scales two bytes per channel.
    """
    total = 0
    for shape, dtype in expected.values():
        numel = math.prod(shape)
        total += numel * (torch.empty(0, dtype=dtype).element_size() + 2) + 64
    return total


def _check_records(header: dict[str, Any], expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                   path: Path) -> None:
    """Every tensor record names a tensor of the model, with its shape and dtype; nothing is allocated."""
    records = header.get("tensors")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ModelError(f"{path} has a corrupt tensor table")
    for record in records:
        name = record.get("name")
        if not isinstance(name, str) or name not in expected:
            raise ModelError(f"{path}: tensor {name!r} is not in the model the file names")
        if "alias" in record:
            if not isinstance(record["alias"], str) or record["alias"] not in expected:
                raise ModelError(f"{path}: tensor {name!r} aliases {record['alias']!r}, which the model does not have")
            continue
        shape, dtype = expected[name]
        try:
            declared = tuple(int(size) for size in record["shape"])
            declared_dtype = _dtype(record["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: tensor {name!r} has a corrupt record: {exc}") from None
        if declared != shape or declared_dtype != dtype:
            raise ModelError(f"{path}: tensor {name!r} is declared {list(declared)} {declared_dtype}, "
                             f"but the model has {list(shape)} {dtype}")


def _read(path: Path, data: bytes) -> tuple[dict[str, Any], memoryview]:
    """The header of a compact file, and its compressed sections."""
    prefix = len(_MAGIC) + 4
    if len(data) < prefix or not data.startswith(_MAGIC):
        raise ModelError(f"{path} is not a spiralkit compact model file (bad magic bytes)")
    (header_size,) = struct.unpack("<I", data[len(_MAGIC) : prefix])
    if prefix + header_size > len(data):
        raise ModelError(f"{path} is truncated: its header needs {header_size} bytes")
    try:
        header = json.loads(data[prefix : prefix + header_size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path} has a corrupt header: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise ModelError(f"{path} is not a spiralkit compact model file (header format is not {_FORMAT!r})")
    if header.get("version") != COMPACT_FORMAT_VERSION:
        raise ModelError(
            f"{path} has compact format version {header.get('version')!r}; "
            f"this spiralkit reads version {COMPACT_FORMAT_VERSION}"
        )
    return header, memoryview(data)[prefix + header_size :]


def _decompress(frame: bytes, size: int) -> bytes:
    """At most ``size + 1`` bytes of a zstd frame: a frame claiming more cannot make us allocate it."""
    with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
        return reader.read(size + 1)


def _sections(header: dict[str, Any], frames: memoryview, path: Path, *, limit: int) -> dict[str, bytes]:
    """Decompress each section's frame, checking sizes against the header and ``limit`` first."""
    sections: dict[str, bytes] = {}
    offset = 0
    try:
        if [entry["name"] for entry in header["sections"]] != list(_SECTIONS):
            raise ValueError(f"sections must be {list(_SECTIONS)}")
        for entry in header["sections"]:
            size, stored = int(entry["size"]), int(entry["stored"])
            if not 0 <= size <= limit or stored < 0:
                raise ValueError(f"section {entry['name']!r} declares {size} bytes; this model's files hold "
                                 f"at most {limit}")
            frame = bytes(frames[offset : offset + stored])
            offset += stored
            if len(frame) != stored:
                raise ValueError(f"section {entry['name']!r} is truncated")
            content = b"" if stored == 0 else _decompress(frame, size)
            if len(content) != size:
                raise ValueError(f"section {entry['name']!r} has {'more than ' if len(content) > size else ''}"
                                 f"{min(len(content), size)} bytes, the header says {size}")
            sections[entry["name"]] = content
        if offset != len(frames):
            raise ValueError(f"{len(frames) - offset} unexpected bytes after the last section")
    except (zstandard.ZstdError, KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ModelError(f"{path} has a corrupt payload: {exc}") from exc
    return sections


def _spec_from_header(header: dict[str, Any], path: Path, *, allow_imports: bool) -> ModelSpec:
    try:
        spec = ModelSpec.model_validate(header["model"])
    except (KeyError, TypeError, ValidationError) as exc:
        raise ModelError(f"{path} has a bad model spec: {exc}") from exc
    if imports_code(spec.name) and not allow_imports:
        raise ModelError(
            f"{path} builds its model with {spec.name!r}, which imports and runs code; "
            "pass allow_imports=True if you trust this file"
        )
    return spec


def _decode_state(header: dict[str, Any], sections: Mapping[str, bytes], path: Path) -> dict[str, Tensor]:
    layout = header.get("code_layout")
    if layout not in _CODE_LAYOUTS:
        raise ModelError(f"{path} has an unknown code layout {layout!r}")
    records = header.get("tensors")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ModelError(f"{path} has a corrupt tensor table")
    state: dict[str, Tensor] = {}
    for record in records:
        if "alias" in record:
            continue
        try:
            state[record["name"]] = _decode_tensor(record, sections, layout)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, QuantError) as exc:
            raise ModelError(f"{path}: cannot decode tensor {record.get('name')!r}: {exc}") from exc
    for record in records:
        if "alias" in record:
            if record["alias"] not in state:
                raise ModelError(f"{path}: tensor {record.get('name')!r} aliases unknown {record['alias']!r}")
            state[record["name"]] = state[record["alias"]]
    return state


def _part(record: dict[str, Any], part: str, sections: Mapping[str, bytes]) -> bytes:
    offset, length = (int(v) for v in record["parts"][part])
    section = sections[_PART_SECTION[part]]
    if offset < 0 or length < 0 or offset + length > len(section):
        raise ValueError(f"part {part!r} [{offset}, {offset + length}) lies outside its section")
    return section[offset : offset + length]


def _from_bytes(data: bytes, dtype: torch.dtype, count: int) -> Tensor:
    """``count`` elements of ``dtype`` from raw little-endian bytes."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(data) != count * itemsize:
        raise ValueError(f"expected {count * itemsize} bytes of {dtype}, found {len(data)}")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    as_bytes = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return as_bytes.to(torch.bool) if dtype == torch.bool else as_bytes.view(dtype)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _decode_tensor(record: dict[str, Any], sections: Mapping[str, bytes], layout: str) -> Tensor:
    dtype = _dtype(record["dtype"])
    shape = [int(size) for size in record["shape"]]
    numel = math.prod(shape)
    index = record["index"]
    if index == "dense":
        mask, count = None, numel
    elif index in ("gaps", "bitmask"):
        mask = _decode_mask(index, _part(record, "index", sections), numel)
        count = int(mask.sum())
    else:
        raise ValueError(f"unknown position encoding {index!r}")
    if "codes" not in record["parts"]:
        values = _from_bytes(_part(record, "values", sections), dtype, count)
        return _scatter(values, mask, numel, torch.zeros((), dtype=dtype)).reshape(shape)
    bits = check_bits(record["bits"])
    granularity: NonzeroGranularity = PerTensor() if record["axis"] is None else PerChannel(axis=0)
    channels = 1 if isinstance(granularity, PerTensor) else shape[0]
    scale = _from_bytes(_part(record, "scale", sections), torch.bfloat16, channels).float()
    if isinstance(granularity, PerTensor):
        scale = scale.reshape(())
    data = _part(record, "codes", sections)
    if layout == "packed":
        stored = unpack_bits(data, count, bits)
    elif len(data) == count:
        stored = np.frombuffer(data, dtype=np.uint8)
    else:
        raise ValueError(f"{len(data)} code bytes for {count} stored elements")
    offset = _code_offset(bits)
    if stored.size and int(stored.max()) > 2 * offset:
        raise ValueError(f"code {int(stored.max())} is outside 0..{2 * offset}")
    codes = torch.from_numpy(stored.astype(np.int16) - offset).to(torch.int8)
    full = _scatter(codes, mask, numel, torch.zeros((), dtype=torch.int8)).reshape(shape)
    return weight_values(full, scale, granularity, dtype)


def _decode_mask(index: str, data: bytes, numel: int) -> np.ndarray:
    if index == "bitmask":
        if len(data) != math.ceil(numel / 8):
            raise ValueError(f"bitmask has {len(data)} bytes, {math.ceil(numel / 8)} expected")
        return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=numel).astype(bool)
    positions = decode_gaps(np.frombuffer(data, dtype=np.uint8))
    if positions.size and positions[-1] >= numel:
        raise ValueError(f"position {positions[-1]} is beyond the tensor's {numel} elements")
    mask = np.zeros(numel, dtype=bool)
    mask[positions] = True
    return mask


def _scatter(values: Tensor, mask: np.ndarray | None, numel: int, fill: Tensor) -> Tensor:
    """The flat tensor with ``values`` at the ``mask`` positions and ``fill`` elsewhere."""
    if mask is None:
        return values
    full = fill.expand(numel).clone()
    full[torch.from_numpy(mask)] = values
    return full
