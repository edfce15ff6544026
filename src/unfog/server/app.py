"""``unfog serve``: AUTOMATIC1111's HTTP API (``/sdapi/v1/…``) over ``unfog.jobs``.

The routes are thin: each reads its request, asks the job layer or the ``Library``, and shapes the
answer as A1111 does. Generation runs on the ``Worker``'s thread, one job at a time, so progress,
interrupt and the lists answer while a job runs.
"""

from __future__ import annotations

import asyncio
import os
import resource
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..checkpoint.io import read_metadata
from ..diffusion.registry import resolve_sampler, valid_names
from ..jobs import Job, ModelCache
from ..pipelines.hires import IMAGE_UPSCALERS, LATENT_UPSCALERS, target_size
from ..pipelines.outputs import A1111_SAMPLERS, SCHEDULE_TYPES, OutputTarget, Settings, parse_parameters
from .a1111 import (BadRequest, Img2ImgRequest, Txt2ImgRequest, control_units, decode_image, encode_png, info_json,
                    init_and_mask, inpainting_settings, request_echo, resize_init, settings_of)
from .library import Library, NotFound
from .worker import Worker


@dataclass(frozen=True)
class Limits:
    """The largest request the server takes (``--max-size``, ``--max-steps``, ``--max-batch``)."""

    max_size: int = 2048  # pixels, each side
    max_steps: int = 150
    max_batch: int = 16  # images per request: batch_size x n_iter


@dataclass(frozen=True)
class ServerConfig:
    library: Library
    dtype: str = "auto"
    device: str | None = None
    compile: str = "off"  # torch.compile of the U-Net and VAE decoder (pipelines.compiled)
    limits: Limits = Limits()
    auth: tuple[tuple[str, str], ...] = ()  # (user, password) pairs; empty: no authentication
    cors_origins: tuple[str, ...] = ()
    cors_origin_regex: str | None = None
    outdir: Path = Path("outputs")  # where save_images writes; no route writes anywhere else
    preview_every: int = 5
    flags: dict[str, Any] = field(default_factory=dict)  # the command line, for /cmd-flags

    @property
    def loading(self) -> dict[str, Any]:
        """How every job loads its models (``Job``'s dtype, device and compile)."""
        return dict(dtype=self.dtype, device=self.device, compile=self.compile)


class PngInfoRequest(BaseModel):
    image: str


def _error(status: int, err: Exception) -> JSONResponse:
    """A1111's error body (``modules/api/api.py``: ``handle_exception``)."""
    return JSONResponse(status_code=status, content={"error": type(err).__name__, "detail": "", "body": "",
                                                     "errors": str(err)})


def create_app(config: ServerConfig) -> FastAPI:
    """The app; its worker thread starts now and stops with the app (``app.state.worker``)."""
    lib = config.library
    cache = ModelCache(size=2)
    worker = Worker(cache, config.preview_every)
    options: dict[str, Any] = {
        "sd_model_checkpoint": lib.default.name, "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
        "show_progress_every_n_steps": config.preview_every, "samples_format": "png",
        "outdir_samples": str(config.outdir), "live_previews_enable": config.preview_every > 0,
    }
    current = {"model": lib.find_model(lib.default.name, cache)}

    dependencies = [Depends(_auth(config.auth))] if config.auth else []

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()

    app = FastAPI(title="unfog", docs_url="/docs", dependencies=dependencies, lifespan=lifespan)
    app.state.worker, app.state.cache = worker, cache
    if config.cors_origins or config.cors_origin_regex:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_origin_regex=config.cors_origin_regex, allow_methods=["*"], allow_headers=["*"],
                           allow_credentials=True)

    _add_error_handlers(app)
    _add_generation_routes(app, config, lib, cache, worker, options, current)
    _add_model_routes(app, config, lib, cache, worker, options, current)
    _add_list_routes(app, lib)
    _add_network_routes(app, lib, cache)
    _add_info_routes(app, config)
    from .comfy import add_comfy_routes

    add_comfy_routes(app, lib, cache, worker, config.outdir, config.loading)

    _add_page_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Errors in A1111's body: 422 for bad requests and values, 404 for unknown names, else 500."""
    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError):
        text = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return _error(422, ValueError(f"invalid request: {text}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        body = {"error": "HTTPException", "detail": err.detail, "body": "", "errors": str(err.detail)}
        return JSONResponse(status_code=err.status_code, content=body, headers=getattr(err, "headers", None))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, err: NotFound):
        return _error(404, err)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, err: ValueError):
        return _error(422, err)

    @app.exception_handler(FileNotFoundError)
    async def missing_file(request: Request, err: FileNotFoundError):
        return _error(404, err)

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception):
        return _error(500, err)


def check_limits(settings: Settings, count: int, limits: Limits) -> None:
    """A request over the server's limits (images, steps, sizes, hires size) is a 400 naming the
    limit and its flag; an unknown sampler a 422, before anything is queued."""
    if count > limits.max_batch:
        raise BadRequest(f"batch_size x n_iter = {count} images; this server takes at most {limits.max_batch} "
                         "(--max-batch)")
    if settings.steps > limits.max_steps or settings.steps < 1:
        raise BadRequest(f"steps must be in 1..{limits.max_steps} (--max-steps), got {settings.steps}")
    for name in ("width", "height"):
        value = getattr(settings, name)
        if value is not None and not 8 <= value <= limits.max_size:
            raise BadRequest(f"{name} must be in 8..{limits.max_size} (--max-size), got {value}")
    resolve_sampler(settings.sampler)
    hires = settings.hires_pass()
    if hires is not None:
        size = target_size(settings.width or 512, settings.height or 512, hires, 1)
        if max(size) > limits.max_size:
            raise BadRequest(f"the hires size {size[0]}x{size[1]} is over this server's {limits.max_size} "
                             "(--max-size)")


def img2img_inputs(req: Img2ImgRequest, settings: Settings):
    """(settings, init image, mask or None) of an img2img request: the init image (and mask) at the
    request's size as its resize mode fits them, or, inpainting only the masked area, the whole
    image with the area's settings."""
    init, mask = init_and_mask(req)
    width, height = settings.width or init.width, settings.height or init.height
    if mask is not None and req.inpaint_full_res:  # only masked: the whole image stays, a region is drawn
        settings = replace(settings, **inpainting_settings(req))
    else:
        init = resize_init(init, req.resize_mode, width, height)
        mask = None if mask is None else mask.resize((width, height), Image.LANCZOS)
        if mask is not None:
            settings = replace(settings, **inpainting_settings(req))
    return replace(settings, width=width, height=height), init, mask


def _add_generation_routes(app: FastAPI, config: ServerConfig, lib: Library, cache: ModelCache, worker: Worker,
                           options: dict, current: dict) -> None:
    """txt2img, img2img, and the queue's progress, interrupt and skip."""
    def job_for(req: Txt2ImgRequest, img2img: bool) -> Job:
        overrides = dict(req.override_settings or {})
        model = current["model"]
        if overrides.get("sd_model_checkpoint"):
            model = lib.find_model(overrides["sd_model_checkpoint"], cache)
        vae = lib.find_vae(overrides.get("sd_vae", options["sd_vae"]))
        overrides.setdefault("CLIP_stop_at_last_layers", options["CLIP_stop_at_last_layers"])
        settings = settings_of(req, model.path, overrides, img2img)
        count = req.batch_size * req.n_iter
        check_limits(settings, count, config.limits)
        init = mask = None
        mode = "txt2img"
        if img2img:
            settings, init, mask = img2img_inputs(req, settings)
            mode = "inpaint" if mask is not None else "img2img"
        controls = control_units(req)
        if controls and not lib.controlnet_dirs:
            raise BadRequest("this server has no ControlNet models: start it with --controlnet-dir")
        return Job(mode, settings, model.path, init=init, mask=mask, **config.loading, batch_size=count, lora_dirs=lib.lora_dirs, embedding_dirs=lib.embedding_dirs,
                   hypernetwork_dirs=lib.hypernetwork_dirs, controls=controls,
                   controlnet_dirs=lib.controlnet_dirs, vae=None if vae is None else vae.path)

    async def generate(req: Txt2ImgRequest, img2img: bool) -> dict:
        job = job_for(req, img2img)
        started = time.time()
        task = worker.submit(job)
        drawn = await asyncio.wrap_future(task.future)
        model_id = cache.model_id(job.model)
        if req.save_images:
            target = OutputTarget.parse(config.outdir / ("img2img-images" if img2img else "txt2img-images"), 2)
            for d in drawn:
                target.save(d.image, d.seed, d.parameters)
        vae = None if job.vae is None else Path(job.vae).name
        return {"images": [encode_png(d.image, d.parameters) for d in drawn] if req.send_images else [],
                "parameters": request_echo(req),
                "info": info_json(req, job, drawn, model_id.name, model_id.hash, vae, started)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest):
        return await generate(req, img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest):
        return await generate(req, img2img=True)

    # ------------------------------------------------------------ progress and control

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        with worker.lock:
            s = replace(worker.state)
        done, eta = s.progress()
        state = {"skipped": s.skipped, "interrupted": s.interrupted, "stopping_generation": False, "job": s.job,
                 "job_count": s.job_count, "job_timestamp": s.timestamp, "job_no": s.job_no,
                 "sampling_step": s.sampling_step, "sampling_steps": s.sampling_steps}
        return {"progress": done, "eta_relative": eta, "state": state,
                "current_image": None if skip_current_image else s.current_image, "textinfo": s.textinfo}

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        worker.skip()
        return {}


def _add_model_routes(app: FastAPI, config: ServerConfig, lib: Library, cache: ModelCache, worker: Worker,
                      options: dict, current: dict) -> None:
    """Options (switching the model through the queue), models and the refresh routes."""
    @app.get("/sdapi/v1/options")
    def get_options():
        return dict(options)

    @app.post("/sdapi/v1/options")
    async def set_options(values: dict[str, Any]):
        if "sd_model_checkpoint" in values:
            entry = lib.find_model(values["sd_model_checkpoint"], cache)
            probe = Job("txt2img", settings_of(Txt2ImgRequest(), entry.path, {}, False), entry.path, **config.loading)
            await asyncio.wrap_future(worker.run_now(lambda: (cache.pipelines(probe), cache.model_id(entry.path))))
            current["model"] = entry
            options["sd_model_checkpoint"] = lib.title(entry, cache)
        if "sd_vae" in values:
            lib.find_vae(values["sd_vae"])  # a VAE not in --vae-dir is a 404
            options["sd_vae"] = values["sd_vae"]
        if "CLIP_stop_at_last_layers" in values:
            skip_layers = values["CLIP_stop_at_last_layers"]
            if not isinstance(skip_layers, int) or skip_layers < 1:
                raise BadRequest(f"CLIP_stop_at_last_layers must be an integer >= 1, got {skip_layers!r}")
            options["CLIP_stop_at_last_layers"] = skip_layers
        return None

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        out = []
        for e in lib.models():
            known = cache.known_id(e.path)
            out.append({"title": lib.title(e, cache), "model_name": Path(e.name).with_suffix("").as_posix(),
                        "hash": known.hash if known else None, "sha256": None, "filename": str(e.path),
                        "config": None})
        return out

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        return None  # the folders are read on every request

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        return None

    @app.post("/sdapi/v1/refresh-vae")
    def refresh_vae():
        return None


def _add_list_routes(app: FastAPI, lib: Library) -> None:
    """The lists clients read (VAEs, samplers, schedulers, upscalers; empty for what unfog lacks)."""
    @app.get("/sdapi/v1/sd-vae")
    def sd_vae():
        return [{"model_name": e.name, "filename": str(e.path)} for e in lib.vaes()]

    @app.get("/sdapi/v1/samplers")
    def samplers():
        out, seen = [], set()
        for name in (*A1111_SAMPLERS, *valid_names()):
            choice = resolve_sampler(name)
            key = (choice.name, tuple(sorted(choice.options.items())))
            if key in seen:
                continue
            seen.add(key)
            aliases = [n for n in valid_names() if n != name and _same(resolve_sampler(n), choice)]
            out.append({"name": name, "aliases": aliases, "options": {}})
        return out

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        from ..diffusion import SPACINGS

        rows = [("automatic", "Automatic")] + [(k, v) for k, v in SCHEDULE_TYPES.items()]
        rows += [(s, s) for s in SPACINGS if s not in SCHEDULE_TYPES]
        return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name, label in rows]

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": None}
                for name in IMAGE_UPSCALERS]

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():
        return [{"name": name} for name in LATENT_UPSCALERS]

    for path in ("prompt-styles", "face-restorers", "realesrgan-models"):
        app.get(f"/sdapi/v1/{path}")(lambda: [])  # things unfog does not have: empty lists, as the issue asks


def _add_network_routes(app: FastAPI, lib: Library, cache: ModelCache) -> None:
    """The extra networks of the library: LoRAs, hypernetworks, embeddings, and sd-webui-controlnet's
    own routes, which its clients read before sending units."""
    @app.get("/sdapi/v1/loras")
    def loras():
        return [{"name": e.stem, "alias": e.stem, "path": str(e.path), "metadata": read_metadata(e.path) or {}}
                for e in lib.loras()]

    @app.get("/sdapi/v1/hypernetworks")
    def hypernetworks():
        return [{"name": e.stem, "path": str(e.path)} for e in lib.hypernetworks()]

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        from ..checkpoint.embeddings import read_embedding

        pipe = cache.last
        widths = None if pipe is None else tuple(
            getattr(pipe, n).config.width for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n) is not None)
        loaded, skipped = {}, {}
        for e in lib.embeddings():
            try:
                emb = read_embedding(e.path)
            except ValueError:
                continue  # not an embedding file: A1111 leaves it out too
            item = {"step": emb.step, "sd_checkpoint": emb.checkpoint, "sd_checkpoint_name": emb.checkpoint_name,
                    "shape": int(emb.vectors[0].shape[1]), "vectors": int(emb.vectors[0].shape[0])}
            fits = widths is None or emb.for_widths(widths) is not None
            (loaded if fits else skipped)[emb.name] = item
        return {"loaded": loaded, "skipped": skipped}

    @app.get("/controlnet/version")
    def controlnet_version():
        return {"version": 2}

    @app.get("/controlnet/model_list")
    def controlnet_models():
        from ..pipelines.control_units import model_title

        return {"model_list": [model_title(e.path) for e in lib.controlnets()]}

    @app.get("/controlnet/module_list")
    def controlnet_modules():
        from ..pipelines.preprocess import A1111_NAMES

        return {"module_list": ["none", *sorted(A1111_NAMES)]}


def _add_info_routes(app: FastAPI, config: ServerConfig) -> None:
    """What the server runs with (flags, memory, scripts) and what a PNG carries (png-info)."""
    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags():
        limits = config.limits
        return {"max_size": limits.max_size, "max_steps": limits.max_steps, "max_batch": limits.max_batch,
                **config.flags}

    @app.get("/sdapi/v1/memory")
    def memory():
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
        used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"ram": {"free": free, "used": used, "total": total}, "cuda": {"error": "no CUDA device in use"}}

    @app.post("/sdapi/v1/png-info")
    def png_info(req: PngInfoRequest):
        image = decode_image(req.image, "image")
        items = dict(getattr(image, "text", {}) or image.info)
        text = items.pop("parameters", None)
        if not isinstance(text, str):
            return {"info": "", "items": {k: v for k, v in items.items() if isinstance(v, str)}, "parameters": {}}
        params: dict[str, Any] = parse_parameters(text)
        if "Size" in params and "x" in params["Size"]:
            params["Size-1"], params["Size-2"] = params["Size"].split("x", 1)
        return {"info": text, "items": {k: v for k, v in items.items() if isinstance(v, str)}, "parameters": params}


def _add_page_routes(app: FastAPI) -> None:
    """The page at / and its files (a fixed list)."""
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in STATIC_FILES:  # a fixed list: no path reaches outside the folder
            raise NotFound(f"no such file: {name}")
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])




STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


def _same(a, b) -> bool:
    return (a.name, a.options) == (b.name, b.options)


def _auth(pairs: tuple[tuple[str, str], ...]):
    security = HTTPBasic(auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(security)) -> None:
        from fastapi import HTTPException

        ok = credentials is not None and any(
            secrets.compare_digest(credentials.username.encode(), u.encode())
            and secrets.compare_digest(credentials.password.encode(), p.encode()) for u, p in pairs)
        if not ok:
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    return check


