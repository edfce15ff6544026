"""Matmul throughput of this CPU in float32, bfloat16 and float16, and what ``--dtype auto`` picks.

``--dtype auto`` (pipelines.precision) takes bf16 only where it beats fp32; this prints the
evidence: square matmuls of a few sizes, the best of ``--runs`` after a warm-up, in GFLOP/s, with
the CPU's flags.

    python benchmarks/matmul_dtypes.py
    python benchmarks/matmul_dtypes.py --sizes 512 2048 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from machine import cpu_flags
from unfog.pipelines.precision import auto_dtype, cpu_bf16_is_faster

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gflops(n: int, dtype: torch.dtype, runs: int) -> float:
    a = torch.randn(n, n).to(dtype)
    a @ a
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, {args.threads} threads")
    print(f"--dtype auto picks {auto_dtype('cpu')} (bf16 faster than fp32: {cpu_bf16_is_faster()})\n")
    print("| n | " + " | ".join(f"{name} GFLOP/s" for name in DTYPES) + " | bf16 / fp32 |")
    print("|---" * (len(DTYPES) + 2) + "|")
    for n in args.sizes:
        rates = {name: gflops(n, dtype, args.runs) for name, dtype in DTYPES.items()}
        print(f"| {n} | " + " | ".join(f"{rates[name]:.1f}" for name in DTYPES) +
              f" | {rates['bf16'] / rates['fp32']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
