"""Channel groups on small hand-built models: what is coupled, and what is refused with a reason."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spiralkit.graph import ChannelGroup, ModelGroups, trace_groups


def group(groups: ModelGroups, root: str) -> ChannelGroup:
    return next(g for g in groups.channels if g.id == root)


def members(g: ChannelGroup) -> set[tuple[str, str]]:
    return {(m.module, m.role) for m in g.members}


def skipped(groups: ModelGroups, name: str) -> str:
    return next(s.reason for s in groups.skipped if s.name == name)


class Residual(nn.Module):
    """stem → [conv a → bn a] + stem → relu → head conv → pool → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.a_bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(x + self.a_bn(self.a(x)))
        return self.fc(self.head(x).mean((2, 3)))


def test_residual_addition_couples_both_branches_and_the_reader() -> None:
    groups = trace_groups(Residual(), torch.randn(1, 3, 8, 8))
    g = group(groups, "stem")
    assert members(g) == {
        ("stem", "out"), ("stem_bn", "out"), ("a", "in"), ("a", "out"), ("a_bn", "out"), ("head", "in"),
    }
    assert all(m.local == tuple(range(8)) and m.roots == tuple(range(8)) for m in g.members)
    # head's outputs are read by fc; fc's outputs are the model output.
    assert members(group(groups, "head")) == {("head", "out"), ("fc", "in")}
    assert skipped(groups, "fc") == "reaches the model output"


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, 2, 1)
        self.right = nn.Conv2d(3, 3, 1)
        self.mix = nn.Conv2d(5, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(torch.cat([self.left(x), self.right(x)], dim=1)).flatten(1)


def test_concatenation_offsets_the_reader_indices() -> None:
    groups = trace_groups(Concat(), torch.randn(1, 3, 1, 1))
    right = {m.module: m for m in group(groups, "right").members}
    assert right["mix"].local == (2, 3, 4) and right["mix"].roots == (0, 1, 2) and right["mix"].size == 5
    left = {m.module: m for m in group(groups, "left").members}
    assert left["mix"].local == (0, 1)


class Flatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        self.fc = nn.Linear(3 * 2 * 2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_flatten_maps_a_channel_to_its_spatial_features() -> None:
    fc = {m.module: m for m in group(trace_groups(Flatten(), torch.randn(1, 1, 2, 2)), "conv").members}["fc"]
    assert fc.local == tuple(range(12))
    assert fc.roots == (0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2)


def test_depthwise_and_grouped_convolutions() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: coupled with its input
        nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 4, 3, padding=1, groups=2),  # grouped: its inputs come in 2 blocks
        nn.Flatten(), nn.LazyLinear(2),
    )
    model(torch.randn(1, 3, 4, 4))
    groups = trace_groups(model, torch.randn(1, 3, 4, 4))
    assert members(group(groups, "0")) == {("0", "out"), ("2", "out"), ("3", "in")}
    grouped = group(groups, "3")
    assert ("4", "in") in members(grouped)
    assert grouped.blocks == (0, 0, 0, 0, 1, 1, 1, 1) and grouped.num_blocks == 2


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.reader = nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = self.conv(x).view(b, 2, 2, h, w).transpose(1, 2).reshape(b, 4, h, w)
        return self.reader(x).flatten(1)


def test_a_channel_shuffle_is_refused_with_the_reason() -> None:
    groups = trace_groups(Shuffle(), torch.randn(1, 3, 2, 2))
    assert "channel shuffle" in skipped(groups, "conv")
    assert not any(g.id == "conv" for g in groups.channels)


def test_layer_norm_across_channels_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    groups = trace_groups(model, torch.randn(1, 4))
    assert skipped(groups, "0") == "is normalised across channels by LayerNorm '1'"


class Scale(nn.Module):
    """A custom layer with its own parameter: spiralkit cannot know how to slice it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class WithCustom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.scale = Scale(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.scale(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def test_an_unknown_layer_type_is_named_and_left_whole() -> None:
    groups = trace_groups(WithCustom(), torch.randn(1, 3, 6, 6))
    assert skipped(groups, "conv1") == "touches parameter 'scale.gamma' of Scale, a layer type spiralkit cannot slice"
    assert [g.id for g in groups.channels] == ["conv2"]


def test_attention_heads_and_ffn_neurons_of_a_transformer_layer() -> None:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True)
    groups = trace_groups(layer, torch.randn(2, 5, 16))
    assert [(h.module, h.kind, h.num_heads, h.head_dim) for h in groups.heads] == [("self_attn", "torch_mha", 4, 4)]
    assert members(group(groups, "linear1")) == {("linear1", "out"), ("linear2", "in")}
    # The residual stream is normalised by the layer norms: left whole.
    assert "LayerNorm" in skipped(groups, "linear2") or "self_attn" in skipped(groups, "linear2")


def test_bidirectional_lstm_units_map_to_both_halves_of_the_output() -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 3, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(6, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.lstm(x)[0][:, -1])

    fc = {m.module: m for m in group(trace_groups(Tagger(), torch.randn(1, 5, 4)), "lstm").members}["fc"]
    assert fc.local == (0, 1, 2, 3, 4, 5) and fc.roots == (0, 1, 2, 0, 1, 2)


def test_tracing_restores_train_mode_and_leaves_weights_alone() -> None:
    model = Residual().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_groups(model, torch.randn(1, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tied_weights_are_not_cut_apart() -> None:
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.hidden = nn.Linear(6, 6)
            self.decoder = nn.Linear(6, 10, bias=False)
            self.decoder.weight = self.embed.weight  # tied: embedding dim = decoder inputs

        def forward(self, tokens: Tensor) -> Tensor:
            return self.decoder(torch.tanh(self.hidden(self.embed(tokens))))

    groups = trace_groups(TiedLM(), torch.tensor([[1, 2, 3]]))
    assert groups.channels == ()
    assert "is shared with decoder (tied)" in skipped(groups, "embed")
    assert "is shared with embed (tied)" in skipped(groups, "hidden")
