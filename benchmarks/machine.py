"""What every benchmark prints beside a CPU figure: the CPU's model and its dtype-relevant flags
(AMX makes bf16 matmuls about 5x fp32; AVX-512 without BF16 makes them about 5x slower than fp32,
AVX2 alone about 100x slower)."""

from __future__ import annotations

from pathlib import Path

FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpu_flags() -> str:
    """E.g. "avx512_bf16, avx512f, avx2 (Intel Xeon ...)"."""
    text = Path("/proc/cpuinfo").read_text()
    flags = set(text.split())
    model = next((line.partition(":")[2].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return f"{', '.join(f for f in FLAGS if f in flags) or 'none of ' + ', '.join(FLAGS)} ({model})"
