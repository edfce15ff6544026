"""``unfog lora extract``: a LoRA from the difference of two models of one architecture.

For each module a LoRA trainer targets, dW = W_tuned - W_base is replaced by its best rank-r
approximation (truncated SVD, ``nn.lora.low_rank_factors``), stored with alpha = r (scale 1), so
merging the file into the base at weight 1 gives W_base + dW_r. The modules are kohya's
(sd-scripts ``networks/lora.py``, which its ``extract_lora_from_models.py`` uses):

- U-Net: every Linear and 1x1 conv inside a transformer block (``SpatialTransformer``: proj_in,
  proj_out, attention q/k/v/out, feed-forward), at rank ``rank``;
- with ``conv_rank``: the ResBlocks and the down/up-samplers too, their 3x3 convs at rank
  ``conv_rank`` (on dW.flatten(1)), their Linear / 1x1 convs (time embedding projection, skip
  connection) at ``rank``;
- text encoders (unless left out): the attention q/k/v/out and MLP fc1/fc2 Linears, at ``rank``.

Differences from kohya's extractor: a module is skipped only when its difference is exactly zero
(kohya leaves out a whole text encoder whose largest difference is below 0.01), the factors are not
clamped to a quantile (kohya clamps at the 99th percentile, which adds error), and the singular
values are split evenly between the two factors (see ``low_rank_factors``). What a LoRA cannot
hold (biases, norms, embeddings, modules it does not target) is listed in ``Extraction.left_out``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.lora import Target, kohya_key, kohya_metadata, save_lora
from ..models.clip_text import CLIPAttention, CLIPMLP
from ..nn.blocks import Downsample, ResBlock, SpatialTransformer, Upsample
from ..nn.lora import AdapterWeights, low_rank_factors

TRANSFORMER_BLOCKS = (SpatialTransformer, CLIPAttention, CLIPMLP)  # always targeted
CONV_BLOCKS = (ResBlock, Downsample, Upsample)  # targeted with a conv rank
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class ExtractedModule:
    """One module of the extracted LoRA: its kohya key, rank, and ||dW_r - dW||_F / ||dW||_F."""

    key: str
    rank: int
    relative_error: float


@dataclass
class Extraction:
    """The adapters by target, a report per module, how many targeted modules did not change, and
    the names of the changed tensors a LoRA cannot hold."""

    adapters: dict[Target, AdapterWeights]
    modules: list[ExtractedModule] = field(default_factory=list)
    unchanged: int = 0
    left_out: list[str] = field(default_factory=list)


def _positive(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _device(device: str | torch.device) -> torch.device:
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device here; use cpu")
    return d


def extraction_targets(models: Mapping[str, nn.Module | None], rank: int, conv_rank: int | None = None
                       ) -> list[tuple[Target, int]]:
    """The modules kohya's LoRA targets in ``models`` ({"unet": …, "text_encoder": …}), each with
    the rank to extract at (see the module docstring)."""
    out: dict[tuple[str, str], tuple[Target, int]] = {}
    for component, model in models.items():
        if model is None:
            continue
        for block_path, block in model.named_modules():
            if not isinstance(block, TRANSFORMER_BLOCKS + (CONV_BLOCKS if conv_rank else ())):
                continue
            for child_path, child in block.named_modules():
                if not isinstance(child, (nn.Linear, nn.Conv2d)):
                    continue
                wide = isinstance(child, nn.Conv2d) and tuple(child.kernel_size) != (1, 1)
                if wide and not conv_rank:
                    continue
                path = f"{block_path}.{child_path}" if block_path else child_path
                out.setdefault((component, path), (Target(component, path, child), conv_rank if wide else rank))
    return list(out.values())


def extract_lora(base: Mapping[str, nn.Module | None], tuned: Mapping[str, nn.Module | None], family: str, *,
                 rank: int, conv_rank: int | None = None, device: str | torch.device = "cpu",
                 progress: bool = False) -> Extraction:
    """The LoRA of ``tuned`` - ``base`` (same architecture; ``family`` names the keys, as in
    ``kohya_key``): factors computed on ``device``, returned in float32 on the CPU."""
    from tqdm import tqdm

    rank = _positive(rank, "the LoRA rank")
    conv_rank = None if conv_rank is None else _positive(conv_rank, "the conv rank")
    device = _device(device)
    unet_config = base["unet"].config if base.get("unet") is not None else None
    result = Extraction({})
    targets = extraction_targets(base, rank, conv_rank)
    for target, r in tqdm(targets, desc="extract", unit="module", disable=not progress):
        w0 = target.module.weight.detach()
        w1 = tuned[target.component].get_submodule(target.path).weight.detach()
        if torch.equal(w0, w1):
            result.unchanged += 1
            continue
        delta = w1.to(device, torch.float32) - w0.to(device, torch.float32)  # (out, in[, kh, kw])
        up, down = low_rank_factors(delta, r)
        approx = (up.flatten(1) @ down.flatten(1)).reshape(delta.shape)
        error = float(torch.linalg.norm(approx - delta) / torch.linalg.norm(delta))
        result.adapters[target] = AdapterWeights("lora", {"lora_down": down.cpu(), "lora_up": up.cpu()},
                                                 float(up.shape[1]))
        result.modules.append(ExtractedModule(kohya_key(target, family, unet_config), up.shape[1], error))
    extracted = {(t.component, t.path + ".weight") for t in result.adapters}
    for component, model in base.items():
        if model is None:
            continue
        theirs = tuned[component].state_dict()
        result.left_out += [f"{component}.{k}" for k, v in model.state_dict().items()
                            if (component, k) not in extracted and not torch.equal(v, theirs[k])]
    return result


def _architecture_differences(a, b) -> list[str]:
    """What differs between two pipelines' architectures ("family: sd1 -> sdxl", "unet.context_dim: …")."""
    from ..training.typed import field_differences

    diffs = [] if a.family == b.family else [f"family: {a.family} -> {b.family}"]
    ignore = ("gradient_checkpointing", "dropout")
    for c in COMPONENTS:
        ma, mb = getattr(a, c), getattr(b, c)
        if (ma is None) != (mb is None):
            held = ["present" if m is not None else "absent" for m in (ma, mb)]
            diffs.append(f"{c}: {held[0]} -> {held[1]}")
        elif ma is not None:
            diffs += [f"{c}.{d}" for d in field_differences(asdict(ma.config), asdict(mb.config), ignore)]
    return diffs


def extract_lora_file(base_path: str | Path, tuned_path: str | Path, out: str | Path, *, rank: int,
                      conv_rank: int | None = None, text_encoder: bool = True, overwrite: bool = False,
                      device: str | torch.device = "cpu", progress: bool = True) -> Extraction:
    """Load two checkpoints (any file or folder ``StableDiffusion.load`` reads: official single
    files, diffusers folders, unfog text-to-image models), extract the LoRA of their difference and
    write it to ``out`` as a kohya file with ``ss_*`` / ``modelspec.*`` metadata."""
    from .stable_diffusion import StableDiffusion

    out = Path(out)
    rank = _positive(rank, "the LoRA rank")
    conv_rank = None if conv_rank is None else _positive(conv_rank, "the conv rank")
    _device(device)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"--out {out}: a kohya LoRA file is .safetensors, got {out.suffix or 'no extension'!r}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    base, tuned = StableDiffusion.load(base_path), StableDiffusion.load(tuned_path)
    diffs = _architecture_differences(base, tuned)
    if diffs:
        raise ValueError(f"{base_path} ({base.family}) and {tuned_path} ({tuned.family}) are models of different "
                         f"architectures ({'; '.join(diffs[:4])}); extract a LoRA from a model and a fine-tune of it")
    names = COMPONENTS if text_encoder else ("unet",)
    result = extract_lora({c: getattr(base, c) for c in names}, {c: getattr(tuned, c) for c in names}, base.family,
                          rank=rank, conv_rank=conv_rank, device=device, progress=progress)
    if not result.adapters:
        raise ValueError(f"{tuned_path} does not differ from {base_path} in any module a LoRA targets")
    comment = f"extracted by unfog lora extract from {Path(tuned_path).name} - {Path(base_path).name}"
    metadata = kohya_metadata(base.family, rank=rank, alpha=rank, output_name=out.stem, started_at=time.time(),
                              prediction="v" if base.prediction == "v" else "eps", conv_rank=conv_rank,
                              resolution=base.native_size,
                              extra={"ss_sd_model_name": Path(base_path).name, "ss_training_comment": comment})
    save_lora(out, result.adapters, base.family, metadata, unet_config=base.unet.config, overwrite=overwrite)
    return result
