"""The CPU's flags and the int8 saturation rule (`spiralkit.cpu`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spiralkit import cpu
from spiralkit.cpu import cpu_flags, int8_saturates, resolve_reduce_range


def test_flags_are_read_from_the_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_vnni\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512f", "avx512_vnni"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert cpu_flags(arm) == {"fp", "asimd", "asimddp"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(("flags", "machine", "saturates"), [
    ({"avx2", "fma"}, "x86_64", True),                  # AMD Zen 3, Intel Haswell: VPMADDUBSW saturates
    ({"avx2", "avx512f", "avx512bw"}, "x86_64", True),   # Skylake-SP: AVX-512 without VNNI saturates too
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),
    ({"avx2", "avx_vnni"}, "x86_64", False),             # Alder Lake's VEX-encoded VNNI
    (set(), "x86_64", True),                             # unreadable flags: reduced range is always correct
    ({"asimd"}, "aarch64", False),
])
def test_int8_saturates_exactly_on_x86_without_vnni(flags: set[str], machine: str, saturates: bool) -> None:
    assert int8_saturates(frozenset(flags), machine) is saturates


def test_reduce_range_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_reduce_range(True) is True and resolve_reduce_range(False) is False
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    assert resolve_reduce_range("auto") is True
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert resolve_reduce_range("auto") is False
