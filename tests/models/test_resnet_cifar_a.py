"""The option-A CIFAR ResNets: the shortcut's formula, akamaster's pretrained checkpoints and their accuracy."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import Tensor

from spiralkit.errors import ModelError
from spiralkit.export import save_weights
from spiralkit.models import ChannelPadShortcut, ModelSpec, cifar_resnet20, load_model, load_weights, resnet20

DEPTHS = (20, 32, 44, 56)
CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def data_root() -> Path:
    """The shared data directory; the test is skipped when SPIRALKIT_DATA_DIR is unset."""
    root = os.environ.get("SPIRALKIT_DATA_DIR")
    if not root:
        pytest.skip("SPIRALKIT_DATA_DIR is not set")
    return Path(root)


def checkpoint(depth: int) -> Path:
    return data_root() / "pretrained" / f"cifar10_resnet{depth}_akamaster.safetensors"


def readme_shortcut(x: Tensor, planes: int) -> Tensor:
    """The data README's option-A formula, as akamaster writes it."""
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0)


def readme_forward(model: torch.nn.Module, x: Tensor) -> Tensor:
    """A direct implementation of the README's architecture over ``model``'s layers (functional ReLUs)."""
    x = F.relu(model.bn1(model.conv1(x)))
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            out = F.relu(block.bn1(block.conv1(x)))
            out = block.bn2(block.conv2(out))
            shortcut = x if x.shape == out.shape else readme_shortcut(x, block.conv2.out_channels)
            x = F.relu(out + shortcut)
    return model.linear(F.avg_pool2d(x, x.shape[3]).flatten(1))


# --------------------------------------------------------------------------- architecture


def test_forward_equals_the_readme_formula_on_random_input() -> None:
    torch.manual_seed(0)
    model = cifar_resnet20().eval()
    for module in model.modules():  # non-trivial statistics, so that every channel matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.normal_()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), readme_forward(model, x), atol=1e-5)
    shortcut = model.layer3[0].downsample
    y = torch.randn(2, 32, 8, 8)
    assert torch.equal(shortcut(y), readme_shortcut(y, 64))


def test_option_a_shortcut_sits_where_the_shape_changes() -> None:
    model = cifar_resnet20()
    shortcuts = {n: m for n, m in model.named_modules() if isinstance(m, ChannelPadShortcut)}
    assert list(shortcuts) == ["layer2.0.downsample", "layer3.0.downsample"]
    assert shortcuts["layer2.0.downsample"].index.tolist() == [-1] * 8 + list(range(16)) + [-1] * 8
    assert "index" not in model.state_dict() and not any("downsample" in k for k in model.state_dict())


def test_channel_map_on_odd_sizes_and_stride_one() -> None:
    shortcut = ChannelPadShortcut([2, -1, 0, 0], in_channels=3, stride=1)
    x = torch.randn(1, 3, 5, 5)
    out = shortcut(x)
    assert out.shape == (1, 4, 5, 5) and shortcut.out_channels == 4
    assert torch.equal(out[0, 0], x[0, 2]) and not out[0, 1].any() and torch.equal(out[0, 3], x[0, 0])
    assert ChannelPadShortcut([0], in_channels=1, stride=2)(torch.randn(1, 1, 5, 5)).shape == (1, 1, 3, 3)
    assert "in_channels=3, out_channels=4, stride=1" in repr(shortcut)


@pytest.mark.parametrize(
    ("index", "kwargs", "message"),
    [
        ([0, 3], {"in_channels": 3}, r"index entry 3 is outside \[-1, 3\)"),
        ([-2, 0], {"in_channels": 3}, r"index entry -2 is outside"),
        ([], {"in_channels": 3}, r"non-empty 1-D sequence of integers"),
        ([0.5], {"in_channels": 3}, r"integers, got torch.float32"),
        ([[0]], {"in_channels": 3}, r"of shape \(1, 1\)"),
        ([0], {"in_channels": 0}, r"in_channels must be a positive integer, got 0"),
        ([0], {"in_channels": 1, "stride": 0}, r"stride must be a positive integer, got 0"),
    ],
)
def test_channel_map_rejects_bad_arguments(index: object, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChannelPadShortcut(index, **kwargs)  # type: ignore[arg-type]


def test_option_a_needs_matching_channel_counts() -> None:
    with pytest.raises(ValueError, match="pads 8 zero channels on each side of 20 inputs, which gives 36, not 32"):
        ChannelPadShortcut.option_a(20, 32, 2)


def test_bad_builder_arguments_name_the_model() -> None:
    with pytest.raises(ModelError, match=r"model 'cifar_resnet44'.*num_classes must be a positive integer"):
        load_model(ModelSpec(name="cifar_resnet44", kwargs={"num_classes": 0}))


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("depth", DEPTHS)
def test_pretrained_checkpoint_loads_with_matching_names_and_shapes(depth: int) -> None:
    path = checkpoint(depth)
    model = load_model(ModelSpec(name=f"cifar_resnet{depth}", checkpoint=path))
    state = model.state_dict()
    with safe_open(str(path), "pt") as file:
        keys = set(file.keys())
        for key in keys:
            assert torch.equal(state[key], file.get_tensor(key)), key
    # The checkpoint holds everything but BatchNorm's counter, which it lacks.
    assert {k for k in state if not k.endswith("num_batches_tracked")} == keys
    assert not model.training


def test_a_checkpoint_missing_real_weights_is_still_refused(tmp_path: Path) -> None:
    state = {k: v for k, v in cifar_resnet20().state_dict().items() if not k.endswith("num_batches_tracked")}
    del state["layer1.0.bn1.running_var"]
    save_weights(state, tmp_path / "w.safetensors")
    with pytest.raises(ModelError, match=r"missing keys 'layer1.0.bn1.running_var'$"):
        load_weights(cifar_resnet20(), tmp_path / "w.safetensors")


def test_the_option_b_net_does_not_take_the_option_a_checkpoint() -> None:
    with pytest.raises(ModelError, match=r"missing keys 'layer2.0.downsample.0.weight'.*unexpected keys 'linear.bias', 'linear.weight'$"):
        load_weights(resnet20(), checkpoint(20))


def first_test_images(archive: Path, per_class: int) -> tuple[Tensor, Tensor]:
    """``test/<class>/0000.jpg …`` (the first ``per_class`` of each class), normalised, with labels."""
    wanted = {f"test/{c}/{i:04d}.jpg": label for label, c in enumerate(CLASSES) for i in range(per_class)}
    pixels: dict[str, np.ndarray] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name in wanted:
                data = tar.extractfile(member)
                assert data is not None, name
                pixels[name] = np.asarray(Image.open(io.BytesIO(data.read())).convert("RGB"))
                if len(pixels) == len(wanted):
                    break
    assert len(pixels) == len(wanted), f"{archive} lacks {sorted(set(wanted) - set(pixels))[:3]}"
    names = sorted(wanted)
    x = torch.from_numpy(np.stack([pixels[n] for n in names])).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.tensor([wanted[n] for n in names])


def test_pretrained_resnet20_accuracy_on_the_first_1000_jpeg_test_images() -> None:
    # The data README measured 81.03% on all 10,000 JPEG test images; 80.4% on these 1,000.
    x, y = first_test_images(data_root() / "cifar10-jpeg" / "cifar10-jpg.tar.gz", per_class=100)
    model = load_model(ModelSpec(name="cifar_resnet20", checkpoint=checkpoint(20)))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.78
