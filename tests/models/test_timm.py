"""``timm:NAME`` model specs: built with ``pretrained=False``, weights only from a local checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spiralkit.errors import ModelError
from spiralkit.export import save_weights
from spiralkit.models import ModelSpec, load_model
from spiralkit.models.loading import MODEL_SOURCES, imports_code

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 10}


def test_timm_model_builds_without_weights() -> None:
    model = load_model(ModelSpec(name="timm:vit_tiny_patch16_224", kwargs=TINY_VIT))
    assert not model.training
    assert model.head.out_features == 10 and len(model.blocks) == 2
    assert model.blocks[0].attn.num_heads == 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_is_a_source_not_a_code_import() -> None:
    assert "timm" in MODEL_SOURCES
    assert not imports_code("timm:resnet18")


def test_timm_local_checkpoint_is_loaded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = load_model(ModelSpec(name="timm:vit_tiny_patch16_224", kwargs=TINY_VIT))
    path = tmp_path / "vit.safetensors"
    save_weights(trained, path)
    torch.manual_seed(1)  # another initialisation: only the checkpoint can make them equal
    loaded = load_model(ModelSpec(name="timm:vit_tiny_patch16_224", kwargs=TINY_VIT, checkpoint=path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))


def test_unknown_timm_name_lists_close_matches() -> None:
    with pytest.raises(ModelError, match=r"unknown timm model 'resnet1B'; close matches: .*'resnet18'"):
        load_model(ModelSpec(name="timm:resnet1B"))


@pytest.mark.parametrize("key", ["pretrained", "pretrained_cfg_overlay", "checkpoint_path"])
def test_timm_hub_weights_are_refused(key: str) -> None:
    with pytest.raises(ModelError, match=rf"model 'timm:resnet18': the '{key}' kwarg is not allowed.*spec's checkpoint"):
        load_model(ModelSpec(name="timm:resnet18", kwargs={key: True if key == "pretrained" else "x"}))


def test_timm_bad_kwarg_names_model_and_kwarg() -> None:
    with pytest.raises(ModelError, match=r"bad arguments for model 'timm:vit_tiny_patch16_224'.*colour"):
        load_model(ModelSpec(name="timm:vit_tiny_patch16_224", kwargs={**TINY_VIT, "colour": "red"}))


def test_unknown_model_message_mentions_timm() -> None:
    with pytest.raises(ModelError, match="'timm:NAME'"):
        load_model(ModelSpec(name="no_such_model"))


def test_spiral_bench_builds_timm_models() -> None:
    from spiralkit.bench import input_shape_of
    from spiralkit.bench.targets import model_candidates

    (candidate,) = model_candidates("timm:resnet10t", None)
    assert candidate.name == "timm:resnet10t" and candidate.module is not None
    assert input_shape_of("timm:resnet10t", None) == (3, 224, 224)
