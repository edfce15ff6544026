"""torch.compile on the CPU: one classifier-free-guidance step of the U-Net, eager and compiled,
for unfog and for diffusers, on the same random weights.

The step and the weights are ``unet_step.py``'s (SD 1.5 at 512 px, batch 2). Variants:

- ``unfog eager``: the U-Net as ``StableDiffusion`` runs it on the CPU (channels-last conv
  weights, ``use_device_layout``);
- ``unfog compiled``: the same through ``torch.compile`` as ``pipe.compile()`` does it
  (inductor's C++ kernels, static shapes); the weights stay parameters, read at run time, so a
  LoRA merged in later is seen;
- ``unfog frozen``: compiled with inductor's ``freezing``, which folds the weights into the graph
  as constants and pre-packs them for oneDNN: a LoRA merged in later is NOT seen;
- ``diffusers eager``: ``UNet2DConditionModel`` as its pipelines leave it (contiguous);
- ``diffusers compiled`` / ``diffusers frozen``: the same two ways of compiling.

Each side holds its own copy of the weights (the layouts differ). Every variant is called once
to compile and warm up (its time is reported as "first call"), then the variants are called in
turn, the order rotating each round; the figure is the median of ``--runs`` calls. Each output
is compared with its side's eager output (max |a - b| / max |b|).

    python benchmarks/step_compile.py --dtypes bf16 --runs 3
    python benchmarks/step_compile.py --quick          # narrow models at 128 px: checks the script
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
import unet_step  # noqa: E402
from machine import cpu_flags  # noqa: E402

VARIANTS = ("unfog eager", "unfog compiled", "unfog frozen",
            "diffusers eager", "diffusers compiled", "diffusers frozen")


def make_variants(model: unet_step.Model, dtype: torch.dtype, which: tuple[str, ...]) -> dict:
    """name -> the step, a call without arguments."""
    state = unet_step.random_state_dict(model.config, dtype)
    states = {"unfog": {k: v.clone() for k, v in state.items()}, "diffusers": state}

    def net_of(side: str) -> torch.nn.Module:
        return unet_step.lay_out(side, unet_step.build(side, model.config, dtype, dict(states[side])), "defaults")

    nets = {side: net_of(side) for side in unet_step.SIDES}
    calls = {side: unet_step.inputs(side, model, model.size, dtype) for side in unet_step.SIDES}
    variants = {}
    for name in which:
        side, how = name.split()
        net = nets[side]
        if how == "frozen":  # a module of its own on the same tensors, so no compiled code is shared
            net = net_of(side)
        if how != "eager":
            net = torch.compile(net, dynamic=False, options={"freezing": how == "frozen"})
        variants[name] = lambda net=net, side=side: calls[side](net)
    return variants


def measure(model: unet_step.Model, dtype: torch.dtype, runs: int, which: tuple[str, ...]):
    variants = make_variants(model, dtype, which)
    first, outs = {}, {}
    with torch.inference_mode():
        for name, call in variants.items():
            start = time.perf_counter()
            outs[name] = call().float()
            first[name] = time.perf_counter() - start
            print(f"  {name}: first call {first[name]:.1f} s", flush=True)
        times: dict[str, list[float]] = {v: [] for v in variants}
        names = list(variants)
        for k in range(runs):
            for name in names[k % len(names):] + names[:k % len(names)]:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
    errors = {}
    for name in variants:
        eager = outs.get(f"{name.split()[0]} eager")
        errors[name] = float("nan") if eager is None else float((outs[name] - eager).abs().max() / eager.abs().max())
    return {v: statistics.median(t) for v, t in times.items()}, first, errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["sd15"], choices=list(unet_step.MODELS))
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(unet_step.DTYPES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--runs", type=int, default=3, help="timed calls per variant (median reported)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--quick", action="store_true", help="narrow, shallow models at 128 px: checks the script")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_flags()}, {args.threads} threads; torch {torch.__version__}; "
          f"median of {args.runs} calls per variant\n", flush=True)
    models = unet_step.QUICK if args.quick else unet_step.MODELS
    rows = []
    for name in args.models:
        for dtype in args.dtypes:
            t, first, err = measure(models[name], unet_step.DTYPES[dtype], args.runs, tuple(args.variants))
            base = t.get("diffusers eager")
            for v in t:
                ratio = f"{t[v] / base:.3f}" if base else "-"
                rows.append(f"| {name}{' (quick)' if args.quick else ''} | {dtype} | {v} | {t[v]:.4f} | "
                            f"{first[v]:.1f} | {ratio} | {err[v]:.1e} |")
    print("\n| model | dtype | variant | s per step | first call s | / diffusers eager | vs own eager |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
