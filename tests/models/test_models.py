"""The model zoo, spec resolution, checkpoint loading and their error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from spiralkit.errors import ModelError
from spiralkit.export import save_sparse, save_weights
from spiralkit.models import ZOO, ModelSpec, lenet5, lenet300, load_model, load_weights, mlp, resnet20


def tiny_net(*, width: int = 4) -> nn.Module:
    """Factory used through the ``tests.models.test_models:tiny_net`` spec."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10))


def not_a_module() -> str:
    """Factory that wrongly returns something that is not a module."""
    return "nope"


class Opaque:
    """An arbitrary object; weights-only loading must refuse to unpickle it."""


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- zoo


def test_zoo_is_read_only_and_complete() -> None:
    assert set(ZOO) == {
        "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56",
        "lenet300", "lenet5", "mlp", "resnet20", "resnet56", "tiny_llama",
    }
    with pytest.raises(TypeError):
        ZOO["extra"] = mlp  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # 784*300+300 + 300*100+100 + 100*10+10
        ("lenet300", 266_610),
        # (1*20*25+20) + (20*50*25+50) + (800*500+500) + (500*10+10)
        ("lenet5", 431_080),
        # 784*256+256 + 256*128+128 + 128*10+10
        ("mlp", 235_146),
        # stem 432+32; stage1 3*(2*2304+64); stage2 14_528 + 2*18_560 (incl. 1x1 shortcut 512+64);
        # stage3 57_728 + 2*73_984 (incl. shortcut 2048+128); fc 650. Option A would be 269,722.
        ("resnet20", 272_474),
        # as resnet20 with 9 blocks per stage
        ("resnet56", 855_770),
        # option A: resnet20 without the two projection shortcuts (576 + 2176)
        ("cifar_resnet20", 269_722),
        # 12 more layers: one more block per stage, 2*(2304+32) + 2*(9216+64) + 2*(36864+128) = 97,216
        ("cifar_resnet32", 464_154),
        ("cifar_resnet44", 658_586),
        ("cifar_resnet56", 853_018),
    ],
)
def test_zoo_parameter_counts(name: str, expected: int) -> None:
    assert n_params(ZOO[name]()) == expected


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("lenet300", {}),
        ("lenet5", {}),
        ("mlp", {"widths": [32, 16, 8]}),
        ("resnet20", {"in_channels": 1}),
        ("resnet56", {"in_channels": 1}),
    ],
)
def test_zoo_forward_on_mnist_shape(name: str, kwargs: dict[str, object]) -> None:
    model = load_model(ModelSpec(name=name, kwargs=kwargs))
    assert not model.training
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_module_names() -> None:
    assert [n for n, m in lenet300().named_modules() if isinstance(m, nn.Linear)] == ["fc1", "fc2", "fc3"]
    assert [n for n, m in lenet5().named_modules() if isinstance(m, nn.Conv2d | nn.Linear)] == [
        "conv1",
        "conv2",
        "fc1",
        "fc2",
    ]
    assert [n for n, m in mlp(widths=(8, 8, 8)).named_modules() if isinstance(m, nn.Linear)] == [
        "fc1",
        "fc2",
        "fc3",
        "fc4",
    ]


def test_lenet5_follows_caffe_no_relu_after_convs() -> None:
    relus = [n for n, m in lenet5().named_modules() if isinstance(m, nn.ReLU)]
    assert relus == ["relu"]


def test_lenet5_other_image_size() -> None:
    model = lenet5(in_channels=3, image_size=32, num_classes=7)
    assert model.fc1.in_features == 50 * 5 * 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_resnet20_on_cifar_shape_and_option_b_shortcuts() -> None:
    model = resnet20(num_classes=4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    shortcuts = [n for n, m in model.named_modules() if n.endswith("downsample")]
    assert shortcuts == ["layer2.0.downsample", "layer3.0.downsample"]
    assert n_params(resnet20(in_channels=1)) == 272_474 - 2 * 16 * 9


def test_torchvision_model_builds_without_weights() -> None:
    model = load_model(ModelSpec(name="torchvision:resnet18", kwargs={"num_classes": 10}))
    assert isinstance(model, nn.Module) and not model.training
    assert model.fc.out_features == 10


def test_module_function_spec() -> None:
    model = load_model(ModelSpec(name="tests.models.test_models:tiny_net", kwargs={"width": 3}))
    assert model[1].out_features == 3
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# --------------------------------------------------------------------------- spec errors


def test_spec_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ModelSpec(name="lenet300", weights="x")  # type: ignore[call-arg]


def test_unknown_zoo_name_lists_zoo() -> None:
    with pytest.raises(ModelError, match="unknown model 'lenet3'") as info:
        load_model(ModelSpec(name="lenet3"))
    message = str(info.value)
    assert all(name in message for name in ZOO)
    assert "did you mean 'lenet5'" in message or "did you mean 'lenet300'" in message


def test_unknown_torchvision_name_lists_close_matches() -> None:
    with pytest.raises(ModelError, match="unknown torchvision model 'resnet19'; close matches: .*'resnet18'"):
        load_model(ModelSpec(name="torchvision:resnet19"))


def test_torchvision_weights_kwarg_rejected() -> None:
    with pytest.raises(ModelError, match="'weights' kwarg is not allowed"):
        load_model(ModelSpec(name="torchvision:resnet18", kwargs={"weights": "DEFAULT"}))


def test_torchvision_bad_kwarg() -> None:
    with pytest.raises(ModelError, match="bad arguments for model 'torchvision:resnet18'.*colour"):
        load_model(ModelSpec(name="torchvision:resnet18", kwargs={"colour": "red"}))


def test_bad_kwarg_names_model_and_kwarg() -> None:
    with pytest.raises(ModelError, match=r"model 'lenet300'.*'hidden'.*accepted: in_features, num_classes"):
        load_model(ModelSpec(name="lenet300", kwargs={"hidden": 3}))


def test_bad_kwarg_value_names_model_and_kwarg() -> None:
    with pytest.raises(ModelError, match=r"model 'mlp'.*widths\[1\] must be a positive integer, got -2"):
        load_model(ModelSpec(name="mlp", kwargs={"widths": [4, -2]}))
    with pytest.raises(ModelError, match=r"model 'lenet5'.*image_size must be at least 16"):
        load_model(ModelSpec(name="lenet5", kwargs={"image_size": 12}))


def test_module_function_errors() -> None:
    with pytest.raises(ModelError, match="cannot import module 'no_such_pkg_xyz'"):
        load_model(ModelSpec(name="no_such_pkg_xyz:build"))
    with pytest.raises(ModelError, match="has no attribute 'missing'"):
        load_model(ModelSpec(name="tests.models.test_models:missing"))
    returned_str = "'tests.models.test_models:not_a_module' returned a str, not a torch.nn.Module"
    with pytest.raises(ModelError, match=returned_str):
        load_model(ModelSpec(name="tests.models.test_models:not_a_module"))
    with pytest.raises(ModelError, match="bad arguments for model 'tests.models.test_models:tiny_net'.*'depth'"):
        load_model(ModelSpec(name="tests.models.test_models:tiny_net", kwargs={"depth": 2}))


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("suffix", [".safetensors", ".sparse.safetensors", ".pt", ".pt-state_dict"])
def test_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    source = lenet5()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_weights(source, path)
    elif suffix == ".sparse.safetensors":
        save_sparse(source, path)
    elif suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    loaded = load_model(ModelSpec(name="lenet5", checkpoint=path))
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), source.eval()(x))


def test_checkpoint_round_trip_with_buffers(tmp_path: Path) -> None:
    source = resnet20(in_channels=1)
    source.bn1.running_mean.fill_(0.5)
    save_weights(source, tmp_path / "r.safetensors")
    loaded = load_model(ModelSpec(name="resnet20", kwargs={"in_channels": 1}, checkpoint=tmp_path / "r.safetensors"))
    assert torch.equal(loaded.bn1.running_mean, source.bn1.running_mean)


def test_missing_checkpoint_names_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(ModelError, match=f"checkpoint not found: {path}"):
        load_model(ModelSpec(name="lenet300", checkpoint=path))


def test_pickled_object_rejected(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"fc1.weight": torch.zeros(1), "extra": Opaque()}, path)
    with pytest.raises(ModelError, match=r"only weights_only files are accepted.*Opaque"):
        load_weights(lenet300(), path)


def test_non_state_dict_torch_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ModelError, match="holds a list, not a state dict of tensors"):
        load_weights(lenet300(), path)


def test_corrupt_safetensors_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot read safetensors file"):
        load_weights(lenet300(), path)


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "five.safetensors"
    save_weights(lenet300(num_classes=5), path)
    with pytest.raises(ModelError, match=r"'fc3.weight' is \(5, 100\) in the checkpoint but \(10, 100\) in the model"):
        load_weights(lenet300(), path)


def test_missing_and_unexpected_keys_named(tmp_path: Path) -> None:
    state = lenet300().state_dict()
    del state["fc2.bias"]
    state["fc9.weight"] = torch.zeros(2)
    path = tmp_path / "keys.safetensors"
    save_weights(state, path)
    with pytest.raises(ModelError, match=r"missing keys 'fc2.bias'; unexpected keys 'fc9.weight'"):
        load_weights(lenet300(), path)


def test_a_checkpoint_path_expands_environment_variables(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file  # noqa: PLC0415

    from spiralkit.errors import ModelError  # noqa: PLC0415
    from spiralkit.models import ModelSpec, load_model  # noqa: PLC0415

    model = load_model(ModelSpec(name="mlp", kwargs={"in_features": 4, "widths": [3]}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    spec = ModelSpec(name="mlp", kwargs={"in_features": 4, "widths": [3]}, checkpoint="$WEIGHTS_HOME/w.safetensors")
    monkeypatch.setenv("WEIGHTS_HOME", str(tmp_path))
    assert spec.checkpoint_path() == tmp_path / "w.safetensors"
    load_model(spec)
    monkeypatch.delenv("WEIGHTS_HOME")
    import pytest  # noqa: PLC0415

    with pytest.raises(ModelError, match=r"checkpoint '\$WEIGHTS_HOME/w.safetensors' names an environment variable that is not set"):
        load_model(spec)
