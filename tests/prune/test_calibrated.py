"""One-shot calibration pruning: Wanda and SparseGPT against direct computations of their objectives, N:M."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from spiralkit.errors import PruneError, StorageError
from spiralkit.layerwise import CalibrationError, calibrate_layers
from spiralkit.prune import NM, SparseGPT, UnstructuredPrune, Wanda, check_nm, prune, sparsegpt_prune
from spiralkit.prune.config import prune_to
from spiralkit.prune.importance import Magnitude
from spiralkit.prune.nm import load_masks, pack_masks, save_masks, unpack_masks
from spiralkit.prune.schedules import OneShot
from spiralkit.train import OptimizerConfig, TrainConfig, supervised, train


def _inputs(seed: int = 0, *, batches: int = 3, tokens: int = 5, features: int = 8) -> list[Tensor]:
    """Correlated, unevenly scaled token inputs ``(batch, tokens, features)`` (what a transformer layer sees)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g)
    scale = torch.linspace(0.2, 3.0, features)
    return [(torch.randn(4, tokens, features, generator=g) @ mix) * scale for _ in range(batches)]


def _rows(inputs: list[Tensor]) -> Tensor:
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).double()


def _layer(out: int = 6, features: int = 8, seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, out))


# --------------------------------------------------------------------------- Wanda


def test_wanda_prunes_lowest_weight_times_input_norm_in_each_row() -> None:
    inputs = _inputs()
    model = _layer()
    w = model[0].weight.detach().clone().double()
    masks = prune(model, UnstructuredPrune(criterion=Wanda(samples=100), target_sparsity=0.5),
                  batches=[(x, None) for x in inputs])
    # Direct computation: S_ij = |W_ij| · sqrt(Σ_tokens x_j²); the 4 smallest of each row of 8 go.
    norms = _rows(inputs).pow(2).sum(0).sqrt()
    scores = w.abs() * norms
    expected = torch.ones_like(w, dtype=torch.bool)
    for row in range(w.shape[0]):
        ranked = sorted(range(w.shape[1]), key=lambda j: float(scores[row, j]))
        expected[row, ranked[:4]] = False
    assert torch.equal(masks["0.weight"], expected)
    kept = model[0].weight.detach().double()
    assert torch.equal(kept[expected], w[expected]) and bool((kept[~expected] == 0).all())  # no update


def test_wanda_uses_only_the_first_samples() -> None:
    inputs = _inputs()
    model = _layer()
    w = model[0].weight.detach().clone().double()
    masks = prune(model, UnstructuredPrune(criterion=Wanda(samples=6), target_sparsity=0.25),
                  batches=[(x, None) for x in inputs])
    rows = _rows([inputs[0], inputs[1][:2]])  # 4 + 2 examples
    scores = w.abs() * rows.pow(2).sum(0).sqrt()
    expected = torch.ones_like(w, dtype=torch.bool).scatter_(1, torch.argsort(scores, dim=1)[:, :2], False)
    assert torch.equal(masks["0.weight"], expected)


def test_wanda_is_sequential_the_second_layer_sees_pruned_outputs() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    inputs = _inputs(seed=4)
    w2 = model[2].weight.detach().clone().double()
    masks = prune(model, UnstructuredPrune(criterion=Wanda(samples=100), target_sparsity=0.5),
                  batches=[(x, None) for x in inputs])
    with torch.no_grad():
        hidden = _rows([model[1](model[0](x)) for x in inputs])  # the *pruned* first layer
    scores = w2.abs() * hidden.pow(2).sum(0).sqrt()
    expected = torch.ones_like(w2, dtype=torch.bool).scatter_(1, torch.argsort(scores, dim=1)[:, :4], False)
    assert torch.equal(masks["2.weight"], expected)


def test_wanda_scores_leave_the_model_unchanged() -> None:
    inputs = _inputs()
    model = _layer()
    before = model[0].weight.detach().clone()
    scores = Wanda(samples=100).weight_scores(model=model, weights={"0.weight": model[0].weight},
                                              batches=[(x, None) for x in inputs], loss_fn=None)
    assert torch.equal(model[0].weight.detach(), before)
    direct = before.double().abs() * _rows(inputs).pow(2).sum(0).sqrt()
    assert torch.allclose(scores["0.weight"].double(), direct, rtol=1e-5)


# --------------------------------------------------------------------------- SparseGPT


def _naive_sparsegpt(w: Tensor, h: Tensor, *, sparsity: float | None, pattern: NM | None) -> tuple[Tensor, Tensor]:
    """SparseGPT with explicit inverses of the trailing Hessian blocks ``H_F``, ``F = {i…}`` (one block)."""
    w = w.double().clone()
    d = w.shape[1]
    inverses = [torch.linalg.inv(h[i:, i:]) for i in range(d)]
    diag = torch.tensor([float(inverses[i][0, 0]) for i in range(d)], dtype=torch.float64)
    keep = torch.ones_like(w, dtype=torch.bool)
    if pattern is None:
        saliency = w.pow(2) / diag  # OBS saliency w² / [H_F⁻¹]_ii, all of the block's weights ranked together
        count = round(sparsity * w.numel())
        keep.view(-1)[torch.argsort(saliency.reshape(-1), stable=True)[:count]] = False
    for i in range(d):
        if pattern is not None and i % pattern.m == 0:
            group = slice(i, i + pattern.m)
            saliency = w[:, group].pow(2) / diag[group]
            order = torch.argsort(saliency, dim=1, descending=True, stable=True)
            keep[:, group] = torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, order[:, : pattern.n], True)
        for row in range(w.shape[0]):
            if not keep[row, i]:
                # OBS: remove w_i, the optimal change of the free weights F: −w_i / [H_F⁻¹]_ii · [H_F⁻¹]_{i,F}
                w[row, i:] -= w[row, i] / inverses[i][0, 0] * inverses[i][0]
                w[row, i] = 0.0
    return w, keep


@pytest.mark.parametrize("pattern", [None, NM(n=2, m=4)], ids=["unstructured", "2:4"])
def test_sparsegpt_matches_obs_with_explicit_inverses(pattern: NM | None) -> None:
    x = _rows(_inputs(seed=5))
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(5, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    new, keep = sparsegpt_prune(w, h, sparsity=0.5, pattern=pattern, blocksize=8, damp=0.0)
    expected_w, expected_keep = _naive_sparsegpt(w, h, sparsity=0.5, pattern=pattern)
    assert torch.equal(keep, expected_keep)
    assert torch.allclose(new, expected_w, atol=1e-9)


def test_sparsegpt_blocks_give_the_same_updates_as_one_block() -> None:
    x = _rows(_inputs(seed=5))
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(5, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    one, keep_one = sparsegpt_prune(w, h, sparsity=0.5, pattern=NM(n=2, m=4), blocksize=8)
    two, keep_two = sparsegpt_prune(w, h, sparsity=0.5, pattern=NM(n=2, m=4), blocksize=4)
    assert torch.equal(keep_one, keep_two) and torch.allclose(one, two, atol=1e-9)


def test_sparsegpt_pruning_one_column_is_the_least_squares_optimum() -> None:
    """Removing column 0 alone, the OBS update is exact: the kept weights solve min ‖XW − XŴ‖²."""
    x = _rows(_inputs(seed=7))
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    must = torch.zeros_like(w, dtype=torch.bool)
    must[:, 0] = True
    new, keep = sparsegpt_prune(w, h, sparsity=0.0, prune=must, damp=0.0)
    assert torch.equal(keep, ~must)
    optimum = torch.linalg.lstsq(x[:, 1:], x @ w.T).solution.T  # (3, 7)
    assert torch.allclose(new[:, 1:], optimum, atol=1e-8) and bool((new[:, 0] == 0).all())


def test_sparsegpt_reconstructs_better_than_wanda_magnitude_and_its_own_mask_without_updates() -> None:
    inputs = _inputs(seed=9, batches=6, features=16)
    x = _rows(inputs)
    errors = {}
    for label, criterion in (("magnitude", Magnitude()), ("wanda", Wanda(samples=100)),
                             ("sparsegpt", SparseGPT(samples=100))):
        model = _layer(out=8, features=16, seed=10)
        w = model[0].weight.detach().double().clone()
        masks = prune(model, UnstructuredPrune(criterion=criterion, target_sparsity=0.5),
                      batches=[(t, None) for t in inputs])
        errors[label] = float((x @ (w - model[0].weight.detach().double()).T).pow(2).sum())
        if label == "sparsegpt":
            errors["sparsegpt mask, no update"] = float((x @ (w * ~masks["0.weight"]).T).pow(2).sum())
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["sparsegpt mask, no update"], errors  # the updates help


def test_sparsegpt_keeps_an_earlier_rounds_pruned_weights_pruned() -> None:
    inputs = _inputs()
    model = _layer()
    earlier = torch.ones(6, 8, dtype=torch.bool)
    earlier[:, 5] = False  # the most active inputs (largest scale): sparsegpt alone would keep them
    masks = prune_to(model, UnstructuredPrune(criterion=SparseGPT(samples=100), target_sparsity=0.5),
                     sparsity=0.5, existing={"0.weight": earlier}, batches=[(x, None) for x in inputs])
    assert not bool(masks["0.weight"][:, 5].any())
    assert bool((model[0].weight.detach()[:, 5] == 0).all())


def test_sparsegpt_prunes_a_conv_over_its_unfolded_patches() -> None:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    images = [torch.randn(3, 2, 6, 6) for _ in range(2)]
    masks = prune(model, UnstructuredPrune(criterion=SparseGPT(samples=10, blocksize=6), pattern=NM(n=1, m=2)),
                  batches=[(x, None) for x in images])
    assert masks["0.weight"].shape == (4, 2, 3, 3)
    check_nm(masks["0.weight"], NM(n=1, m=2), name="0")
    assert masks["0.weight"].sum() == 4 * 9 and masks["2.weight"].sum() == 4 * 2


# --------------------------------------------------------------------------- N:M


@pytest.mark.parametrize("criterion", [Magnitude(), Wanda(samples=100), SparseGPT(samples=100)],
                         ids=["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [NM(n=2, m=4), NM(n=4, m=8)], ids=["2:4", "4:8"])
def test_nm_patterns_are_exact(criterion: object, pattern: NM) -> None:
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    inputs = _inputs(seed=13, features=16)
    config = UnstructuredPrune(criterion=criterion, pattern=pattern)
    assert config.target_sparsity == pattern.sparsity and isinstance(config.schedule, OneShot)
    masks = prune(model, config, batches=[(x, None) for x in inputs])
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, pattern.m).sum(-1)
        assert bool((groups == pattern.n).all()), name
        weight = dict(model.named_parameters())[name].detach()
        assert bool((weight[~mask] == 0).all())


def test_magnitude_nm_keeps_the_largest_of_each_group() -> None:
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -3.0, 2.0, 0.5]]))
    masks = prune(model, UnstructuredPrune(criterion=Magnitude(), pattern={"n": 2, "m": 4}))
    assert masks["0.weight"].tolist() == [[False, True, True, False]]


def test_nm_masks_are_kept_through_a_recovery_step() -> None:
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    inputs = _inputs(seed=15)
    masks = prune(model, UnstructuredPrune(criterion=Wanda(samples=100), pattern=NM(n=2, m=4)),
                  batches=[(x, None) for x in inputs])
    data = [(x.mean(1), torch.randint(0, 3, (4,))) for x in inputs]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, data, config=TrainConfig(epochs=2, optimizer=OptimizerConfig(name="adamw", lr=0.05, weight_decay=0.1)),
          objective=supervised(nn.functional.cross_entropy), seed=0, masks=masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        check_nm(params[name].detach() != 0, NM(n=2, m=4), name=name)
        assert bool((params[name].detach()[~mask] == 0).all())
        assert not torch.equal(params[name].detach(), before[name])  # it did train


# --------------------------------------------------------------------------- storage


def test_masks_round_trip_exactly_in_one_bit_per_weight(tmp_path) -> None:
    g = torch.Generator().manual_seed(16)
    masks = {"a.weight": torch.rand(6, 8, generator=g) > 0.5, "b.weight": torch.rand(3, 2, 3, 3, generator=g) > 0.3}
    size = save_masks(tmp_path / "m.safetensors", masks)
    loaded = load_masks(tmp_path / "m.safetensors")
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert size < 48 + 54 + 400  # 13 bytes of bits plus a small header, not a byte per weight


def test_nm_masks_file_is_checked_on_load(tmp_path) -> None:
    bad = {"fc.weight": torch.tensor([[True, True, True, False]])}
    with pytest.raises(PruneError, match=r"'fc.weight' breaks the 2:4 pattern: row 0, columns 0..3 keep 3"):
        unpack_masks(pack_masks(bad, pattern=NM(n=2, m=4)))


def test_a_file_that_is_not_a_mask_file_is_refused(tmp_path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(StorageError, match="junk.safetensors is not a safetensors mask file"):
        load_masks(path)
    with pytest.raises(StorageError, match="cannot read masks"):
        load_masks(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------- errors


def test_bad_configs_are_refused_with_the_key() -> None:
    with pytest.raises(ValidationError, match="n=4 must be < m=4"):
        NM(n=4, m=4)
    with pytest.raises(ValidationError, match="target_sparsity 0.6 contradicts pattern 2:4"):
        UnstructuredPrune(pattern=NM(n=2, m=4), target_sparsity=0.6)
    with pytest.raises(ValidationError, match="schedule must be one-shot"):
        UnstructuredPrune(pattern=NM(n=2, m=4), schedule={"kind": "agp", "rounds": 3})
    with pytest.raises(ValidationError, match="samples"):
        UnstructuredPrune(criterion={"kind": "sparsegpt", "samples": 0}, target_sparsity=0.5)


def test_a_layer_whose_width_is_not_a_multiple_of_m_is_named() -> None:
    model = nn.Sequential(nn.Linear(6, 2))
    with pytest.raises(PruneError, match=r"layer '0': its 6 input columns are not a multiple of m=4"):
        prune(model, UnstructuredPrune(criterion=Wanda(), pattern=NM(n=2, m=4)), batches=[(torch.randn(2, 6), None)])


def test_calibration_errors_name_what_is_wrong() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(CalibrationError, match="calibration batches are empty"):
        prune(model, UnstructuredPrune(criterion=Wanda(), target_sparsity=0.5), batches=[])
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(CalibrationError, match=r"layer '0': calibration methods need a Conv2d with groups=1"):
        prune(grouped, UnstructuredPrune(criterion=Wanda(), target_sparsity=0.5), batches=[(torch.randn(1, 4, 5, 5), None)])

    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    branch = Branch()
    with pytest.raises(CalibrationError, match="never reach layer\\(s\\) unused: exclude them"):
        calibrate_layers(branch, {"used": branch.used, "unused": branch.unused}, [torch.randn(2, 4)],
                         solve=lambda *args: None)
    with pytest.raises(PruneError, match="sparsegpt changes the weights it keeps"):
        SparseGPT().weight_scores(model=model, weights={}, batches=[], loss_fn=None)


def test_query_key_value_sharing_one_input_are_calibrated_in_one_pass() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))
            self.passes = 0

        def forward(self, x: Tensor) -> Tensor:
            self.passes += 1
            return self.o(self.q(x) * self.k(x) + self.v(x))

    model = Attention()
    groups: list[str] = []
    order = calibrate_layers(model, {"q": model.q, "k": model.k, "v": model.v, "o": model.o}, [torch.randn(3, 4)],
                             solve=lambda name, layer, stats: groups.append(f"{name}@{model.passes}"))
    assert order == ["q", "k", "v", "o"]
    assert groups == ["q@1", "k@1", "v@1", "o@2"]  # q, k, v from the first pass; o needs a second


def test_an_nm_model_in_the_compact_artefact_reloads_with_its_pattern(tmp_path) -> None:
    from spiralkit.models import ModelSpec, load_model
    from spiralkit.quant.compact import load_compressed, save_compressed

    spec = ModelSpec(name="mlp", kwargs={"in_features": 16, "widths": [16], "num_classes": 4})
    torch.manual_seed(17)
    model = load_model(spec)
    masks = prune(model, UnstructuredPrune(criterion=SparseGPT(samples=32), pattern=NM(n=2, m=4),
                                           exclude=("fc2",)), batches=[(torch.randn(32, 16), None)])
    save_compressed(model, tmp_path / "nm.spkc", spec=spec, bits=6)
    loaded = dict(load_compressed(tmp_path / "nm.spkc").named_parameters())
    assert torch.equal(loaded["fc1.weight"] != 0, masks["fc1.weight"])  # the exact 2:4 positions, 6-bit values
    check_nm(loaded["fc1.weight"] != 0, NM(n=2, m=4), name="fc1.weight")


def test_a_sparsegpt_block_that_splits_an_nm_group_is_refused() -> None:
    with pytest.raises(PruneError, match="sparsegpt blocksize 6 is not a multiple of the pattern's m=4"):
        sparsegpt_prune(torch.ones(2, 8), torch.eye(8), sparsity=0.5, pattern=NM(n=2, m=4), blocksize=6)
