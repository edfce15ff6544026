"""Every code block of README.md runs as printed, in a temporary folder (issue 22).

- ```python blocks: each is executed, in order, in one fresh namespace per block.
- ```bash blocks: every ``unfog ...`` command (``\\`` continuations joined, ``#`` comments cut)
  must parse; those in RUN are then run, in README order, and must exit 0: together they also show
  that the commands, run in order, never hit the overwrite guard. The others are skipped by rule,
  each with its reason (``skip_reason``): training and evaluation take minutes to hours on the CPU,
  the 1000-step DDPM grid takes minutes, the Stable Diffusion commands need weights that are not
  in the repository, and a ``--vae`` command the decoder a training command writes (no download works here); for those the test checks only that they parse and
  that no two commands name the same output file.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from unfog.cli import build_parser, main

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)

# The README commands this test runs, in README order.
RUN = [
    'unfog generate "a green triangle above a red square" --seed 3',
    "unfog info outputs/00001-3.png",
    "unfog generate --from outputs/00001-3.png",
    "unfog sample",
    'unfog sample --classes 3,7 --per-class 16 --sampler "DPM++ 2M Karras" --steps 15 --cfg-scale 3 --seed 1 '
    "--out d.png",
    "unfog samplers",
]


def blocks(language: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(README.read_text()) if lang == language]


def commands() -> list[str]:
    """The ``unfog`` command lines of the bash blocks, continuations joined and comments cut."""
    out = []
    for code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line.startswith("unfog "):
                out.append(" ".join(line.split()))
    return out


def skip_reason(command: str) -> str | None:
    words = shlex.split(command)
    if words[1] == "train":
        return "training: minutes to hours on the CPU"
    if words[1] == "eval":
        return "evaluation: minutes on the CPU"
    if words[1] == "serve":
        return "runs until stopped (tests/server/test_a1111_api.py starts and stops it)"
    if "--model" in words:
        return "needs Stable Diffusion weights, which are not in the repository"
    if "--vae" in words:
        return "needs the decoder a training command above writes"
    if "1000" in words:
        return "the 1000-step DDPM grid: minutes on the CPU"
    return None


def output_of(command: str) -> str | None:
    words = shlex.split(command)
    for option in ("--out", "--output"):
        if option in words:
            return words[words.index(option) + 1]
    return "samples.png" if words[1] == "sample" else None  # generate without --output: numbered files


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(previous)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs_as_printed(index, in_tmp):
    exec(compile(blocks("python")[index], f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})


def test_every_command_parses_and_outputs_are_distinct():
    parser = build_parser()
    cmds = commands()
    for command in cmds:
        parser.parse_args(shlex.split(command)[1:])
    outputs = [o for o in map(output_of, cmds) if o is not None]
    assert len(outputs) == len(set(outputs)), outputs  # run in order, none needs --overwrite
    assert [c for c in cmds if skip_reason(c) is None] == RUN


@pytest.mark.slow
def test_cheap_commands_run_in_order(in_tmp, capsys):
    for command in RUN:
        assert main(shlex.split(command)[1:]) == 0, (command, capsys.readouterr().err)
    assert (in_tmp / "outputs" / "00002-3.png").is_file() and (in_tmp / "d.png").is_file()
    assert (in_tmp / "outputs" / "00001-3.png").read_bytes() != b""
