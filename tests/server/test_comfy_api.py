"""The ComfyUI subset of ``unfog serve``, replaying Open WebUI's call sequence (object_info ->
websocket -> prompt -> "executing" with node null -> history -> view) on the embedded model, and
ComfyUI's refusals of graphs it cannot run."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import requests
from PIL import Image

import websockets.sync.client as websockets

from test_a1111_api import Running  # noqa: E402

from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path, main  # noqa: E402
from unfog.server.app import ServerConfig  # noqa: E402
from unfog.server.library import Library  # noqa: E402


def graph(seed=5, steps=4, **ksampler) -> dict:
    """The txt2img graph Open WebUI sends (its default workflow's nodes and links)."""
    return {
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 2.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                    "positive": ["6", 0], "negative": ["7", 0],
                                                    "latent_image": ["5", 0], **ksampler}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "shapes.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle above a green square", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "webui", "images": ["8", 0]}},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    running = Running(ServerConfig(Library(default_model_path(DEFAULT_TEXT_MODEL)), outdir=out))
    running.out = out
    yield running
    running.stop()


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_open_webui_sequence(server, prefix, tmp_path):
    base = server.url + prefix
    info = requests.get(f"{base}/object_info").json()
    assert "shapes.safetensors" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert {"KSampler", "UNETLoader", "VAELoader"} <= set(info)
    ws_url = server.url.replace("http", "ws") + prefix + "/ws?clientId=open-webui"
    with websockets.connect(ws_url) as ws:
        first = json.loads(ws.recv())
        assert first["type"] == "status" and first["data"]["sid"] == "open-webui"
        r = requests.post(f"{base}/prompt", json={"prompt": graph(), "client_id": "open-webui"})
        assert r.status_code == 200, r.text
        prompt_id = r.json()["prompt_id"]
        seen, deadline = [], time.time() + 120
        while time.time() < deadline:
            message = json.loads(ws.recv(timeout=60))
            seen.append(message["type"])
            data = message["data"]
            if message["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
                break
    assert "execution_start" in seen and "progress" in seen and "executed" in seen
    history = requests.get(f"{base}/history/{prompt_id}").json()[prompt_id]
    assert history["status"]["completed"]
    images = history["outputs"]["9"]["images"]
    assert len(images) == 2 and images[0]["filename"].startswith("webui_")
    png = requests.get(f"{base}/view", params=images[1])
    assert png.status_code == 200
    got = Image.open(io.BytesIO(png.content))
    assert "Seed: 6," in got.info["parameters"] and "Schedule type: linspace" in got.info["parameters"]
    # the same job through the CLI draws the same pixels (image 2 of the batch: seed 6)
    assert main(["generate", "a red circle above a green square", "--seed", "6", "--steps", "4", "--sampler", "euler",
                 "--spacing", "linspace", "--cfg-scale", "2", "--output", str(tmp_path / "cli.png")]) == 0
    assert np.array_equal(np.asarray(got), np.asarray(Image.open(tmp_path / "cli.png")))
    assert prompt_id in requests.get(f"{base}/history").json()
    assert requests.get(f"{base}/queue").json() == {"queue_running": [], "queue_pending": []}
    assert requests.get(f"{base}/system_stats").json()["system"]["comfyui_version"] == "unfog"


def test_img2img_graph_from_the_input_folder(server):
    (server.out / "comfy-input").mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (40, 75, 225)).save(server.out / "comfy-input" / "blue.png")
    g = graph(denoise=0.5, steps=6)
    g["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "blue.png"}}
    prompt_id = requests.post(server.url + "/prompt", json={"prompt": g}).json()["prompt_id"]
    for _ in range(600):
        history = requests.get(f"{server.url}/history/{prompt_id}").json()
        if history:
            break
        time.sleep(0.1)
    (image,) = history[prompt_id]["outputs"]["9"]["images"]
    text = Image.open(io.BytesIO(requests.get(server.url + "/view", params=image).content)).info["parameters"]
    assert "Denoising strength: 0.5" in text


@pytest.mark.parametrize("change, status, words", [
    (lambda g: g.update({"11": {"class_type": "LoraLoader", "inputs": {}}}), 400, "node LoraLoader does not exist"),
    (lambda g: g["4"]["inputs"].update(ckpt_name="../../etc/passwd"), 400, "not in the server's folders"),
    (lambda g: g["3"]["inputs"].update(scheduler="beta"), 400, "valid choices: normal"),
    (lambda g: g.pop("9"), 400, "Prompt has no outputs"),
    (lambda g: g.update({"5": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
                         "10": {"class_type": "LoadImage", "inputs": {"image": "../secret.png"}}}), 400,
     "not in the server's input folder"),
])
def test_graphs_unfog_cannot_run_get_comfyuis_400(server, change, status, words):
    g = graph()
    change(g)
    r = requests.post(server.url + "/prompt", json={"prompt": g})
    assert r.status_code == status and words in r.json()["error"]["message"], r.text


def test_view_refuses_paths(server):
    for params in ({"filename": "../../etc/passwd"}, {"filename": "x.png", "subfolder": ".."},
                   {"filename": "a/b.png"}):
        assert requests.get(server.url + "/view", params=params).status_code == 400
    assert requests.get(server.url + "/view", params={"filename": "missing.png"}).status_code == 404


def test_auth_covers_comfy_routes_the_websocket_and_the_page():
    import base64

    running = Running(ServerConfig(Library(default_model_path(DEFAULT_TEXT_MODEL)), auth=(("ann", "pw"),)))
    try:
        for path in ("/", "/object_info", "/api/queue", "/sdapi/v1/progress"):
            assert requests.get(running.url + path).status_code == 401
            assert requests.get(running.url + path, auth=("ann", "pw")).status_code == 200
        url = running.url.replace("http", "ws") + "/ws?clientId=x"
        with pytest.raises(Exception, match="401"):
            websockets.connect(url).close()
        token = base64.b64encode(b"ann:pw").decode()
        with websockets.connect(url, additional_headers={"Authorization": f"Basic {token}"}) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "status"
    finally:
        running.stop()
