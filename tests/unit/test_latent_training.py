"""Latent text-to-image training: the autoencoder stage, the text-to-image stage, the model file,
exact resume (also after SIGKILL), and data-parallel training under torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import unfog
from unfog.conditioning import encode_prompt
from unfog.models.tokenizer import CLIPTokenizer, SubVocabTokenizer
from unfog.models.vae import DiagonalGaussian
from unfog.jobs import Job, run
from unfog.pipelines.latent_model import load_autoencoder, load_parts, recommended_settings
from unfog.pipelines.outputs import Settings
from unfog.training import load_config, make_trainer, train
from unfog.training.autoencoder import kl_to_standard_normal

ROOT = Path(__file__).resolve().parents[2]
VAE = ["task=autoencoder", "data=shapes", "image_size=32", "data_size=64", "batch_size=4", "precision=fp32",
       'vae_overrides={"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1}', "warmup_steps=1",
       "log_every=1", "lr=0.001"]
T2I = ["task=text2image", "data=shapes", "image_size=32", "data_size=64", "batch_size=4", "precision=fp32",
       "model=TINY", 'text_encoder={"width": 32, "layers": 2, "heads": 2}', "prediction=v", "schedule=scaled_linear",
       "warmup_steps=1", "log_every=1", "sample_steps=2", "sample_every=1000", "lr=0.001"]


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    return train(load_config(None, VAE + ["steps=2", f"out_dir={out}"]), progress=False)


def t2i_config(vae_file, out, *extra):
    return load_config(None, T2I + [f"vae_model={vae_file}", f"out_dir={out}", *extra])


# ---- tokenizer and conditioning -------------------------------------------------------------------------


def test_sub_vocabulary_renumbers_clip_ids():
    base = CLIPTokenizer.from_bpe_file()
    tok = SubVocabTokenizer.from_texts(base, ["a red circle above a blue square"])
    kept = list(tok.kept_ids)
    text = "a blue circle above a red square"  # every token seen
    assert tok.encode(text) == [kept.index(i) + 1 for i in base.encode(text)]
    assert tok.eos_id == tok.vocab_size - 1 == max(tok.vocab.values())  # argmax pooling finds the end
    assert tok.encode("a green cat")[0] == kept.index(base.encode("a")[0]) + 1
    assert tok.encode("a green cat")[1:] == [0, 0]  # unknown
    assert tok.unknown_words("a green cat, red") == ["green", "cat"]


def test_training_context_is_the_pipelines_context(vae_file, tmp_path):
    """The trainer encodes captions with the pipeline's encode_prompt; before it did, it read the
    encoder's last state of the tokenizer's ids, which gives the same bits for captions of up to
    75 tokens (so the switch changed no training run)."""
    trainer = make_trainer(t2i_config(vae_file, tmp_path / "run"))
    net, tok = trainer.net.eval(), trainer.tokenizer
    captions = ["a red circle to the left of a blue square", ""]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        old_path = net.text_encoder(tok(captions, pad="eos").input_ids).last_hidden_state
        at_inference = encode_prompt("sd1", [net.text_encoder], tok, captions).context
        trained = net(x, t, captions)
        expected = net.unet(x, t, at_inference)
    torch.testing.assert_close(old_path, at_inference, rtol=0, atol=0)
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)


# ---- autoencoder ---------------------------------------------------------------------------------------


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=g)
    q = DiagonalGaussian(moments)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(q.mean, q.std),
                                            torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(kl_to_standard_normal(q), ref, rtol=1e-5, atol=1e-5)


def test_autoencoder_file_scales_latents_to_unit_std(vae_file):
    vae = load_autoencoder(vae_file)
    from unfog.datasets.shapes import ShapesDataset

    data = ShapesDataset(48, size=32, seed=123)  # other images than the ones it was measured on
    x = torch.stack([data[i]["image"] for i in range(48)])
    with torch.no_grad():
        z = vae.encode(x).sample(torch.Generator().manual_seed(1)) * vae.config.scaling_factor
    assert 0.8 < z.std().item() < 1.25
    meta = json.loads((Path(vae_file).parent / "config.json").read_text())
    assert meta["task"] == "autoencoder"


def test_autoencoder_with_discriminator_trains_and_resumes(tmp_path):
    cfg = load_config(None, VAE + ["steps=2", "disc_weight=0.1", f"out_dir={tmp_path / 'run'}", "save_every=1"])
    train(cfg, progress=False)
    state = torch.load(sorted((tmp_path / "run" / "states").iterdir())[-1], weights_only=True)
    assert {"disc", "disc_opt"} <= set(state)
    train(load_config(None, VAE + ["steps=3", "disc_weight=0.1", f"out_dir={tmp_path / 'run'}"]), resume=True,
          progress=False)


def test_decoder_fine_tune_keeps_the_encoder_and_the_scaling_factor(vae_file, tmp_path):
    """train_encoder=false (a decoder fine-tune, as Stability's ft-MSE VAE): from --init-from's
    model, the encoder and quant_conv stay bit for bit, the decoder moves, the file keeps the
    model's scaling factor, and a resumed run still keeps it. Without --init-from, or from a
    model of another architecture, it is refused."""
    source = load_autoencoder(vae_file)
    decoder_only = VAE + ["train_encoder=false", 'shapes_options={"style": ["filled", "outlined"]}', "save_every=1"]
    run = tmp_path / "ft"
    path = train(load_config(None, decoder_only + ["steps=2", f"out_dir={run}"]), init_from=vae_file, progress=False)
    path = train(load_config(None, decoder_only + ["steps=3", f"out_dir={run}"]), resume=True, progress=False)
    tuned = load_autoencoder(path)
    assert tuned.config.scaling_factor == source.config.scaling_factor
    before, after = source.state_dict(), tuned.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))

    with pytest.raises(ValueError, match="give it with --init-from"):
        train(load_config(None, decoder_only + ["steps=1", f"out_dir={tmp_path / 'none'}"]), progress=False)
    wide = VAE + ['vae_overrides={"base_channels": 64, "channel_mult": [1, 2], "num_res_blocks": 1}']
    with pytest.raises(ValueError, match="differs from this config's in base_channels"):
        train(load_config(None, wide + ["steps=1", f"out_dir={tmp_path / 'wide'}"]), init_from=vae_file, progress=False)


def test_styles_alternate_by_item():
    from unfog.datasets.shapes import ShapesDataset, make_item, render, to_tensor
    from unfog.datasets.shapes_text import ShapesConfig

    config = ShapesConfig(style=("filled", "outlined"))
    data = ShapesDataset(4, size=32, seed=5, config=config)
    for i in range(4):
        scene = make_item(i, 32, 5, config)[0]
        assert torch.equal(data[i]["image"], to_tensor(render(scene, style=("filled", "outlined")[i % 2])))
    with pytest.raises(ValueError, match="style must name at least one of filled, outlined, pastel"):
        ShapesConfig(style=())
    with pytest.raises(ValueError, match="valid choices"):
        ShapesConfig(style=("filled", "striped"))


# ---- text-to-image: the file, the pipeline and bad input -----------------------------------------------


def test_text2image_model_loads_as_a_pipeline(vae_file, tmp_path):
    path = train(t2i_config(vae_file, tmp_path / "run", "steps=2"), progress=False)
    pipe = unfog.load(path)
    assert pipe.default_size == 32 and pipe.prediction == "v"
    images = pipe(["a red circle", ""], steps=2, cfg_scale=3, seed=1, output="tensor")
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert recommended_settings(path) == {"sampler": "dpmpp_2m", "steps": 2, "cfg_scale": 2.0}
    unet, vae, te, tok, info, meta = load_parts(path, torch.bfloat16)
    assert next(unet.parameters()).dtype == torch.bfloat16 and info.image_size == 32 and meta["step"] == 2


def test_generate_warns_outside_the_domain_and_accepts_an_empty_prompt(vae_file, tmp_path):
    path = train(t2i_config(vae_file, tmp_path / "run", "steps=1"), progress=False)
    warnings = []
    for prompt in ("a photo of a cat", ""):
        settings = Settings(prompt=prompt, steps=2, seed=3, sampler="euler")
        job = Job("txt2img", settings, path, output=str(tmp_path / f"out{len(warnings)}.png"))
        (written,) = run(job, warn=warnings.append)
        assert written.is_file()
    assert len(warnings) == 1 and "outside this model's training domain: cat, photo" in warnings[0]


def test_init_from_a_model_file_starts_from_its_weights_at_step_0(vae_file, tmp_path):
    """Fine-tuning a released model: --init-from model.safetensors loads its U-Net and text encoder
    (the oracle: the EMA weights in the source run's own training state, saved by another path),
    the EMA starts equal to them, and step, optimizer and schedule start afresh. A file of another
    architecture, vocabulary or autoencoder is refused, naming what differs."""
    from PIL import Image

    source = train(t2i_config(vae_file, tmp_path / "a", "steps=2", "save_every=1"), progress=False)
    ema = torch.load(tmp_path / "a" / "states" / "state_00000002.pt", weights_only=True)["ema"]["model"]
    trainer = make_trainer(t2i_config(vae_file, tmp_path / "b", "steps=3"))
    assert trainer.load_weights(source) == []
    for module in (trainer.net, trainer.ema.model):
        state = module.state_dict()
        assert state.keys() == ema.keys() and all(torch.equal(state[k], ema[k]) for k in ema)
    assert trainer.step == 0 and trainer.ema.num_updates == 0 and not trainer.optimizer.state
    # the autoencoder may come from the model file itself (vae_model=<model file>): the stage-1 weights
    own = make_trainer(t2i_config(source, tmp_path / "g", "steps=1"))
    original = load_autoencoder(vae_file).state_dict()
    assert all(torch.equal(own.vae.state_dict()[k], original[k]) for k in original)
    assert own.load_weights(source) == []

    path = train(t2i_config(vae_file, tmp_path / "b", "steps=1", "prediction=eps"), init_from=source, progress=False)
    history = json.loads((tmp_path / "b" / "resumes.jsonl").read_text())
    assert history["step"] == 0 and history["changes"] == [f"started from the weights of {source}",
                                                           "prediction: 'v' -> 'eps'"]
    assert load_parts(path)[5]["step"] == 1

    wider = t2i_config(vae_file, tmp_path / "c", "steps=1", 'text_encoder={"width": 48, "layers": 2, "heads": 2}')
    with pytest.raises(ValueError, match=r"cannot start from .*U-Net: context_dim: 32 -> 48; text encoder: width: 32 -> 48"):
        train(wider, init_from=source, progress=False)
    other_vae = train(load_config(None, VAE + ["steps=1", f"out_dir={tmp_path / 'vae2'}"]), progress=False)
    with pytest.raises(ValueError, match=r"autoencoder: scaling_factor"):
        train(t2i_config(other_vae, tmp_path / "d", "steps=1"), init_from=source, progress=False)
    folder = tmp_path / "captioned"  # a folder's vocabulary is the tokens of its captions
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 60, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of a cat")
    with pytest.raises(ValueError, match="vocabulary: the file's text encoder knows"):
        make_trainer(t2i_config(vae_file, tmp_path / "e", f"data={folder}")).load_weights(source)
    # an autoencoder run starts from the model file's autoencoder; a pixel run from no model file
    vae_run = make_trainer(load_config(None, VAE + ["steps=1", f"out_dir={tmp_path / 'f'}"]))
    assert vae_run.load_weights(source) == []
    assert all(torch.equal(vae_run.net.vae.state_dict()[k], original[k]) for k in original)
    pixel = ["image_size=8", "batch_size=6", "warmup_steps=2", "sample_steps=2", "precision=fp32",
             'model_overrides={"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, '
             '"transformer_depth": [0, 1]}']
    with pytest.raises(ValueError, match="supported for text2image and autoencoder runs"):
        train(load_config(ROOT / "configs" / "digits.json", pixel + [f"out_dir={tmp_path / 'p'}"]), init_from=source,
              progress=False)


def test_worker_processes_draw_the_same_batches():
    """data_workers draws a batch's shapes scenes in parallel processes; the oracle is the same
    batch drawn in this process, which it must equal exactly (images, captions, sizes)."""
    from unfog.training.data import make_captioned_data

    idx = torch.tensor([5, 0, 17, 3, 9, 11, 2])
    here, pooled = (make_captioned_data("shapes", 32, 20, 4, workers=w) for w in (0, 2))
    for _ in range(2):  # the pool serves the next batch too
        a, b = here.batch(idx), pooled.batch(idx)
        assert torch.equal(a.images, b.images) and a.captions == b.captions and torch.equal(a.sizes, b.sizes)
        idx = idx.flip(0)
    with pytest.raises(ValueError, match="data_workers must be >= 0"):
        load_config(None, ["data_workers=-1"])
    with pytest.raises(ValueError, match="data_workers is an option of tasks 'text2image' and 'autoencoder'"):
        load_config(None, ["data_workers=2"])  # the default task, pixel


def test_folder_without_captions_is_an_error(vae_file, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("a red thing")
    with pytest.raises(ValueError, match=r"2 of 3 images have no caption.*\.txt file beside it.*metadata\.jsonl"):
        make_trainer(t2i_config(vae_file, tmp_path / "run", f"data={folder}"))


def test_config_errors():
    with pytest.raises(ValueError, match="set text2image.vae_model"):
        load_config(None, ["task=text2image", "data=shapes"])
    with pytest.raises(ValueError, match="valid choices: pixel, autoencoder, text2image"):
        load_config(None, ["task=vae"])
    with pytest.raises(ValueError, match="needs RGB data"):
        load_config(None, ["task=autoencoder"])
    with pytest.raises(FileNotFoundError, match="autoencoder file not found.*shapes_vae.json"):
        make_trainer(load_config(None, ["task=text2image", "data=shapes", "vae_model=/nonexistent.safetensors"]))
    with pytest.raises(ValueError, match="shapes_options: .*'colour'.*valid keys: categories, weights"):
        load_config(None, VAE + ['shapes_options={"colour": 1}'])
    with pytest.raises(ValueError, match="weights must be 2 non-negative numbers"):
        load_config(None, VAE + ['shapes_options={"categories": ["position", "colors"], "weights": [1]}'])
    with pytest.raises(ValueError, match="shapes_options apply to data 'shapes', not '/some/folder'"):
        load_config(None, VAE + ["data=/some/folder", 'shapes_options={"weights": [1, 1, 1, 1, 1, 1]}'])


def test_shapes_options_reach_the_training_data(vae_file, tmp_path):
    """A trainer on data "shapes" with shapes_options draws exactly the items of the data set
    module with that ShapesConfig (here: position scenes only)."""
    from unfog.datasets.shapes import make_item
    from unfog.datasets.shapes_text import ShapesConfig

    options = 'shapes_options={"categories": ["position"], "relation_word": 1.0}'
    trainer = make_trainer(load_config(None, T2I + [options, f"vae_model={vae_file}", f"out_dir={tmp_path}"]))
    config = ShapesConfig(categories=("position",), relation_word=1.0)
    for i in range(16):
        scene, caption = make_item(i, 32, 0, config)
        assert scene.category == "position" and trainer.data.caption_of(i) == caption
        assert trainer.data.load_item(i, (32, 32), None)["caption"] == caption
    assert any(w in trainer.data.caption_of(0) for w in ("left", "right", "above", "below"))


def test_resume_with_other_scenes_keeps_the_vocabulary_and_other_captions_are_refused(vae_file, tmp_path):
    """A "shapes" run's vocabulary is its caption grammar, so a forced resume that draws only
    position scenes (fewer words) continues; a folder whose captions gained a word cannot resume
    into the old text encoder, and says why."""
    from PIL import Image

    train(t2i_config(vae_file, tmp_path / "s", "steps=1"), progress=False)
    narrow = t2i_config(vae_file, tmp_path / "s", "steps=2", 'shapes_options={"categories": ["position"]}')
    assert unfog.load(train(narrow, resume=True, force=True, progress=False)).tokenizer.vocab_size \
        == unfog.load(train(t2i_config(vae_file, tmp_path / "t", "steps=1"), progress=False)).tokenizer.vocab_size

    folder = tmp_path / "images"
    folder.mkdir()
    for i, text in enumerate(["a red thing", "a blue thing"]):
        Image.new("RGB", (32, 32), (200 * (1 - i), 0, 200 * i)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(text)
    train(t2i_config(vae_file, tmp_path / "f", "steps=1", f"data={folder}", "data_size=2", "batch_size=2"),
          progress=False)
    (folder / "1.txt").write_text("a dog thing")  # a word the grid prompts lack
    changed = t2i_config(vae_file, tmp_path / "f", "steps=2", f"data={folder}", "data_size=2", "batch_size=2")
    with pytest.raises(ValueError, match=r"cannot resume: .*only this config's captions: \['dog</w>'\]"):
        train(changed, resume=True, force=True, progress=False)


# ---- exact resume ----------------------------------------------------------------------------------------


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_text2image_resume_is_bit_identical(vae_file, tmp_path):
    straight = train(t2i_config(vae_file, tmp_path / "a", "steps=4", "save_every=2"), progress=False)
    train(t2i_config(vae_file, tmp_path / "b", "steps=2", "save_every=2"), progress=False)
    resumed = train(t2i_config(vae_file, tmp_path / "b", "steps=4", "save_every=2"), resume=True, progress=False)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from unfog.cli import main; sys.exit(main())", *args]


def _write_config(path: Path, config) -> Path:
    path.write_text(json.dumps(config.to_dict()))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


STOP_STEPS = ["steps=40", "save_every=5", "keep_last=2"]


@pytest.fixture(scope="module")
def uninterrupted(vae_file, tmp_path_factory):
    """A 40-step run in a process (one thread): the reference the interrupted runs must end at.
    Interrupted runs are processes with the same environment: a different thread count changes
    float summation order, so bit-identity is only defined between like runs."""
    out = tmp_path_factory.mktemp("straight")
    config = _write_config(out / "a.json", t2i_config(vae_file, out / "a", *STOP_STEPS))
    done = subprocess.run(_cli("train", str(config)), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "a"


def _start_and_signal(cfg: Path, states: Path, sig: int, when: str) -> subprocess.Popen:
    proc = subprocess.Popen(_cli("train", str(cfg)), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (states / when).exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no state written in time"
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def _log_losses(run: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in entries]
    assert steps == sorted(set(steps)), f"log steps repeat or go back: {steps}"
    return {e["step"]: e["loss"] for e in entries}


def test_sigkill_mid_run_then_resume_is_bit_identical(vae_file, uninterrupted, tmp_path):
    """A run killed with SIGKILL (no handler runs) resumes from its last atomic state and ends with
    the weights of a run that was never interrupted; the steps it logged past that state are
    replaced by the resumed run's, so the log is the uninterrupted run's."""
    cfg = _write_config(tmp_path / "b.json", t2i_config(vae_file, tmp_path / "b", *STOP_STEPS))
    states = tmp_path / "b" / "states"
    proc = _start_and_signal(cfg, states, signal.SIGKILL, "state_00000010.pt")
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in states.iterdir())
    assert "state_00000040.pt" not in left  # killed in the middle of the run
    resumed = subprocess.run(_cli("train", str(cfg), "--resume"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(uninterrupted / "model.safetensors"), _weights(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log_losses(tmp_path / "b") == _log_losses(uninterrupted)


def test_sigterm_saves_the_state_at_a_step_boundary_then_resume_is_bit_identical(vae_file, uninterrupted, tmp_path):
    """SIGTERM (a scheduler's or torchrun's stop) is handled like Ctrl-C: the current step finishes,
    the state is saved there (not at the last multiple of save_every), the exit code is 130."""
    cfg = _write_config(tmp_path / "c.json", t2i_config(vae_file, tmp_path / "c", *STOP_STEPS))
    states = tmp_path / "c" / "states"
    proc = _start_and_signal(cfg, states, signal.SIGTERM, "state_00000005.pt")
    err = proc.stderr.read().decode()
    assert proc.returncode == 130, err[-2000:]
    assert "SIGTERM: stopping after this step" in err and "resume with --resume" in err
    saved = sorted(int(p.stem.split("_")[1]) for p in states.glob("state_*.pt"))
    stopped = int(err.split("state saved at step ")[1].split()[0])
    assert saved[-1] == stopped and 5 <= stopped < 40
    resumed = subprocess.run(_cli("train", str(cfg), "--resume"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(uninterrupted / "model.safetensors"), _weights(tmp_path / "c" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log_losses(tmp_path / "c") == _log_losses(uninterrupted)


# ---- data-parallel training --------------------------------------------------------------------------


def test_two_processes_follow_the_one_process_trajectory(vae_file, tmp_path):
    """torchrun --nproc_per_node 2 with global batch B (gloo, CPU) against one process with batch B:
    the same losses at every step and the same final weights, within float tolerance."""
    steps = ["steps=4", "batch_size=4", "save_every=4"]
    one = train(t2i_config(vae_file, tmp_path / "one", *steps), progress=False)
    cfg = _write_config(tmp_path / "two.json", t2i_config(vae_file, tmp_path / "two", *steps))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "unfog.cli", "train", str(cfg)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = lambda run: [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    torch.testing.assert_close(torch.tensor(log("two")), torch.tensor(log("one")), rtol=1e-5, atol=1e-6)
    # Adam normalises each update by the gradient's running RMS, so a parameter whose gradient is
    # near zero moves by up to lr per step whatever its size, and summation-order noise in such a
    # gradient shows in its weight. Bound the weights by a tenth of one step (lr = 1e-3) instead.
    a, b = _weights(one), _weights(tmp_path / "two" / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst


def test_shapes_evaluation_scores_every_category(vae_file, tmp_path):
    from unfog.datasets.shapes_text import CATEGORIES
    from unfog.metrics.shapes_eval import evaluate, reference_features

    pipe = unfog.load(train(t2i_config(vae_file, tmp_path / "run", "steps=1"), progress=False))
    ref, floor = reference_features(pipe.vae, 30, 32)
    s = evaluate(pipe, per_category=2, steps=2, cfg_scale=2.0, fid_reference=ref, real_floor=floor, progress=False)
    assert set(s.adherence) == {*CATEGORIES, "overall"} and s.num_images == 2 * len(CATEGORIES)
    assert all(0 <= v <= 1 for v in s.adherence.values())
    assert s.fid > floor  # one training step: far from the real images
