"""`spiral analyze`: one-layer pruning / channel-group / bit-width scans, analysis.json/html, --suggest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from spiralkit.cli import app
from spiralkit.errors import RecipeError, SpiralError
from spiralkit.report.analysis import ANALYSIS_SCHEMA, Analysis, GroupAnalysis, LayerAnalysis, Sample, analysis_html
from spiralkit.spiral import parse_recipe
from spiralkit.spiral.analyze import AnalyzeConfig, analyze, fewest_bits, first_examples, scans_only, suggest
from spiralkit.spiral.recipe import Recipe
from tests.spiral.tiny import TINY, TINY_TRANSFORMER

SCAN = AnalyzeConfig(limit=100, prune_ratios=(0.0, 0.5), channel_ratios=(0.0, 0.5), bits=(8, 2))


def _recipe(**changes: Any) -> Recipe:
    data = yaml.safe_load(TINY) | changes
    return parse_recipe(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Analysis, Path]:
    out = tmp_path_factory.mktemp("analysis")
    return analyze(_recipe(), out, SCAN), out


# --------------------------------------------------------------------------- values


def test_ratio_zero_is_the_unpruned_metric(scanned: tuple[Analysis, Path]) -> None:
    analysis, _ = scanned
    assert [layer.name for layer in analysis.layers] == ["fc1", "fc2"]
    for row in [*(layer.prune for layer in analysis.layers), *(group.prune for group in analysis.groups)]:
        assert row[0].setting == 0.0 and row[0].metric == analysis.baseline and row[0].drop == 0.0
    assert [g.id for g in analysis.groups] == ["fc1"] and analysis.groups[0].channels == 16


def test_eight_bits_is_close_to_float_and_drops_are_signed(scanned: tuple[Analysis, Path]) -> None:
    analysis, _ = scanned
    for layer in analysis.layers:
        assert [s.setting for s in layer.quant] == [8, 2]  # widest first
        assert abs(layer.quant[0].metric - analysis.baseline) <= 2.0
        for sample in (*layer.prune, *layer.quant):
            assert sample.drop == pytest.approx(analysis.baseline - sample.metric)  # accuracy: higher is better


def test_shares_sum_to_one(scanned: tuple[Analysis, Path]) -> None:
    analysis, _ = scanned
    assert sum(layer.mac_share for layer in analysis.layers) == pytest.approx(1.0)
    assert sum(layer.param_share for layer in analysis.layers) == pytest.approx(1.0)
    assert [(layer.params, layer.macs) for layer in analysis.layers] == [(64 * 16 + 16, 64 * 16), (16 * 10 + 10, 160)]


def test_limit_is_respected(scanned: tuple[Analysis, Path]) -> None:
    assert scanned[0].examples == 100
    batches = [(torch.zeros(64, 2), torch.zeros(64)), (torch.zeros(64, 2), torch.zeros(64)), (torch.zeros(5, 2), torch.zeros(5))]
    assert [y.shape[0] for _, y in first_examples(batches, 70)] == [70]  # joined up to EVAL_BATCH
    assert [y.shape[0] for _, y in first_examples(batches, 130, batch_size=100)] == [64, 66]
    assert [y.shape[0] for _, y in first_examples(batches, 7)] == [7]
    joined = first_examples([(torch.arange(3.0), torch.arange(3)), (torch.arange(3.0, 5), torch.arange(3, 5))], 4)
    assert [y.tolist() for _, y in joined] == [[0, 1, 2, 3]]
    assert first_examples(batches, None) is batches


# --------------------------------------------------------------------------- files


def test_json_has_a_versioned_schema_and_round_trips(scanned: tuple[Analysis, Path]) -> None:
    analysis, out = scanned
    text = (out / "analysis.json").read_text(encoding="utf-8")
    assert next(iter(json.loads(text))) == "schema" and json.loads(text)["schema"] == ANALYSIS_SCHEMA
    assert Analysis.from_json(text) == analysis
    with pytest.raises(ValidationError, match="spiralkit.analysis/1"):
        Analysis.from_json(text.replace(ANALYSIS_SCHEMA, "spiralkit.analysis/0"))


def test_html_is_written_self_contained(scanned: tuple[Analysis, Path]) -> None:
    page = (scanned[1] / "analysis.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 3
    assert "<?xml" not in page and "http://" not in page.split("<svg", 1)[0]  # no external resources before the plots
    assert "<td>fc1</td>" in page and "prune 50%" in page and "2 bit" in page


def test_html_escapes_names(scanned: tuple[Analysis, Path]) -> None:
    analysis = scanned[0]
    layer = analysis.layers[0].model_copy(update={"name": "<b>x&y</b>"})
    page = analysis_html(analysis.model_copy(update={"recipe": "<script>", "layers": (layer,)}))
    assert "<b>x&y</b>" not in page and "&lt;b&gt;x&amp;y&lt;/b&gt;" in page
    assert "<script>" not in page and "&lt;script&gt;" in page


# --------------------------------------------------------------------------- attention heads, depth, latency

HEADS_SCAN = AnalyzeConfig(limit=100, prune_ratios=(0.5,), channel_ratios=(0.5,), head_ratios=(0.0, 0.5), bits=(8,),
                           allow_code=True)


@pytest.fixture(scope="module")
def transformer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Analysis, Path]:
    out = tmp_path_factory.mktemp("transformer")
    return analyze(parse_recipe(TINY_TRANSFORMER), out, HEADS_SCAN), out


def test_a_transformer_s_heads_and_layers_are_scanned(transformer: tuple[Analysis, Path]) -> None:
    analysis, out = transformer
    assert [(h.module, h.heads) for h in analysis.heads] == [("encoder.layers.0.self_attn", 4),
                                                             ("encoder.layers.1.self_attn", 4)]
    for head in analysis.heads:
        assert [s.setting for s in head.prune] == [0.0, 0.5]
        assert head.prune[0].metric == analysis.baseline and head.prune[0].drop == 0.0
        assert head.prune[1].drop == pytest.approx(analysis.baseline - head.prune[1].metric)
        assert 0 < head.param_share < 1 and 0 < head.mac_share < 1
    assert [b.module for b in analysis.blocks] == ["encoder.layers.0", "encoder.layers.1"]
    assert all(0 < b.influence < 2 and b.params == 2224 for b in analysis.blocks)
    assert any(h.prune[1].drop != 0 for h in analysis.heads) and any(b.drop != 0 for b in analysis.blocks)
    assert Analysis.from_json((out / "analysis.json").read_text(encoding="utf-8")) == analysis


def test_a_removed_layer_s_metric_is_that_of_the_model_without_it(transformer: tuple[Analysis, Path]) -> None:
    from spiralkit.data import load_data
    from spiralkit.export import load_state
    from spiralkit.models import load_model
    from spiralkit.tasks import evaluate

    analysis, out = transformer
    recipe = parse_recipe(TINY_TRANSFORMER)
    model = load_model(recipe.model)
    model.load_state_dict(load_state(out / "baseline.safetensors"))
    del model.encoder.layers[1]
    val = first_examples(load_data(recipe.data, seed=recipe.seed).val, 100)
    assert evaluate(recipe.task, model, val).metric == analysis.blocks[1].metric


def test_latency_shares_are_in_analysis_json(transformer: tuple[Analysis, Path]) -> None:
    analysis, out = transformer
    data = json.loads((out / "analysis.json").read_text(encoding="utf-8"))
    assert data["latency_ms"] > 0 and data["latency_batch"] == 1
    shares = {m["name"]: m["share"] for m in data["latency"]}
    # Innermost modules: the leaves that ran, and the attention layers (their out_proj is never called).
    assert "encoder.layers.0.self_attn" in shares and "encoder.layers.0.self_attn.out_proj" not in shares
    assert "encoder" not in shares and "encoder.layers.0" not in shares
    assert 0.3 < sum(shares.values()) <= 1.0 + 1e-9  # the rest ran outside them (hooks, Python)
    for layer in data["layers"]:
        assert layer["latency_share"] == shares.get(layer["name"])
    for head in data["heads"]:
        assert head["latency_share"] == shares[head["module"]]
    for block in data["blocks"]:  # a block's share includes its modules'
        inner = sum(v for k, v in shares.items() if k.startswith(block["module"] + "."))
        assert inner <= block["latency_share"] + 1e-9 <= 1.0


def test_the_page_shows_heads_layers_and_latency(transformer: tuple[Analysis, Path]) -> None:
    page = (transformer[1] / "analysis.html").read_text(encoding="utf-8")
    assert page.count("<svg") == 5  # pruned, quantized, channel groups, heads, blocks
    for text in ("<h2>Attention heads</h2>", "heads removed 50%", "<h2>Layers and blocks (depth)</h2>",
                 "<td>encoder.layers.1</td>", "<h2>Measured latency</h2>", "MultiheadAttention"):
        assert text in page


def test_a_model_without_attention_or_residual_blocks_has_none(scanned: tuple[Analysis, Path]) -> None:
    analysis = scanned[0]
    assert analysis.heads == () and analysis.blocks == ()
    assert [(m.name, m.type) for m in analysis.latency] == [("flatten", "Flatten"), ("fc1", "Linear"),
                                                            ("relu1", "ReLU"), ("fc2", "Linear")]
    assert all(layer.latency_share is not None and 0 < layer.latency_share < 1 for layer in analysis.layers)


def test_depth_off_scans_no_blocks(tmp_path: Path) -> None:
    config = AnalyzeConfig(limit=50, prune_ratios=(), channel_ratios=(), head_ratios=(), bits=(8,), depth=False,
                           allow_code=True)
    analysis = analyze(parse_recipe(TINY_TRANSFORMER), tmp_path, config)
    assert analysis.blocks == () and len(analysis.heads) == 2 and analysis.heads[0].prune == ()


def test_only_the_chosen_scans_run(tmp_path: Path) -> None:
    config = scans_only(AnalyzeConfig(limit=50, allow_code=True), ["heads", "depth"])
    assert (config.prune_ratios, config.bits, config.channel_ratios, config.depth) == ((), (), (), True)
    assert config.head_ratios == (0.25, 0.5, 0.75)
    path = tmp_path / "tt.yaml"
    path.write_text(TINY_TRANSFORMER, encoding="utf-8")
    result = CliRunner().invoke(app, ["analyze", str(path), "--out", str(tmp_path / "a"), "--limit", "50",
                                      "--scan", "heads", "--scan", "depth", "--allow-code"])
    assert result.exit_code == 0, result.output
    analysis = Analysis.from_json((tmp_path / "a" / "analysis.json").read_text(encoding="utf-8"))
    assert all(layer.prune == () and layer.quant == () for layer in analysis.layers)
    assert [len(g.prune) for g in analysis.groups] == [0, 0]
    assert [len(h.prune) for h in analysis.heads] == [3, 3] and len(analysis.blocks) == 2
    assert (tmp_path / "a" / "analysis.html").read_text(encoding="utf-8").count("<svg") == 2  # heads, blocks


def test_a_version_1_analysis_still_loads(scanned: tuple[Analysis, Path]) -> None:
    data = json.loads(scanned[0].to_json())
    data["schema"] = "spiralkit.analysis/1"
    for key in ("heads", "blocks", "latency_ms", "latency_batch", "latency"):
        del data[key]
    for layer in data["layers"]:
        del layer["latency_share"]
    old = Analysis.from_json(json.dumps(data))
    assert old.heads == () and old.latency_ms is None
    page = analysis_html(old)
    assert "Measured latency" not in page and "Attention heads" not in page and page.count("<svg") == 3


def test_the_test_split_is_scanned_on_request(tmp_path: Path) -> None:
    config = AnalyzeConfig(limit=30, prune_ratios=(), channel_ratios=(), bits=(8,), split="test")
    assert analyze(_recipe(), tmp_path, config).examples == 30


def test_data_without_a_test_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import spiralkit.spiral.analyze as module

    real = module.load_data
    monkeypatch.setattr(module, "load_data", lambda *a, **k: dataclasses.replace(real(*a, **k), test=None))
    with pytest.raises(SpiralError, match="data 'digits' has no test split: analyse with --split val"):
        analyze(_recipe(), tmp_path, AnalyzeConfig(split="test"))


# --------------------------------------------------------------------------- suggestions


def _samples(*pairs: tuple[float, float]) -> tuple[Sample, ...]:
    return tuple(Sample(setting=s, metric=90.0 - d, drop=d) for s, d in pairs)


def _synthetic() -> Analysis:
    """fc1 is sensitive to pruning (drop 5 at 0.5) and fine down to 4 bits; fc2 fails even at 8 bits."""
    def layer(name: str, prune: float, quant: tuple[float, float, float]) -> LayerAnalysis:
        return LayerAnalysis(name=name, type="Linear", params=1, param_share=0.5, macs=1, mac_share=0.5,
                             prune=_samples((0.25, 0.0), (0.5, prune)), quant=_samples(*zip((8, 4, 2), quant)))

    return Analysis(recipe="tiny", metric="accuracy", higher_is_better=True, examples=10, baseline=90.0, seconds=1.0,
                    layers=(layer("fc1", 5.0, (0.0, 0.5, 3.0)), layer("fc2", 0.0, (2.0, 0.0, 0.0))),
                    groups=(GroupAnalysis(id="fc1", channels=16, layers=("fc1",), prune=_samples((0.5, 9.0))),))


def _merged(recipe_text: str, fragment: str) -> Recipe:
    data = yaml.safe_load(recipe_text) | yaml.safe_load(fragment)
    return parse_recipe(yaml.safe_dump(data))


def test_suggest_excludes_sensitive_layers_and_picks_bits() -> None:
    fragment = suggest(_synthetic(), _recipe(), max_drop=1.0)
    assert yaml.safe_load(fragment) == {
        "prune": [{"kind": "unstructured", "target_sparsity": 0.5, "schedule": {"kind": "one-shot"}, "exclude": ["fc1"]}],
        "quantize": {"kind": "compact", "granularity": "per-channel", "bits": {"fc1": 4}},
    }
    assert "kept in float (every width drops too much): fc2" in fragment
    merged = _merged(TINY, fragment)
    assert merged.prune[0].exclude == ("fc1",) and merged.quantize is not None and merged.quantize.bits == {"fc1": 4}


def test_suggest_uses_the_recipes_threshold_and_own_compact_stage() -> None:
    recipe = _recipe(targets={"max_metric_drop": 10.0}, quantize={"kind": "compact", "bits": 6, "exclude": ["fc2"]})
    fragment = yaml.safe_load(suggest(_synthetic(), recipe))
    assert fragment["prune"][0]["exclude"] == []
    assert fragment["quantize"] == {"kind": "compact", "bits": {"fc1": 2, "fc2": 2}, "exclude": ["fc2"]}


def test_suggest_for_a_structured_stage_excludes_groups_and_no_compact() -> None:
    structured = {"kind": "structured", "target_reduction": 0.3, "exclude": ["fc2"]}
    text = yaml.safe_dump(yaml.safe_load(TINY) | {"prune": structured})
    fragment = suggest(_synthetic(), parse_recipe(text), max_drop=1.0)
    assert "quantize" not in yaml.safe_load(fragment) and "cannot follow structured pruning" in fragment
    assert _merged(text, fragment).prune[0].exclude == ("fc2", "fc1")


def test_suggest_fragment_from_a_real_scan_parses(scanned: tuple[Analysis, Path]) -> None:
    for max_drop in (-1e9, 1.0, 1e9):
        merged = _merged(TINY, suggest(scanned[0], _recipe(), max_drop=max_drop))
        assert merged.quantize is not None
    assert _merged(TINY, suggest(scanned[0], _recipe(), max_drop=-1e9)).prune[0].exclude == ("fc1", "fc2")


def test_fewest_bits_stops_at_the_first_failing_width() -> None:
    assert fewest_bits(_samples((8, 0.0), (6, 2.0), (4, 0.0)), 1.0) == 8  # a lucky 4 bits does not count
    assert fewest_bits(_samples((4, 0.0), (8, 0.0)), 1.0) == 4
    assert fewest_bits(_samples((8, 1.5)), 1.0) is None


def test_suggest_needs_ratio_one_half() -> None:
    analysis = _synthetic()
    layer = analysis.layers[0].model_copy(update={"prune": _samples((0.25, 0.0))})
    with pytest.raises(SpiralError, match="no sample at 0.5; scan ratio 0.5 to get suggestions"):
        suggest(analysis.model_copy(update={"layers": (layer,)}), _recipe())


# --------------------------------------------------------------------------- baseline and errors


def test_from_run_reads_its_baseline(scanned: tuple[Analysis, Path], tmp_path: Path) -> None:
    # The first scan trained the baseline into its directory: reading it back gives the same metric.
    again = analyze(_recipe(), tmp_path, AnalyzeConfig(limit=100, from_run=scanned[1], prune_ratios=(0.5,),
                                                       channel_ratios=(0.5,), bits=(8,)))
    assert again.baseline == scanned[0].baseline and not (tmp_path / "baseline.safetensors").exists()


def test_from_run_errors(scanned: tuple[Analysis, Path], tmp_path: Path) -> None:
    with pytest.raises(SpiralError, match="holds no baseline.safetensors: give a run directory"):
        analyze(_recipe(), tmp_path / "out", AnalyzeConfig(from_run=tmp_path))
    wider = _recipe(model={"name": "mlp", "kwargs": {"in_features": 64, "widths": [8]}})
    with pytest.raises(SpiralError, match=r"baseline.safetensors does not fit model 'mlp' of the recipe: .*size mismatch"):
        analyze(wider, tmp_path / "out", AnalyzeConfig(from_run=scanned[1]))


@pytest.mark.parametrize(("config", "message"), [
    ({"limit": 0}, "--limit must be at least 1 validation example, got 0"),
    ({"prune_ratios": (0.5, 1.0)}, r"prune_ratios must be in \[0, 1\), got 1.0"),
    ({"channel_ratios": (-0.1,)}, r"channel_ratios must be in \[0, 1\), got -0.1"),
    ({"head_ratios": (0.5, 1.0)}, r"head_ratios must be in \[0, 1\), got 1.0"),
    ({"split": "train"}, "--split must be 'val' or 'test', got 'train'"),
])
def test_bad_config(config: dict[str, Any], message: str) -> None:
    with pytest.raises(SpiralError, match=message):
        AnalyzeConfig(**config)


def test_recipe_naming_code_needs_allow_code(tmp_path: Path) -> None:
    recipe = _recipe(model={"name": "tests.spiral.tiny:no_such_builder"})
    with pytest.raises(RecipeError, match="names Python code .* with --allow-code"):
        analyze(recipe, tmp_path, SCAN)
    assert not any(tmp_path.iterdir())


def test_untrained_model_is_refused(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY)
    del data["train"]
    with pytest.raises(RecipeError, match="has no 'model.checkpoint' and the recipe has no 'train' section"):
        analyze(parse_recipe(yaml.safe_dump(data)), tmp_path, SCAN)


# --------------------------------------------------------------------------- the command


def test_cli_writes_files_and_prints_a_fragment(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY, encoding="utf-8")
    out = tmp_path / "analysis"
    result = CliRunner().invoke(app, ["analyze", str(path), "--out", str(out), "--limit", "50", "--suggest",
                                      "--max-drop", "100"])
    assert result.exit_code == 0, result.output
    assert Analysis.from_json((out / "analysis.json").read_text(encoding="utf-8")).examples == 50
    assert (out / "analysis.html").exists()
    assert yaml.safe_load(result.stdout)["quantize"]["bits"] == {"fc1": 2, "fc2": 2}
    assert "wrote" in result.stderr and "analysis.html" in result.stderr


def test_cli_errors(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY, encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["analyze", str(path), "--out", str(tmp_path / "a"), "--limit", "0"])
    assert result.exit_code == 2 and "--limit must be at least 1 validation example, got 0" in result.stderr
    result = runner.invoke(app, ["analyze", str(path), "--out", str(tmp_path / "a"), "--split", "dev"])
    assert result.exit_code == 2 and "--split must be 'val' or 'test', got 'dev'" in result.stderr
    result = runner.invoke(app, ["analyze", str(path), "--out", str(tmp_path / "a"), "--scan", "layers"])
    assert result.exit_code == 2
    assert "unknown --scan 'layers': choose from weights, bits, channels, heads, depth" in result.stderr
    coded = tmp_path / "coded.yaml"
    coded.write_text(TINY.replace("name: mlp", "name: pkg.mod:build"), encoding="utf-8")
    result = runner.invoke(app, ["analyze", str(coded), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "key 'model.name'" in result.stderr and "--allow-code" in result.stderr
    assert not (tmp_path / "a").exists()
