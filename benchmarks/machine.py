"""What every benchmark prints beside a CPU figure: the CPU's bf16-relevant flags (AMX makes bf16
matmuls about 5x fp32; AVX-512 without BF16 makes them slower than fp32)."""

from __future__ import annotations

from pathlib import Path

FLAGS = ("amx_bf16", "avx512_bf16", "avx512f")


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split())
    return ", ".join(f for f in FLAGS if f in flags) or f"none of {', '.join(FLAGS)}"
