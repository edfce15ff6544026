"""``torch.compile`` for a pipeline's U-Net and VAE decoder, with a way back to eager.

``compile_call(fn, device, mode)`` returns a callable that runs ``torch.compile(fn)``: on CUDA with
CUDA graphs ("reduce-overhead"), whose replays take the per-kernel launch cost out of a step; on
the CPU with inductor's C++ kernels. Shapes are static (``dynamic=False``): a new image size or
batch compiles once more, and each size compiled is kept (up to dynamo's cache limit).

``mode`` "auto" (``--compile``) runs eager, after one warning that says why, where compiling is not
possible: no C++ compiler for inductor on the CPU (it is looked for before anything is compiled),
a device inductor does not serve, or a compilation that fails at its first call. "strict"
(``--compile strict``) raises instead, with the reason.

What is compiled reads the modules' weights at run time, so LoRAs merged in or taken out, a new
VAE and the like are seen without recompiling; options that change the U-Net's path (ControlNets,
DeepCache, token merging) are traced too, at the cost of a recompilation per variant.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Literal, get_args

import torch

from ..choices import check_choice

CompileMode = Literal["off", "auto", "strict"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
COMPILERS = ("g++", "c++", "clang++")


def unavailable_reason(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot compile for ``device`` here, or None."""
    if device.type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else list(COMPILERS)
        if not any(shutil.which(name) for name in names):
            return f"inductor needs a C++ compiler on the CPU, and none of {', '.join(names)} is on the PATH"
        return None
    if device.type == "cuda":
        return None
    return f"inductor does not compile for {device.type!r} devices"


class CompiledCall:
    """``fn`` through ``torch.compile``; in mode "auto", eager from the first failure on (said once
    through ``warn``)."""

    def __init__(self, fn: Callable, what: str, device: torch.device, mode: str, warn: Callable[[str], None]):
        check_choice("compile mode", mode, COMPILE_MODES[1:])
        self.fn, self.what, self.mode, self.warn = fn, what, mode, warn
        self.compiled: Callable | None = None
        reason = unavailable_reason(device)
        if reason is None:
            options = {"mode": "reduce-overhead"} if device.type == "cuda" else {}
            self.compiled = torch.compile(fn, dynamic=False, **options)
        else:
            self._give_up(reason)

    def _give_up(self, reason: str) -> None:
        if self.mode == "strict":
            raise RuntimeError(f"cannot compile the {self.what}: {reason}")
        self.warn(f"cannot compile the {self.what} ({reason}); running it eagerly")
        self.compiled = None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # inductor's and dynamo's failures have no common base class
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                self._give_up(f"{type(err).__name__}: {first}"[:300])
        return self.fn(*args, **kwargs)
