"""Task "controlnet": a ControlNet (Zhang, Rao & Agrawala 2023) trained for a frozen model that
unfog loads (the fine-tuning tasks' base, ``finetune.py``), on (image, hint, caption) triples
(``controlnet_data.py``).

Initialisation, as the official ``cldm`` (``tool_add_control.py`` copies every U-Net tensor whose
name the ControlNet shares; ``zero_module`` for the rest): the time (and label) embedding, the
input blocks and the middle block are the U-Net's weights; the 1x1 ``zero_convs``,
``middle_block_out`` and the hint encoder's last conv are zero; the hint encoder's other convs
are PyTorch's default draws (seeded). So at step 0 every residual is zero and the controlled
U-Net is the plain one, bit for bit.

The training call is the pipeline's: U-Net(x_t, t, c, control=ControlNet(x_t, t, c, hint, y)),
the prompt through the one conditioner (dropped to "" with ``caption_dropout``, the paper's 50 %),
the hint brought to 8x the latent size by the pipeline's own ``prepare_hint`` ("just_resize"), so
a saved file given to ``pipe(..., controls=[Control(unfog.load_controlnet(file), hint)])`` sees
what training saw. Only the ControlNet trains (fp32); the model stays as loaded.

The paper's "unlocked" decoder (``sd_locked=False``: the U-Net's output blocks train too) is not
offered: its result is a changed U-Net that no ControlNet file carries and no loader applies.

File: ``out_dir/<output_name>.safetensors``, the official single-file layout (``control_model.``)
from the EMA ControlNet, with the U-Net config as metadata (``checkpoint.controlnet.save_controlnet``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint.controlnet import check_controlnet_family, load_controlnet, save_controlnet
from ..models.controlnet import HINT_DOWNSCALE, ControlNet, ControlNetConfig
from ..pipelines.controlnet import Control, prepare_hint
from ..pipelines.images import make_grid, save_png
from ..pipelines.stable_diffusion import StableDiffusion
from .sections import ControlNetTrainingOptions
from .controlnet_data import make_controlnet_data
from .data import CaptionedBatch, CaptionedImages
from .finetune import FineTuneTrainer, frozen_forward
from .lora_data import transform_captions

GRID_ITEMS = 4  # the sample grid's columns: the first items' hints


def controlnet_from_unet(pipe: StableDiffusion) -> ControlNet:
    """A ControlNet for ``pipe.unet`` initialised as the module docstring says (torch's RNG draws
    the hint encoder's convs: seed it first)."""
    unet = pipe.unet
    if unet.config.in_channels != 4:
        raise ValueError(f"the model's U-Net takes {unet.config.in_channels} input channels (an inpainting model); "
                         "train a ControlNet on its base model (its ControlNets fit the inpainting model too)")
    controlnet = ControlNet(ControlNetConfig(unet.config))
    theirs = unet.state_dict()
    shared = {k: v.detach().float().clone() for k, v in theirs.items() if k in controlnet.state_dict()}
    missing, unexpected = controlnet.load_state_dict(shared, strict=False)
    fresh = ("input_hint_block.", "zero_convs.", "middle_block_out.")
    if unexpected or any(not k.startswith(fresh) for k in missing):
        raise AssertionError(f"the ControlNet's encoder does not match the U-Net's: {missing[:3]} {unexpected[:3]}")
    return controlnet


class ControlNetNetwork(nn.Module):
    """The trained ControlNet and a forward that runs the frozen model with it: (x_t, t, prompts,
    per-sample sizes, hint (b, 3, 8h, 8w) in [0, 1]) -> the controlled U-Net's output."""

    def __init__(self, controlnet: ControlNet, pipe: StableDiffusion):
        super().__init__()
        self.controlnet = controlnet
        self.pipe = pipe  # the pipeline is no module: never copied, saved or optimised

    def __deepcopy__(self, memo) -> "ControlNetNetwork":
        return ControlNetNetwork(copy.deepcopy(self.controlnet, memo), self.pipe).train(self.training)

    def forward(self, x: Tensor, t: Tensor, prompts: list[str], sizes: Tensor | None = None, *,
                hint: Tensor) -> Tensor:
        def control(x, t, context, y):
            return self.controlnet(x, t, context, hint, y)

        return frozen_forward(self.pipe, x, t, prompts, sizes, text_grad=False, control=control)


def control_hints(hints: Tensor, latent_size: tuple[int, int]) -> Tensor:
    """Hints (b, 3, H, W) in [0, 1] at the ControlNet's input size, 8x ``latent_size`` (h, w), each
    resized as the pipeline resizes a hint ("just_resize")."""
    h, w = (HINT_DOWNSCALE * n for n in latent_size)
    return torch.cat([prepare_hint(hint, w, h, "just_resize") for hint in hints])


class ControlNetTrainer(FineTuneTrainer):
    options: ControlNetTrainingOptions

    def make_data(self) -> CaptionedImages:
        c = self.config
        return make_controlnet_data(c.data, c.image_size, c.data_size, c.seed, c.center_crop,
                                    shapes_config=c.shapes_config(), workers=c.data_workers)

    def make_network(self) -> ControlNetNetwork:
        self.freeze()
        torch.manual_seed(self.config.seed)
        controlnet = controlnet_from_unet(self.pipe)
        self.cast_frozen(set())
        return ControlNetNetwork(controlnet, self.pipe)

    def latent_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        f = self.pipe.vae.config.downsample_factor
        return image_size[0] // f, image_size[1] // f

    def extra_inputs(self, batch: CaptionedBatch) -> dict[str, Tensor]:
        hints = control_hints(batch.hints, self.latent_size(tuple(batch.images.shape[-2:])))
        return {"hint": hints.to(self.device)}

    def prompt_draws(self, b: int, g: torch.Generator) -> tuple[Tensor | None, ...]:
        return (torch.rand(b, generator=g) < self.options.caption_dropout,)

    def make_prompts(self, captions: list[str], draws: tuple[Tensor | None, ...]) -> list[str]:
        return transform_captions(captions, draws[0], None, 0)

    def describe(self) -> str:
        return f"ControlNet {self.options.output_name}"

    # ---- the sample grid: a column per item, its hint above the images drawn with it ---------------
    def sample_grid(self) -> None:
        c = self.config
        n = min(GRID_ITEMS, len(self.data))
        batch = self.data.batch(torch.arange(n), self.data.crop_seeds(n, torch.Generator().manual_seed(0)))
        prompts = list(self.options.validation_prompts)[:n] or batch.captions
        n = len(prompts)
        rows = [batch.hints[:n] * 2 - 1]  # (n, 3, H, W) in [-1, 1]
        drawn = []
        for prompt, hint in zip(prompts, batch.hints):
            drawn.append(self.pipe(prompt, steps=c.sample_steps, sampler=c.sample_sampler,
                                   cfg_scale=c.sample_cfg_scale, seed=0, batch_size=2, width=c.image_size,
                                   height=c.image_size, output="tensor",
                                   controls=[Control(self.ema.model.controlnet, hint)]))
        rows += [torch.stack([d[k] for d in drawn]).to(rows[0]) for k in range(2)]  # a row per seed
        grid = make_grid(torch.cat(rows), nrow=n, scale=2 if c.image_size <= 128 else 1)
        save_png(grid, self.out / "samples" / f"step_{self.step:08d}.png",
                 f"step {self.step}; {self.describe()} on {self.base_path.name}; row 1: hints, rows 2-3: seeds 0, 1; "
                 f"columns: {' | '.join(prompts)}; sampler {c.sample_sampler}, {c.sample_steps} steps, "
                 f"cfg {c.sample_cfg_scale}", overwrite=True)

    # ---- files --------------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        return Path(self.config.out_dir) / f"{self.options.output_name}.safetensors"

    def save_model(self) -> None:
        """The EMA ControlNet in the official layout (ours to replace: ``build`` refused a file of
        that name that is not from this run)."""
        save_controlnet(self.ema.model.controlnet, self.model_path,
                        {"step": self.step, "base_model": self.base_path.name,
                         "base_model_hash": self.checkpoint_hash()}, overwrite=True)

    def load_weights(self, path: Path) -> list[str]:
        """Continue a ControlNet file (``--init-from``; any layout ``load_controlnet`` reads) for this
        model: its weights become the trained ones and the EMA's; the optimizer starts afresh."""
        theirs = load_controlnet(path)
        check_controlnet_family(theirs, self.pipe.unet)
        if theirs.control_config != self.net.controlnet.control_config:
            raise ValueError(f"{path} is a ControlNet of another shape than this model's (transformer depths or "
                             "hint channels differ)")
        self.net.controlnet.load_state_dict(theirs.state_dict())
        self.ema.model.load_state_dict(self.net.state_dict())
        return [f"ControlNet {path.name}"]
