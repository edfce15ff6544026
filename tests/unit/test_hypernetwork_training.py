"""Task "hypernetwork" on the embedded shapes model (trained here at 32 px so the steps are cheap):
only the hypernetwork trains and every weight of the model stays bit for bit as loaded; A1111's
initializations against their closed forms; each saved file, loaded back by
``pipe.load_hypernetwork`` (and the .pt by ``torch.load(weights_only=True)``), gives the trainer's
EMA U-Net output bit for bit; the loss falls when overfitting; resume is bit-identical (dropout
on) and a changed config is refused; ``--init-from`` continues a file; bad options are one-line
errors."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import unfog
from unfog.conditioning import encode_prompt
from unfog.datasets.shapes_text import ShapesConfig
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.models.presets import TINY
from unfog.models.unet import UNet
from unfog.nn.hypernetwork import Hypernetwork, HypernetworkOptions, initialize_
from unfog.training import load_config, make_trainer, train
from unfog.training.hypernetwork import attention_widths
from training_checks import last_state_tensors, overfit_loss_ratio

BASE = ["task=hypernetwork", "data=shapes", "image_size=32", "data_size=8", "batch_size=2", "precision=fp32",
        "warmup_steps=0", "lr=0.001", "log_every=1", "sample_every=1000", "sample_steps=2",
        "hypernetwork.output_name=ink"]
PROMPTS = ["a red circle", "a blue square to the left of a green triangle", ""]


def hn_config(out, *extra):
    return load_config(None, [*BASE, f"out_dir={out}", *extra])


def model_tensors(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def test_only_the_hypernetwork_trains_and_every_weight_stays_bit_for_bit(tmp_path):
    trainer = make_trainer(hn_config(tmp_path), "cpu")
    pipe, hn = trainer.pipe, trainer.net.hypernetwork
    before = model_tensors(pipe)
    assert hn.widths == (128,)  # the shapes model's attention: self and cross both read 128 wide
    assert {id(p) for p in trainer.params} == {id(p) for p in hn.parameters()}
    assert all(k.startswith("hypernetwork.pairs.128.") for k in trainer.net.state_dict())
    assert all(k.startswith("hypernetwork.") for k in trainer.ema.model.state_dict())  # not the model
    start = {k: v.clone() for k, v in hn.state_dict().items()}
    assert all(float(v.abs().max()) == 0 for k, v in start.items() if k.endswith("bias"))  # A1111: biases 0
    for _ in range(3):
        trainer.train_step()
    assert max(float((hn.state_dict()[k] - v).abs().max()) for k, v in start.items()) > 1e-4
    after = model_tensors(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for name in ("unet", "vae", "text_encoder")
                   for p in getattr(pipe, name).parameters())


@pytest.mark.parametrize("init", ["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"])
def test_a1111_initializations_match_their_closed_forms(init):
    """Every Linear (the output one too) and LayerNorm, as A1111's HypernetworkModule: the weight's
    spread from the fan-in / fan-out formulas (He 2015, Glorot 2010), biases 0, the LayerNorm gain
    N(0, 0.01^2) whatever the init. A (256 x 128) weight: its sample std is within 4 % of the law's
    (about 10 standard errors; a wrong gain or fan is off by 30 % or more)."""
    hn = Hypernetwork([128], HypernetworkOptions(layer_structure=(1, 2, 1), activation="leakyrelu",
                                                 layer_norm=True, weight_init=init))
    initialize_(hn, torch.Generator().manual_seed(0))
    std = {"Normal": lambda i, o: 0.01, "XavierUniform": lambda i, o: math.sqrt(2 / (i + o)),
           "XavierNormal": lambda i, o: math.sqrt(2 / (i + o)), "KaimingUniform": lambda i, o: math.sqrt(2 / i),
           "KaimingNormal": lambda i, o: math.sqrt(2 / i)}[init]
    for module in hn.pairs["128"]:
        layers = list(module.linear)
        linears = [m for m in layers if type(m) is torch.nn.Linear]
        norms = [m for m in layers if type(m) is torch.nn.LayerNorm]
        assert len(linears) == len(norms) == 2
        for lin in linears:
            out, fan_in = lin.weight.shape
            assert abs(lin.weight.std().item() / std(fan_in, out) - 1) < 0.04
            if "Uniform" in init:  # bounded by sqrt(3) std
                assert lin.weight.abs().max().item() <= math.sqrt(3) * std(fan_in, out) + 1e-7
            assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        for norm in norms:  # 128 or 256 draws: a sample std within 25 % (4 standard errors)
            assert abs(norm.weight.std().item() / 0.01 - 1) < 0.25 and torch.equal(norm.bias, torch.zeros_like(norm.bias))
    with pytest.raises(ValueError, match=r"unknown hypernetwork weight initialization 'Zero'; valid: Normal, "):
        initialize_(Hypernetwork([8], HypernetworkOptions(weight_init="Zero")))


def test_saved_files_loaded_with_load_hypernetwork_reproduce_the_trainers_unet_output(tmp_path):
    """Oracle: the U-Net output of the trainer's own EMA network (dropout off) against a fresh
    pipeline that loads each written file by ``load_hypernetwork``: equal bit for bit (the same
    float32 modules in the same hook)."""
    config = hn_config(tmp_path, "ema_decay=0.5", "lr=0.01", "hypernetwork.save_pt=true",
                       "hypernetwork.activation_func=relu", "hypernetwork.is_layer_norm=true",
                       "hypernetwork.use_dropout=true", "hypernetwork.layer_structure=[1, 1.5, 1.5, 1]",
                       "hypernetwork.last_layer_dropout=true")
    trainer = make_trainer(config, "cpu")
    for _ in range(2):
        trainer.train_step()
    trainer.save_model()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 4, 4, generator=g), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        ours = trainer.ema.model(x, t, PROMPTS)
        pipe = unfog.load(default_model_path(DEFAULT_TEXT_MODEL))
        c = encode_prompt("sd1", [pipe.text_encoder], pipe.tokenizer, PROMPTS).context
        assert (pipe.unet(x, t, c) - ours).abs().max() > 1e-3  # it changes the output, so this can fail
        for suffix in (".safetensors", ".pt"):
            pipe.unload_hypernetworks()
            applied = pipe.load_hypernetwork(tmp_path / f"ink{suffix}")
            assert applied.name == "ink" and torch.equal(pipe.unet(x, t, c), ours), suffix
    pt = torch.load(tmp_path / "ink.pt", weights_only=True)  # what A1111's torch.load sees
    assert sorted(k for k in pt if isinstance(k, int)) == [128] and pt["name"] == "ink" and pt["step"] == 2
    assert pt["layer_structure"] == [1, 1.5, 1.5, 1] and pt["dropout_structure"] == [0, 0.3, 0.3, 0]
    assert (pt["activation_func"], pt["is_layer_norm"], pt["activate_output"], pt["use_dropout"],
            pt["last_layer_dropout"], pt["weight_initialization"]) == ("relu", True, False, True, True, "Normal")
    assert pt["sd_checkpoint_name"] == "shapes" and len(pt["sd_checkpoint"]) == 10
    assert torch.equal(pt[128][1]["linear.0.weight"], trainer.ema.model.hypernetwork.pairs["128"][1].linear[0].weight)
    with pytest.raises(FileExistsError, match=r"is not from a training run.*hypernetwork\.output_name"):
        make_trainer(hn_config(tmp_path), "cpu")  # a hypernetwork file without a run beside it


@pytest.mark.slow  # 30 steps: about 15 s on a busy 2-core machine
def test_loss_falls_when_overfitting_two_images(tmp_path):
    trainer = make_trainer(hn_config(tmp_path, "data_size=2", "lr=0.003"), "cpu")
    assert overfit_loss_ratio(trainer, steps=30, repeats=8) < 0.9


@pytest.mark.slow  # three runs of 2-4 steps and a sample grid
def test_resume_is_bit_identical_and_a_changed_config_is_refused(tmp_path):
    dropout = ["hypernetwork.use_dropout=true", "hypernetwork.layer_structure=[1, 2, 2, 1]"]  # draws torch's RNG
    straight = hn_config(tmp_path / "a", "steps=4", "save_every=2", *dropout)
    assert train(straight, progress=False) == tmp_path / "a" / "ink.safetensors"
    train(hn_config(tmp_path / "b", "steps=2", "save_every=2", *dropout), progress=False)
    with pytest.raises(ValueError, match=r"hypernetwork\.activation_func: 'linear' -> 'relu'"):
        train(hn_config(tmp_path / "b", "steps=4", "save_every=2", *dropout, "hypernetwork.activation_func=relu"),
              resume=True, progress=False)
    train(hn_config(tmp_path / "b", "steps=4", "save_every=2", *dropout), resume=True, progress=False)
    a, b = last_state_tensors(tmp_path / "a"), last_state_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "samples" / "step_00000004.png").is_file()


def test_init_from_a_hypernetwork_file_continues_it(tmp_path):
    first = make_trainer(hn_config(tmp_path / "a", "ema_decay=0", "hypernetwork.save_pt=true"), "cpu")
    first.train_step()
    first.save_model()
    want = first.net.hypernetwork.state_dict()
    for suffix in (".safetensors", ".pt"):
        second = make_trainer(hn_config(tmp_path / f"b{suffix}"), "cpu")
        path = tmp_path / "a" / f"ink{suffix}"
        assert second.weights_file(path) == (suffix == ".pt")  # an A1111 .pt is no training state
        assert second.load_weights(path) == ["hypernetwork ink at step 1"]
        for net in (second.net, second.ema.model):
            got = net.hypernetwork.state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not second.weights_file(tmp_path / "states" / "state_00000002.pt")
    with pytest.raises(ValueError, match=r"of other options: activation 'linear' \(this config: 'relu'\); set the"):
        make_trainer(hn_config(tmp_path / "c", "hypernetwork.activation_func=relu"), "cpu").load_weights(path)
    # through `unfog train --init-from` (the loop sends the .pt to load_weights, not load_state)
    out = train(hn_config(tmp_path / "d", "steps=1", "sample_steps=1"), init_from=path, progress=False)
    assert out.is_file() and "started from the weights of" in (tmp_path / "d" / "resumes.jsonl").read_text()


def test_attention_widths_are_self_and_cross_attentions():
    """A U-Net whose levels are 32 and 64 wide with a 32-wide text context: pairs for 32 and 64."""
    assert attention_widths(SimpleNamespace(unet=UNet(TINY))) == [32, 64]


def test_bad_options_are_one_line_errors(tmp_path):
    cases = [
        (["hypernetwork.activation_func=glu"], r"unknown hypernetwork\.activation_func 'glu'; valid choices: linear"),
        (["hypernetwork.weight_initialization=Zero"], r"weight_initialization 'Zero'; valid choices: Normal, Xavier"),
        (["hypernetwork.layer_structure=[2, 1]"],
         r"layer_structure must start and end with 1"),
        (["hypernetwork.dropout_structure=[0, 0.3, 0]"], r"dropout_structure is set but use_dropout is false"),
        (["hypernetwork.use_dropout=true", "hypernetwork.dropout_structure=[0, 0.3]"],
         r"dropout_structure needs 3 probabilities .* the first and last 0"),
        (["hypernetwork.use_dropout=true", "hypernetwork.dropout_structure=[0, 1.5, 0]"],
         r"dropout_structure needs 3 probabilities in \[0, 1\)"),
        (["hypernetwork.use_dropout=true", "hypernetwork.last_layer_dropout=true",
          "hypernetwork.dropout_structure=[0, 0.3, 0]"], r"last_layer_dropout is read only when dropout_structure"),
        (["hypernetwork.output_name=a/b"], r"output_name must be a file name without folders"),
        (["hypernetwork.enable_sizes=[768, true]"], r"enable_sizes must be a list of context widths"),
        (["cond_dropout=0.2"], r"task 'hypernetwork' does not read cond_dropout"),
        (["data=digits"], r"needs RGB data"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            hn_config(tmp_path, *extra)
    built = [(["hypernetwork.enable_sizes=[128, 320]"], r"no attention layer of shapes.safetensors reads a context "
                                                        r"320 wide; its widths are 128"),
             (["prediction=x0"], r"model's own noise schedule and prediction type \('v'\)")]
    for extra, message in built:
        with pytest.raises(ValueError, match=message):
            make_trainer(hn_config(tmp_path, *extra), "cpu")



def test_committed_config_loads():
    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "configs" / "hypernetwork_shapes_outline.json")
    assert config.task == "hypernetwork" and config.shapes_config().style == "outlined"
    assert config.shapes_config().categories == ShapesConfig().categories  # every scene, drawn outlined
