"""Fused QKV: one classifier-free-guidance step of the U-Net with its attention projections
computed separately and fused, for unfog and for diffusers, on the same random weights.

Fused means the projections that read one input are one matmul: q, k and v in self-attention,
k and v in cross-attention (unfog: ``nn.attention.fuse_projections``, ``pipe.fuse_qkv()``;
diffusers: ``UNet2DConditionModel.fuse_qkv_projections``). The step and
the weights are ``unet_step.py``'s (SD 1.5 at 512 px, SDXL base at 768 px, batch 2); unfog and
diffusers share one copy of the weights, both contiguous. The four variants (unfog separate,
unfog fused, diffusers separate, diffusers fused) are called in turn, the order rotating each
round, after one warm-up call each; the figure is the median of ``--runs`` calls. On CUDA every
call is timed between two ``torch.cuda.synchronize()``.

Printed: each variant's time, fused / separate for each side, unfog / diffusers fused, and the
largest difference between each side's fused and separate output relative to its scale.

    python benchmarks/fused_qkv.py                         # SD 1.5, fp32 and bf16, on the CPU
    python benchmarks/fused_qkv.py --device cuda --dtypes fp16 --models sd15 sdxl --runs 20
    python benchmarks/fused_qkv.py --quick                 # narrow models at 128 px: checks the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # unet_step, machine
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "parity"))  # oracles
import unet_step  # noqa: E402
from machine import cpu_flags  # noqa: E402
from unfog.nn.attention import fuse_projections  # noqa: E402

DTYPES = {**unet_step.DTYPES, "fp16": torch.float16}
VARIANTS = ("unfog separate", "unfog fused", "diffusers separate", "diffusers fused")


def measure(model: unet_step.Model, dtype: torch.dtype, device: str, runs: int) -> tuple[dict, dict]:
    state = {k: v.to(device) for k, v in unet_step.random_state_dict(model.config, dtype).items()}
    # Two models per side on the one copy of the weights, one of them fused (diffusers' fused
    # layers add their concatenated weights at once, unfog's at the first call): no switching
    # between the timed calls.
    nets = {v: unet_step.build(v.split()[0], model.config, dtype, state) for v in VARIANTS}
    del state
    fuse_projections(nets["unfog fused"])
    nets["diffusers fused"].fuse_qkv_projections()
    calls = {side: unet_step.inputs(side, model, model.size, dtype, device) for side in unet_step.SIDES}

    def call(variant: str) -> torch.Tensor:
        return calls[variant.split()[0]](nets[variant])

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with torch.inference_mode():
        outs = {v: call(v).float() for v in VARIANTS}  # the warm-up
        errors = {side: float((outs[f"{side} fused"] - outs[f"{side} separate"]).abs().max()
                              / outs[f"{side} separate"].abs().max()) for side in unet_step.SIDES}
        for k in range(runs):
            for v in VARIANTS[k % 4:] + VARIANTS[:k % 4]:
                sync()
                start = time.perf_counter()
                call(v)
                sync()
                times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}, errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["sd15"], choices=list(unet_step.MODELS))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--runs", type=int, default=3, help="timed calls per variant (median reported)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads on the CPU")
    p.add_argument("--quick", action="store_true", help="narrow, shallow models at 128 px: checks the script")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU: {cpu_flags()}, {args.threads} threads"
    print(f"{where}; torch {torch.__version__}; median of {args.runs} calls per variant\n")
    print("| model | dtype | " + " | ".join(f"{v} s" for v in VARIANTS)
          + " | unfog fused / separate | diffusers fused / separate | unfog / diffusers, fused "
          "| fused vs separate, unfog / diffusers |")
    print("|---|---|" + "---|" * (len(VARIANTS) + 4))
    models = unet_step.QUICK if args.quick else unet_step.MODELS
    for name in args.models:
        for dtype in args.dtypes:
            t, err = measure(models[name], DTYPES[dtype], args.device, args.runs)
            print(f"| {name}{' (quick)' if args.quick else ''} | {dtype} | "
                  + " | ".join(f"{t[v]:.4f}" for v in VARIANTS)
                  + f" | {t['unfog fused'] / t['unfog separate']:.3f} "
                  f"| {t['diffusers fused'] / t['diffusers separate']:.3f} "
                  f"| {t['unfog fused'] / t['diffusers fused']:.3f} | {err['unfog']:.1e} / {err['diffusers']:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
