"""Textual-inversion embeddings bundled in a LoRA file (A1111's ``bundle_emb`` keys) and task "lora"'s
``new_words`` (pivotal tuning), on the embedded shapes model.

Oracles: an embedding whose rows are the token table's rows of known words must encode exactly as
those words do (so a bundled name is matched and its rows land where the words' would); the
trainer's own EMA network against a fresh pipeline with the saved file; the untouched model's
weights; a run resumed half-way against one run straight through."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import unfog
from unfog.checkpoint.lora import read_lora
from unfog.conditioning import encode_prompt
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.models.tokenizer import SubVocabTokenizer
from unfog.pipelines.lora import describe_lora
from unfog.training import load_config, make_trainer, train
from unfog.training.state import list_states, load_state

BASE = ["task=lora", "data=shapes", "image_size=32", "data_size=8", "batch_size=2", "precision=fp32",
        "warmup_steps=0", "lr=0.002", "log_every=1", "sample_every=1000", "sample_steps=2", "lora.rank=4",
        "lora.alpha=4"]
NEW = ['lora.new_words={"star": "triangle", "teal": "blue"}', "lora.new_word_vectors=2",
       'shapes_options={"extra_shapes": ["star"], "extra_colors": ["teal"], "extra_fraction": 1.0}']


def lora_config(out, *extra):
    return load_config(None, [*BASE, f"out_dir={out}", *extra])


@pytest.fixture
def pipe():
    return unfog.load(default_model_path(DEFAULT_TEXT_MODEL))


def context(pipe, prompts):
    with torch.no_grad():
        return encode_prompt("sd1", [pipe.text_encoder], pipe.tokenizer, prompts, embeddings=pipe.embeddings).context


def rows(pipe, words):
    """The token table's rows of ``words`` (each one token of the model's vocabulary)."""
    ids = pipe.tokenizer.encode(words)
    assert len(ids) == len(words.split()) and SubVocabTokenizer.UNKNOWN_ID not in ids
    return pipe.text_encoder.embeddings.token_embedding.weight.detach()[ids].clone()


def adapters(pipe, seed=0, rank=2):
    """kohya adapters on some cross-attention and text-encoder projections, random values."""
    g = torch.Generator().manual_seed(seed)
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_k")}
    modules.update({"lora_te_text_model_" + n.replace(".", "_"): m for n, m in pipe.text_encoder.named_modules()
                    if n.endswith("self_attn.q_proj")})
    out = {}
    for key, m in modules.items():
        out[f"{key}.lora_down.weight"] = torch.randn(rank, m.weight.shape[1], generator=g) * 0.1
        out[f"{key}.lora_up.weight"] = torch.randn(m.weight.shape[0], rank, generator=g) * 0.1
        out[f"{key}.alpha"] = torch.tensor(1.0)
    return out


def snapshot(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def test_bundled_embeddings_are_words_while_the_lora_is_on_and_unload_exactly(pipe, tmp_path):
    """A1111's layout: bundle_emb.<name>.string_to_param.*. "star" (one vector: the row of "triangle")
    and "teal" (two: "blue circle") are the shapes model's unknown token, yet with the LoRA on they
    encode exactly as the words whose rows they hold, through the LoRA-changed text encoder."""
    assert SubVocabTokenizer.UNKNOWN_ID in pipe.tokenizer.encode("a teal star")
    tensors = {**adapters(pipe), "bundle_emb.star.string_to_param.*": rows(pipe, "triangle"),
               "bundle_emb.teal.string_to_param.*": rows(pipe, "blue circle")}
    save_file(tensors, str(tmp_path / "pivot.safetensors"))
    before, plain = snapshot(pipe), context(pipe, ["a red star", "a teal"])
    said = []
    applied = pipe.load_lora(tmp_path / "pivot.safetensors", warn=said.append)
    assert said == [] and applied.embeddings == ("star", "teal") and not applied.unmatched
    assert [e.name for e in pipe.embeddings] == ["star", "teal"]
    assert torch.equal(pipe.embeddings[1].vectors[0], tensors["bundle_emb.teal.string_to_param.*"])
    assert pipe.embeddings[0].short_hash == ""  # TI hashes leave it to Lora hashes
    with_lora = context(pipe, ["a red star", "a teal"])
    assert torch.equal(with_lora, context(pipe, ["a red triangle", "a blue circle"]))
    assert not torch.equal(with_lora, plain)
    pipe.unload_loras()
    assert pipe.embeddings == [] and pipe.loras == []
    after = snapshot(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(context(pipe, ["a red star", "a teal"]), plain)


def test_a_loaded_embedding_of_the_same_name_stays_and_other_widths_are_skipped(pipe, tmp_path):
    save_file({"emb_params": rows(pipe, "square")}, str(tmp_path / "star.safetensors"))
    mine = pipe.load_embedding(tmp_path / "star.safetensors")
    save_file({**adapters(pipe), "bundle_emb.star.string_to_param.*": rows(pipe, "triangle"),
               "bundle_emb.big.clip_l": torch.zeros(1, 768), "bundle_emb.big.clip_g": torch.zeros(1, 1280)},
              str(tmp_path / "p.safetensors"))
    said = []
    pipe.load_lora(tmp_path / "p.safetensors", warn=said.append)
    assert pipe.embeddings == [mine]
    assert any("bundled embedding star is skipped" in m and "stays" in m for m in said)
    assert any("skipped embedding big" in m and "SDXL" in m for m in said)
    pipe.unload_loras()
    assert pipe.embeddings == [mine]
    text = describe_lora(tmp_path / "p.safetensors")
    assert "bundled embedding: star (1 vector, for a model with text width 128)" in text
    assert "bundled embedding: big (1 vector, for SDXL (clip_l 768 + clip_g 1280))" in text
    assert "other keys" not in text


def test_bad_bundles_are_one_line_errors_and_change_nothing(pipe, tmp_path):
    before = snapshot(pipe)
    cases = {"bundle_emb.x": r"bundle_emb\.x is not a bundled embedding key",
             "bundle_emb.two.string_to_param.a": r"bundled embedding two: string_to_param must hold exactly one"}
    for key, message in cases.items():
        extra = {key: torch.zeros(1, 128)}
        if "two" in key:
            extra["bundle_emb.two.string_to_param.b"] = torch.zeros(1, 128)
        save_file({**adapters(pipe), **extra}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ValueError, match=message):
            pipe.load_lora(tmp_path / "bad.safetensors")
    assert pipe.loras == [] and pipe.embeddings == []
    after = snapshot(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_new_words_train_with_the_adapters_and_the_saved_file_reproduces_the_trainer(tmp_path):
    """Only adapters and the new rows train; captions with "star" / "teal" give the rows a gradient
    (the sub-vocabulary maps both to its unknown token; the match is on CLIP's ids); the saved
    file, loaded by ``pipe.load_lora``, gives the trainer's EMA output on prompts with the new words."""
    trainer = make_trainer(lora_config(tmp_path, "steps=2", "lora.text_encoder_lora=true", *NEW), "cpu")
    net, pipe = trainer.net, trainer.pipe
    assert [w.name for w in net.words] == ["star", "teal"]
    table = pipe.text_encoder.embeddings.token_embedding.weight.detach()
    start = [w[0].detach().clone() for w in net.words]
    assert torch.equal(start[0], table[pipe.tokenizer.encode("triangle") * 2])  # A1111's spread of one token
    assert {id(p) for p in trainer.params} == {id(p) for p in net.parameters()}
    assert all(k.startswith(("adapters.", "words.")) for k in net.state_dict())
    frozen = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items() if "lora_" not in k}

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([100.0, 700.0])
    net(x, t, ["a red star", "a blue circle"]).square().mean().backward()
    assert net.words[0][0].grad.abs().max() > 0 and torch.equal(net.words[1][0].grad, torch.zeros(2, 128))
    trainer.optimizer.zero_grad(set_to_none=True)
    for _ in range(2):
        trainer.train_step()
    assert all(not torch.equal(w[0], s) for w, s in zip(net.words, start))
    now = {k: v for k, v in pipe.text_encoder.state_dict().items() if "lora_" not in k}
    assert now.keys() == frozen.keys() and all(torch.equal(now[k], frozen[k]) for k in frozen)

    trainer.save_model()
    path = tmp_path / "lora.safetensors"
    with safe_open(path, "pt") as f:
        bundled = {k: f.get_tensor(k) for k in f.keys() if k.startswith("bundle_emb.")}
    assert set(bundled) == {"bundle_emb.star.string_to_param.*", "bundle_emb.teal.string_to_param.*"}
    assert torch.equal(bundled["bundle_emb.teal.string_to_param.*"], trainer.ema.model.words[1][0])
    prompts = ["a teal star", "a red star to the left of a teal circle"]
    fresh = unfog.load(default_model_path(DEFAULT_TEXT_MODEL))
    with torch.no_grad():
        ours = trainer.ema.model(x, t, prompts)
        fresh.load_lora(path)
        theirs = fresh.unet(x, t, context(fresh, prompts))
        fresh.unload_embeddings()  # the same LoRA without its words: the rows matter
        without = fresh.unet(x, t, context(fresh, prompts))
    assert (ours - without).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    again = make_trainer(lora_config(tmp_path / "b", "lora.text_encoder_lora=true", *NEW), "cpu")
    again.load_weights(path)  # --init-from continues the words too
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again.net.words, trainer.ema.model.words))
    plain = make_trainer(lora_config(tmp_path / "c", "lora.text_encoder_lora=true"), "cpu")
    with pytest.raises(ValueError, match=r"bundles the embeddings star, teal, which are not in lora\.new_words"):
        plain.load_weights(path)


def test_bad_new_words_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"lora\.new_words: 'a\.b' must be a prompt word"):
        lora_config(tmp_path, 'lora.new_words={"a.b": "triangle"}')
    with pytest.raises(ValueError, match=r"lora\.new_word_vectors must be in 1\.\.75 \(a prompt chunk.s tokens\), got 0"):
        lora_config(tmp_path, "lora.new_word_vectors=0")
    with pytest.raises(ValueError, match=r"config key lora\.new_words: expected a JSON object"):
        lora_config(tmp_path, 'lora.new_words=["star"]')
    built = [('{"triangle": "square"}', r"lora\.new_words 'triangle' is made of words the model knows"),
             ('{"star": "sphere"}', r"lora\.new_words\['star'\] 'sphere': sphere is not in the model's vocabulary; "
                                    r"known words: a, "),
             ('{"star": " "}', r"lora\.new_words\['star'\] ' ' has no tokens"),
             ('{"star": "triangle", "STAR": "square"}', r"lora\.new_words: embeddings 'star' and 'STAR' are the same")]
    for words, message in built:
        with pytest.raises(ValueError, match=message):
            make_trainer(lora_config(tmp_path, f"lora.new_words={words}"), "cpu")


def _states(run):
    state = load_state(list_states(run / "states")[-1])
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"ema.{k}": v for k, v in state["ema"]["model"].items()},
            **{f"opt.{i}": s["exp_avg"] for i, s in state["optimizer"]["state"].items()}}


def test_resume_with_new_words_is_bit_identical(tmp_path):
    extra = ["save_every=2", *NEW]
    train(lora_config(tmp_path / "a", "steps=4", *extra), progress=False)
    train(lora_config(tmp_path / "b", "steps=2", *extra), progress=False)
    with pytest.raises(ValueError, match=r"lora\.new_word_vectors: 2 -> 1"):
        train(lora_config(tmp_path / "b", "steps=4", *extra, "lora.new_word_vectors=1"), resume=True, progress=False)
    train(lora_config(tmp_path / "b", "steps=4", *extra), resume=True, progress=False)
    a, b = _states(tmp_path / "a"), _states(tmp_path / "b")
    assert any(k.startswith("model.words.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_with_a_bundling_lora_knows_its_words_and_records_no_ti_hash(pipe, tmp_path, capsys):
    from unfog.cli import main

    (tmp_path / "loras").mkdir()
    save_file({**adapters(pipe), "bundle_emb.star.string_to_param.*": rows(pipe, "triangle")},
              str(tmp_path / "loras" / "pivot.safetensors"))
    out = tmp_path / "a.png"
    assert main(["generate", "a teal star <lora:pivot>", "--steps", "2", "--seed", "1", "--lora-dir",
                 str(tmp_path / "loras"), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "outside this model's training domain: teal (never seen" in err  # star is the LoRA's word now
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert 'Lora hashes: "pivot: ' in info and "TI hashes" not in info


@pytest.mark.slow  # torchrun with two processes
def test_two_processes_train_new_words_that_a_rank_lacks(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU), global batch 4, where a rank's half of a batch may
    hold no new word: DDP needs every row to get a gradient on every rank (a zero one is fine), so
    the run must finish, with the one-process run's losses."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    words = ['lora.new_words={"star": "triangle", "teal": "blue"}',
             'shapes_options={"extra_shapes": ["star"], "extra_colors": ["teal"], "extra_fraction": 0.3}']
    steps = ["steps=3", "batch_size=4", "save_every=1", *words]
    train(lora_config(tmp_path / "one", *steps), progress=False)
    cfg = tmp_path / "two.json"
    cfg.write_text(json.dumps(lora_config(tmp_path / "two", *steps).to_dict()))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543",
           "-m", "unfog.cli", "train", str(cfg)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = lambda run: [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    torch.testing.assert_close(torch.tensor(log("two")), torch.tensor(log("one")), rtol=1e-5, atol=1e-6)
