"""Head and FFN pruning of timm transformers (tiny configs, never pretrained weights).

For each family (ViT, DeiT, Swin, Swin V2, BEiT, LeViT, EVA-02, EVA-02 with rotary grouped-query
attention): half the heads of every attention layer and half the FFN neurons are planned away; the physically pruned model computes what its
masked twin computes and exports to ONNX that ONNX Runtime runs with the same outputs. Also:
layouts without an adapter are reported as such, LeViT deep-copies after planning, and a
pruned ``timm:`` model is saved and rebuilt from its spec.

``python -m tests.prune.test_timm_heads`` prints the table of docs/results.md.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from spiralkit.export.onnx import export_onnx, verify_onnx
from spiralkit.graph import find_attention, trace_groups
from spiralkit.models import ModelSpec, load_model
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.plan import PrunePlan
from spiralkit.prune.saved import load_pruned, save_pruned
from spiralkit.prune.structured import StructuredPrune, plan_pruning
from tests.prune.test_torchvision_matrix import assert_twins, describe, export_torchscript, macs, make_live

# name: (timm model, tiny kwargs, input size, head adapter, attention layers, FFNs): each FFN is
# a channel group (fc1 -> fc2) or, for EVA-02's fused SwiGLU, a `timm_glu_mlp` unit group.
FAMILIES: dict[str, tuple[str, dict[str, Any], int, str, int, int]] = {
    "vit": ("vit_tiny_patch16_224",
            {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "qkv_bias": True},
            32, "timm_vit", 2, 2),
    "deit": ("deit_tiny_distilled_patch16_224",
             {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}, 32, "timm_vit", 2, 2),
    "swin": ("swin_tiny_patch4_window7_224",
             {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4)},
             32, "timm_swin", 4, 4),
    "swin_v2": ("swinv2_tiny_window8_256",
                {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4)},
                32, "timm_swin_v2", 4, 4),
    "beit": ("beit_base_patch16_224",
             {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}, 32, "timm_beit", 2, 2),
    "levit": ("levit_128s",
              {"img_size": 64, "embed_dim": (32, 48), "key_dim": 8, "depth": (1, 1), "num_heads": (4, 4)},
              64, "timm_levit", 3, 3),
    "eva": ("eva02_tiny_patch14_224",
            {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 4, "qkv_bias": True},
            28, "timm_eva", 2, 2),
    # AttentionRope with grouped-query attention: 4 query heads reading 2 key/value heads
    "eva_rope_gqa": ("eva02_tiny_patch14_224",
                     {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 4,
                      "attn_type": "rope", "qkv_fused": False, "num_kv_heads": 2},
                     28, "timm_rope", 2, 2),
}
# The project's (dynamo) exporter where the TorchScript one fails on the unpruned model too
# (timm's EVA passes is_causal through as a traced tensor); it takes about 10 s, so that
# check is a separate slow test. The others use the TorchScript exporter (well under a second).
DYNAMO = ("eva", "eva_rope_gqa")


def _live(model: nn.Module, x: Tensor) -> nn.Module:
    """Linear weights ~ N(0, 1/fan_in) (timm's std-0.02 init makes every head's share of the
    output tiny), then `make_live` (no constant parameters, calibrated batch norms)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5)
    make_live(model, x)
    return model.eval()


def build(family: str, **extra: Any) -> tuple[nn.Module, Tensor]:
    """The tiny model (made live: no constant parameters) and a batch of two inputs."""
    name, kwargs, size, *_ = FAMILIES[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(ModelSpec(name=f"timm:{name}", kwargs={**kwargs, **extra, "num_classes": 10}))
    x = torch.randn(2, 3, size, size)
    return _live(model, x), x


def onnx_error(family: str, model: nn.Module, x: Tensor, tmp_path: Path) -> None:
    """Export ``model`` and check ONNX Runtime's outputs against it."""
    if family in DYNAMO:
        with torch.no_grad():
            scale = float(model(x).abs().max())
        path = export_onnx(model, x, tmp_path / f"{family}.onnx")
        verify_onnx(model, path, x, atol=1e-4 * scale, rtol=1e-3)
    else:
        export_torchscript(model, x, tmp_path / f"{family}.onnx")


def ffn_count(plan: PrunePlan) -> int:
    """FFNs the plan prunes: channel groups inside ``mlp`` modules and GLU FFNs pruned by unit."""
    return len([g for g in plan.groups if ".mlp." in g.id]) + len([h for h in plan.heads if h.kind == "timm_glu_mlp"])


def prune_family(family: str, **extra: Any) -> tuple[nn.Module, nn.Module, nn.Module, Tensor, PrunePlan]:
    """(original, masked twin, removed) and the batch, pruned by half."""
    model, x = build(family, **extra)
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=x[:1])
    original = copy.deepcopy(model)
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    removed = apply_plan(model, plan, mode="remove")
    return original, masked, removed, x, plan


@pytest.mark.parametrize("family", list(FAMILIES))
def test_half_the_heads_and_ffn_removed_match_the_masked_twin(family: str, tmp_path: Path) -> None:
    _, _, _, kind, layers, ffn = FAMILIES[family]
    original, masked, removed, x, plan = prune_family(family)
    attention = [h for h in plan.heads if h.kind != "timm_glu_mlp"]
    assert [h.kind for h in attention] == [kind] * layers, describe(plan)
    assert all(len(h.keep) == h.num_heads // 2 for h in attention)
    assert ffn_count(plan) == ffn, describe(plan)
    for head in attention:  # grouped-query attention: units are key/value heads
        layer = removed.get_submodule(head.module)
        assert getattr(layer, "num_kv_heads", layer.num_heads) == len(head.keep)
    with torch.no_grad():  # the comparison proves something only if pruning changed the function
        before, after = original(x), masked(x)
        assert float((before - after).abs().max()) > 1e-2 * float(after.abs().max())
    assert macs(removed, x[:1]) < 0.9 * macs(original, x[:1])
    assert_twins(removed, masked, x)
    if family not in DYNAMO:
        onnx_error(family, removed, x, tmp_path)


def test_eva_separate_projections_match_the_masked_twin() -> None:
    _, masked, removed, x, plan = prune_family("eva", qkv_fused=False)
    attention = removed.get_submodule("blocks.0.attn")
    assert attention.qkv is None and attention.q_proj.out_features == attention.v_proj.out_features == 2 * 8
    assert_twins(removed, masked, x)


@pytest.mark.parametrize("fused", [True, False])
def test_rope_attention_without_grouping_prunes_single_heads(fused: bool) -> None:
    _, masked, removed, x, plan = prune_family("eva", attn_type="rope", qkv_fused=fused)
    assert [(h.kind, h.num_heads, len(h.keep)) for h in plan.heads if h.kind != "timm_glu_mlp"] == [("timm_rope", 4, 2)] * 2
    assert_twins(removed, masked, x)


def test_grouped_query_attention_keeps_each_kv_head_with_its_query_heads() -> None:
    _, masked, removed, x, plan = prune_family("eva_rope_gqa")
    head = plan.heads[0]
    assert (head.kind, head.num_heads, head.head_dim, len(head.keep)) == ("timm_rope", 2, 16, 1)  # 2 query heads of 8 per unit
    layer = removed.get_submodule(head.module)
    assert (layer.num_heads, layer.num_kv_heads, layer.num_kv_groups) == (2, 1, 2)
    assert (layer.q_proj.out_features, layer.k_proj.out_features, layer.proj.in_features) == (16, 8, 16)
    assert_twins(removed, masked, x)


def test_gated_vit_attention_matches_the_masked_twin() -> None:
    from timm.layers import Attention

    torch.manual_seed(0)
    model = _live(nn.Sequential(nn.Linear(8, 16), Attention(16, num_heads=4, qkv_bias=True, gated=True)),
                  torch.randn(2, 5, 8)).eval()
    x = torch.randn(2, 5, 8)
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=x[:1])
    assert [(h.module, h.kind, len(h.keep)) for h in plan.heads] == [("1", "timm_vit", 2)]
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    removed = apply_plan(model, plan, mode="remove")
    assert removed[1].gate.out_features == removed[1].attn_dim == 8
    assert_twins(removed, masked, x)


@pytest.mark.slow
@pytest.mark.parametrize("family", DYNAMO)
def test_pruned_model_exports_with_the_project_exporter(family: str, tmp_path: Path) -> None:
    *_, removed, x, _ = prune_family(family)
    onnx_error(family, removed, x, tmp_path)


@pytest.mark.parametrize("family", ["swin_v2", "beit", "eva"])
def test_a_second_round_prunes_the_pruned_layers_again(family: str) -> None:
    *_, removed, x, first = prune_family(family)
    second = plan_pruning(removed, StructuredPrune(ratio=0.5), example=x[:1])
    left = [(h.module, h.kind) for h in first.heads if len(h.keep) > 1]  # a single head stays
    assert len(left) >= 2 and [(h.module, h.kind) for h in second.heads] == left, describe(second)
    masked = apply_plan(copy.deepcopy(removed), second, mode="mask")
    apply_plan(removed, second, mode="remove")
    attention = [h for h in second.heads if h.kind != "timm_glu_mlp"]
    assert all(removed.get_submodule(h.module).num_heads == 1 for h in attention)  # 2 -> 1, 4 -> 2 -> 1
    assert_twins(removed, masked, x)


def test_levit_deep_copies_after_planning() -> None:
    model, x = build("levit")
    with torch.no_grad():
        expected = model(x)
    plan_pruning(model, StructuredPrune(ratio=0.5), example=x[:1])
    attention = model.get_submodule("stages.0.blocks.0.attn")
    cached = list(attention.attention_bias_cache.values())
    assert cached and all(t.grad_fn is None for t in cached)  # the trace filled the cache; it is detached
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(x), expected) and torch.equal(model(x), expected)


def test_tracing_alone_leaves_no_graph_in_the_levit_cache() -> None:
    model, x = build("levit")
    trace_groups(model, x[:1])
    copy.deepcopy(model)


def test_levit_pruned_bias_cache_is_rebuilt_and_running_stats_stay_buffers() -> None:
    _, _, removed, x, plan = prune_family("levit")
    attention = removed.get_submodule(plan.heads[0].module)
    assert attention.attention_bias_cache == {}
    norm = attention.qkv.bn
    assert norm.num_features == attention.qkv.linear.out_features == norm.running_mean.shape[0]
    assert {"running_mean", "running_var"} <= {n for n, _ in norm.named_buffers()}
    assert not any(n.startswith("running") for n, _ in norm.named_parameters())
    removed(x)
    assert attention.attention_bias_cache["cpu"].shape[0] == attention.num_heads


@pytest.mark.parametrize("family", ["vit", "eva"])
def test_scale_norm_over_all_heads_is_refused(family: str) -> None:
    extra = {"scale_attn_norm": True} if family == "vit" else {"scale_attn_inner": True}
    model, x = build(family, **extra)
    groups = trace_groups(model, x[:1])
    assert not [h for h in groups.heads if h.kind != "timm_glu_mlp"]
    reasons = {s.name: s.reason for s in groups.skipped}
    assert "scale_norm normalises all heads' outputs together" in reasons["blocks.0.attn"]


def test_glu_ffn_units_cut_both_halves_of_fc1() -> None:
    _, _, removed, x, plan = prune_family("eva")
    glu = next(h for h in plan.heads if h.kind == "timm_glu_mlp")
    mlp = removed.get_submodule(glu.module)
    assert mlp.fc2.in_features == len(glu.keep) == 43 and mlp.fc1.out_features == 2 * 43


def test_normalised_glu_ffn_is_refused() -> None:
    from timm.layers import GluMlp

    model = nn.Sequential(nn.Linear(4, 8), GluMlp(8, 16, norm_layer=nn.LayerNorm))
    groups, unsupported, _ = find_attention(model)
    assert not groups
    assert unsupported == {"1": "timm GluMlp normalises its hidden units together (LayerNorm), "
                                "so removing one would change the others: they are kept"}


def test_beit_with_a_table_shared_by_all_layers_is_refused() -> None:
    model, x = build("beit", use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    groups = trace_groups(model, x[:1])
    assert not [h for h in groups.heads if h.kind == "timm_beit"]
    reasons = {s.name: s.reason for s in groups.skipped}
    assert "without its own relative position bias table (one table shared by all layers" in reasons["blocks.0.attn"]


def test_a_timm_attention_without_adapter_is_reported_as_such() -> None:
    torch.manual_seed(0)
    model = load_model(ModelSpec(name="timm:vit_relpos_small_patch16_224", kwargs={
        "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 4, "num_classes": 10}))
    groups, unsupported, _ = find_attention(model)
    assert not groups
    assert "vision_transformer_relpos.RelPosAttention) has no head adapter" in unsupported["blocks.0.attn"]
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=torch.randn(1, 3, 32, 32))
    reasons = {s.name: s.reason for s in plan.skipped}
    assert "has no head adapter" in reasons["blocks.0.attn"]
    assert reasons["blocks.0.attn"].startswith("this attention layout"), describe(plan)


def test_channels_feeding_an_attention_without_adapter_are_still_cut() -> None:
    from timm.layers.bottleneck_attn import BottleneckAttn

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          BottleneckAttn(16, feat_size=(8, 8), num_heads=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10))
    model = _live(model, x)
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=x[:1])
    reasons = {s.name: s.reason for s in plan.skipped}
    assert "(timm.layers.bottleneck_attn.BottleneckAttn) has no head adapter" in reasons["3"]
    assert [(g.id, {m.module for m in g.members}) for g in plan.groups] == [("0", {"0", "1", "3.qkv"})], describe(plan)
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    removed = apply_plan(model, plan, mode="remove")
    assert removed[3].qkv.in_channels == 8
    assert_twins(removed, masked, x)


@pytest.mark.parametrize("family", ["vit", "swin_v2", "beit", "levit", "eva"])
def test_pruned_timm_model_is_saved_and_rebuilt_from_its_spec(family: str, tmp_path: Path) -> None:
    name, kwargs, *_ = FAMILIES[family]
    spec = ModelSpec(name=f"timm:{name}", kwargs={**kwargs, "num_classes": 10})
    model, x = build(family)
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=x[:1])
    apply_plan(model, plan, mode="remove")
    loaded = load_pruned(save_pruned(model, plan, tmp_path / "pruned", spec=spec))
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert not [key for key in model.state_dict() if key.endswith("k_bias")]  # rebuilt zero buffers stay out
    for head in plan.heads:
        assert loaded.get_submodule(head.module).state_dict().keys() == model.get_submodule(head.module).state_dict().keys()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def table_row(label: str, model_name: str, model: nn.Module, x: Tensor, tmp_path: Path, *, dynamo: bool) -> str:
    """One row of the docs table: MACs ratio, twin error, ONNX error (both relative to the output scale)."""
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=x[:1])
    before = macs(model, x[:1])
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    removed = apply_plan(model, plan, mode="remove")
    ratio = macs(removed, x[:1]) / before
    with torch.no_grad():
        expected, actual = masked(x), removed(x)
    scale = float(expected.abs().max())
    twin = float((actual - expected).abs().max()) / scale
    path = tmp_path / "model.onnx"
    if dynamo:
        export_onnx(removed, x, path)
    else:
        export_torchscript(removed, x, path)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    onnx = float((torch.from_numpy(session.run(None, feed)[0]) - actual).abs().max()) / scale
    attention = [h for h in plan.heads if h.kind != "timm_glu_mlp"]
    heads = sum(h.num_heads for h in attention)
    kept = sum(len(h.keep) for h in attention)
    return (f"| {label} | {model_name} | {len(attention)} ({kept}/{heads} heads) | {ffn_count(plan)} | "
            f"{ratio:.3f} | {twin:.1e} | {onnx:.1e} |")


if __name__ == "__main__":  # the tiny configs, or (with names) timm's default configs at their input size
    import sys
    import tempfile
    import time

    torch.set_num_threads(1)
    print("| family | timm model | attention layers (heads kept) | FFNs pruned | MACs after | twin error | ONNX error |")
    print("|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:] or list(FAMILIES):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as directory:
            if arg in FAMILIES:
                net, batch = build(arg)
                label, timm_name = arg, f"{FAMILIES[arg][0]} (tiny)"
            else:
                torch.manual_seed(0)
                net = load_model(ModelSpec(name=f"timm:{arg}", kwargs={"num_classes": 10}))
                size = net.pretrained_cfg["input_size"][-1]
                batch = torch.randn(2, 3, size, size)
                net = _live(net, batch)
                label, timm_name = "default config", arg
            row = table_row(label, timm_name, net, batch, Path(directory), dynamo=arg in DYNAMO or arg.startswith("eva"))
            print(row, flush=True)
            print(f"  {arg}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
