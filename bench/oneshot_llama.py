"""One-shot calibration methods on the tiny Llama trained here, no retraining: test perplexity.

The checkpoint is the model `recipes/tinyllama_tinystories.yaml` trains (``--checkpoint``,
default ``runs/tinyllama_tinystories/model.safetensors``). Every Linear layer of the decoder
blocks (21 of them: q, k, v, o projections and the gate, up and down projections of each of
the 3 layers) is pruned to 50% (unstructured, per layer) or 2:4 by magnitude, Wanda and
SparseGPT, or quantized to 4 bits (groups of 32) by round-to-nearest and GPTQ (same format and
scales); the token embedding and the output layer ``lm_head`` stay dense float. The metric is
the perplexity task's: perplexity per byte on the recipe's test split (the last 10% of the
stories). Calibration: the first ``--samples`` training windows of 128 bytes. Methods and
compression are `bench.oneshot_minilm`'s.

    SPIRALKIT_DATA_DIR=... python -m bench.oneshot_llama [--samples 128] [--methods ...]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from bench.oneshot_minilm import _compress
from spiralkit.data import DataSpec, load_data
from spiralkit.models import ModelSpec, load_model
from spiralkit.modules import freeze
from spiralkit.tasks import Perplexity, evaluate
from spiralkit.layerwise import calibration_inputs

METHODS = ("dense", "magnitude-50", "wanda-50", "sparsegpt-50", "magnitude-2:4", "wanda-2:4", "sparsegpt-2:4",
           "rtn-4bit-g32", "gptq-4bit-g32", "gptq-4bit-g32-actorder")

# The decoder blocks' Linear layers; the output layer stays float (the embedding is no Linear).
DECODER_LAYERS = ("llm.model.layers.*",)
KEEP_FLOAT = ("llm.lm_head",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/tinyllama_tinystories/model.safetensors"))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_data(DataSpec(name="tinystories", batch_size=32, eval_batch_size=64, val_fraction=0.05,
                              kwargs={"seq_len": 128, "test_fraction": 0.1}), seed=0)
    original = freeze(load_model(ModelSpec(
        name="tiny_llama", checkpoint=args.checkpoint,
        kwargs={"hidden_size": 128, "layers": 3, "heads": 4, "kv_heads": 2, "intermediate_size": 384,
                "tie_embeddings": False})))
    calibration = calibration_inputs(data.train, args.samples)
    task = Perplexity()
    print(f"{'method':28s} {'perplexity':>10s} {'NLL':>7s} {'seconds':>8s}  what")
    for method in args.methods:
        model = copy.deepcopy(original)
        started = time.perf_counter()
        what = _compress(method, model, calibration, args.samples, include=DECODER_LAYERS, exclude=KEEP_FLOAT)
        seconds = time.perf_counter() - started
        result = evaluate(task, model.eval(), data.test)
        print(f"{method:28s} {result.metric:10.4f} {result.loss:7.4f} {seconds:8.1f}  {what}", flush=True)


if __name__ == "__main__":
    main()
