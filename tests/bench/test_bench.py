"""`spiral bench`: the runtime table, interleaved timing, the CLI's table and JSON, --peers, bad inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spiralkit.bench import RUNTIMES, BenchConfig, BenchError, Candidate, bench, runtime, time_interleaved
from spiralkit.bench.peers import PeersConfig, latency_plan, spiralkit_plan, torchpruning_plan
from spiralkit.cli import app
from spiralkit.measure import count_macs
from spiralkit.models import lenet5, mlp
from spiralkit.spiral import Spiral, parse_recipe
from tests.spiral.tiny import TINY

FAST = ["--repeats", "2", "--warmup", "0"]
CONTRACT = {"latency_ms", "macs", "size_bytes", "speedup_vs_eager_fp32"}
PEERS = {"eager_fp32", "ort_fp32", "ort_int8_default", "torchpruning_fp32", "torchpruning_ort_int8",
         "torch_prune_unstructured", "spiralkit_prune_fp32", "spiralkit_prune_int8"}


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["bench", *args])
    return result.exit_code, result.output


def test_interleaved_timing_calls_every_candidate_round_robin_with_a_rotating_start() -> None:
    order: list[str] = []
    timings = time_interleaved({name: (lambda name=name: order.append(name)) for name in "abc"}, warmup=1, repeats=3)
    assert order == list("abc" "abc" "bca" "cab")
    assert {t.repeats for t in timings.values()} == {3}
    assert all(t.p10_ms <= t.median_ms <= t.p90_ms for t in timings.values())


def test_unknown_and_missing_runtimes_are_errors_that_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BenchError, match=r"unknown runtime 'tensorrt'; runtimes: eager, ort, ort_int8, openvino, openvino_bf16"):
        runtime("tensorrt")
    hide_openvino(monkeypatch)
    assert RUNTIMES["openvino"].missing == "not installed (pip install 'spiralkit[openvino]')"
    assert RUNTIMES["ort"].missing is None
    with pytest.raises(BenchError, match=r"runtime 'openvino_bf16' is not installed \(pip install 'spiralkit\[openvino\]'\)"):
        BenchConfig(runtimes=("eager", "openvino_bf16"))


def test_bench_and_the_latency_tables_share_one_runtime_table() -> None:
    from spiralkit.latency import RUNTIMES as LATENCY_RUNTIMES

    assert RUNTIMES is LATENCY_RUNTIMES and runtime("ort") is RUNTIMES["ort"]
    assert [name for name, r in RUNTIMES.items() if not r.reads_onnx] == ["eager"]


def test_bench_times_every_candidate_on_every_runtime_batch_and_thread_count(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mlp(in_features=16, widths=(8,), num_classes=3)
    small = mlp(in_features=16, widths=(4,), num_classes=3)
    config = BenchConfig(runtimes=("eager", "ort"), batches=(1, 4), threads=(1,), warmup=0, repeats=2)
    rows = bench([Candidate("big", model), Candidate("small", small)], (16,), config, tmp_path)
    assert [(r.model, r.runtime, r.batch) for r in rows] == [
        (m, rt, b) for b in (1, 4) for m in ("big", "small") for rt in ("eager", "ort")]
    assert {r.speedup for r in rows if r.model == "big"} == {1.0}
    assert [r.macs for r in rows if r.runtime == "eager"] == [16 * 8 + 8 * 3, 16 * 4 + 4 * 3, 4 * 152, 4 * 76]


def test_the_cli_prints_the_table_and_writes_json_for_a_model(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code, output = invoke("lenet5", "--runtime", "eager,ort", "--batch", "1", "--batch", "2", "--json", str(out), *FAST)
    assert code == 0, output
    assert "lenet5" in output and "median ms" in output and "p10–p90 ms" in output
    data = json.loads(out.read_text())
    assert data["schema"] == "spiralkit.bench/1" and data["input_shape"] == [1, 28, 28]
    assert {(r["runtime"], r["batch"], r["threads"]) for r in data["rows"]} == {
        ("eager", 1, 1), ("ort", 1, 1), ("eager", 2, 1), ("ort", 2, 1)}
    assert {"median_ms", "p10_ms", "p90_ms", "repeats", "macs"} <= set(data["rows"][0])
    assert data["machine"]["cores"] >= 1 and data["machine"]["runtimes"]["ort"].startswith("onnxruntime ")
    assert "runtimes: eager: torch" in " ".join(output.split())


def test_the_cli_times_a_run_directorys_baseline_pruned_and_final_models(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    Spiral(parse_recipe(TINY + "quantize: {kind: static-int8, calibration_batches: 2}\n")).run(run_dir)
    out = tmp_path / "bench.json"
    code, output = invoke(str(run_dir), "--runtime", "eager", "--runtime", "ort", "--json", str(out), *FAST)
    assert code == 0, output
    rows = json.loads(out.read_text())["rows"]
    # the int8 final model exists only as ONNX: ONNX Runtime times it, eager cannot
    assert [(r["model"], r["runtime"]) for r in rows] == [
        ("baseline", "eager"), ("baseline", "ort"), ("pruned", "eager"), ("pruned", "ort"), ("final", "ort")]
    assert json.loads(out.read_text())["input_shape"] == [1, 8, 8]
    assert rows[-1]["macs"] == rows[-2]["macs"]  # the int8 model counts the MACs of the float model it quantizes  # the digits, as the run's data gives them


@pytest.mark.parametrize(("args", "message"), [
    (["lenet5", "--runtime", "eager,tensorrt"], "unknown runtime 'tensorrt'; runtimes: eager, ort, ort_int8, openvino"),
    (["lenet7"], "unknown model 'lenet7' (did you mean 'lenet5'"),
    (["torchvision:resnet19"], "unknown torchvision model 'resnet19'"),
    (["mypackage.models:net"], "spiral bench builds zoo, torchvision and timm models only"),
    (["lenet5", "--batch", "one"], "--batch takes whole numbers"),
    (["--peers", "lenet5", "--macs", "1.5"], "--macs is the fraction of the MACs to keep, in (0, 1]; got 1.5"),
    (["--peers", "lenet5", "--plan", "magic"], "unknown --plan 'magic'; known plans: uniform, latency, latency_int8, latency_openvino_int8"),
])
def test_bad_inputs_are_errors_that_name_them(args: list[str], message: str) -> None:
    code, output = invoke(*args, *FAST)
    assert code == 2 and message in " ".join(output.split()), output


def test_a_runtime_that_is_not_installed_is_an_error_saying_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_openvino(monkeypatch)
    code, output = invoke("lenet5", "--runtime", "ort,openvino", *FAST)
    assert code == 2 and "runtime 'openvino' is not installed (pip install 'spiralkit[openvino]')" in output


def test_a_plan_on_a_runtime_that_is_not_installed_is_an_error_saying_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hide_openvino(monkeypatch)
    code, output = invoke("--peers", "lenet5", "--plan", "latency_openvino_int8", *FAST)
    assert code == 2 and "runtime 'openvino_int8' is not installed (pip install 'spiralkit[openvino]')" in output, output


def test_a_directory_that_is_not_a_run_is_an_error(tmp_path: Path) -> None:
    code, output = invoke(str(tmp_path), *FAST)
    assert code == 2 and f"{tmp_path} is not a run directory: it holds no recipe.yaml" in " ".join(output.split())
    missing = tmp_path / "nowhere" / "run"
    code, output = invoke(str(missing), *FAST)
    assert code == 2 and "is not a run directory: no such directory" in output


def test_plans_meet_the_macs_budget_and_spiralkit_keeps_widths_multiples_of_16() -> None:
    torch.manual_seed(0)
    model = lenet5().eval()
    x = torch.randn(1, 1, 28, 28)
    dense = count_macs(model, x)
    ours, theirs = spiralkit_plan(model, x, macs=0.5), torchpruning_plan(model, x, macs=0.5, iterations=6)
    assert count_macs(ours, x) <= 0.5 * dense and count_macs(theirs, x) <= 0.5 * dense
    assert ours.conv1.out_channels % 16 == 0 and ours.conv2.out_channels % 16 == 0
    assert model.conv1.out_channels == 20  # the dense model is not changed


def hide_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make spiralkit see OpenVINO as not installed (what it checks: ``importlib.util.find_spec``)."""
    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *args: None if name in ("openvino", "nncf") else real(name, *args))


def test_peers_json_has_the_contract_fields_and_methods_without_openvino(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    hide_openvino(monkeypatch)
    out = tmp_path / "peers.json"
    code, output = invoke("--peers", "lenet5", "--json", str(out), *FAST)
    assert code == 0, output
    assert "spiralkit_prune_int8" in output and "torchpruning_ort_int8" in output
    assert "openvino: not installed (pip install 'spiralkit[openvino]')" in " ".join(output.split())
    assert not any(name.startswith("openvino") for name in json.loads(out.read_text())["methods"])
    data = json.loads(out.read_text())
    assert data["schema"] == "spiralkit.bench-peers/1" and data["config"]["batch"] == 1 and data["config"]["threads"] == 1
    methods = data["methods"]
    assert PEERS <= set(methods)
    for name, fields in methods.items():
        assert CONTRACT <= set(fields), name
        assert fields["latency_ms"] > 0 and fields["size_bytes"] > 0
    assert methods["eager_fp32"]["speedup_vs_eager_fp32"] == 1.0
    dense = methods["eager_fp32"]["macs"]
    assert methods["spiralkit_prune_int8"]["macs"] <= 0.5 * dense and methods["torchpruning_ort_int8"]["macs"] <= 0.5 * dense
    assert methods["spiralkit_prune_int8"]["cosine_to_fp32"] > 0.99
    assert "random normal" in data["calibration"]


@pytest.mark.parametrize("runtime", ["ort", "ort_int8", pytest.param("openvino_int8", marks=pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="OpenVINO is optional"))])
def test_the_latency_aware_plan_meets_the_macs_budget_with_table_widths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        runtime: str) -> None:
    monkeypatch.setenv("SPIRALKIT_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    ).eval()
    x = torch.randn(1, 3, 8, 8)
    pruned = latency_plan(model, x, macs=0.5, step=8, iterations=6, runtime=runtime)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert count_macs(pruned, x) <= 0.5 * count_macs(model, x) and pruned(x).shape == (1, 10)
    assert all(w % 8 == 0 for w in widths) and widths != [32, 32]
    assert list((tmp_path / "cache" / "latency").glob(f"{runtime}-*.json")), "the table is cached for the next run"


def test_peers_with_openvino_add_its_methods(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    out = tmp_path / "peers.json"
    code, output = invoke("--peers", "lenet5", "--json", str(out), *FAST)
    assert code == 0, output
    methods = json.loads(out.read_text())["methods"]
    assert {"openvino_nncf_int8", "openvino_bf16", "spiralkit_prune_int8_openvino"} <= set(methods)
    assert methods["openvino_bf16"]["runtime"] == "openvino_bf16" and methods["openvino_bf16"]["cosine_to_fp32"] > 0.999


def test_peers_config_refuses_nonsense() -> None:
    with pytest.raises(BenchError, match="batch, threads, repeats"):
        PeersConfig(threads=0)
