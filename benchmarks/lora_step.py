"""One LoRA training step: unfog's U-Net with ``nn.lora.add_lora`` against diffusers'
UNet2DConditionModel with PEFT's ``LoraConfig`` (``unet.add_adapter``), on the same weights.

The step: rank 16 (alpha 16) on the same targets on both sides (kohya's defaults: the transformer
blocks' attention projections ``to_q/to_k/to_v/to_out.0``, the feed-forward ``ff.net.0.proj`` and
``ff.net.2``, and ``proj_in`` / ``proj_out``), batch 1 at 512 x 512 (latents 64 x 64, context
77 x 768), the frozen U-Net in bf16 and the adapters in fp32 (as diffusers' ``train_text_to_image_
lora.py`` casts them), bf16 autocast, an MSE loss against a fixed target, backward and one AdamW
step over the adapters (the base in fp32 and no autocast with `--dtype fp32`, the default on a CPU
without fast bf16), with gradient checkpointing off and on (unfog: ``UNetConfig.
gradient_checkpointing``; diffusers: ``enable_gradient_checkpointing()``).

Both sides in ONE process on ONE copy of the base weights (diffusers' converter only renames, so its
model is assigned unfog's very tensors), called alternately (unfog, diffusers, diffusers, unfog,
...), so that any drift of the machine falls on both alike. Time: the median of ``--runs`` steps
after ``--warmup``. Memory: each side alone in a fresh process (``--memory-worker``): the peak
resident set (VmHWM) of its first training step less the resident set just before it, with the
model, the adapters and the optimiser built: the activations, gradients, optimiser state and
workspace of a step. (Measured inside the timing process, a step mostly reuses memory the
allocator kept from the warm-up, and the figure says nothing.)

    python benchmarks/lora_step.py              # SD 1.5, 512 px (docs/benchmarks.md)
    python benchmarks/lora_step.py --quick      # a narrow model at 128 px: checks the script in seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from unet_step import MODELS, QUICK, build, random_state_dict, rel_err, rss_mb  # noqa: E402

from unfog.nn.lora import add_lora  # noqa: E402
from unfog.pipelines.precision import DTYPES, training_autocast  # noqa: E402
from machine import cpu_flags  # noqa: E402

SIDES = ("unfog", "diffusers")
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]



def with_adapters(side: str, net: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    """Rank-``rank`` LoRA on the targets, the adapters in fp32 with up = 0 (both libraries' init);
    returns the adapters' parameters."""
    net.requires_grad_(False)
    if side == "unfog":
        names = [n for n, m in net.named_modules() if n.endswith(TARGETS) and isinstance(m, (torch.nn.Linear,
                                                                                             torch.nn.Conv2d))]
        layers = add_lora(net, names, rank, float(rank))
        params = [p for layer in layers.values() for p in (layer.lora_down.weight, layer.lora_up.weight)]
    else:
        from peft import LoraConfig

        net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=PEFT_TARGETS))
        params = [p for n, p in net.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def make_step(side: str, cfg, rank: int, x, t, ctx, target, state=None, dtype=torch.bfloat16):
    """One side's U-Net in ``dtype`` (on ``state``, one copy both sides can share; default: the random
    weights of ``cfg``) with rank-``rank`` fp32 adapters and AdamW, under bf16 autocast when ``dtype``
    is bf16; returns ``step()``, one training step that returns the (detached) prediction."""
    net = build(side, cfg, dtype, random_state_dict(cfg, dtype) if state is None else state)
    if side == "diffusers" and cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    params = with_adapters(side, net, rank)
    optim = torch.optim.AdamW(params, lr=1e-4)
    call = (lambda: net(x, t, ctx)) if side == "unfog" else (lambda: net(x, t, encoder_hidden_states=ctx).sample)

    def step() -> torch.Tensor:
        net.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = call()
        loss = torch.nn.functional.mse_loss(out.float(), target)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        return out.detach()
    return step


def inputs(size: int, context_dim: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, size // 8, size // 8, generator=g)
    ctx = torch.randn(1, 77, context_dim, generator=g)
    return x, torch.tensor([500.0]), ctx, torch.randn(1, 4, size // 8, size // 8, generator=g)


def memory_worker(side: str, checkpointing: bool, quick: bool, rank: int, threads: int, dtype: torch.dtype) -> None:
    """Print, as JSON, the MB one first training step adds to this fresh process's peak."""
    torch.set_num_threads(threads)
    if side == "diffusers":
        import diffusers  # noqa: F401  (imported before the step is measured)
    model = (QUICK if quick else MODELS)["sd15"]
    cfg = replace(model.config, gradient_checkpointing=checkpointing)
    step = make_step(side, cfg, rank, *inputs(model.size, cfg.context_dim), dtype=dtype)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    before = rss_mb()
    step()
    print(json.dumps({"mb": rss_mb("VmHWM") - before}))


def fresh_process_mb(side: str, checkpointing: bool, args) -> float:
    cmd = [sys.executable, __file__, "--memory-worker", side, "--rank", str(args.rank), "--threads", str(args.threads),
           "--dtype", args.dtype]
    cmd += ["--checkpointing"] * checkpointing + ["--quick"] * args.quick
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["mb"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="the frozen base's dtype, bf16 with "
                        "bf16 autocast (default: bf16 where this CPU runs it fast, else fp32: pipelines.precision)")
    parser.add_argument("--memory-worker", choices=SIDES, help=argparse.SUPPRESS)  # one side's memory, in a fresh process
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if training_autocast("auto", "cpu") else "fp32"
    dtype = DTYPES[args.dtype]
    if args.memory_worker:
        return memory_worker(args.memory_worker, args.checkpointing, args.quick, args.rank, args.threads, dtype)
    torch.set_num_threads(args.threads)
    model = (QUICK if args.quick else MODELS)["sd15"]
    size = model.size
    data = inputs(size, model.config.context_dim)
    print(f"LoRA training step: SD 1.5 U-Net{' (quick)' if args.quick else ''}, {size} px, batch 1, rank "
          f"{args.rank}, {args.dtype} base + fp32 adapters; torch {torch.__version__}, {args.threads} threads; CPU flags: "
          f"{cpu_flags()}")
    print(f"{'checkpointing':>13} | {'unfog s':>8} | {'diffusers s':>11} | {'time ratio':>10} | "
          f"{'unfog MB':>8} | {'diffusers MB':>12} | {'memory ratio':>12}")
    for checkpointing in (False, True):
        cfg = replace(model.config, gradient_checkpointing=checkpointing)
        state = random_state_dict(cfg, dtype)
        steps = {side: make_step(side, cfg, args.rank, *data, state=state, dtype=dtype) for side in SIDES}
        del state

        outs = {side: steps[side]() for side in SIDES}  # warm-up 1; up = 0, so both are the base model here
        err = rel_err(outs["diffusers"], outs["unfog"])
        if not err <= 5e-2:
            sys.exit(f"diffusers and unfog disagree before training: max relative error {err:.2e}")
        for _ in range(args.warmup - 1):
            for side in SIDES:
                steps[side]()
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        for k in range(args.runs):
            for side in SIDES if k % 2 == 0 else SIDES[::-1]:
                start = time.perf_counter()
                steps[side]()
                times[side].append(time.perf_counter() - start)
        med = {side: statistics.median(times[side]) for side in SIDES}
        mem = {side: fresh_process_mb(side, checkpointing, args) for side in SIDES}
        ratio = f"{mem['unfog'] / mem['diffusers']:12.3f}" if mem["diffusers"] >= 1 else f"{'n/a (< 1 MB)':>12}"
        print(f"{'on' if checkpointing else 'off':>13} | {med['unfog']:8.2f} | {med['diffusers']:11.2f} | "
              f"{med['unfog'] / med['diffusers']:10.3f} | {mem['unfog']:8.0f} | {mem['diffusers']:12.0f} | {ratio}")
        del steps, outs


if __name__ == "__main__":
    main()
