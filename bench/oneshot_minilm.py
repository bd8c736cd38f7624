"""One-shot calibration methods on the real all-MiniLM-L6-v2, no retraining: embedding fidelity on SST-2 dev.

Every Linear layer of the encoder (36 of them: query, key, value, attention output, FFN in
and out of each of the 6 layers) is pruned to 50% (unstructured) or 2:4 by magnitude, Wanda
and SparseGPT, or quantized to 4 bits by round-to-nearest and GPTQ (same format and scales).
The metric is the fidelity task's: the mean cosine similarity between the compressed model's
sentence embeddings and the original's on the 872 SST-2 dev sentences. Calibration: the first
``--samples`` training sentences (up to 64 tokens). Magnitude is ranked per layer. The size
is the whole model on disk (the 11.7M-parameter word-embedding table included, never
compressed here): the sparse safetensors encoding for pruned models, the weight-only file
(codes + scales) for quantized ones.

    SPIRALKIT_DATA_DIR=... python -m bench.oneshot_minilm [--samples 128] [--methods ...]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from spiralkit.data import DataSpec, load_data
from spiralkit.distill.cache import CachedModel, TeacherCache
from spiralkit.export import save_sparse
from spiralkit.models import ModelSpec, load_model
from spiralkit.modules import freeze
from spiralkit.prune import NM, SparseGPT, UnstructuredPrune, Wanda, mask_sparsity, prune
from spiralkit.prune.importance import Magnitude
from spiralkit.prune.unstructured import Scope
from spiralkit.quant.gptq import GPTQConfig, quantize_gptq_
from spiralkit.quant.weight_only import WeightOnlyConfig, quantize_weights_, save_weight_only
from spiralkit.tasks import EmbeddingFidelity, evaluate
from spiralkit.layerwise import calibration_inputs

METHODS = ("dense", "magnitude-50", "wanda-50", "sparsegpt-50", "magnitude-2:4", "wanda-2:4", "sparsegpt-2:4",
           "rtn-4bit-g32", "gptq-4bit-g32", "gptq-4bit-g32-actorder", "rtn-4bit-channel", "gptq-4bit-channel-actorder",
           "rtn-3bit-g32", "gptq-3bit-g32-actorder")


def _compress(method: str, model: torch.nn.Module, calibration: list, samples: int, *,
              include: tuple[str, ...] = ("*",), exclude: tuple[str, ...] = ()) -> str:
    """Compress ``model`` in place by ``method``; a short description of what was done.

    ``include``/``exclude`` (fnmatch patterns of layer names) choose the pruned layers;
    ``exclude`` also names the layers quantization leaves in float.
    """
    if method == "dense":
        return "uncompressed"
    if method.startswith(("magnitude", "wanda", "sparsegpt")):
        name, amount = method.split("-")
        criterion = {"magnitude": Magnitude(), "wanda": Wanda(samples=samples), "sparsegpt": SparseGPT(samples=samples)}[name]
        if amount == "2:4":
            config = UnstructuredPrune(criterion=criterion, pattern=NM(n=2, m=4), include=include, exclude=exclude)
        else:
            config = UnstructuredPrune(criterion=criterion, target_sparsity=0.5, scope=Scope.LAYERWISE,
                                       include=include, exclude=exclude)
        masks = prune(model, config, batches=calibration)
        return f"{len(masks)} layers, sparsity {mask_sparsity(masks):.4f}"
    group = None if "channel" in method else 32
    width = int(method.split("-")[1].removesuffix("bit"))
    if method.startswith("rtn"):
        bits = quantize_weights_(model, WeightOnlyConfig(bits=width, group_size=group), exclude=exclude)
    else:
        bits = quantize_gptq_(model, GPTQConfig(bits=width, group_size=group, act_order="actorder" in method,
                                                samples=samples), calibration, exclude=exclude)
    return f"{sum(b == width for b in bits.values())} layers at {width} bits, group {group or 'per channel'}"


def _saved_bytes(method: str, model: torch.nn.Module, directory: Path) -> int:
    """The model's size on disk: weight-only file for quantized models, the sparse encoding otherwise."""
    if method.startswith(("rtn", "gptq")):
        return save_weight_only(model, directory / "model.weight-only.safetensors")
    return save_sparse(model, directory / "model.sparse.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_data(DataSpec(name="sst2", batch_size=32, eval_batch_size=64, val_fraction=0.02,
                              kwargs={"tokenizer": "minilm-l6", "max_length": 64}), seed=0)
    original = freeze(load_model(ModelSpec(name="hf:minilm-l6", kwargs={"head": "embedding", "encoder_dropout": 0.0})))
    calibration = calibration_inputs(data.train, args.samples)
    task = EmbeddingFidelity()
    with TeacherCache(budget_mb=256.0, disk_budget_mb=0) as cache:
        reference = CachedModel(original, cache)
        print(f"{'method':28s} {'fidelity':>9s} {'seconds':>8s} {'MB on disk':>10s}  what")
        for method in args.methods:
            model = copy.deepcopy(original)
            started = time.perf_counter()
            what = _compress(method, model, calibration, args.samples)
            seconds = time.perf_counter() - started
            fidelity = evaluate(task, model.eval(), data.test, reference=reference).metric
            with tempfile.TemporaryDirectory() as scratch:
                size = _saved_bytes(method, model, Path(scratch)) / 1e6
            print(f"{method:28s} {fidelity:9.4f} {seconds:8.1f} {size:10.2f}  {what}", flush=True)


if __name__ == "__main__":
    main()
