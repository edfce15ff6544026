"""One CFG step of two text-to-image backbones side by side: the `shapes` U-Net and the DiT of
``configs/shapes_dit.json``, on the 16 x 16 x 4 latents of the `shapes` autoencoder with a batch
of 2 (unconditional and conditional) and a 77 x 128 text context.

Printed per backbone and dtype: parameters, GFLOP of the step (``torch.utils.flop_counter``) and
the median time of ``--runs`` calls after ``--warmup``, the backbones called alternately in one
process. The weights are the trained models' when ``--unet`` / ``--dit`` name model files, else
random (the time does not depend on them).

    python benchmarks/backbone_step.py --threads 2
    python benchmarks/backbone_step.py --unet runs/u/model.safetensors --dit runs/shapes_dit/model.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from unfog.models.backbone import build, for_latents
from unfog.models.presets import get_preset
from unfog.pipelines.latent_model import load_parts
from machine import cpu_flags


def backbone(path: str | None, preset: str):
    if path:
        return load_parts(path)[0].float().eval()
    return build(for_latents(get_preset(preset), 4, 128, 16)).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", default=None, help="a U-Net text-to-image model file (default: random SHAPES)")
    p.add_argument("--dit", default=None, help="a DiT text-to-image model file (default: random DIT_SHAPES)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    nets = {"U-Net (SHAPES)": backbone(args.unet, "SHAPES"), "DiT (DIT_SHAPES)": backbone(args.dit, "DIT_SHAPES")}
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g), torch.tensor([500.0] * 2)
    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| backbone | dtype | parameters | GFLOP / step | ms / step |")
    print("|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        times: dict[str, list[float]] = {name: [] for name in nets}
        flops = {}
        with torch.inference_mode():
            for name, net in nets.items():
                net.to(dtype)
                with FlopCounterMode(display=False) as fc:
                    net(x.to(dtype), t, ctx.to(dtype))
                flops[name] = fc.get_total_flops() / 1e9
                for _ in range(args.warmup):
                    net(x.to(dtype), t, ctx.to(dtype))
            for _ in range(args.runs):  # alternating: drift of the machine falls on both alike
                for name, net in nets.items():
                    start = time.perf_counter()
                    net(x.to(dtype), t, ctx.to(dtype))
                    times[name].append(time.perf_counter() - start)
        for name, net in nets.items():
            params = sum(q.numel() for q in net.parameters()) / 1e6
            print(f"| {name} | {dtype_name} | {params:.2f}M | {flops[name]:.2f} | "
                  f"{1000 * statistics.median(times[name]):.1f} |", flush=True)


if __name__ == "__main__":
    main()
