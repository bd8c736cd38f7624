"""The compact artefact: bit streams, bit-exact round trips, errors, and the size it reaches."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from spiralkit.errors import ModelError
from spiralkit.export.weights import save_weights
from spiralkit.models import ModelSpec, load_model
from spiralkit.prune.importance import magnitude_scores
from spiralkit.prune.unstructured import apply_masks, masks_for_sparsity
from spiralkit.quant.affine import PerChannel, PerTensor, QuantError
from spiralkit.quant.compact import (
    compressed_size,
    decode_gaps,
    encode_gaps,
    load_compressed,
    pack_bits,
    save_compressed,
    unpack_bits,
)
from spiralkit.quant.nonzero import quantize_nonzero_

TINY = ModelSpec(name="mlp", kwargs={"in_features": 12, "widths": [10], "num_classes": 3})


def raw(tensor: Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert raw(actual[name]) == raw(tensor), name


def pruned(spec: ModelSpec, sparsity: float, seed: int = 0) -> nn.Module:
    """The spec's model, magnitude-pruned layer by layer (zeros are +0.0)."""
    torch.manual_seed(seed)
    model = load_model(spec)
    weights = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    apply_masks(model, masks_for_sparsity(magnitude_scores(weights), sparsity=sparsity))
    return model


def expected_quantized(weight: Tensor, bits: int) -> Tensor:
    """The documented quantizer, computed independently: s = bf16(max|w| / Q), ŵ = clamp(round(w/s)) · s."""
    q_max = 2 ** (bits - 1) - 1
    scale = (weight.abs().max() / q_max).to(torch.bfloat16).float()
    # Integer codes have no -0: a weight that rounds to code 0 comes back as +0.0.
    return torch.clamp(torch.round(weight / scale), -q_max, q_max) * scale + 0.0


# --------------------------------------------------------------------------- bit streams


def test_pack_bits_by_hand() -> None:
    assert pack_bits(np.array([1, 2, 3]), 2) == bytes([0b01101100])
    assert pack_bits(np.array([31, 0]), 5) == bytes([0b11111000, 0b00000000])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 13])
def test_pack_bits_round_trip(bits: int, count: int) -> None:
    codes = (np.arange(count) * 37 % (1 << bits)).astype(np.uint8)
    data = pack_bits(codes, bits)
    assert len(data) == -(-count * bits // 8)
    assert np.array_equal(unpack_bits(data, count, bits), codes)


def test_pack_bits_errors() -> None:
    with pytest.raises(QuantError, match=r"codes must be in \[0, 3\], got \[0, 4\]"):
        pack_bits(np.array([0, 4]), 2)
    with pytest.raises(QuantError, match="got 9"):
        pack_bits(np.array([0]), 9)


def test_gaps_by_hand() -> None:
    # Gaps 1, 3, 297, 1, 699: 297 = 255 + 42 -> [0, 42]; 699 = 2·255 + 189 -> [0, 0, 189].
    positions = np.array([0, 3, 300, 301, 1000])
    stream = encode_gaps(positions)
    assert stream.tolist() == [1, 3, 0, 42, 1, 0, 0, 189]
    assert decode_gaps(stream).tolist() == positions.tolist()
    assert encode_gaps(np.array([254])).tolist() == [255]  # a gap of exactly 255: no filler
    assert encode_gaps(np.array([255])).tolist() == [0, 1]
    assert encode_gaps(np.array([], dtype=np.int64)).tolist() == []


# --------------------------------------------------------------------------- round trips


def test_float_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model = pruned(TINY, 0.7)
    path = tmp_path / "tiny.spk"
    written = save_compressed(model, path, spec=TINY)
    assert written == path.stat().st_size == compressed_size(model, spec=TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.spk"]  # no temporary left
    loaded = load_compressed(path)
    assert not loaded.training
    assert_bit_exact(loaded.state_dict(), model.state_dict())
    x = torch.randn(4, 12)
    assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_quantized_weights_load_bit_exact(tmp_path: Path, bits: int) -> None:
    model = pruned(TINY, 0.6)
    save_compressed(model, tmp_path / "q.spk", spec=TINY, bits=bits)
    loaded = load_compressed(tmp_path / "q.spk").state_dict()
    for name, tensor in model.state_dict().items():
        if name.endswith("weight"):
            expected = expected_quantized(tensor, bits)
            assert raw(loaded[name]) == raw(expected), name
            assert bool((loaded[name][tensor == 0] == 0).all()), f"{name}: a pruned weight came back"
        else:
            assert raw(loaded[name]) == raw(tensor), name


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(axis=0)], ids=["tensor", "channel"])
def test_quantize_nonzero_matches_the_file_and_is_idempotent(
    tmp_path: Path, granularity: PerTensor | PerChannel
) -> None:
    model = pruned(TINY, 0.5)
    save_compressed(model, tmp_path / "a.spk", spec=TINY, bits=4, granularity=granularity)
    in_memory = copy.deepcopy(model)
    assert quantize_nonzero_(in_memory, 4, granularity=granularity) == {"fc1.weight": 4, "fc2.weight": 4}
    assert_bit_exact(load_compressed(tmp_path / "a.spk").state_dict(), in_memory.state_dict())
    again = copy.deepcopy(in_memory)
    quantize_nonzero_(again, 4, granularity=granularity)
    assert_bit_exact(again.state_dict(), in_memory.state_dict())
    # Saving the already-quantized model writes the same file.
    save_compressed(in_memory, tmp_path / "b.spk", spec=TINY, bits=4, granularity=granularity)
    assert (tmp_path / "a.spk").read_bytes() == (tmp_path / "b.spk").read_bytes()


def test_per_layer_bits_and_exclude(tmp_path: Path) -> None:
    model = pruned(TINY, 0.5)
    save_compressed(model, tmp_path / "m.spk", spec=TINY, bits={"fc1": 3})
    loaded = load_compressed(tmp_path / "m.spk").state_dict()
    assert raw(loaded["fc1.weight"]) == raw(expected_quantized(model.fc1.weight, 3))
    assert raw(loaded["fc2.weight"]) == raw(model.fc2.weight)  # not listed: float
    save_compressed(model, tmp_path / "e.spk", spec=TINY, bits=6, exclude=("fc2",))
    loaded = load_compressed(tmp_path / "e.spk").state_dict()
    assert raw(loaded["fc1.weight"]) == raw(expected_quantized(model.fc1.weight, 6))
    assert raw(loaded["fc2.weight"]) == raw(model.fc2.weight)


def tied() -> nn.Module:
    """A model whose two layers share one weight (built by module:function spec)."""
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.ReLU(), nn.Linear(6, 6, bias=False))
    model[2].weight = model[0].weight
    return model


def test_tied_weights_are_stored_once_and_need_allow_imports(tmp_path: Path) -> None:
    spec = ModelSpec(name=f"{__name__}:tied")
    model = tied()
    save_compressed(model, tmp_path / "t.spk", spec=spec, bits=5)
    with pytest.raises(ModelError, match="imports and runs code; pass allow_imports=True"):
        load_compressed(tmp_path / "t.spk")
    loaded = load_compressed(tmp_path / "t.spk", allow_imports=True)
    assert loaded[0].weight is loaded[2].weight
    assert raw(loaded[0].weight) == raw(expected_quantized(model[0].weight, 5))


# --------------------------------------------------------------------------- errors


def test_bad_requests_name_what_is_wrong(tmp_path: Path) -> None:
    model = pruned(TINY, 0.5)
    with pytest.raises(QuantError, match=r"exclude pattern 'head' matches no Linear/Conv layer; layers are: fc1, fc2"):
        save_compressed(model, tmp_path / "x.spk", spec=TINY, bits=4, exclude=("head",))
    with pytest.raises(QuantError, match="bits given for 'fc9'"):
        compressed_size(model, spec=TINY, bits={"fc9": 4})
    with pytest.raises(QuantError, match="got 9"):
        quantize_nonzero_(model, 9)
    other = ModelSpec(name="mlp", kwargs={"in_features": 12, "widths": [11], "num_classes": 3})
    with pytest.raises(ModelError, match="does not build the model being saved: .*'fc1.weight'"):
        save_compressed(model, tmp_path / "x.spk", spec=other)
    assert not any(tmp_path.iterdir())


def _rewrite_header(data: bytes, change: dict[str, object]) -> bytes:
    (size,) = struct.unpack("<I", data[8:12])
    header = json.loads(data[12 : 12 + size])
    header.update(change)
    encoded = json.dumps(header).encode()
    return data[:8] + struct.pack("<I", len(encoded)) + encoded + data[12 + size :]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda data: b"not a model at all", "is not a spiralkit compact model file"),
        (lambda data: data[:-5], "has a corrupt payload"),
        (lambda data: data[:-3] + bytes(b ^ 0xFF for b in data[-3:]), "has a corrupt payload"),
        (lambda data: data[:12] + b"x" + data[13:], "has a corrupt header"),
        (lambda data: _rewrite_header(data, {"version": 99}), "format version 99; this spiralkit reads version 1"),
        (lambda data: _rewrite_header(data, {"model": {"name": "nope"}}), "unknown model 'nope'"),
        (lambda data: _rewrite_header(data, {"tensors": [{"name": "fc1.weight"}]}), "tensor 'fc1.weight' has a corrupt record"),
    ],
    ids=["garbage", "truncated", "flipped", "header", "version", "spec", "records"],
)
def test_corrupt_files_name_the_path(tmp_path: Path, corrupt, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "model.spk"
    save_compressed(pruned(TINY, 0.5), path, spec=TINY, bits=4)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ModelError, match=message) as info:
        load_compressed(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="compact model file not found: .*nothing.spk"):
        load_compressed(tmp_path / "nothing.spk")


# --------------------------------------------------------------------------- size


def test_lenet300_pruned_and_5_bit_is_at_least_40x_smaller(tmp_path: Path) -> None:
    spec = ModelSpec(name="lenet300")
    model = pruned(spec, 0.92)
    dense = save_weights(model, tmp_path / "dense.safetensors")
    assert 1_050_000 < dense < 1_090_000  # 266,610 float32 parameters
    size = save_compressed(model, tmp_path / "lenet.spk", spec=spec, bits=5)
    assert dense / size >= 40, f"only {dense / size:.1f}x ({size} bytes)"
    loaded = load_compressed(tmp_path / "lenet.spk")
    reference = copy.deepcopy(model)
    quantize_nonzero_(reference, 5)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(loaded(x), reference.eval()(x))
