"""AUTOMATIC1111's HTTP API shapes: its txt2img / img2img request fields and defaults (read off
``modules/api/models.py`` and ``modules/processing.py`` of stable-diffusion-webui), their
translation into an ``unfog.jobs.Job``, and the response's ``info``. Unknown fields are ignored,
as A1111 ignores them; fields of features unfog does not have are refused when they ask for
something (``restore_faces: true``), never silently dropped.

Fields the request leaves out take the model's recommended settings where its file stores them
(unfog's own models), else A1111's defaults; ``width`` / ``height`` left out take the model's
native size (512 for SD 1.x, A1111's default, 64 for the embedded shapes model).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageOps, PngImagePlugin
from pydantic import BaseModel, ConfigDict

from ..jobs import Drawn, Job
from ..pipelines.latent_model import recommended_settings
from ..pipelines.outputs import Settings, parse_parameters, settings_from_parameters, spacing_of

# A1111's defaults where unfog's Settings differ (StableDiffusionProcessing.__init__).
A1111_DEFAULTS = dict(steps=50, sampler="Euler", cfg_scale=7.0)


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"  # the name, in old clients
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    script_name: str | None = None
    script_args: list = []
    infotext: str | None = None
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    mask: str | None = None
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class BadRequest(ValueError):
    """A request that asks for something unfog cannot do, or with a value out of range (HTTP 422)."""


def decode_image(data: str, what: str) -> Image.Image:
    """A base64 image, bare or as a data URI ("data:image/png;base64,...")."""
    if not isinstance(data, str) or not data:
        raise BadRequest(f"{what}: expected a base64 image string")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what}: not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            return img
    except (OSError, SyntaxError) as err:
        raise BadRequest(f"{what}: not an image that can be read ({err})") from None


def encode_png(image: Image.Image, parameters: str | None) -> str:
    """Base64 PNG carrying its parameters in the "parameters" chunk, as A1111 sends them."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _refuse_unsupported(req: Txt2ImgRequest) -> None:
    if req.subseed_strength:
        raise BadRequest("variation seeds (subseed_strength != 0) are not supported by unfog; send 0")
    if req.restore_faces:
        raise BadRequest("face restoration is not available in unfog (GET /sdapi/v1/face-restorers is empty); "
                         "send restore_faces false")
    if req.tiling:
        raise BadRequest("tiling is not supported by unfog; send tiling false")
    if req.styles:
        raise BadRequest(f"prompt styles {req.styles} are not defined (GET /sdapi/v1/prompt-styles is empty)")
    if req.script_name:
        raise BadRequest(f"script {req.script_name!r} is not available (GET /sdapi/v1/scripts lists none)")
    others = sorted(k for k in req.alwayson_scripts if k.lower() != "controlnet")
    if others:
        raise BadRequest(f"alwayson_scripts {others} are not available in unfog (ControlNet is); leave them out")
    if req.enable_hr and req.hr_scheduler not in (None, "", "Use same scheduler", req.scheduler):
        raise BadRequest("a hires scheduler of its own (hr_scheduler) is not supported; send \"Use same scheduler\"")
    for name in ("batch_size", "n_iter"):
        if getattr(req, name) < 1:
            raise BadRequest(f"{name} must be >= 1, got {getattr(req, name)}")


def settings_of(req: Txt2ImgRequest, model: Path, overrides: dict[str, Any], img2img: bool) -> Settings:
    """The job's settings: A1111's defaults < the model's recommended settings < the settings of
    the request's ``infotext`` (a parameters text, as A1111 applies it) < the request's fields."""
    _refuse_unsupported(req)
    given = req.model_fields_set
    values: dict[str, Any] = dict(A1111_DEFAULTS)
    values |= {k: v for k, v in recommended_settings(model).items() if k in ("steps", "sampler", "cfg_scale",
                                                                             "spacing")}
    restored: dict[str, Any] = {}
    if req.infotext:
        try:
            restored = settings_from_parameters(parse_parameters(req.infotext), "infotext")
        except ValueError as err:
            raise BadRequest(str(err)) from None
        if not img2img and not restored.get("hires"):
            restored.pop("strength", None)
        values |= {k: v for k, v in restored.items() if k not in ("prompt", "negative_prompt", "seed", "strength")}
    sampler = req.sampler_name or (req.sampler_index if "sampler_index" in given else None)
    if sampler:
        values["sampler"] = sampler
    if req.scheduler:
        try:
            values["spacing"] = spacing_of(req.scheduler)
        except ValueError as err:
            raise BadRequest(str(err).replace(" (or pass --spacing)", "")) from None
    for name in ("steps", "cfg_scale", "width", "height"):
        if getattr(req, name) is not None:
            values[name] = getattr(req, name)
    merging = overrides.get("token_merging_ratio_img2img" if img2img else "token_merging_ratio")
    if merging is not None:
        if isinstance(merging, bool) or not isinstance(merging, (int, float)) or not 0 <= merging < 1:
            raise BadRequest(f"token_merging_ratio must be a number in [0, 1), got {merging!r}")
        values["token_merging"] = float(merging)
    clip_skip = overrides.get("CLIP_stop_at_last_layers")
    if clip_skip is not None and not isinstance(clip_skip, int):
        raise BadRequest(f"CLIP_stop_at_last_layers must be an integer, got {clip_skip!r}")
    strength = req.denoising_strength if img2img or req.enable_hr else None
    if "denoising_strength" not in given and "strength" in restored:
        strength = restored["strength"]
    if img2img and strength is None:
        strength = 0.75
    if req.enable_hr and not img2img:
        values |= dict(hires=True, hr_scale=req.hr_scale, hr_upscaler=req.hr_upscaler or "Latent",
                       hr_steps=req.hr_second_pass_steps, hr_resize_x=req.hr_resize_x, hr_resize_y=req.hr_resize_y,
                       hr_sampler=None if req.hr_sampler_name in (None, "Use same sampler") else req.hr_sampler_name,
                       hr_prompt=req.hr_prompt or None, hr_negative_prompt=req.hr_negative_prompt or None)
    text = {name: getattr(req, name) if name in given or name not in restored else restored[name]
            for name in ("prompt", "negative_prompt", "seed")}
    if clip_skip is None or (clip_skip == 1 and "clip_skip" in restored):
        clip_skip = restored.get("clip_skip", clip_skip)
    fields = Settings.__dataclass_fields__
    return Settings(**{k: v for k, v in values.items() if k in fields and k not in ("clip_skip",)}, **text,
                    clip_skip=clip_skip if clip_skip and clip_skip > 1 else None, strength=strength)


INPAINTING_FILL = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3


def init_and_mask(req: Img2ImgRequest) -> tuple[Image.Image, Image.Image | None]:
    """The init image and the mask as A1111 reads them: white (or, in an RGBA mask with
    transparency, opaque) = repaint; ``inpainting_mask_invert`` swaps them. (Blur, masked content and only-masked are
    settings of the job: ``inpainting_settings``.)"""
    if not req.init_images:
        raise BadRequest("img2img needs init_images: a list with one base64 image")
    init = decode_image(req.init_images[0], "init_images[0]").convert("RGB")
    if req.mask is None:
        return init, None
    raw = decode_image(req.mask, "mask")
    transparent = raw.mode in ("RGBA", "LA") and raw.getchannel("A").getextrema() != (255, 255)
    mask = raw.getchannel("A") if transparent else raw.convert("L")  # an opaque RGBA mask is read by its grey
    if req.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if mask.size != init.size:
        mask = mask.resize(init.size, Image.LANCZOS)
    return init, mask


def inpainting_settings(req: Img2ImgRequest) -> dict[str, Any]:
    """The job settings of A1111's inpainting fields."""
    if req.inpainting_fill not in range(4):
        raise BadRequest(f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), "
                         f"got {req.inpainting_fill}")
    blur = req.mask_blur
    if blur is None:
        if req.mask_blur_x != req.mask_blur_y:
            raise BadRequest(f"mask_blur_x {req.mask_blur_x} and mask_blur_y {req.mask_blur_y} differ; unfog blurs "
                             "both axes alike: send mask_blur")
        blur = req.mask_blur_x
    if blur < 0 or req.inpaint_full_res_padding < 0:
        raise BadRequest("mask_blur and inpaint_full_res_padding must be >= 0")
    return dict(masked_content=INPAINTING_FILL[req.inpainting_fill], mask_blur=blur,
                only_masked=bool(req.inpaint_full_res), mask_padding=req.inpaint_full_res_padding)


def resize_init(init: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's img2img ``resize_mode``: 0 just resize, 1 crop and resize, 2 resize and fill (the
    borders stretched from the image's edges), 3 just resize (latent upscale)."""
    if mode not in (0, 1, 2, 3):
        raise BadRequest(f"resize_mode must be 0 (just resize), 1 (crop and resize), 2 (resize and fill) or 3 "
                         f"(just resize, latent upscale), got {mode}")
    if init.size == (width, height):
        return init
    if mode in (0, 3):
        return init.resize((width, height), Image.LANCZOS)
    if mode == 1:
        return ImageOps.fit(init, (width, height), Image.LANCZOS)
    scale = min(width / init.width, height / init.height)  # fit inside, then fill the rest
    inner = init.resize((max(1, round(init.width * scale)), max(1, round(init.height * scale))), Image.LANCZOS)
    out = init.resize((width, height), Image.LANCZOS).filter(ImageFilter.GaussianBlur(max(width, height) / 16))
    out.paste(inner, ((width - inner.width) // 2, (height - inner.height) // 2))
    return out


def info_json(req: Txt2ImgRequest, job: Job, drawn: list[Drawn], model_name: str, model_hash: str | None,
              vae: str | None, started: float) -> str:
    """The response's ``info``: A1111's ``Processed.js()`` keys."""
    s = job.settings
    seeds = [d.seed for d in drawn]
    first = seeds[0] if seeds else s.seed
    n = len(drawn)
    return json.dumps({
        "prompt": s.prompt, "all_prompts": [s.prompt] * n, "negative_prompt": s.negative_prompt,
        "all_negative_prompts": [s.negative_prompt] * n, "seed": first, "all_seeds": seeds,
        "subseed": -1 if req.subseed == -1 else req.subseed, "all_subseeds": [req.subseed] * n,
        "subseed_strength": req.subseed_strength, "width": s.width, "height": s.height,
        "sampler_name": s.sampler, "cfg_scale": s.cfg_scale, "steps": s.steps, "batch_size": req.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model_name,
        "sd_model_hash": model_hash, "sd_vae_name": vae, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": s.strength,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": [d.parameters for d in drawn],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "clip_skip": s.clip_skip or 1, "is_using_inpainting_conditioning": False, "version": "unfog",
    })


def request_echo(req: Txt2ImgRequest) -> dict:
    """The response's ``parameters``: the request as A1111 echoes it (without its images)."""
    echo = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        echo["init_images"], echo["mask"] = None, None
    return echo



# sd-webui-controlnet's unit fields: resize_mode and control_mode as names or numbers
_RESIZE = {"just resize": "just_resize", "crop and resize": "crop_and_resize", "resize and fill": "resize_and_fill",
           "inner fit (scale to fit)": "crop_and_resize", "outer fit (shrink to fit)": "resize_and_fill",
           "0": "just_resize", "1": "crop_and_resize", "2": "resize_and_fill"}
_CONTROL = {"balanced": "balanced", "my prompt is more important": "prompt",
            "controlnet is more important": "controlnet", "0": "balanced", "1": "prompt", "2": "controlnet"}


def control_units(req: Txt2ImgRequest) -> tuple:
    """The ControlNet units of ``alwayson_scripts`` (sd-webui-controlnet's API: ``{"controlnet":
    {"args": [unit, ...]}}``), enabled ones with a model, as ``ControlSpec``s; canny's
    ``threshold_a`` / ``threshold_b`` are its low / high thresholds, as in the extension."""
    from ..pipelines.control_units import ControlSpec
    from ..pipelines.preprocess import A1111_NAMES

    script = next((v for k, v in req.alwayson_scripts.items() if k.lower() == "controlnet"), None)
    if script is None:
        return ()
    args = script.get("args") if isinstance(script, dict) else script
    if not isinstance(args, list):
        raise BadRequest("alwayson_scripts.controlnet.args must be a list of ControlNet units")
    specs = []
    for i, unit in enumerate(args):
        where = f"ControlNet unit {i}"
        if not isinstance(unit, dict):
            raise BadRequest(f"{where}: expected an object, got {unit!r}")
        model = str(unit.get("model") or "None")
        if not unit.get("enabled", True) or model == "None":
            continue
        image = unit.get("image") or unit.get("input_image")
        if isinstance(image, dict):  # newer clients: {"image": b64, "mask": b64}
            image = image.get("image")
        if not image:
            raise BadRequest(f"{where}: give its hint as image (base64)")
        resize = _RESIZE.get(str(unit.get("resize_mode", "Crop and Resize")).strip().lower())
        control = _CONTROL.get(str(unit.get("control_mode", "Balanced")).strip().lower())
        if resize is None or control is None:
            raise BadRequest(f"{where}: resize_mode must be Just Resize, Crop and Resize or Resize and Fill (0-2) and "
                             "control_mode Balanced, My prompt is more important or ControlNet is more important "
                             f"(0-2); got {unit.get('resize_mode')!r}, {unit.get('control_mode')!r}")
        module = str(unit.get("module") or "none")
        options = ()
        if A1111_NAMES.get(module, module) == "canny":
            options = (("low", float(unit.get("threshold_a", 100))), ("high", float(unit.get("threshold_b", 200))))
        hint = decode_image(image, f"{where} image")
        try:
            specs.append(ControlSpec(model.rsplit(" [", 1)[0].strip(), hint,
                                     float(unit.get("weight", 1.0)), float(unit.get("guidance_start", 0.0)),
                                     float(unit.get("guidance_end", 1.0)), resize, control, module, options))
        except (TypeError, ValueError) as err:
            raise BadRequest(f"{where}: {err}") from None
    return tuple(specs)


__all__ = ["A1111_DEFAULTS", "BadRequest", "Img2ImgRequest", "Txt2ImgRequest", "control_units", "decode_image",
           "encode_png", "info_json", "init_and_mask", "inpainting_settings", "request_echo", "resize_init",
           "settings_of"]
