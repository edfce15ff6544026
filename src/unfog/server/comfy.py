"""A subset of ComfyUI's HTTP API, for the clients that speak only that (Open WebUI, SillyTavern):
graphs of the core txt2img / img2img nodes become one ``unfog.jobs.Job`` on the server's queue.

Supported graphs: SaveImage <- VAEDecode <- KSampler, whose model comes from CheckpointLoaderSimple,
whose positive / negative come from CLIPTextEncode, and whose latent_image is an EmptyLatentImage
(txt2img) or a VAEEncode of a LoadImage (img2img, ``denoise`` its strength). Any other node is
refused with ComfyUI's 400 naming it. KSampler's ``scheduler`` maps to the nearest of unfog's
sigma spacings (normal: linspace, simple: trailing, ddim_uniform: leading; karras, exponential and
sgm_uniform as named): the same kind of schedule, not ComfyUI's numbers bit for bit; its seed
seeds image i with seed + i, as unfog does everywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse

from ..choices import check_choice
from ..diffusion.registry import resolve_sampler, valid_names
from ..jobs import Job, ModelCache
from ..pipelines.images import open_image, save_png
from ..pipelines.outputs import Settings
from .library import Library, NotFound
from .worker import Worker

SCHEDULERS = {"normal": "linspace", "simple": "trailing", "ddim_uniform": "leading", "karras": "karras",
              "exponential": "exponential", "sgm_uniform": "sgm_uniform"}
SAMPLERS = [n for n in valid_names() if n.islower() and " " not in n and not n.startswith("k_")]
RUNS = ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "VAEEncode",
        "SaveImage", "LoadImage")
LISTED = RUNS + ("UNETLoader", "VAELoader")  # /object_info describes these; graphs may use the first eight


class GraphError(ValueError):
    """A graph unfog cannot run; ``node`` is its id (or None), answered as ComfyUI's 400."""

    def __init__(self, message: str, node: str | None = None, kind: str = "invalid_prompt"):
        super().__init__(message)
        self.node, self.kind = node, kind


def object_info(lib: Library, cache: ModelCache) -> dict[str, Any]:
    """ComfyUI's node descriptions for the nodes unfog knows."""
    models = [e.name for e in lib.models()]
    inputs = {
        "CheckpointLoaderSimple": ({"ckpt_name": [models]}, ["MODEL", "CLIP", "VAE"], "loaders"),
        "UNETLoader": ({"unet_name": [models], "weight_dtype": [["default"]]}, ["MODEL"], "advanced/loaders"),
        "VAELoader": ({"vae_name": [[e.name for e in lib.vaes()]]}, ["VAE"], "loaders"),
        "CLIPTextEncode": ({"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}, ["CONDITIONING"],
                           "conditioning"),
        "EmptyLatentImage": ({"width": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
                              "height": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
                              "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}]}, ["LATENT"], "latent"),
        "KSampler": ({"model": ["MODEL"], "seed": ["INT", {"default": 0, "min": 0, "max": 2**64 - 1}],
                      "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
                      "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}],
                      "sampler_name": [SAMPLERS], "scheduler": [list(SCHEDULERS)],
                      "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
                      "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}]},
                     ["LATENT"], "sampling"),
        "VAEDecode": ({"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"], "latent"),
        "VAEEncode": ({"pixels": ["IMAGE"], "vae": ["VAE"]}, ["LATENT"], "latent"),
        "SaveImage": ({"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}, [], "image"),
        "LoadImage": ({"image": [[]]}, ["IMAGE", "MASK"], "image"),
    }
    return {name: {"input": {"required": req}, "input_order": {"required": list(req)}, "output": out,
                   "output_is_list": [False] * len(out), "output_name": out, "name": name, "display_name": name,
                   "description": "", "python_module": "unfog", "category": cat, "output_node": name == "SaveImage"}
            for name, (req, out, cat) in inputs.items()}


def _node(graph: dict, link, want: tuple[str, ...], what: str, node_id: str) -> tuple[str, dict]:
    """The node a link ``[id, output]`` points to; its class is to be in ``want``."""
    if not (isinstance(link, list) and len(link) == 2 and str(link[0]) in graph):
        raise GraphError(f"node {node_id}: input {what} must link to another node, got {link!r}", node_id)
    nid = str(link[0])
    kind = graph[nid].get("class_type")
    if kind not in want:
        raise GraphError(f"node {node_id}: {what} comes from {kind} (node {nid}); unfog runs it from "
                         f"{' or '.join(want)}", nid)
    return nid, graph[nid].get("inputs", {})


def _value(inputs: dict, name: str, node_id: str, kind: type, default=None):
    value = inputs.get(name, default)
    if value is None or isinstance(value, list):
        raise GraphError(f"node {node_id}: {name} must be a {kind.__name__} value, got {value!r}", node_id)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise GraphError(f"node {node_id}: {name} must be a {kind.__name__}, got {value!r}", node_id) from None


@dataclass
class Plan:
    job: Job
    save_node: str
    prefix: str
    sampler_node: str


def plan(graph: dict, lib: Library, cache: ModelCache, input_dir: Path, loading: dict[str, Any]) -> Plan:
    """The job a graph asks for (see the module docstring)."""
    if not isinstance(graph, dict) or not graph:
        raise GraphError("the prompt must be a non-empty graph: {node id: {class_type, inputs}}")
    for nid, node in graph.items():
        kind = node.get("class_type") if isinstance(node, dict) else None
        if kind not in RUNS:
            raise GraphError(f"Cannot execute because node {kind} does not exist.", str(nid))
    saves = [nid for nid, n in graph.items() if n["class_type"] == "SaveImage"]
    if len(saves) != 1:
        raise GraphError("Prompt has no outputs" if not saves else "unfog runs graphs with one SaveImage node",
                         None if not saves else saves[1], "prompt_no_outputs" if not saves else "invalid_prompt")
    save = str(saves[0])
    s_in = graph[save].get("inputs", {})
    dec_id, dec = _node(graph, s_in.get("images"), ("VAEDecode",), "images", save)
    k_id, k = _node(graph, dec.get("samples"), ("KSampler",), "samples", dec_id)
    ck_id, ck = _node(graph, k.get("model"), ("CheckpointLoaderSimple",), "model", k_id)
    vae_id, _ = _node(graph, dec.get("vae"), ("CheckpointLoaderSimple",), "vae", dec_id)
    if vae_id != ck_id:
        raise GraphError(f"node {dec_id}: decode with the KSampler's checkpoint's VAE (node {ck_id})", dec_id)
    texts = {}
    for name in ("positive", "negative"):
        t_id, t = _node(graph, k.get(name), ("CLIPTextEncode",), name, k_id)
        texts[name] = _value(t, "text", t_id, str)
    try:
        model = lib.find_model(_value(ck, "ckpt_name", ck_id, str), cache)
    except NotFound as err:
        raise GraphError(f"node {ck_id}: {err}", ck_id, "value_not_in_list") from None
    scheduler = _value(k, "scheduler", k_id, str, "normal")
    try:
        check_choice("scheduler", scheduler, SCHEDULERS)
    except ValueError as err:
        raise GraphError(f"node {k_id}: {err}", k_id, "value_not_in_list") from None
    sampler = _value(k, "sampler_name", k_id, str, "euler")
    try:
        resolve_sampler(sampler)
    except ValueError as err:
        raise GraphError(f"node {k_id}: {err}", k_id, "value_not_in_list") from None
    denoise = _value(k, "denoise", k_id, float, 1.0)
    l_id, latent = _node(graph, k.get("latent_image"), ("EmptyLatentImage", "VAEEncode"), "latent_image", k_id)
    settings = dict(prompt=texts["positive"], negative_prompt=texts["negative"],
                    steps=_value(k, "steps", k_id, int, 20),
                    sampler=sampler, spacing=SCHEDULERS[scheduler], cfg_scale=_value(k, "cfg", k_id, float, 8.0),
                    seed=_value(k, "seed", k_id, int, 0))
    init, batch = None, 1
    if graph[l_id]["class_type"] == "EmptyLatentImage":
        if denoise != 1:
            raise GraphError(f"node {k_id}: denoise {denoise} on an empty latent; unfog draws txt2img at 1", k_id)
        settings |= dict(width=_value(latent, "width", l_id, int), height=_value(latent, "height", l_id, int))
        batch = _value(latent, "batch_size", l_id, int, 1)
    else:
        li_id, load = _node(graph, latent.get("pixels"), ("LoadImage",), "pixels", l_id)
        name = _value(load, "image", li_id, str)
        path = (input_dir / name).resolve()
        if input_dir.resolve() not in path.parents or not path.is_file():
            raise GraphError(f"node {li_id}: image {name!r} is not in the server's input folder", li_id,
                             "value_not_in_list")
        init = open_image(path, "LoadImage image").convert("RGB")
        if not 0 < denoise <= 1:
            raise GraphError(f"node {k_id}: denoise must be in (0, 1], got {denoise}", k_id)
        settings["strength"] = denoise
    job = Job("txt2img" if init is None else "img2img", Settings(**settings), model.path, init=init, **loading,
              batch_size=batch)
    return Plan(job, save, _value(s_in, "filename_prefix", save, str, "ComfyUI"), k_id)


@dataclass
class ComfyState:
    """The prompts run and the messages the websocket clients are sent (the latest 1000)."""

    history: dict[str, dict] = field(default_factory=dict)
    queue: list[tuple[int, str, dict]] = field(default_factory=list)
    events: list[tuple[int, dict]] = field(default_factory=list)
    counter: int = 0
    sequence: int = 0

    def emit(self, kind: str, data: dict) -> None:
        self.sequence += 1
        self.events.append((self.sequence, {"type": kind, "data": data}))
        del self.events[:-1000]


def error_response(status: int, err: GraphError) -> JSONResponse:
    """ComfyUI's answer to a graph it cannot run: the error, and the node's own when one is named."""
    node_errors = {} if err.node is None else {err.node: {"errors": [{"type": err.kind, "message": str(err),
                                                                      "details": "", "extra_info": {}}],
                                                          "dependent_outputs": [], "class_type": None}}
    details = "" if err.node is None else f"Node ID '#{err.node}'"
    return JSONResponse(status_code=status, content={"error": {"type": err.kind, "message": str(err),
                                                                "details": details, "extra_info": {}},
                                                      "node_errors": node_errors})


def system_stats() -> dict[str, Any]:
    page = os.sysconf("SC_PAGE_SIZE")
    return {"system": {"os": os.name, "ram_total": page * os.sysconf("SC_PHYS_PAGES"),
                       "ram_free": page * os.sysconf("SC_AVPHYS_PAGES"), "comfyui_version": "unfog",
                       "python_version": sys.version, "pytorch_version": torch.__version__,
                       "embedded_python": False, "argv": ["unfog", "serve"]},
            "devices": [{"name": platform.processor() or "cpu", "type": "cpu", "index": None, "vram_total": 0,
                         "vram_free": 0, "torch_vram_total": 0, "torch_vram_free": 0}]}


class ComfyRoutes:
    """ComfyUI's routes over the server's library, model cache and worker; each route is a method."""

    def __init__(self, lib: Library, cache: ModelCache, worker: Worker, outdir: Path, loading: dict[str, Any]):
        self.lib, self.cache, self.worker, self.loading = lib, cache, worker, loading
        self.state = ComfyState()
        self.out_dir, self.input_dir = outdir / "comfy", outdir / "comfy-input"

    def register(self, app: FastAPI) -> None:
        """Every route, also under /api (as ComfyUI serves them)."""
        for prefix in ("", "/api"):
            app.post(prefix + "/prompt")(self.post_prompt)
            app.get(prefix + "/history")(self.get_history)
            app.get(prefix + "/history/{prompt_id}")(self.get_history_of)
            app.get(prefix + "/view")(self.view)
            app.get(prefix + "/object_info")(self.get_object_info)
            app.get(prefix + "/object_info/{node}")(self.get_object_info_of)
            app.get(prefix + "/queue")(self.get_queue)
            app.post(prefix + "/interrupt")(self.post_interrupt)
            app.get(prefix + "/system_stats")(system_stats)
            app.websocket(prefix + "/ws")(self.ws)

    async def post_prompt(self, request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, GraphError("the body is not JSON"))
        graph = body.get("prompt") if isinstance(body, dict) else None
        try:
            p = plan(graph, self.lib, self.cache, self.input_dir, self.loading)
        except GraphError as err:
            return error_response(400, err)
        state = self.state
        prompt_id = str(uuid.uuid4())
        state.counter += 1
        state.queue.append((state.counter, prompt_id, graph))
        state.emit("status", {"status": {"exec_info": {"queue_remaining": len(state.queue)}}})
        asyncio.get_running_loop().create_task(self.run(prompt_id, state.counter, graph, p))
        return {"prompt_id": prompt_id, "number": state.counter, "node_errors": {}}

    async def run(self, prompt_id: str, number: int, graph: dict, p: Plan) -> None:
        """One prompt on the worker, with ComfyUI's messages: start, progress, then the saved images
        (or the error) in the history."""
        state = self.state
        state.emit("execution_start", {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)})
        task = self.worker.submit(p.job)
        state.emit("executing", {"node": p.sampler_node, "display_node": p.sampler_node, "prompt_id": prompt_id})
        await self._report_progress(task, prompt_id, p.sampler_node)
        state.queue = [q for q in state.queue if q[1] != prompt_id]
        entry = [number, prompt_id, graph, {}, [p.save_node]]
        try:
            drawn = task.future.result()
        except Exception as err:  # noqa: BLE001 - reported as ComfyUI reports a failed node
            state.emit("execution_error", {"prompt_id": prompt_id, "node_id": p.sampler_node,
                                           "exception_message": str(err), "exception_type": type(err).__name__})
            state.history[prompt_id] = {"prompt": entry, "outputs": {},
                                        "status": {"status_str": "error", "completed": False,
                                                   "messages": [["execution_error", {"exception_message": str(err)}]]}}
            return
        images = [self._save(d, p.prefix) for d in drawn]
        state.emit("executed", {"node": p.save_node, "display_node": p.save_node, "output": {"images": images},
                                "prompt_id": prompt_id})
        state.emit("execution_success", {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)})
        state.emit("executing", {"node": None, "display_node": None, "prompt_id": prompt_id})
        state.emit("status", {"status": {"exec_info": {"queue_remaining": len(state.queue)}}})
        state.history[prompt_id] = {"prompt": entry, "outputs": {p.save_node: {"images": images}},
                                    "status": {"status_str": "success", "completed": True, "messages": []}}

    async def _report_progress(self, task, prompt_id: str, node: str) -> None:
        """A "progress" message at each new sampling step, until the task is done."""
        last = None
        while not task.future.done():
            with self.worker.lock:
                progress = self.worker.state
                step, total, running = progress.sampling_step, progress.sampling_steps, progress.job_images
            if running and (step, total) != last and total:
                self.state.emit("progress", {"value": step, "max": total, "prompt_id": prompt_id, "node": node})
                last = (step, total)
            await asyncio.sleep(0.05)

    def _save(self, drawn, prefix: str) -> dict[str, str]:
        """One image saved as ComfyUI's SaveImage names it (PREFIX_00001_.png, numbered on)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        n = 1 + max([int(f.stem.rsplit("_", 2)[-2]) for f in self.out_dir.glob(f"{prefix}_*_.png")
                     if f.stem.rsplit("_", 2)[-2].isdigit()] or [0])
        name = f"{prefix}_{n:05}_.png"
        save_png(drawn.image, self.out_dir / name, drawn.parameters)
        return {"filename": name, "subfolder": "", "type": "output"}

    def get_history(self, max_items: int | None = None):
        items = list(self.state.history.items())
        return dict(items[-max_items:] if max_items else items)

    def get_history_of(self, prompt_id: str):
        return {prompt_id: self.state.history[prompt_id]} if prompt_id in self.state.history else {}

    def view(self, filename: str, subfolder: str = "", type: str = "output"):
        if type != "output" or subfolder or not filename or "/" in filename or "\\" in filename or ".." in filename:
            return JSONResponse(status_code=400, content={"error": "filename must be a plain name of an output image"})
        path = self.out_dir / filename
        if not path.is_file():
            return JSONResponse(status_code=404, content={"error": f"no output image {filename!r}"})
        return FileResponse(path, media_type="image/png")

    def get_object_info(self):
        return object_info(self.lib, self.cache)

    def get_object_info_of(self, node: str):
        info = object_info(self.lib, self.cache)
        return {node: info[node]} if node in info else {}

    def get_queue(self):
        queue = [[n, pid, g, {}, []] for n, pid, g in self.state.queue]
        return {"queue_running": queue[:1], "queue_pending": queue[1:]}

    def post_interrupt(self):
        self.worker.interrupt()
        return {}

    async def ws(self, socket: WebSocket, clientId: str | None = None):  # noqa: N803 - ComfyUI's query name
        """The status message, then every message emitted from now on."""
        state = self.state
        await socket.accept()
        sid = clientId or uuid.uuid4().hex
        cursor = state.sequence
        try:
            await socket.send_text(json.dumps({"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": len(state.queue)}}, "sid": sid}}))
            while True:
                fresh = [e for seq, e in state.events if seq > cursor]
                cursor = state.sequence
                for event in fresh:
                    await socket.send_text(json.dumps(event))
                await asyncio.sleep(0.05)
        except (WebSocketDisconnect, RuntimeError):
            return


def add_comfy_routes(app: FastAPI, lib: Library, cache: ModelCache, worker: Worker, outdir: Path,
                     loading: dict[str, Any]) -> None:
    """ComfyUI's routes, each also under /api (as ComfyUI serves them)."""
    ComfyRoutes(lib, cache, worker, outdir, loading).register(app)
