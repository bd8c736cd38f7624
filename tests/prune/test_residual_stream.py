"""Structured pruning of option-A CIFAR ResNets, residual stream included, through the shortcut's channel map."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from spiralkit.errors import PruneError
from spiralkit.export.onnx import export_onnx, verify_onnx
from spiralkit.graph import LayerEdit, edit_layer, trace_groups
from spiralkit.graph.slicing import Cutter
from spiralkit.measure import count_macs
from spiralkit.models import ChannelPadShortcut, ModelSpec, load_model
from spiralkit.prune.apply import apply_plan, replay_plans
from spiralkit.prune.plan import GroupPlan, PrunePlan
from spiralkit.prune.saved import load_pruned, save_pruned
from spiralkit.prune.structured import StructuredPrune, plan_pruning, prune_structured
from spiralkit.prune.structured_importance import MeanActivation
from tests.prune.test_structured import assert_twins

SPEC = ModelSpec(name="cifar_resnet20")
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def model_with_statistics(spec: ModelSpec = SPEC) -> nn.Module:
    """The model with random BN statistics and shifts: removed channels must not leak anywhere."""
    torch.manual_seed(0)
    model = load_model(spec)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.normal_(0.0, 0.5)
    return model


def stream_widths(model: nn.Module) -> list[int]:
    return [model.get_submodule(f"layer{s}.0.bn2").num_features for s in (1, 2, 3)]


# --------------------------------------------------------------------------- the channel map, by hand


def shortcut_4_to_8() -> ChannelPadShortcut:
    shortcut = ChannelPadShortcut.option_a(4, 8, 2)
    assert shortcut.index.tolist() == [-1, -1, 0, 1, 2, 3, -1, -1]
    return shortcut


def test_removal_renumbers_the_kept_inputs_at_their_kept_outputs() -> None:
    shortcut = shortcut_4_to_8()
    edit_layer(shortcut, LayerEdit(out=(2, 3, 4, 7), inp=(1, 2)), Cutter("remove"))
    # output 2 copied input 0 (removed), 3 and 4 copy inputs 1 and 2 (now 0 and 1), 7 was zero
    assert shortcut.index.tolist() == [-1, 0, 1, -1]
    assert shortcut.in_channels == 2 and shortcut.out_channels == 4
    assert shortcut(torch.randn(1, 2, 4, 4)).shape == (1, 4, 2, 2)


def test_masking_zeroes_the_same_channels_in_place() -> None:
    shortcut = shortcut_4_to_8()
    edit_layer(shortcut, LayerEdit(out=(2, 3, 4, 7), inp=(1, 2)), Cutter("mask"))
    assert shortcut.index.tolist() == [-1, -1, -1, 1, 2, -1, -1, -1]
    assert shortcut.in_channels == 4


@pytest.mark.parametrize(("edit", "expected"), [(LayerEdit(out=(0, 5)), [-1, 3]), (LayerEdit(inp=(3,)), [-1] * 5 + [0, -1, -1])])
def test_one_side_alone(edit: LayerEdit, expected: list[int]) -> None:
    shortcut = shortcut_4_to_8()
    edit_layer(shortcut, edit, Cutter("remove"))
    assert shortcut.index.tolist() == expected


# --------------------------------------------------------------------------- the graph


def test_the_residual_stream_is_one_group_per_stage_across_the_shortcut() -> None:
    groups = trace_groups(load_model(SPEC), X)
    assert [(s.name, s.reason) for s in groups.skipped] == [("linear", "reaches the model output")]
    by_id = {g.id: g for g in groups.channels}
    stage1 = {(m.module, m.role) for m in by_id["conv1"].members}
    stage2 = {(m.module, m.role) for m in by_id["layer2.0.conv2"].members}
    assert ("layer2.0.downsample", "in") in stage1 and ("layer2.0.downsample", "out") not in stage1
    assert ("layer2.0.downsample", "out") in stage2 and ("layer3.0.downsample", "in") in stage2
    assert ("layer2.0.conv1", "in") in stage1 and ("layer1.2.bn2", "out") in stage1
    assert ("linear", "in") in {(m.module, m.role) for m in by_id["layer3.0.conv2"].members}


# --------------------------------------------------------------------------- pruning


def test_remove_matches_the_masked_twin_exports_and_leaves_a_quarter_of_the_macs(tmp_path: Path) -> None:
    model = model_with_statistics().eval()
    dense = count_macs(model, X)
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=X)
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    apply_plan(model, plan, mode="remove")
    assert stream_widths(model) == [8, 16, 32]
    assert model.layer2[0].downsample.in_channels == 8 and model.linear.in_features == 32
    assert count_macs(model, X) / dense < 0.35  # 0.253; 0.505 when the stream was left whole
    assert_twins(model, masked, X)
    path = export_onnx(model, X, tmp_path / "pruned.onnx")
    verify_onnx(model, path, torch.randn(3, 3, 32, 32))


def test_an_activation_criterion_reads_the_shortcut_channels() -> None:
    model = model_with_statistics().eval()
    plan = plan_pruning(model, StructuredPrune(ratio=0.5, criterion=MeanActivation()), example=X)
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    apply_plan(model, plan, mode="remove")
    assert stream_widths(model) == [8, 16, 32]
    assert_twins(model, masked, X)


def test_plans_replay_on_a_fresh_model_and_load_the_pruned_weights(tmp_path: Path) -> None:
    model = model_with_statistics().eval()
    first = prune_structured(model, StructuredPrune(ratio=0.25), example=X)
    second = prune_structured(model, StructuredPrune(ratio=0.5, depth=1), example=X)
    assert second.blocks and stream_widths(model)[1:] == [12, 24]
    save_pruned(model, [first, second], tmp_path / "pruned", spec=SPEC)
    loaded = load_pruned(tmp_path / "pruned")
    fresh = replay_plans(load_model(SPEC), [first, second])
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = model(X)
        assert torch.equal(loaded(X), expected) and torch.equal(fresh.eval()(X), expected)
    assert torch.equal(loaded.layer3[0].downsample.index, model.layer3[0].downsample.index)


def test_a_plan_that_does_not_fit_the_shortcut_is_refused() -> None:
    model = load_model(SPEC)
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=X)
    apply_plan(model, plan, mode="remove")
    stage1 = next(g for g in plan.groups if g.id == "conv1")
    only_shortcut = tuple(m for m in stage1.members if m.module == "layer2.0.downsample")
    again = PrunePlan(groups=(GroupPlan(id="conv1", size=16, keep=stage1.keep, members=only_shortcut),))
    with pytest.raises(PruneError, match=(
            r"plan does not fit the model: 'layer2.0.downsample' \(ChannelPadShortcut\) has 8 input channels, "
            r"the plan expects 16")):
        apply_plan(model, again, mode="mask")
