"""``unfog serve`` driven by a client nobody here wrote: the ``webuiapi`` package (the Python client
of AUTOMATIC1111's API), against the embedded shapes model at 64 px and 2 steps.

The oracles: the CLI's ``unfog generate`` draws the same pixels for the same settings and seed
(the API maps A1111's fields onto the same job); A1111's own documented behaviour (seeds
seed + i over batch_size x n_iter, the PNG's parameters chunk, the init image kept outside the
mask); and the client's own parsing of every answer.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

import uvicorn
import webuiapi

from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path, main  # noqa: E402
from unfog.server.app import Limits, ServerConfig, create_app  # noqa: E402
from unfog.server.library import Library  # noqa: E402

FAST = dict(steps=2, width=64, height=64, sampler_name="Euler a")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server on 127.0.0.1 at an ephemeral port, in a thread; ``stop`` ends it."""

    def __init__(self, config: ServerConfig):
        self.port = _free_port()
        self.app = create_app(config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    (root / "models" / "sub").mkdir(parents=True)
    shutil.copyfile(default_model_path(DEFAULT_TEXT_MODEL), root / "models" / "sub" / "other.safetensors")
    (root / "loras").mkdir()
    (root / "out").mkdir()
    return {"root": root, "models": root / "models", "loras": root / "loras", "out": root / "out"}


@pytest.fixture(scope="module")
def server(folders):
    config = ServerConfig(Library(default_model_path(DEFAULT_TEXT_MODEL), [folders["models"]], [folders["loras"]]),
                          limits=Limits(max_size=256, max_steps=50, max_batch=8), outdir=folders["out"],
                          preview_every=1)
    running = Running(config)
    yield running
    running.stop()


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def cli_image(tmp_path: Path, prompt: str, seed: int, *extra) -> np.ndarray:
    out = tmp_path / f"cli-{seed}.png"
    assert main(["generate", prompt, "--seed", str(seed), "--steps", "2", "--width", "64", "--height", "64",
                 "--sampler", "Euler a", "--output", str(out), "--overwrite", *map(str, extra)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def test_txt2img_seeds_infotexts_and_pixels_match_the_cli(api, tmp_path):
    r = api.txt2img(prompt="a red circle to the left of a blue square", seed=5, batch_size=2, n_iter=2,
                    cfg_scale=2.0, **FAST)
    assert len(r.images) == 4
    assert r.info["all_seeds"] == [5, 6, 7, 8] and r.info["seed"] == 5
    assert r.info["sd_model_name"] == "shapes" and len(r.info["sd_model_hash"]) == 10
    assert r.info["width"] == 64 and r.info["steps"] == 2 and r.info["cfg_scale"] == 2.0
    for image, text, seed in zip(r.images, r.info["infotexts"], r.info["all_seeds"]):
        assert image.info["parameters"] == text  # the PNG carries its own parameters
        assert f"Seed: {seed}," in text and "Steps: 2," in text and "Sampler: Euler a," in text
        assert "Size: 64x64" in text and "CFG scale: 2," in text
    assert r.parameters["prompt"] == "a red circle to the left of a blue square"  # the request echoed
    same = cli_image(tmp_path, "a red circle to the left of a blue square", 7, "--cfg-scale", "2")
    assert np.array_equal(np.asarray(r.images[2].convert("RGB")), same)


def test_random_seed_is_reported(api):
    r = api.txt2img(prompt="a green triangle", seed=-1, **FAST)
    seed = r.info["all_seeds"][0]
    assert 0 <= seed < 2**32 and f"Seed: {seed}," in r.images[0].info["parameters"]


def test_img2img_without_and_with_a_mask(api, tmp_path):
    init = Image.new("RGB", (64, 64), (250, 250, 248))
    init.paste((40, 75, 225), (8, 8, 40, 40))
    plain = api.img2img(images=[init], prompt="a blue square", denoising_strength=0.5, seed=3, cfg_scale=2.0, **FAST)
    assert len(plain.images) == 1 and "Denoising strength: 0.5" in plain.images[0].info["parameters"]
    init.save(tmp_path / "init.png")
    assert main(["img2img", "a blue square", "--init", str(tmp_path / "init.png"), "--strength", "0.5", "--seed", "3",
                 "--steps", "2", "--sampler", "Euler a", "--cfg-scale", "2", "--output", str(tmp_path / "i2i.png")]) == 0
    assert np.array_equal(np.asarray(plain.images[0].convert("RGB")),
                          np.asarray(Image.open(tmp_path / "i2i.png").convert("RGB")))

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 32, 64, 64))
    painted = api.img2img(images=[init], mask_image=mask, inpainting_fill=1, inpaint_full_res=False, mask_blur=0,
                          prompt="a red circle", denoising_strength=1.0, seed=4, **FAST)
    out = np.asarray(painted.images[0].convert("RGB"))
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], np.asarray(init)[keep])  # outside the mask: the init image, exactly
    assert not np.array_equal(out[~keep], np.asarray(init)[~keep])
    # an RGBA mask is read by its alpha; inpainting_mask_invert swaps the regions
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (32, 32, 64, 64))
    inverted = api.img2img(images=[init], mask_image=rgba, inpainting_mask_invert=1, inpainting_fill=1,
                           inpaint_full_res=False, mask_blur=0, prompt="a red circle", seed=4, **FAST)
    out = np.asarray(inverted.images[0].convert("RGB"))
    assert np.array_equal(out[~keep], np.asarray(init)[~keep])
    opaque = Image.merge("RGBA", (*[mask] * 3, Image.new("L", (64, 64), 255)))  # a canvas export: read by its grey
    same = api.img2img(images=[init], mask_image=opaque, inpainting_fill=1, inpaint_full_res=False, mask_blur=0,
                       prompt="a red circle", denoising_strength=1.0, seed=4, **FAST)
    assert np.array_equal(np.asarray(same.images[0]), np.asarray(painted.images[0]))


def test_png_info_reads_what_txt2img_wrote(api):
    r = api.txt2img(prompt="a yellow square", seed=11, **FAST)
    info = api.png_info(r.images[0])
    text = r.images[0].info["parameters"]
    assert info.info == text
    assert info.json["parameters"]["Seed"] == "11" and info.json["parameters"]["Size-1"] == "64"


def _in_thread(fn):
    result = {}

    def target():
        try:
            result["value"] = fn()
        except Exception as err:  # noqa: BLE001
            result["error"] = err

    t = threading.Thread(target=target)
    t.start()
    return t, result


def _wait_for_step(api, at_least: int, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= at_least:
            return p
        time.sleep(0.02)
    raise AssertionError("the job never reached that step")


def test_progress_interrupt_and_skip(api):
    settings = dict(FAST, steps=40)
    t, result = _in_thread(lambda: api.txt2img(prompt="a red circle", seed=20, batch_size=3, **settings))
    p = _wait_for_step(api, 3)
    assert p["state"]["job_count"] == 1 and p["state"]["sampling_steps"] == 40
    assert 0 < p["progress"] < 1 and p["eta_relative"] >= 0
    assert p["current_image"]  # a preview of the latents
    Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).load()
    started = time.perf_counter()
    api.get_progress()
    assert time.perf_counter() - started < 0.2  # progress answers while the job runs
    api.interrupt()
    t.join(60)
    images = result["value"].images
    assert len(images) == 1  # the first image, as far as it got
    assert result["value"].info["all_seeds"] == [20]

    t, result = _in_thread(lambda: api.txt2img(prompt="a red circle", seed=30, batch_size=2, **settings))
    _wait_for_step(api, 2)
    api.skip()
    t.join(60)
    assert result["value"].info["all_seeds"] == [31]  # the first image skipped, the second drawn
    api.util_wait_for_ready(check_interval=0.1)


def test_token_merging_ratio_override_is_recorded_and_drawn_as_the_cli(api, server, tmp_path):
    r = api.txt2img(prompt="a red circle", seed=9, cfg_scale=2.0, override_settings={"token_merging_ratio": 0.5},
                    **FAST)
    assert "Token merging ratio: 0.5" in r.images[0].info["parameters"]
    same = cli_image(tmp_path, "a red circle", 9, "--cfg-scale", "2", "--token-merging", "0.5")
    assert np.array_equal(np.asarray(r.images[0].convert("RGB")), same)
    bad = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "override_settings":
                                                                {"token_merging_ratio": 1.5}})
    assert bad.status_code == 422 and "token_merging_ratio must be a number in [0, 1)" in bad.json()["errors"]


def test_options_and_models(api):
    titles = api.util_get_model_names()
    assert any(t.startswith("shapes.safetensors") for t in titles) and "sub/other.safetensors" in titles
    api.util_set_model("sub/other")
    assert api.util_get_current_model().startswith("sub/other.safetensors [")
    r = api.txt2img(prompt="a red circle", seed=1, **FAST)
    assert "Model: other," in r.images[0].info["parameters"]
    api.util_set_model("shapes.safetensors")
    assert api.util_get_current_model().startswith("shapes.safetensors")
    api.set_options({"CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    api.set_options({"CLIP_stop_at_last_layers": 1})


def test_every_list(api):
    samplers = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM"} <= set(samplers)
    assert "karras" in api.util_get_scheduler_names()
    for getter in ("get_upscalers", "get_latent_upscale_modes", "get_sd_vae", "get_loras", "get_hypernetworks",
                   "get_prompt_styles", "get_face_restorers", "get_realesrgan_models", "get_sd_models"):
        assert isinstance(getattr(api, getter)(), list), getter
    assert set(api.get_embeddings()) == {"loaded", "skipped"}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_cmd_flags()["max_steps"] == 50
    assert {"ram", "cuda"} <= set(api.get_memory())


def test_bad_requests_get_a1111_errors_and_the_server_goes_on(server, api):
    url = server.url + "/sdapi/v1"
    cases = [
        (requests.post(f"{url}/txt2img", data="{not json", headers={"Content-Type": "application/json"}), 422),
        (requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": "many"}), 422),
        (requests.post(f"{url}/txt2img", json={"prompt": "x", "width": 100000}), 422),
        (requests.post(f"{url}/txt2img", json={"prompt": "x", "steps": 1000}), 422),
        (requests.post(f"{url}/txt2img", json={"prompt": "x", "batch_size": 5, "n_iter": 2}), 422),
        (requests.post(f"{url}/txt2img", json={"prompt": "x", "sampler_name": "Nope"}), 422),
        (requests.post(f"{url}/img2img", json={"prompt": "x", "init_images": ["%%%"]}), 422),
        (requests.post(f"{url}/txt2img", json={"prompt": "x", "override_settings":
                                              {"sd_model_checkpoint": "../../etc/passwd"}}), 404),
        (requests.post(f"{url}/options", json={"sd_model_checkpoint": "../../etc/passwd"}), 404),
        (requests.post(f"{url}/png-info", json={"image": "not base64!"}), 422),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error", "detail", "body", "errors"} and body["errors"], body
    assert "Nope" in cases[5][0].json()["errors"] and "valid choices" in cases[5][0].json()["errors"]
    assert len(api.txt2img(prompt="a red circle", seed=2, **FAST).images) == 1  # still serving


def test_auth(folders):
    config = ServerConfig(Library(default_model_path(DEFAULT_TEXT_MODEL)), auth=(("ann", "pw1"), ("bo", "pw2")))
    running = Running(config)
    try:
        anonymous = requests.get(running.url + "/sdapi/v1/options")
        assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == "Basic"
        wrong = requests.get(running.url + "/sdapi/v1/options", auth=("ann", "nope"))
        assert wrong.status_code == 401
        api = webuiapi.WebUIApi(host="127.0.0.1", port=running.port, username="bo", password="pw2")
        assert api.get_options()["sd_model_checkpoint"].startswith("shapes.safetensors")
    finally:
        running.stop()


def test_save_images_writes_in_the_output_folder_only(api, folders):
    before = set(folders["root"].rglob("*.png"))
    api.txt2img(prompt="a red circle", seed=9, save_images=True, **FAST)
    written = set(folders["root"].rglob("*.png")) - before
    assert len(written) == 1 and all(folders["out"] in p.parents for p in written)
    assert "Seed: 9," in Image.open(next(iter(written))).info["parameters"]


def test_info_is_json_with_a1111_keys(server):
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 1, **FAST})
    info = json.loads(r.json()["info"])
    for key in ("all_prompts", "all_seeds", "infotexts", "sd_model_name", "sd_model_hash", "sampler_name",
                "cfg_scale", "steps", "width", "height", "job_timestamp"):
        assert key in info


def test_unfog_serve_starts_answers_and_stops(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unfog.cli", "serve", "--port", str(port), "--outdir",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while True:
            try:
                options = requests.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=1).json()
                break
            except requests.ConnectionError:
                assert proc.poll() is None, proc.communicate()
                assert time.time() < deadline, "unfog serve did not answer within 60 s"
                time.sleep(0.2)
        assert options["sd_model_checkpoint"] == "shapes.safetensors"  # the embedded model, nothing else needed
        flags = requests.get(f"http://127.0.0.1:{port}/sdapi/v1/cmd-flags").json()
        assert flags["port"] == port and "api_auth" not in flags  # credentials are never echoed
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in out


@pytest.mark.parametrize("args, message", [
    (["--api-auth", "nocolon"], "has no colon"),
    (["--models-dir", "/no/such/folder"], "--models-dir /no/such/folder: not a folder"),
    (["--model", "/no/such/model.safetensors"], "model not found"),
])
def test_serve_start_up_errors(args, message, capsys):
    assert main(["serve", "--port", str(_free_port()), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_serve_refuses_a_folder_it_cannot_read(tmp_path, monkeypatch, capsys):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real(path, mode))
    assert main(["serve", "--port", str(_free_port()), "--lora-dir", str(locked)]) == 2  # (root reads any folder)
    assert f"--lora-dir {locked}: this user cannot read the folder" in capsys.readouterr().err


def test_serve_says_when_the_port_is_taken(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_every_inpainting_fill_whole_picture_and_only_masked(api, fill):
    init = Image.fromarray(np.random.default_rng(fill).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    keep = np.ones((64, 64), bool)
    keep[14:50, 14:50] = False  # beyond the blur's reach (sigma 4 px: 10 px) the init image is kept exactly
    names = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
    for full_res in (False, True):
        r = api.img2img(images=[init], mask_image=mask, inpainting_fill=fill, inpaint_full_res=full_res,
                        inpaint_full_res_padding=8, mask_blur=4, prompt="a red circle", seed=6,
                        denoising_strength=0.8, **FAST)
        out = np.asarray(r.images[0].convert("RGB"))
        assert out.shape == (64, 64, 3)
        assert np.array_equal(out[keep], np.asarray(init)[keep])
        assert not np.array_equal(out[~keep], np.asarray(init)[~keep])
        text = r.images[0].info["parameters"]
        assert "Mask blur: 4" in text
        assert (f"Masked content: {names[fill]}" in text) == (fill != 1)
        assert ("Inpaint area: Only masked, Masked area padding: 8" in text) == full_res


def test_webuiapi_default_inpainting_works(api):
    """webuiapi sends inpainting_fill 0 and inpaint_full_res True unless told otherwise."""
    init = Image.new("RGB", (64, 64), (250, 250, 248))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 20, 44, 44))
    r = api.img2img(images=[init], mask_image=mask, prompt="a red circle", seed=2, **FAST)
    assert r.images[0].size == (64, 64) and "Inpaint area: Only masked" in r.images[0].info["parameters"]


@pytest.mark.parametrize("fields, named", [
    ({"restore_faces": True}, "face restoration"), ({"tiling": True}, "tiling"), ({"styles": ["noir"]}, "noir"),
    ({"script_name": "x/y/z plot"}, "x/y/z plot"), ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "ADetailer"),
    ({"subseed_strength": 0.3}, "variation seeds"), ({"enable_hr": True, "hr_scheduler": "Karras"}, "hr_scheduler"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "valid choices"),
    ({"enable_hr": True, "hr_scale": 8}, "hires size 512x512 is over"),
])
def test_features_unfog_lacks_are_refused_by_name(server, fields, named):
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", **FAST, **fields})
    assert r.status_code == 422 and named in r.json()["errors"], r.text


def test_hires_fix(api):
    """A1111's hires fix: the image at hr_scale x the size; its PNG records the first pass's size and
    the hires keys; webuiapi's util lists the upscalers it may name."""
    assert {"Latent", "Latent (bicubic antialiased)"} <= {m["name"] for m in api.get_latent_upscale_modes()}
    assert {"Lanczos", "Nearest"} <= {u["name"] for u in api.get_upscalers()}
    r = api.txt2img(prompt="a red circle", seed=3, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent (bicubic)",
                    hr_second_pass_steps=5, denoising_strength=0.4, **FAST)
    assert r.images[0].size == (96, 96)
    text = r.images[0].info["parameters"]
    for part in ("Size: 64x64", "Denoising strength: 0.4", "Hires upscale: 1.5", "Hires steps: 5",
                 "Hires upscaler: Latent (bicubic)"):
        assert part in text
    r = api.txt2img(prompt="a red circle", seed=3, enable_hr=True, hr_resize_x=128, hr_upscaler="Lanczos",
                    hr_second_pass_steps=4, denoising_strength=0.5, **FAST)
    assert r.images[0].size == (128, 128) and "Hires resize: 128x0" in r.images[0].info["parameters"]


def test_fifty_requests_from_ten_clients_and_a_client_that_leaves(server):
    """Bounded load on this machine: every request completes with its own seeds, none lost;
    /progress stays fast while the queue is full; a client that disconnects mid-job stops
    nothing (its job still runs and the next requests are served)."""
    from concurrent.futures import ThreadPoolExecutor

    url = server.url + "/sdapi/v1"
    leaver = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"prompt": "a red circle", "seed": 900, "batch_size": 2, **FAST, "steps": 30}).encode()
    leaver.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    time.sleep(0.3)
    leaver.close()  # gone before its answer

    def client(c: int) -> list[bool]:
        with requests.Session() as s:
            return [s.post(f"{url}/txt2img", json={"prompt": "a blue square", "seed": 100 * c + k, **FAST}).json()
                    ["info"].count(f'"all_seeds": [{100 * c + k}]') == 1 for k in range(5)]

    slow = []

    def poll(stop: threading.Event) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            requests.get(f"{url}/progress", timeout=5)
            slow.append(time.perf_counter() - t0)
            time.sleep(0.02)

    stop = threading.Event()
    poller = threading.Thread(target=poll, args=(stop,))
    poller.start()
    with ThreadPoolExecutor(10) as pool:
        results = [ok for oks in pool.map(client, range(10)) for ok in oks]
    stop.set()
    poller.join()
    assert len(results) == 50 and all(results)
    assert len(slow) > 10 and max(slow) < 0.2
    assert requests.get(f"{url}/progress").json()["state"]["job_count"] == 0


def test_infotext_redraws_an_image_and_fields_given_win(server, api):
    first = api.txt2img(prompt="a purple square below a red circle", negative_prompt="green", seed=41, steps=3,
                        cfg_scale=3.0, width=64, height=64, sampler_name="DPM++ 2M", scheduler="Karras")
    text = first.images[0].info["parameters"]
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={"infotext": text})
    again = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert again.info["parameters"] == text
    assert np.array_equal(np.asarray(again), np.asarray(first.images[0]))
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={"infotext": text, "seed": 42})
    assert json.loads(r.json()["info"])["all_seeds"] == [42]
    bad = requests.post(server.url + "/sdapi/v1/txt2img",
                        json={"infotext": "x\nSteps: many, Sampler: Euler, Size: 64x64"})
    assert bad.status_code == 422 and "Steps: many" in bad.json()["errors"]


def test_send_images_false_and_cors(folders):
    config = ServerConfig(Library(default_model_path(DEFAULT_TEXT_MODEL)), cors_origins=("https://ok.example",))
    running = Running(config)
    try:
        r = requests.post(running.url + "/sdapi/v1/txt2img", json={"prompt": "x", "send_images": False, **FAST})
        assert r.json()["images"] == [] and json.loads(r.json()["info"])["all_seeds"]
        pre = {"Origin": "https://ok.example", "Access-Control-Request-Method": "POST"}
        ok = requests.options(running.url + "/sdapi/v1/txt2img", headers=pre)
        assert ok.headers.get("access-control-allow-origin") == "https://ok.example"
        no = requests.options(running.url + "/sdapi/v1/txt2img", headers={**pre, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in no.headers
    finally:
        running.stop()


def test_listen_means_every_address(monkeypatch):
    import unfog.server as server_module

    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda config, host, port: seen.update(host=host, port=port))
    assert main(["serve", "--port", "7861"]) == 0 and seen["host"] == "127.0.0.1"
    assert main(["serve", "--port", "7861", "--listen"]) == 0 and seen["host"] == "0.0.0.0"
