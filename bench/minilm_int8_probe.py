"""Benchmark: which int8 for MiniLM at 4x — speed of the shapes, and int8 noise on the real weights.

    python -m bench.minilm_int8_probe [--repeats 8] [--sentences 192]

Needs no fine-tuned run: it uses the packaged all-MiniLM-L6-v2 weights (``hf:minilm-l6``).

* **Speed.** The 6-layer model (eager fp32 and ONNX Runtime fp32), its 3-layer shallow
  student, and that student with heads and FFN neurons removed (layer-wise L2 magnitude) to
  70% and 75% fewer MACs than the 6-layer model — the architecture `recipes/minilm_sst2_4x.yaml`
  reaches — in eager fp32 and in ONNX Runtime dynamic int8 (per tensor, per channel) and
  static int8. Latency does not depend on the weights' values, so the pruned models are not
  trained. Batch 32 (the 32 longest validation sentences, ``dev``, and 32 rows of 64 real
  tokens, ``full``), 1 thread, all models called in turn (`bench.minilm_4x.interleave`).
* **Int8 noise.** The mean-pooled sentence embeddings of the real 6-layer model in int8
  against fp32, on the first ``--sentences`` dev sentences: mean and lowest cosine.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

from spiralkit.data import DataSpec, load_data
from spiralkit.export.onnx import OrtModel, export_onnx
from spiralkit.measure import count_macs
from spiralkit.models import ModelSpec, load_model
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.structured import StructuredPrune, planner
from spiralkit.prune.students import ShallowStudent, apply_student, plan_student
from spiralkit.quant.ptq import DynamicInt8, StaticInt8, quantize
from spiralkit.spiral.context import example_input
from spiralkit.spiral.prune import search_ratio

from bench.common import format_table
from bench.minilm_4x import interleave

DATA = DataSpec(name="sst2", batch_size=32, eval_batch_size=64, val_fraction=0.02, limit_train=2000,
                kwargs={"tokenizer": "minilm-l6", "max_length": 64})
KINDS = {"dynamic int8": DynamicInt8(), "dynamic int8 per channel": DynamicInt8(per_channel=True),
         "static int8": StaticInt8()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=192)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data(DATA, seed=0)
    example = example_input(data, 32)
    full = example.clone()
    full[:, 0] = torch.randint(1000, 2000, full[:, 0].shape, generator=torch.Generator().manual_seed(0))
    full[:, 1] = 1
    teacher = load_model(ModelSpec(name="hf:minilm-l6", kwargs={"head": "classifier", "num_labels": 2, "pooling": "mean"})).eval()
    student = apply_student(copy.deepcopy(teacher), plan_student(ShallowStudent(every=2), teacher, example=example)).eval()
    base = count_macs(teacher, example)
    plan_for = planner(student, StructuredPrune(ratio=0.0, heads=True), example=example)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        named: dict[str, nn.Module] = {"teacher eager": teacher,
                                       "teacher ORT fp32": OrtModel(export_onnx(teacher, example, work / "t.onnx")),
                                       "student eager": student}
        for reduction in (0.7, 0.75):
            pruned = copy.deepcopy(student)
            plan = search_ratio(plan_for, student, size=lambda m: count_macs(m, example), goal=(1 - reduction) * base,
                                max_ratio=0.9)
            apply_plan(pruned, plan, mode="remove")
            layer = pruned.encoder.encoder.layer[0]
            print(f"{reduction}: MACs {count_macs(pruned, example) / base:.3f} of the teacher's; layer 0 keeps "
                  f"{layer.attention.self.query.weight.shape[0] // 32} of 12 heads, "
                  f"{layer.intermediate.dense.weight.shape[0]} of 1536 FFN neurons", flush=True)
            named[f"pruned {reduction} eager"] = pruned.eval()
            for kind, config in KINDS.items():
                calibration = None if isinstance(config, DynamicInt8) else data.train
                result = quantize(pruned, config, calibration, example=example, workdir=work / f"{reduction}-{kind}")
                named[f"pruned {reduction} {kind}"] = result.model
        medians = {case: interleave(named, x, repeats=args.repeats) for case, x in (("dev", example), ("full", full))}
        print(f"1 thread, batch 32, median of {args.repeats} interleaved calls")
        print(format_table(["model", "dev ms", "dev speed-up", "full ms", "full speed-up"], [
            [name, *(v for case in medians for v in (f"{medians[case][name]:.1f}",
                                                     f"{medians[case]['teacher eager'] / medians[case][name]:.2f}x"))]
            for name in named]))
        encoder = load_model(ModelSpec(name="hf:minilm-l6", kwargs={"head": "embedding"})).eval()
        x = torch.cat([batch for batch, _ in data.test])[:args.sentences]
        rows = []
        with torch.no_grad():
            reference = encoder(x)
            for kind, config in KINDS.items():
                calibration = None if isinstance(config, DynamicInt8) else data.train
                int8 = quantize(encoder, config, calibration, example=example, workdir=work / f"embedding-{kind}").model
                cosine = nn.functional.cosine_similarity(torch.cat([int8(x[i:i + 32]) for i in range(0, len(x), 32)]),
                                                         reference)
                rows.append([kind, f"{cosine.mean():.4f}", f"{cosine.min():.4f}"])
        print(f"int8 vs fp32 sentence embeddings of all-MiniLM-L6-v2, {len(x)} dev sentences")
        print(format_table(["int8", "mean cosine", "lowest cosine"], rows))


if __name__ == "__main__":
    main()
