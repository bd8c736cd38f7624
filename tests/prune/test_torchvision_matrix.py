"""50% channel pruning (L2) of every torchvision classification model that builds without weights.

For each model: the pruned model runs, has at most 60% of the MACs, computes what its masked
twin computes (the same plan applied with ``mode="mask"``), and exports to ONNX that ONNX
Runtime runs with the same outputs. What is left unpruned is in the plan's ``skipped`` list
(printed on failure, and summarised by ``python -m tests.prune.test_torchvision_matrix``).

The masked twin is only a fair check when removed channels would otherwise be visible, so
the random models are first made "live": batch-norm scales and shifts are randomised and
the running statistics calibrated on random data (so activations neither vanish nor explode
and the shift of a removed channel is non-zero), and constant parameters (zero classifier
heads, ConvNeXt's 1e-6 layer scales, ...) get random values.

A fast subset runs by default; the rest is marked slow. ONNX export is checked for the fast
subset and for one or two models of every family (see ``ONNX``), partly with
`spiralkit.export.onnx.export_onnx` (torch's dynamo exporter) and partly with the TorchScript
exporter through a private helper, which is about ten times faster, so that the whole matrix
finishes in a few minutes on two cores.
"""

from __future__ import annotations

import copy
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import Tensor, nn

from spiralkit.export.onnx import export_onnx, verify_onnx
from spiralkit.measure import count_macs
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.plan import PrunePlan
from spiralkit.prune.structured import StructuredPrune, plan_pruning

FAST = ("resnet18", "mobilenet_v2", "densenet121", "vit_b_16")
# ONNX: the fast subset and one or two members of every family in the slow matrix are
# exported and run by ONNX Runtime (the other members repeat the same layer types, and the
# exporter costs seconds per model). resnet18 and vit_b_16 use the project's exporter
# (`export_onnx`, dynamo); so do AlexNet and VGG, whose adaptive average pool to 6x6 / 7x7 from
# the 1x1 / 2x2 map of a 64x64 input the TorchScript exporter cannot handle. The rest use the
# TorchScript exporter, about ten times faster.
ONNX = (
    *FAST, "alexnet", "convnext_tiny", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3",
    "maxvit_t", "mnasnet0_5", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf",
    "resnet50", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "squeezenet1_1", "swin_t", "swin_v2_t",
    "vgg11_bn", "vit_b_32", "wide_resnet50_2",
)
DYNAMO = ("resnet18", "vit_b_16", "alexnet", "vgg11_bn")
# 632M parameters: the builder's weight initialisation alone takes about 15 s, so it is
# built on the meta device and given quick random weights instead (see `quick_weights`).
GIANTS = ("vit_h_14",)
ALL = tuple(torchvision.models.list_models(module=torchvision.models))
MAX_MACS_RATIO = 0.6
# Models that stay above the MACs bound, and why (every other model must reach it).
PARTIAL: dict[str, str] = {}
# Input sizes: 64x64 unless the architecture needs more (or fixes it).
SIZES = {"inception_v3": 75, "maxvit_t": 224}
KWARGS = {
    "vit_b_16": {"image_size": 32},
    "vit_b_32": {"image_size": 32},
    "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 32},
    "vit_h_14": {"image_size": 28},
    "googlenet": {"init_weights": True},
    "inception_v3": {"init_weights": True, "aux_logits": False},  # the auxiliary head needs 299x299
}




def build(name: str) -> tuple[nn.Module, Tensor]:
    """The model (weights=None, made live) and a batch of two inputs."""
    torch.manual_seed(0)
    kwargs = KWARGS.get(name, {})
    size = kwargs.get("image_size", SIZES.get(name, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in GIANTS:
            with torch.device("meta"):
                model = torchvision.models.get_model(name, weights=None, **kwargs)
            quick_weights(model)
        else:
            model = torchvision.models.get_model(name, weights=None, **kwargs)
    x = torch.randn(2, 3, size, size)
    make_live(model, x)
    return model.eval(), x


@torch.no_grad()
def quick_weights(model: nn.Module) -> None:
    """Materialise a meta-device model: weights ~ N(0, 1/fan_in), norms at identity, biases zero."""
    model.to_empty(device="cpu")
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, norms):
                param.fill_(1.0 if name == "weight" else 0.0)
            elif param.dim() >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5)
            else:
                param.zero_()
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
    assert not [n for n, b in model.named_buffers() if not isinstance(model.get_submodule(n.rpartition(".")[0]),
                                                                       nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def make_live(model: nn.Module, x: Tensor) -> None:
    """Random batch-norm affine parameters and calibrated statistics; no constant parameters."""
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if param.numel() > 1 and bool((param == param.flatten()[0]).all()) and not _is_norm_param(model, name):
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            else:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator) * 0.2)
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
    if norms:
        model.train()
        model(torch.randn(2, *x.shape[1:], generator=generator))
    model.eval()


def _is_norm_param(model: nn.Module, name: str) -> bool:
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return isinstance(owner, nn.modules.batchnorm._BatchNorm)


@contextmanager
def slow_attention() -> Iterator[None]:
    """Count nn.MultiheadAttention's projections: its fused fast path hides them from the MAC counter."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def macs(model: nn.Module, x: Tensor) -> int:
    with slow_attention():
        return count_macs(model, x)


def assert_twins(removed: nn.Module, masked: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        expected, actual = masked(x), removed(x)
    scale = float(expected.abs().max())
    assert scale > 1e-6, "the model's output is all zeros: the comparison would prove nothing"
    assert torch.isfinite(actual).all()
    diff = float((actual - expected).abs().max())
    assert torch.allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale), f"max |diff| {diff:.3g}, scale {scale:.3g}"


def export_torchscript(model: nn.Module, x: Tensor, path: Path) -> None:
    """The TorchScript ONNX exporter (fast), with an ONNX Runtime comparison on ``x``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          do_constant_folding=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = torch.from_numpy(np.asarray(session.run(None, {"input": x.numpy()})[0]))
    with torch.no_grad():
        expected = model(x)
    scale = float(expected.abs().max())
    assert torch.allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale), (
        f"ONNX Runtime differs by {float((actual - expected).abs().max()):.3g}")


def describe(plan: PrunePlan) -> str:
    return "\n".join(f"  {s.name}: {s.reason}" for s in plan.skipped) or "  (nothing skipped)"


def check_model(name: str, tmp_path: Path) -> PrunePlan:
    model, x = build(name)
    before = macs(model, x[:1])
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=x[:1])
    assert plan.groups or plan.heads, f"{name}: nothing pruned\n{describe(plan)}"
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    removed = apply_plan(model, plan, mode="remove")
    del model
    ratio = macs(removed, x[:1]) / before
    if name not in PARTIAL:
        assert ratio <= MAX_MACS_RATIO, f"{name}: MACs ratio {ratio:.3f}\n{describe(plan)}"
    assert_twins(removed, masked, x)
    del masked
    if name not in ONNX:
        return plan
    if name in DYNAMO:
        path = export_onnx(removed, x, tmp_path / f"{name}.onnx")
        with torch.no_grad():
            scale = float(removed(x).abs().max())
        verify_onnx(removed, path, x, atol=1e-4 * scale, rtol=1e-3)
    else:
        export_torchscript(removed, x, tmp_path / f"{name}.onnx")
    return plan


@pytest.mark.parametrize("name", FAST)
def test_fast_subset(name: str, tmp_path: Path) -> None:
    check_model(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL if n not in FAST])
def test_every_torchvision_model(name: str, tmp_path: Path) -> None:
    check_model(name, tmp_path)


def test_the_matrix_covers_every_builder() -> None:
    assert len(ALL) >= 80 and set(ONNX) <= set(ALL) and set(DYNAMO) <= set(ONNX)
    def family(name: str) -> str:
        return re.match(r"[a-z]+", name).group()  # type: ignore[union-attr]

    assert {family(n) for n in ALL} == {family(n) for n in ONNX}, "a family without an ONNX export check"


if __name__ == "__main__":  # a table of MACs ratios and what stays unpruned, for the docs
    import tempfile
    import time

    torch.set_num_threads(1)
    for model_name in sys.argv[1:] or ALL:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as directory:
            model, x = build(model_name)
            before = macs(model, x[:1])
            result = plan_pruning(model, StructuredPrune(ratio=0.5), example=x[:1])
            apply_plan(model, result, mode="remove")
            print(f"{model_name}: MACs x{macs(model, x[:1]) / before:.3f}, {len(result.groups)} groups, "
                  f"{len(result.heads)} attention layers, {len(result.skipped)} skipped "
                  f"({time.perf_counter() - start:.1f}s)", flush=True)
            for item in result.skipped:
                print(f"    {item.name}: {item.reason}")
