"""What this CPU can do: its instruction-set flags, and whether int8 kernels saturate on it.

ONNX Runtime runs spiralkit's int8 files with U8S8 kernels (unsigned 8-bit activations,
signed 8-bit weights). On x86 CPUs with VNNI (``avx512_vnni``, ``avx_vnni``, AMX) each
product is accumulated in 32 bits. Without VNNI (AVX2 or AVX-512 alone, e.g. AMD Zen 3,
Intel Skylake) the kernels multiply with ``VPMADDUBSW``, which adds two ``u8 · s8`` products
into a saturating 16-bit lane: 255 · 127 · 2 overflows it, and the model's outputs are
silently wrong (measured on a Zen 3 core: a static int8 LeNet-5 at cosine 0.976 to its
float model, where the test asks 0.999, which VNNI cores meet). ONNX Runtime's remedy is
``reduce_range``: weights on 7 bits (codes within ±64), so that 255 · 64 · 2 fits.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Literal

__all__ = ["BF16_FLAGS", "ReduceRange", "VNNI_FLAGS", "cpu_flags", "int8_saturates", "native_bf16", "resolve_reduce_range"]

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
"""``/proc/cpuinfo`` flags of x86 instruction sets that accumulate ``u8 · s8`` products in 32 bits."""

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""Flags of bfloat16 arithmetic in hardware: AVX-512-BF16 and AMX on x86, ``bf16`` on ARM (``Features``)."""

ReduceRange = bool | Literal["auto"]
"""A config's ``reduce_range``: 7-bit weights (True), full int8 (False), or ``"auto"``: 7-bit
exactly where the int8 kernels would saturate (`int8_saturates`)."""

_X86 = frozenset({"x86_64", "amd64", "i386", "i686"})


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's instruction-set flags (``flags`` on x86, ``Features`` on ARM); empty when unreadable.

    Read once per file and process (the CPU does not change under a running process; every
    quantization call, QAT layer and training run asks).
    """
    try:
        text = cpuinfo.read_text(encoding="utf-8")
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def int8_saturates(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's U8S8 kernels can saturate here: an x86 CPU without VNNI.

    Args:
        flags: The CPU's flags (default: `cpu_flags`). When they cannot be read on x86,
            the answer is True (reduced-range weights are correct on every CPU).
        machine: ``platform.machine()`` (default: this one's). Other architectures
            (ARM's dot-product kernels) do not saturate.
    """
    if (machine or platform.machine()).lower() not in _X86:
        return False
    return not (VNNI_FLAGS & (cpu_flags() if flags is None else flags))


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes in bfloat16 natively (`BF16_FLAGS`); else PyTorch emulates it, slowly.

    Measured on a Zen 3 core (AVX2, no bf16): a ResNet-20 distillation step under bf16
    autocast took 18.8 s against 1.05 s in float32 (``bench/train_precision.py``); on a Zen 4
    core with AVX-512-BF16 it was 2.05x faster than float32.
    """
    return bool(BF16_FLAGS & (cpu_flags() if flags is None else flags))


def resolve_reduce_range(setting: ReduceRange) -> bool:
    """A config's ``reduce_range`` as a bool: ``"auto"`` is `int8_saturates` on this CPU."""
    return int8_saturates() if setting == "auto" else bool(setting)
