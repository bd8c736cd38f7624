"""Parameter counts, MACs, latency and size on disk."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from spiralkit.measure import (
    Latency,
    ParamCount,
    SizeInfo,
    count_macs,
    count_params,
    latency_by_module,
    measure_latency,
    size_on_disk,
)
from spiralkit.models import lenet5, lenet300


def zero_fraction_(model: nn.Module, fraction: float) -> None:
    """Zero the first ``fraction`` of every weight matrix, deterministically."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                flat = module.weight.view(-1)
                flat[: int(fraction * flat.numel())] = 0.0


def test_count_params_with_zeroed_weights() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))  # 15 + 8 = 23 parameters
    with torch.no_grad():
        model[0].weight[0].zero_()  # 4 zeros
        model[1].bias.zero_()  # 2 zeros
    counts = count_params(model)
    assert counts == ParamCount(total=23, nonzero=17)
    assert counts.sparsity == pytest.approx(6 / 23)


def test_count_params_shared_counted_once() -> None:
    shared = nn.Linear(5, 5)
    assert count_params(nn.Sequential(shared, nn.ReLU(), shared)).total == 30


def test_count_params_sees_torch_prune_masks() -> None:
    model = nn.Sequential(nn.Linear(10, 10, bias=False))
    prune.l1_unstructured(model[0], "weight", amount=30)
    assert count_params(model) == ParamCount(total=100, nonzero=70)


def test_sparsity_of_empty_model() -> None:
    assert count_params(nn.ReLU()).sparsity == 0.0


def test_count_macs_linear() -> None:
    assert count_macs(nn.Linear(10, 5), torch.randn(1, 10)) == 50


def test_count_macs_conv() -> None:
    # out elements 8*16*16 = 2048, each 3*3*3 = 27 MACs
    assert count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 16, 16)) == 55_296
    # grouped, strided: out 6*4*4 = 96 elements, each (6/3)*3*3 = 18 MACs, batch 2
    assert count_macs(nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3), torch.randn(2, 6, 8, 8)) == 2 * 96 * 18


def test_count_macs_lenet5() -> None:
    # conv1 20*24*24*25 + conv2 50*8*8*500 + fc1 800*500 + fc2 500*10
    assert count_macs(lenet5(), torch.randn(1, 1, 28, 28)) == 288_000 + 1_600_000 + 400_000 + 5_000


def test_count_macs_restores_modes() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout())
    model.train()
    model[1].eval()  # a frozen BN inside a training model must stay as it was
    count_macs(model, torch.randn(2, 4))
    assert [m.training for m in model] == [True, False, True]


def test_measure_latency_fields_and_restores_threads() -> None:
    model = lenet300().train()
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    latency = measure_latency(model, torch.randn(3, 1, 28, 28), threads=other, warmup=1, repeats=5)
    assert isinstance(latency, Latency)
    assert 0.0 < latency.median_ms <= latency.p90_ms
    assert (latency.batch_size, latency.threads, latency.repeats) == (3, other, 5)
    assert torch.get_num_threads() == before
    assert model.training


def test_measure_latency_restores_threads_on_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        measure_latency(nn.Linear(3, 3), torch.randn(2, 4), threads=1, warmup=0, repeats=1)
    assert torch.get_num_threads() == before


def test_measure_latency_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="repeats=0"):
        measure_latency(nn.Linear(3, 3), torch.randn(1, 3), repeats=0)


def test_size_on_disk_sparse_model(tmp_path: Path) -> None:
    model = lenet300()
    zero_fraction_(model, 0.95)
    size = size_on_disk(model, tmp_path / "sizes")
    assert size.dense_bytes == (tmp_path / "sizes" / "weights.safetensors").stat().st_size
    assert size.sparse_bytes == (tmp_path / "sizes" / "weights.sparse.safetensors").stat().st_size
    assert size.dense_bytes > 266_610 * 4
    # bitmask (1/32 of dense) + 5% of the values, plus the dense biases
    assert size.sparse_bytes < 0.1 * size.dense_bytes
    assert size.best_bytes == size.sparse_bytes


def test_size_on_disk_dense_model(tmp_path: Path) -> None:
    size = size_on_disk(lenet300(), tmp_path)
    assert size.sparse_bytes <= size.dense_bytes + 1024
    assert size.best_bytes == min(size.dense_bytes, size.sparse_bytes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors", "weights.sparse.safetensors"]


def test_size_info_best_bytes() -> None:
    assert SizeInfo(dense_bytes=10, sparse_bytes=7).best_bytes == 7


def test_count_macs_sees_multihead_attention_in_eval() -> None:
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    x = torch.randn(1, 4, 16)
    # q/k/v/out projections 4·4·16·16 and FFN 2·4·16·32; with the fused fast path it was 0.
    # (The attention scores themselves, CPU scaled-dot-product attention, are not counted.)
    assert count_macs(layer, x) == 4 * 4 * 16 * 16 + 2 * 4 * 16 * 32
    assert torch.backends.mha.get_fastpath_enabled()


class _Sleep(nn.Module):
    """Takes ``seconds`` per call: a layer whose time dominates any hook overhead."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_Sleep(0.02), nn.Sequential(_Sleep(0.01), _Sleep(0.01)), _Sleep(0.0))
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_latency_by_module_times_each_module_and_the_whole_pass() -> None:
    model = _Net()
    before = torch.get_num_threads()
    times = latency_by_module(model, torch.zeros(1), warmup=0, repeats=3)
    assert torch.get_num_threads() == before and not model.body[0]._forward_hooks and not model._forward_pre_hooks
    times = {name.removeprefix("body."): ms for name, ms in times.items() if name != "body"}
    assert sorted(times) == ["", "0", "1", "1.0", "1.1", "2"]  # "unused" never ran
    assert times["0"] == pytest.approx(20.0, abs=8.0) and times["1"] == pytest.approx(20.0, abs=8.0)
    assert times["1"] >= times["1.0"] + times["1.1"] - 1.0  # a module's time includes its children's
    leaves = times["0"] + times["1.0"] + times["1.1"] + times["2"]
    assert leaves / times[""] == pytest.approx(1.0, abs=0.1)  # the leaves add up to the whole pass


def test_latency_by_module_counts_every_call_of_a_module() -> None:
    sleep = _Sleep(0.01)
    model = nn.Sequential(sleep, sleep)  # one module called twice
    times = latency_by_module(model, torch.zeros(1), warmup=0, repeats=2)
    assert times["0"] == pytest.approx(20.0, abs=8.0)


@pytest.mark.parametrize("bad", [{"threads": 0}, {"repeats": 0}, {"warmup": -1}])
def test_latency_by_module_rejects_bad_settings(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="need threads >= 1, repeats >= 1, warmup >= 0"):
        latency_by_module(nn.Linear(2, 2), torch.zeros(1, 2), **bad)
