"""Task "hypernetwork": a hypernetwork (NovelAI / AUTOMATIC1111; ``nn/hypernetwork.py``) trained on
a frozen model that unfog loads (the fine-tuning tasks' base, ``finetune.py``).

The hypernetwork's module pairs are the only trained tensors. They reach the U-Net through the one
hook inference uses too, ``UNet.set_context_transform``: every attention layer, self and cross,
transforms its k and v context with the pair for that context's width, q untouched. Nothing is
written into the model, so every weight stays bit for bit as loaded.

Widths: A1111 creates pairs for the sizes ticked in its UI (768, 320, 640, 1280 and 1024 for
SD 1.x / 2.x). Here the default is every width the U-Net's attention layers see: the inner widths
of its transformer blocks (what self-attention reads) and the text context's width (what
cross-attention reads); ``enable_sizes`` picks a subset, which must hold the context's width
(a file without it is refused by every loader, A1111's included, as one for another model).

As A1111 trains them: the multiplier is 1, dropout is on while training (off in the EMA copy that
the sample grid and the saved file use), the weights start as ``nn.hypernetwork.initialize_``
draws them for ``weight_initialization``, from the config's seed. The prompts are the captions:
a hypernetwork learns a style, not a word.

Files, ``out_dir/<output_name>.*``: ``.safetensors`` (unfog's layout: the module tensors, the
options and A1111's name / step / sd_checkpoint / sd_checkpoint_name as JSON metadata); with
``save_pt`` A1111's ``.pt`` dict, which A1111 loads.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint.hypernetwork import read_hypernetwork, save_hypernetwork
from ..nn.attention import CrossAttention
from ..nn.hypernetwork import Hypernetwork, HypernetworkTransform, initialize_
from ..pipelines.stable_diffusion import StableDiffusion
from .sections import HypernetworkTrainingOptions
from .finetune import FineTuneTrainer, frozen_forward
from .state import is_state_file


def attention_widths(pipe: StableDiffusion) -> list[int]:
    """The context widths the U-Net's attention layers read: self-attention's and the text's."""
    return sorted({m.to_k.in_features for m in pipe.unet.modules() if isinstance(m, CrossAttention)})


class HypernetworkNetwork(nn.Module):
    """The trained hypernetwork and a forward that runs the frozen model with it: (x_t, t, prompts,
    per-sample sizes) -> the U-Net's output."""

    def __init__(self, hypernetwork: Hypernetwork, pipe: StableDiffusion):
        super().__init__()
        self.hypernetwork = hypernetwork
        self.pipe = pipe  # the pipeline is no module: never copied, saved or optimised

    def __deepcopy__(self, memo) -> "HypernetworkNetwork":
        twin = HypernetworkNetwork(copy.deepcopy(self.hypernetwork, memo), self.pipe)
        return twin.train(self.training)

    def attach(self) -> None:
        """Make the frozen U-Net's attention use this hypernetwork."""
        self.pipe.unet.set_context_transform(HypernetworkTransform([self.hypernetwork]))

    def forward(self, x: Tensor, t: Tensor, prompts: list[str], sizes: Tensor | None = None) -> Tensor:
        self.attach()
        return frozen_forward(self.pipe, x, t, prompts, sizes, text_grad=False)


class HypernetworkTrainer(FineTuneTrainer):
    options: HypernetworkTrainingOptions

    def make_network(self) -> HypernetworkNetwork:
        c, o, pipe = self.config, self.options, self.pipe
        self.freeze()
        seen, context = attention_widths(pipe), pipe.unet.config.context_dim
        widths = list(o.enable_sizes) or seen
        unseen = sorted(set(widths) - set(seen))
        if unseen:
            raise ValueError(f"hypernetwork.enable_sizes: no attention layer of {self.base_path.name} reads a context "
                             f"{', '.join(map(str, unseen))} wide; its widths are {', '.join(map(str, seen))}")
        if context not in widths:
            raise ValueError(f"hypernetwork.enable_sizes must hold the text context's width {context} (a file "
                             f"without it loads on no model of this family); this model's widths are "
                             f"{', '.join(map(str, seen))}")
        hn = Hypernetwork(widths, o.module_options(), name=o.output_name)
        initialize_(hn, torch.Generator().manual_seed(c.seed))
        torch.manual_seed(c.seed)  # dropout draws from torch's RNG (saved in the state, so resume is exact)
        self.cast_frozen(set())
        return HypernetworkNetwork(hn, pipe)

    @contextmanager
    def applied(self):
        self.ema.model.attach()  # the EMA hypernetwork in the U-Net
        try:
            yield
        finally:
            self.net.attach()

    def describe(self) -> str:
        o = self.options
        return f"hypernetwork {o.output_name} ({o.layer_structure}, {o.activation_func})"

    # ---- files --------------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        return Path(self.config.out_dir) / f"{self.options.output_name}.safetensors"

    def output_paths(self) -> list[Path]:
        return [self.model_path] + ([self.model_path.with_suffix(".pt")] if self.options.save_pt else [])

    def save_model(self) -> None:
        """The EMA hypernetwork as unfog's ``.safetensors`` (and A1111's ``.pt`` with ``save_pt``):
        ours to replace, ``build`` refused files of these names that are not from this run."""
        hn = self.ema.model.hypernetwork
        hn.name, hn.step = self.options.output_name, self.step
        hn.sd_checkpoint, hn.sd_checkpoint_name = self.checkpoint_hash(), self.base_path.stem
        for path in self.output_paths():
            save_hypernetwork(hn, path, overwrite=True)

    def weights_file(self, path: Path) -> bool:
        """An A1111 ``.pt`` given to ``--init-from`` is a hypernetwork, not a training state."""
        return path.suffix.lower() == ".pt" and not is_state_file(path)

    def load_weights(self, path: Path) -> list[str]:
        """Continue a hypernetwork file (``--init-from``; A1111's ``.pt`` or unfog's ``.safetensors``)
        of this config's module options and widths: its weights become the trained ones and the
        EMA's; the optimizer, LR schedule and step start afresh."""
        theirs, mine = read_hypernetwork(path), self.net.hypernetwork
        shape = ("layer_structure", "activation", "layer_norm", "dropout_structure", "activate_output")
        differ = [f"{k} {getattr(theirs.options, k)!r} (this config: {getattr(mine.options, k)!r})" for k in shape
                  if getattr(theirs.options, k) != getattr(mine.options, k)]
        if differ:
            raise ValueError(f"{path} is a hypernetwork of other options: {'; '.join(differ)}; set the options of "
                             "section hypernetwork to the file's")
        if theirs.widths != mine.widths:
            raise ValueError(f"{path} has module pairs for widths {', '.join(map(str, theirs.widths))}; this run trains "
                             f"{', '.join(map(str, mine.widths))} (set hypernetwork.enable_sizes to the file's)")
        mine.load_state_dict(theirs.state_dict())
        self.ema.model.load_state_dict(self.net.state_dict())
        return [f"hypernetwork {theirs.name} at step {theirs.step}"]
