"""Structured pruning: hand-checked channel choices, plans as data, masks vs removal, RNNs and transformers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pydantic
import pytest
import torch
from torch import Tensor, nn

from spiralkit.errors import PruneError
from spiralkit.models import ModelSpec, load_model
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.importance import Magnitude, Random, Taylor
from spiralkit.prune.plan import PrunePlan
from spiralkit.prune.saved import load_pruned, save_pruned
from spiralkit.prune.structured import StructuredPrune, plan_pruning, prune_structured
from spiralkit.prune.structured_importance import APoZ, BNScale, MeanActivation, NormRatio, bn_l1_penalty
from spiralkit.prune.unstructured import Scope




# --------------------------------------------------------------------------- a tiny net, by hand


class Tiny(nn.Module):
    """``conv1 (2→4, 1x1) → bn1 → relu → conv2 (4→3) → mean → fc (3→2)``.

    The four filters of conv1 are chosen so that L1, L2, BN scale and ‖W‖₂²/‖W‖₁ each
    remove a different pair:

    ======  ==========  ====  =====  =====  =====
    filter  weights     L1    L2     ratio  |γ|
    ======  ==========  ====  =====  =====  =====
    0       (2, 0)      2.0   2.000  2.000  0.1
    1       (1.2, 1.2)  2.4   1.697  1.200  0.9
    2       (1, 0.5)    1.5   1.118  0.833  0.5
    3       (1.5, 0.7)  2.2   1.655  1.245  0.3
    ======  ==========  ====  =====  =====  =====
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[2.0, 0.0], [1.2, 1.2], [1.0, 0.5], [1.5, 0.7]]).view(4, 2, 1, 1))
            self.bn1.weight.copy_(torch.tensor([0.1, -0.9, 0.5, 0.3]))
            self.bn1.bias.copy_(torch.tensor([0.2, -0.1, 0.3, 0.4]))  # non-zero shifts: masks must zero them too
            self.conv2.weight.copy_(torch.arange(12.0).view(3, 4, 1, 1) / 10)
            self.conv2.bias.copy_(torch.tensor([3.0, 0.1, 2.0]))  # conv2's filters: L2 ranks 0 < 1 < 2

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.conv2(x).mean((2, 3)))


X = torch.tensor([[1.0, 1.0], [1.0, -1.0]]).view(2, 2, 1, 1)


def kept(plan: PrunePlan, group: str) -> tuple[int, ...]:
    return next(g.keep for g in plan.groups if g.id == group)


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [
        (Magnitude(norm=1), (1, 3)),
        (Magnitude(norm=2), (0, 1)),
        (NormRatio(), (0, 3)),
        (BNScale(), (1, 2)),
    ],
)
def test_exact_channels_removed_by_each_criterion(criterion: object, expected: tuple[int, ...]) -> None:
    plan = plan_pruning(Tiny().eval(), StructuredPrune(criterion=criterion, ratio=0.5), example=X)
    assert kept(plan, "conv1") == expected


def test_the_plan_lists_every_member_with_its_kept_indices() -> None:
    plan = plan_pruning(Tiny().eval(), StructuredPrune(ratio=0.5), example=X)
    conv1 = next(g for g in plan.groups if g.id == "conv1")
    assert [(m.module, m.role, m.size, m.keep) for m in conv1.members] == [
        ("conv1", "out", 4, (0, 1)), ("bn1", "out", 4, (0, 1)), ("conv2", "in", 4, (0, 1)),
    ]
    # conv2 has 3 filters: round(3 · 0.5) = 2 kept (half rounds up); the weakest filter goes.
    assert kept(plan, "conv2") == (1, 2)
    assert [(s.name, s.reason) for s in plan.skipped] == [("fc", "reaches the model output")]


def test_activation_criteria_rank_what_the_next_layer_sees() -> None:
    model = Tiny().eval()
    with torch.no_grad():
        model.bn1.weight.fill_(1.0)
        model.bn1.bias.zero_()
    # Input (1, 1): conv1 gives (2, 2.4, 1.5, 2.2); relu keeps them all.
    ones = torch.ones(1, 2, 1, 1)
    plan = plan_pruning(model, StructuredPrune(criterion=MeanActivation(), ratio=0.5), example=ones)
    assert kept(plan, "conv1") == (1, 3)
    # Input (1, -1): conv1 gives (2, 0, 0.5, 0.8); channel 1 is always zero after relu
    # (APoZ 100%), the others never: ties are broken by removing the lower index first.
    plan = plan_pruning(model, StructuredPrune(criterion=APoZ(), ratio=0.5), example=torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
    assert kept(plan, "conv1") == (2, 3)


def test_taylor_removes_channels_that_do_not_affect_the_loss() -> None:
    model = Tiny().eval()
    with torch.no_grad():
        model.conv2.weight[:, 0] = 0.0  # channel 0 is never read: its Taylor score is 0
    batches = [(torch.randn(4, 2, 3, 3), torch.tensor([0, 1, 0, 1])) for _ in range(2)]
    plan = plan_pruning(model, StructuredPrune(criterion=Taylor(batches=2), ratio=0.25), example=X,
                        batches=batches, loss_fn=nn.functional.cross_entropy)
    assert 0 not in kept(plan, "conv1")
    with pytest.raises(PruneError, match="needs a loss function"):
        plan_pruning(model, StructuredPrune(criterion=Taylor(), ratio=0.5), example=X)
    with pytest.raises(PruneError, match="at least one"):
        plan_pruning(model, StructuredPrune(criterion=Taylor(), ratio=0.5), example=X, loss_fn=nn.functional.cross_entropy)


def test_random_is_seeded() -> None:
    config = StructuredPrune(criterion=Random(seed=3), ratio=0.5)
    assert plan_pruning(Tiny(), config, example=X) == plan_pruning(Tiny(), config, example=X)


def test_global_scope_compares_groups_by_normalised_scores() -> None:
    # L2 scores divided by their group's mean: conv1 (2, 1.697, 1.118, 1.655)/1.618 =
    # (1.236, 1.049, 0.691, 1.023); conv2's filters (0.374, 1.122, 1.913)/1.137 =
    # (0.329, 0.987, 1.683). The 3 lowest of all 7: conv2's 0 and 1, conv1's 2.
    plan = plan_pruning(Tiny().eval(), StructuredPrune(ratio=3 / 7, scope=Scope.GLOBAL), example=X)
    assert kept(plan, "conv1") == (0, 1, 3) and kept(plan, "conv2") == (2,)


def wide(channels: int = 12) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, channels, 1), nn.ReLU(), nn.Conv2d(channels, 2, 1), nn.Flatten())


@pytest.mark.parametrize(("ratio", "round_to", "count"), [(0.5, 1, 6), (0.5, 8, 8), (0.4, 4, 8), (0.9, 8, 8), (0.1, 4, 12)])
def test_round_to_keeps_a_multiple(ratio: float, round_to: int, count: int) -> None:
    config = StructuredPrune(ratio=ratio, round_to=round_to)
    plan = plan_pruning(wide(), config, example=torch.randn(1, 3, 1, 1))
    assert len(next((g.keep for g in plan.groups if g.id == "0"), tuple(range(12)))) == count


# --------------------------------------------------------------------------- masks, removal, plans as data


def assert_twins(removed: nn.Module, masked: nn.Module, *inputs: object) -> None:
    with torch.inference_mode():
        expected, actual = masked(*inputs), removed(*inputs)
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())), (
        float((actual - expected).abs().max()))


def test_masked_twin_matches_removal_including_batch_norm_shifts() -> None:
    model = Tiny().eval()
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=X)
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    removed = apply_plan(copy.deepcopy(model), plan, mode="remove")
    assert masked.conv1.weight.shape == (4, 2, 1, 1) and removed.conv1.weight.shape == (2, 2, 1, 1)
    assert removed.bn1.num_features == 2 and removed.conv2.in_channels == 2 and removed.fc.in_features == 2
    assert masked.bn1.bias[2:].eq(0).all()  # the shift of a removed channel would leak through the ReLU
    assert_twins(removed, masked, torch.randn(3, 2, 4, 4))


def test_plan_json_round_trip_and_replay_on_a_fresh_model() -> None:
    torch.manual_seed(0)
    model = load_model(ModelSpec(name="resnet20", kwargs={"in_channels": 1}))
    x = torch.randn(2, 1, 28, 28)
    plan = plan_pruning(model, StructuredPrune(ratio=0.5, round_to=4), example=x[:1])
    again = PrunePlan.from_json(plan.to_json())
    assert again == plan and json.loads(plan.to_json())["version"] == 1
    fresh = copy.deepcopy(model)
    apply_plan(model, plan, mode="remove")
    apply_plan(fresh, again, mode="remove")
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert all(len(g.keep) % 4 == 0 for g in plan.groups)
    with pytest.raises(PruneError, match="plan does not fit the model: 'conv1' .* has 8 output channels, the plan expects 16"):
        apply_plan(model, plan, mode="remove")


def test_save_and_load_pruned_gives_identical_outputs(tmp_path: Path) -> None:
    spec = ModelSpec(name="resnet20", kwargs={"in_channels": 1})
    torch.manual_seed(0)
    model = load_model(spec)
    x = torch.randn(2, 1, 28, 28)
    plan = prune_structured(model, StructuredPrune(ratio=0.5, depth=1), example=x[:1])
    assert plan.blocks
    save_pruned(model, plan, tmp_path / "pruned", spec=spec)
    assert sorted(p.name for p in (tmp_path / "pruned").iterdir()) == ["plan.json", "spec.json", "weights.safetensors"]
    loaded = load_pruned(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_save_pruned_refuses_a_masked_model(tmp_path: Path) -> None:
    spec = ModelSpec(name="resnet20", kwargs={"in_channels": 1})
    model = load_model(spec)
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=torch.randn(1, 1, 28, 28))
    apply_plan(model, plan, mode="mask")
    with pytest.raises(PruneError, match="mode='remove'"):
        save_pruned(model, plan, tmp_path, spec=spec)
    with pytest.raises(PruneError, match="spec.json is missing"):
        load_pruned(tmp_path / "nothing")


def test_an_unknown_layer_type_is_reported_and_left_unpruned() -> None:
    from tests.graph.test_groups import WithCustom

    model = WithCustom().eval()
    x = torch.randn(2, 3, 6, 6)
    plan = prune_structured(model, StructuredPrune(ratio=0.5), example=x[:1])
    assert ("conv1", "touches parameter 'scale.gamma' of Scale, a layer type spiralkit cannot slice") in [
        (s.name, s.reason) for s in plan.skipped]
    assert model.conv1.out_channels == 6 and model.scale.gamma.shape == (6,) and model.conv2.out_channels == 2
    assert model(x).shape == (2, 2)


# --------------------------------------------------------------------------- bad input


def test_bad_ratio_is_rejected_with_the_field_named() -> None:
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(pydantic.ValidationError, match="ratio"):
            StructuredPrune(ratio=ratio)
    with pytest.raises(pydantic.ValidationError, match="round_to"):
        StructuredPrune(ratio=0.5, round_to=0)
    with pytest.raises(pydantic.ValidationError, match="criterion"):
        StructuredPrune(ratio=0.5, criterion="l3")


def test_a_pattern_matching_nothing_is_an_error() -> None:
    with pytest.raises(PruneError, match=r"pattern 'layer9\*' matches no prunable layer; prunable layers are: conv1, conv2, fc"):
        plan_pruning(Tiny(), StructuredPrune(ratio=0.5, exclude=("layer9*",)), example=X)


def test_exclude_keeps_a_layer_whole() -> None:
    plan = plan_pruning(Tiny().eval(), StructuredPrune(ratio=0.5, exclude=("conv1",)), example=X)
    assert [g.id for g in plan.groups] == ["conv2"]


def test_bad_mode_and_a_bad_plan_file() -> None:
    plan = plan_pruning(Tiny(), StructuredPrune(ratio=0.5), example=X)
    with pytest.raises(PruneError, match="mode must be 'mask' or 'remove', got 'zero'"):
        apply_plan(Tiny(), plan, mode="zero")  # type: ignore[arg-type]
    with pytest.raises(PruneError, match="not a valid prune plan"):
        PrunePlan.from_json('{"version": 2}')
    with pytest.raises(PruneError, match="bn_scale needs batch norms"):
        plan_pruning(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), StructuredPrune(criterion=BNScale(), ratio=0.5),
                     example=torch.randn(1, 3))


def test_bn_l1_penalty() -> None:
    model = Tiny()
    penalty = bn_l1_penalty(model, 0.01)
    assert penalty.item() == pytest.approx(0.01 * (0.1 + 0.9 + 0.5 + 0.3))
    penalty.backward()
    assert torch.allclose(model.bn1.weight.grad, 0.01 * torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(PruneError, match="strength must be >= 0"):
        bn_l1_penalty(model, -1.0)


# --------------------------------------------------------------------------- RNNs and transformers


class Recurrent(nn.Module):
    def __init__(self, kind: type[nn.RNNBase] = nn.LSTM, *, bidirectional: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.rnn = kind(16, 32, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(64 if bidirectional else 32, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(self.rnn(self.embed(tokens))[0][:, -1])


@pytest.mark.parametrize(("kind", "bidirectional"), [(nn.LSTM, False), (nn.LSTM, True), (nn.GRU, False)])
def test_rnn_hidden_units_removed(kind: type[nn.RNNBase], bidirectional: bool) -> None:
    torch.manual_seed(0)
    model = Recurrent(kind, bidirectional=bidirectional).eval()
    tokens = torch.randint(0, 50, (3, 7))
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=tokens[:1])
    assert {g.id for g in plan.groups} == {"embed", "rnn"}
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    apply_plan(model, plan, mode="remove")
    assert model.rnn.hidden_size == 16 and model.rnn.input_size == 8 and model.embed.embedding_dim == 8
    assert model.fc.in_features == (32 if bidirectional else 16)
    assert model(tokens).shape == (3, 5)
    assert_twins(model, masked, tokens)


def tiny_transformer(*, layers: int = 2) -> nn.Module:
    """A token classifier: embedding → transformer encoder → mean over tokens → linear."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True),
        num_layers=layers, enable_nested_tensor=False,
    )
    return nn.Sequential(nn.Embedding(40, 32), encoder, _MeanTokens(), nn.Linear(32, 3)).eval()


class _MeanTokens(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


def test_transformer_heads_and_ffn_removed_match_the_masked_twin() -> None:
    model = tiny_transformer()
    tokens = torch.randint(0, 40, (3, 6))
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=tokens[:1])
    assert [(h.module, h.num_heads, len(h.keep)) for h in plan.heads] == [
        ("1.layers.0.self_attn", 4, 2), ("1.layers.1.self_attn", 4, 2)]
    assert {g.id for g in plan.groups} == {"1.layers.0.linear1", "1.layers.1.linear1"}
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    apply_plan(model, plan, mode="remove")
    attention = model[1].layers[0].self_attn
    assert attention.num_heads == 2 and attention.in_proj_weight.shape == (48, 32) and attention.out_proj.in_features == 16
    assert model[1].layers[0].linear1.out_features == 32
    assert_twins(model, masked, tokens)  # inference mode: the masked twin takes torch's fused fast path
    with torch.no_grad():
        out, weights = attention(torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.randn(2, 5, 32),
                                 key_padding_mask=torch.tensor([[False] * 4 + [True]] * 2))
    assert out.shape == (2, 5, 32) and weights.shape == (2, 5, 5) and weights[..., -1].eq(0).all()


def test_depth_pruning_removes_the_least_influential_layer(tmp_path: Path) -> None:
    spec = ModelSpec(name="tests.prune.test_structured:tiny_transformer", kwargs={"layers": 3})
    model = load_model(spec)
    tokens = torch.randint(0, 40, (2, 6))
    plan = prune_structured(model, StructuredPrune(ratio=0.5, depth=1), example=tokens[:1])
    assert len(plan.blocks) == 1 and plan.blocks[0].module.startswith("1.layers.")
    assert len(model[1].layers) == 2 and model[1].num_layers == 2
    save_pruned(model, plan, tmp_path, spec=spec)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path)(tokens), model(tokens))
    with pytest.raises(PruneError, match="depth=9 but only"):
        plan_pruning(tiny_transformer(), StructuredPrune(ratio=0.5, depth=9), example=tokens[:1])


def test_hugging_face_bert_heads_and_ffn_removed_and_exported(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from spiralkit.export.onnx import export_onnx, verify_onnx

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(config).eval()
    model = _Logits(bert)
    tokens = torch.randint(0, 64, (2, 8))
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=tokens[:1])
    assert len(plan.heads) == 2 and all(h.kind == "hf_bert" and len(h.keep) == 2 for h in plan.heads)
    assert {g.id for g in plan.groups} >= {"bert.bert.encoder.layer.0.intermediate.dense"}
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    apply_plan(model, plan, mode="remove")
    attention = bert.bert.encoder.layer[0].attention.self
    assert attention.num_attention_heads == 2 and attention.all_head_size == 16 and attention.query.out_features == 16
    assert bert.bert.encoder.layer[0].intermediate.dense.out_features == 32
    assert_twins(model, masked, tokens)
    path = export_onnx(model, tokens, tmp_path / "bert.onnx")
    verify_onnx(model, path, tokens, atol=1e-4, rtol=1e-3)


class _Logits(nn.Module):
    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.bert(input_ids=input_ids).logits


def test_a_pruned_model_prunes_again_and_both_rounds_replay(tmp_path: Path) -> None:
    spec = ModelSpec(name="tests.prune.test_structured:tiny_transformer")
    model = load_model(spec)
    tokens = torch.randint(0, 40, (2, 6))
    first = prune_structured(model, StructuredPrune(ratio=0.5), example=tokens[:1])
    second = plan_pruning(model, StructuredPrune(ratio=0.5), example=tokens[:1])
    assert [len(h.keep) for h in second.heads] == [1, 1]
    masked = apply_plan(copy.deepcopy(model), second, mode="mask")
    apply_plan(model, second, mode="remove")
    assert model[1].layers[0].self_attn.num_heads == 1 and model[1].layers[0].linear1.out_features == 16
    assert_twins(model, masked, tokens)
    save_pruned(model, [first, second], tmp_path, spec=spec)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path)(tokens), model(tokens))
