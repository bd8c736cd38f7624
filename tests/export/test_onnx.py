"""ONNX export, verification against ONNX Runtime, and OrtModel as a module."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
from torch import Tensor, nn

from spiralkit.export.onnx import (
    ExportError,
    OrtModel,
    compare_outputs,
    export_onnx,
    verify_onnx,
)
from spiralkit.measure import count_params, measure_latency
from spiralkit.models import CifarResNet, lenet5
from spiralkit.tasks import Classification, evaluate


@pytest.fixture(scope="module")
def lenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A random LeNet-5 and its ONNX file, exported from a batch-1 example."""
    torch.manual_seed(0)
    model = lenet5()
    path = export_onnx(model, torch.randn(1, 1, 28, 28), tmp_path_factory.mktemp("lenet") / "sub" / "lenet5.onnx")
    return model, path


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_lenet5_export_is_one_file_with_named_dynamic_io(lenet: tuple[nn.Module, Path]) -> None:
    model, path = lenet
    assert sorted(p.name for p in path.parent.iterdir()) == ["lenet5.onnx"]  # no .onnx.data, no temp file
    proto = onnx.load(str(path), load_external_data=False)
    assert not any(init.HasField("data_location") and init.data_location == onnx.TensorProto.EXTERNAL
                   for init in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert _dims(proto.graph.input[0]) == ["batch", 1, 28, 28]
    assert _dims(proto.graph.output[0]) == ["batch", 10]
    # Debug records that name local source files are not shipped.
    assert not any(p.key.endswith("stack_trace") for n in proto.graph.node for p in n.metadata_props)


def test_lenet5_onnx_matches_torch_at_other_batch_sizes(lenet: tuple[nn.Module, Path]) -> None:
    model, path = lenet
    for batch in (1, 5):
        result = verify_onnx(model, path, torch.randn(batch, 1, 28, 28), atol=1e-5, rtol=1e-4)
        assert result.max_abs_diff < 1e-5
        assert result.cosine == pytest.approx(1.0, abs=1e-9)


def test_resnet_with_batchnorm_matches_torch_and_keeps_train_mode(tmp_path: Path) -> None:
    # CifarResNet with one block per stage (ResNet-8): the same BN folding, residual adds and
    # projection shortcuts as ResNet-20, at a third of the export time.
    torch.manual_seed(1)
    model = CifarResNet(blocks_per_stage=1, in_channels=1, num_classes=4)
    for module in model.modules():  # non-trivial running statistics, so BN folding matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
    model.train()
    path = export_onnx(model, torch.randn(2, 1, 16, 16), tmp_path / "resnet.onnx")
    assert model.training and all(m.training for m in model.modules())
    x = torch.randn(3, 1, 16, 16)
    verify_onnx(model, path, x, atol=1e-4, rtol=1e-3)
    assert model.training
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(OrtModel(path)(x), expected, atol=1e-4, rtol=1e-3)


def test_static_batch_export_fixes_the_batch(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 3))
    path = export_onnx(model, torch.randn(2, 6), tmp_path / "fixed.onnx", dynamic_batch=False, opset=18)
    proto = onnx.load(str(path))
    assert _dims(proto.graph.input[0]) == [2, 6]
    assert proto.opset_import[0].version == 18
    verify_onnx(model, path, torch.randn(2, 6))


def test_verify_names_the_file_when_outputs_differ(lenet: tuple[nn.Module, Path]) -> None:
    model, path = lenet
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.fc2.bias.add_(0.5)
    with pytest.raises(ExportError, match=rf"{path.name} disagrees with LeNet5: max \|diff\| = 0\.5"):
        verify_onnx(changed, path, torch.randn(2, 1, 28, 28))


def test_ortmodel_works_with_evaluate_and_measure_latency(lenet: tuple[nn.Module, Path]) -> None:
    model, path = lenet
    ort_model = OrtModel(path, threads=1)
    assert isinstance(ort_model, nn.Module)
    assert count_params(ort_model).total == 0
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, 1, 28, 28, generator=generator)
    loader = [(x[:20], torch.arange(20) % 10), (x[20:], torch.arange(20) % 10)]
    got = evaluate(Classification(), ort_model, loader)
    want = evaluate(Classification(), model, loader)
    assert got.metric == want.metric and got.examples == 40
    assert got.loss == pytest.approx(want.loss, rel=1e-4)
    latency = measure_latency(ort_model, x[:8], threads=1, warmup=1, repeats=3)
    assert latency.median_ms > 0 and latency.batch_size == 8
    clone = copy.deepcopy(ort_model)  # the session is reopened, not copied
    torch.testing.assert_close(clone(x[:2]), ort_model(x[:2]))
    assert "lenet5.onnx" in repr(ort_model)


def test_ortmodel_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ExportError, match="ONNX file not found: .*nope.onnx"):
        OrtModel(missing)


class _Unexportable(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("unsupported layer xyz")


def test_export_failure_names_model_class_and_cause(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"cannot export _Unexportable to ONNX: RuntimeError: unsupported layer xyz"):
        export_onnx(_Unexportable(), torch.randn(2, 3), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_compare_outputs() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    same = compare_outputs(a, a)
    assert same.max_abs_diff == 0.0 and same.cosine == pytest.approx(1.0)
    scaled = compare_outputs(a, 2 * a)
    assert scaled.max_abs_diff == 2.0 and scaled.cosine == pytest.approx(1.0)
    orthogonal = compare_outputs(a, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert orthogonal.cosine == pytest.approx(0.0)
    with pytest.raises(ValueError, match="shape"):
        compare_outputs(a, a[:1])
