"""One classifier-free-guidance step of the U-Net: unfog against diffusers' UNet2DConditionModel.

A CFG step is one U-Net call on a batch of 2 (unconditional and conditional): SD 1.5 at 512 x 512
(latents 64 x 64, context 77 x 768) and SDXL base at 768 x 768 (latents 96 x 96, context
77 x 2048, size conditioning), in float32 and bfloat16. Both sides get the SAME random weights:
every tensor of unfog's state dict is drawn from its own seeded generator (matrices
N(0, 1/fan_in), norm scales 1 + 0.1 N(0, 1), biases 0.1 N(0, 1)) and diffusers gets them through its
own ``convert_ldm_unet_checkpoint``; diffusers' output is checked against unfog's (after the
warm-up, before diffusers is timed) and a mismatch stops the benchmark.

Time: both sides in ONE process holding ONE copy of the weights (diffusers' converter only
renames keys, so its model is assigned unfog's very tensors; the script checks that they share
storage), called alternately (unfog, diffusers, diffusers, unfog, ...) under
``torch.inference_mode()`` with torch using every core (``--threads``); the figure is the median
of ``--runs`` calls per side after ``--warmup`` calls each. Alternating puts any drift of the
machine (other load, clock, memory state) on both sides alike. ``--separate`` times each side
alone in its own process instead.

Memory: each side alone in its own process, one after the other, so that only one model is in
memory (SDXL base is 10.3 GB in float32) and each side's memory is its own:
- the step peak, the process's peak resident set (VmHWM) during a timed call less its resident
  set just before it (the peak is reset through /proc/self/clear_refs after the warm-up), i.e.
  the activations and workspace of a step;
- the first-call peak, the same from the moment the weights are loaded through the warm-up,
  which adds what the first call allocates once and keeps (caches, workspace, allocator growth);
- and the weights' own size.

    python benchmarks/unet_step.py                       # the full table (see docs/benchmarks.md)
    python benchmarks/unet_step.py --quick               # tiny models, seconds: checks the script
    python benchmarks/unet_step.py --models sd15 --dtypes bf16 --sizes 512 --runs 3
    python benchmarks/unet_step.py --layouts contiguous channels_last   # also the layout unfog uses on the CPU
    python benchmarks/unet_step.py --layouts defaults    # each side as its pipeline runs it: unfog channels-last
    python benchmarks/unet_step.py --control --models sd15   # the controlled step: U-Net + one ControlNet

``--control`` times the controlled step instead: one ControlNet call, then the U-Net call given
its residuals (unfog: ``ControlNet`` and ``UNet.forward(..., control=residuals)``; diffusers:
``ControlNetModel`` and ``UNet2DConditionModel(down_block_additional_residuals=...,
mid_block_additional_residual=...)``), on the same batch of 2 with one hint image (3 x size x
size) for both rows, as a CFG step with one "balanced" unit runs. The ControlNet's weights are
drawn as the U-Net's (from seeds of their own, the zero convs random too, so that every residual
counts) and reach diffusers through its ``convert_controlnet_checkpoint`` (plus the SDXL label
embedding, by diffusers' own name table, which that converter skips), again one shared copy.
The unfog side checks once, untimed, that the residuals change its output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "parity"))  # oracles.diffusers_twin: the diffusers config of a UNetConfig
sys.path.insert(0, str(ROOT / "tests"))  # model_checks, imported by oracles

from unfog.conditioning import sdxl_vector_cond  # noqa: E402
from unfog.models.controlnet import ControlNet, ControlNetConfig  # noqa: E402
from unfog.models.presets import SD15, SDXL_BASE  # noqa: E402
from unfog.models.unet import UNet, UNetConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last, "defaults": None}

TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}  # max |unfog - diffusers| / max |diffusers|
SIDES = ("unfog", "diffusers")
CONTROL_SEED = 1_000_000  # the ControlNet's tensors are drawn from seeds CONTROL_SEED + i


def lay_out(side: str, net: torch.nn.Module, layout: str) -> torch.nn.Module:
    """Both models in ``layout``; "defaults": each as its own loader lays it out on this device
    (unfog's ``use_device_layout``, applied by the pipeline to its U-Net and VAE and by
    ``unfog.load_controlnet`` to a ControlNet: channels-last conv weights on the CPU; diffusers'
    pipelines leave PyTorch's contiguous default unless the user converts the models)."""
    if layout != "defaults":
        return net.to(memory_format=LAYOUTS[layout])
    if side == "unfog":
        from unfog.pipelines.precision import use_device_layout

        use_device_layout(net)
    return net


@dataclass(frozen=True)
class Model:
    config: UNetConfig
    size: int  # default image side in pixels
    pooled: int | None = None  # SDXL: width of the pooled text embedding in y


MODELS = {
    "sd15": Model(SD15, 512),
    "sdxl": Model(SDXL_BASE, 768, pooled=1280),
}
# --quick: the same architectures, narrow and shallow.
QUICK = {
    "sd15": Model(replace(SD15, model_channels=64, num_heads=4, context_dim=64), 128),
    "sdxl": Model(replace(SDXL_BASE, model_channels=64, transformer_depth=(0, 1, 2), transformer_depth_middle=2,
                          num_head_channels=32, context_dim=64, adm_in_channels=64 + 6 * 256), 128, pooled=64),
}


# ---------------------------------------------------------------- the worker (one side, one config)


def random_state_dict(cfg: UNetConfig, dtype: torch.dtype, seed: int = 0,
                      control: bool = False) -> dict[str, torch.Tensor]:
    """unfog's state dict with seeded random values; tensor i comes from generator seed + i, so
    either side draws the same weights, one tensor at a time (no float32 copy of a bf16 model).
    ``control``: the state dict of a ControlNet for ``cfg``'s U-Net (official names)."""
    with torch.device("meta"):
        net = ControlNet(ControlNetConfig(cfg)) if control else UNet(cfg)
        shapes = {k: v.shape for k, v in net.state_dict().items()}
    weights = {}
    for i, (name, shape) in enumerate(shapes.items()):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
        if len(shape) > 1:
            value = noise / math.sqrt(math.prod(shape[1:]))
        else:
            value = 0.1 * noise + (1.0 if name.endswith("weight") else 0.0)
        weights[name] = value.to(dtype)
    return weights


def build(side: str, cfg: UNetConfig, dtype: torch.dtype,
          state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """One side's model on the random weights (or on ``state``, whose tensors it then shares:
    diffusers' converter only renames keys, so two models can hold one copy of the weights)."""
    if state is None:
        state = random_state_dict(cfg, dtype)
    if side == "unfog":
        with torch.device("meta"):
            model = UNet(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from oracles import diffusers_twin  # tests/parity/oracles.py

    with torch.device("meta"):
        model = diffusers_twin(cfg, **sdxl_extra(cfg))
    ldm = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    del state
    model.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(model.config)), strict=True, assign=True)
    return model.eval()


def sdxl_extra(cfg: UNetConfig) -> dict:
    """diffusers' arguments for the SDXL label embedding (text_time), for the U-Net and the ControlNet."""
    if cfg.num_classes != "sequential":
        return {}
    return dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=cfg.adm_in_channels)


def build_control(side: str, cfg: UNetConfig, dtype: torch.dtype,
                  state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """One side's ControlNet for ``cfg``'s U-Net, as ``build`` builds the U-Net. diffusers gets the
    official layout through its ``convert_controlnet_checkpoint``, which renames only and leaves
    out the SDXL label embedding (``label_emb``); that is mapped by diffusers' own name table."""
    if state is None:
        state = random_state_dict(cfg, dtype, CONTROL_SEED, control=True)
    if side == "unfog":
        with torch.device("meta"):
            model = ControlNet(ControlNetConfig(cfg))
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
    from oracles import diffusers_unet_kwargs  # tests/parity/oracles.py

    with torch.device("meta"):
        model = ControlNetModel(conditioning_channels=3, **diffusers_unet_kwargs(cfg), **sdxl_extra(cfg))
    converted = convert_controlnet_checkpoint(state, dict(model.config))
    if cfg.num_classes == "sequential":
        table = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
        converted.update({theirs: state[ours] for theirs, ours in table.items()})
    del state
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def inputs(side: str, model: Model, size: int, dtype: torch.dtype, device: str = "cpu"):
    """One CFG step's inputs (batch 2), the same on both sides, drawn on the CPU and moved to
    ``device``; returns the step, a call ``step(unet)`` or, controlled, ``step(unet, controlnet)``."""
    cfg, g = model.config, torch.Generator().manual_seed(1234)
    x = torch.randn(2, cfg.in_channels, size // 8, size // 8, generator=g).to(device, dtype)  # (2, 4, h, w)
    t = torch.tensor([500.0, 500.0], device=device)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g).to(device, dtype)  # (uncond, cond) contexts
    y = cond = None
    if model.pooled is not None:
        pooled = torch.randn(2, model.pooled, generator=g)
        y = sdxl_vector_cond(pooled, (size, size), (0, 0), (size, size)).to(device, dtype)  # (2, adm_in_channels)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32, device=device)
        cond = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids}  # time_ids: original, crop, target
    hint = torch.rand(1, 3, size, size, generator=g).to(device, dtype).repeat(2, 1, 1, 1)  # one hint for both rows

    if side == "unfog":
        def step(unet, controlnet=None):
            residuals = None if controlnet is None else controlnet(x, t, ctx, hint, y)
            return unet(x, t, ctx, y=y, control=residuals)
        return step

    def step(unet, controlnet=None):
        extra = {}
        if controlnet is not None:
            down, mid = controlnet(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, added_cond_kwargs=cond,
                                   return_dict=False)
            extra = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=cond, **extra).sample
    return step


def rss_mb(field: str = "VmRSS") -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = (QUICK if args.quick else MODELS)[args.model]
    dtype = DTYPES[args.dtype]
    if args.side == "diffusers":
        import diffusers.loaders.single_file_utils  # noqa: F401  (imported before the weights are measured)
        from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: F401
    before = rss_mb()
    net = [lay_out(args.side, build(args.side, model.config, dtype), args.layout)]  # step(*net)
    if args.control:
        net.append(lay_out(args.side, build_control(args.side, model.config, dtype), args.layout))
    call = inputs(args.side, model, args.size, dtype)
    loaded = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    with torch.inference_mode():
        out = call(*net)
        for _ in range(args.warmup - 1):
            call(*net)
        if args.reference:  # diffusers: agree with unfog before being timed
            err = rel_err(out, torch.load(args.reference))
            if not err <= TOLERANCE[args.dtype] or not torch.isfinite(out).all():
                sys.exit(f"diffusers and unfog disagree: max relative error {err:.2e} > {TOLERANCE[args.dtype]}")
        first_peak = rss_mb("VmHWM") - loaded
        settled = rss_mb()
        Path("/proc/self/clear_refs").write_text("5")
        for _ in range(args.runs):
            start = time.perf_counter()
            call(*net)
            times.append(time.perf_counter() - start)
        if args.control and args.side == "unfog":  # after the measurements: the residuals must count
            moved = rel_err(out, call(net[0]))
            if not moved > 1e-2:
                sys.exit(f"the ControlNet's residuals change the output by only {moved:.1e} relative")
    torch.save(out, args.output)
    report = dict(times=times, weights_mb=loaded - before, first_peak_mb=first_peak,
                  step_peak_mb=rss_mb("VmHWM") - settled)
    Path(args.output).with_suffix(".json").write_text(json.dumps(report))


def interleaved_worker(args: argparse.Namespace) -> None:
    """Both sides in one process on one shared copy of the weights, called alternately (unfog,
    diffusers, unfog, ...), so that anything else that changes over the run (other load, clock
    speed, memory state) falls on both alike; the ratio of the medians is the time figure."""
    torch.set_num_threads(args.threads)
    model = (QUICK if args.quick else MODELS)[args.model]
    dtype = DTYPES[args.dtype]

    def shared(state):  # lay out the one copy first, so that both sides keep sharing it
        if LAYOUTS[args.layout] is None:
            return state
        return {k: v.to(memory_format=LAYOUTS[args.layout]) if v.dim() == 4 else v for k, v in state.items()}

    state = shared(random_state_dict(model.config, dtype))
    nets = {side: [lay_out(side, build(side, model.config, dtype, state), args.layout)] for side in SIDES}
    if args.control:
        state = shared(random_state_dict(model.config, dtype, CONTROL_SEED, control=True))
        for side in SIDES:
            nets[side].append(lay_out(side, build_control(side, model.config, dtype, state), args.layout))
    del state
    # One copy of the weights; with "defaults" unfog's 4-D conv weights are its channels-last copies.
    def storage(net, converted):
        return {p.data_ptr() for p in net.parameters() if not converted or p.dim() != 4}

    for ours, theirs, what in zip(nets["unfog"], nets["diffusers"], ("U-Nets", "ControlNets")):
        if storage(ours, args.layout == "defaults") != storage(theirs, args.layout == "defaults"):
            sys.exit(f"the two {what} do not share their weights")
    calls = {side: inputs(side, model, args.size, dtype) for side in SIDES}
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    with torch.inference_mode():
        outs = {side: calls[side](*nets[side]) for side in SIDES}
        err = rel_err(outs["diffusers"], outs["unfog"])
        if not err <= TOLERANCE[args.dtype]:
            sys.exit(f"diffusers and unfog disagree: max relative error {err:.2e} > {TOLERANCE[args.dtype]}")
        for _ in range(args.warmup - 1):
            for side in SIDES:
                calls[side](*nets[side])
        for k in range(args.runs):
            for side in SIDES if k % 2 == 0 else SIDES[::-1]:  # neither side always goes first
                start = time.perf_counter()
                calls[side](*nets[side])
                times[side].append(time.perf_counter() - start)
    Path(args.output).write_text(json.dumps(dict(times=times, rel_err=err)))


# ---------------------------------------------------------------- the driver


def step_tflop(cfg: UNetConfig, size: int, pooled: int | None, control: bool = False) -> float:
    """FLOPs of one CFG step (batch 2), with ``control`` the ControlNet's too, counted by torch on
    the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = UNet(cfg)
        x, ctx = torch.empty(2, cfg.in_channels, size // 8, size // 8), torch.empty(2, 77, cfg.context_dim)
        y = None if pooled is None else torch.empty(2, cfg.adm_in_channels)
        with FlopCounterMode(display=False) as counter:
            residuals = None
            if control:
                residuals = ControlNet(ControlNetConfig(cfg))(x, torch.zeros(2), ctx, torch.empty(2, 3, size, size), y)
            net(x, torch.zeros(2), ctx, y, control=residuals)
    return counter.get_total_flops() / 1e12


def run_side(side: str, name: str, size: int, dtype: str, layout: str, args, tmp: Path,
             reference: Path | None, runs: int) -> dict:
    """One worker process: ``side`` is "unfog" or "diffusers" alone (memory, and the output the
    other side is checked against), or "both" (the interleaved timing)."""
    output = tmp / f"{side}-{name}-{size}-{dtype}-{layout}.pt"
    cmd = [sys.executable, __file__, "--worker", side, "--models", name, "--sizes", str(size), "--dtypes", dtype,
           "--layouts", layout,
           "--runs", str(runs), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--output", str(output)] + (["--quick"] if args.quick else []) + (["--control"] if args.control else []) + \
          (["--reference", str(reference)] if reference else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{side} {name} {size}px {dtype} failed:\n{done.stderr[-3000:]}")
    if side == "both":
        return json.loads(output.read_text())
    return {**json.loads(output.with_suffix(".json").read_text()), "output": output}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="image sides in pixels, for every model (default: sd15 512, sdxl 768)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", default=["contiguous"], choices=list(LAYOUTS),
                        help="memory layout of both models' conv weights, hence of their activations; unfog's "
                             "pipeline uses channels_last on the CPU; 'defaults': each side as its own pipeline "
                             "lays it out (default: contiguous, PyTorch's default, for both)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (>= 1)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (all cores)")
    parser.add_argument("--quick", action="store_true", help="narrow, shallow models at 128 px: checks the script")
    parser.add_argument("--control", action="store_true",
                        help="time the controlled step instead: one ControlNet call, then the U-Net given its "
                             "residuals (ControlNetModel + down/mid_block_additional_residual(s) on diffusers' side)")
    parser.add_argument("--separate", action="store_true",
                        help="time each side alone in its own process (as memory is measured) instead of "
                             "alternating the two in one process")
    parser.add_argument("--worker", choices=SIDES + ("both",), help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.runs < 1:
        parser.error("--warmup and --runs must be >= 1")
    if args.worker:
        args.side, args.model, args.dtype, args.layout = args.worker, args.models[0], args.dtypes[0], args.layouts[0]
        args.size = args.sizes[0]
        return interleaved_worker(args) if args.worker == "both" else worker(args)

    models = QUICK if args.quick else MODELS
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"note: load average {load:.1f} before starting; other processes will distort the times "
              "(with every core in use, an OpenMP thread that is preempted stalls the others)\n")
    header = ("| model | size | dtype | layout | TFLOP | unfog s | diffusers s | unfog / diffusers | unfog TFLOP/s "
              "| step peak MB unfog / diffusers | first-call peak MB unfog / diffusers | weights MB unfog / diffusers "
              "| max rel. diff |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = models[name]
            for size in args.sizes or [model.size]:
                if size % 8:
                    raise SystemExit(f"--sizes must be multiples of 8 (the VAE factor), got {size}")
                tflop = step_tflop(model.config, size, model.pooled, args.control)
                for dtype, layout in [(d, lay) for d in args.dtypes for lay in args.layouts]:
                    alone = 1 if not args.separate else args.runs  # memory: one settled call is enough
                    ours = run_side("unfog", name, size, dtype, layout, args, Path(tmp), None, alone)
                    theirs = run_side("diffusers", name, size, dtype, layout, args, Path(tmp), ours["output"], alone)
                    err = rel_err(torch.load(theirs["output"]), torch.load(ours["output"]))
                    times = {"unfog": ours["times"], "diffusers": theirs["times"]}
                    if not args.separate:
                        times = run_side("both", name, size, dtype, layout, args, Path(tmp), None, args.runs)["times"]
                    t_ours, t_theirs = statistics.median(times["unfog"]), statistics.median(times["diffusers"])
                    label = name + (" + ControlNet" if args.control else "") + (" (quick)" if args.quick else "")
                    print(f"| {label} | {size} | {dtype} | {layout} | {tflop:.3g} "
                          f"| {t_ours:.3f} | {t_theirs:.3f} | {t_ours / t_theirs:.3f} | {tflop / t_ours:.3g} "
                          f"| {ours['step_peak_mb']:.0f} / {theirs['step_peak_mb']:.0f} "
                          f"| {ours['first_peak_mb']:.0f} / {theirs['first_peak_mb']:.0f} "
                          f"| {ours['weights_mb']:.0f} / {theirs['weights_mb']:.0f} | {err:.1e} |", flush=True)
    how = "each side alone in its own process" if args.separate else "the two alternating in one process"
    step = "one ControlNet call and one U-Net call given its residuals" if args.control else "one U-Net call"
    print(f"\nOne CFG step = {step} on batch 2; median of {args.runs} runs after {args.warmup} warm-up, "
          f"{how}; memory: each side alone in its own process; "
          f"{args.threads} threads; torch {torch.__version__}; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
