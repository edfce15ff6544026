"""`unfog train`: the training loop that every task's trainer runs (``base.BaseTrainer``; the
tasks are in ``config.TASKS``): resume and ``--init-from``, the log, periodic states and sample
grids, and stopping cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from ..checkpoint.io import atomic_write
from .base import BaseTrainer
from .config import TrainConfig, config_differences, get_task
from .state import list_states, load_state


def make_trainer(config: TrainConfig, device: str | None = None) -> BaseTrainer:
    """The trainer of the config's task (``TASKS``)."""
    return get_task(config.task).load_trainer()(config, device)


def _resume(trainer: BaseTrainer, force: bool) -> list[str]:
    """Load the latest state; returns every config change against it (cadence included), which
    ``train`` records in ``resumes.jsonl``. A change of the trajectory needs ``force``."""
    states = list_states(trainer.out / "states")
    if not states:
        raise FileNotFoundError(f"nothing to resume: no training state in {trainer.out / 'states'}")
    state = load_state(states[-1])
    diffs = config_differences(state["config"], trainer.config.to_dict())
    if diffs and not force:
        raise ValueError("the config differs from the one the run was started with: " + "; ".join(diffs)
                         + " (pass --force to resume anyway)")
    if diffs and trainer.world.is_main:
        print("resuming with a changed config (--force): " + "; ".join(diffs), file=sys.stderr)
    trainer.load_state_dict(state)
    return config_differences(state["config"], trainer.config.to_dict(), ignore=())


def find_state(source: Path) -> Path:
    """The training state ``source`` names: a state file (or a model file), or the latest state of a
    run folder (its ``states`` folder or the folder itself)."""
    source = Path(source)
    if source.is_file():
        return source
    for folder in (source / "states", source):
        states = list_states(folder)
        if states:
            return states[-1]
    raise FileNotFoundError(f"no training state to start from in {source}: expected a state_XXXXXXXX.pt file, "
                            "a run folder holding them in states/, or a model .safetensors file")


def _init_from(trainer: BaseTrainer, path: Path) -> list[str]:
    """Start a new run from another run's state file ``path`` (weights, EMA, optimizer, RNG
    streams, step): a curriculum stage. Every config difference is expected there, so none needs
    ``force``; they are returned for ``resumes.jsonl``, after the state they came from. A model
    file (``.safetensors``, or a task's own ``weights_file`` such as an A1111 hypernetwork ``.pt``)
    gives the weights alone, and the run starts at step 0."""
    if path.suffix == ".safetensors" or trainer.weights_file(path):
        changes = trainer.load_weights(path)
        if trainer.world.is_main:
            print(f"starting from the weights of {path} (step 0, a fresh optimizer)", file=sys.stderr)
        return [f"started from the weights of {path}"] + changes
    state = load_state(path)
    trainer.load_state_dict(state)
    if trainer.world.is_main:
        print(f"starting from {path} (step {trainer.step})", file=sys.stderr)
    return [f"started from {path}"] + config_differences(state["config"], trainer.config.to_dict(), ignore=())


def _trim_log(path: Path, step: int) -> None:
    """Drop the log lines after ``step``: a killed run logs past its last saved state, and the
    resumed run logs those steps again. Rewritten atomically."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) < len(lines):
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


class _StopRequests:
    """Ctrl-C (SIGINT) and SIGTERM (what schedulers, ``kill`` and torchrun send) ask the loop to
    stop at the end of the current step, so the saved state is never that of a half-done step; a
    second Ctrl-C stops at once (the last saved state is intact: states are written atomically)."""

    def __init__(self):
        self.requested: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving the state "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False,
          init_from: str | Path | None = None, progress: bool = True, device: str | None = None) -> Path:
    """Train (or resume) the run of ``config``; returns the path of the final model file.
    ``init_from`` (a state file or run folder) starts the run from another run's state, e.g. the
    previous stage of a curriculum. Under torchrun every process calls this; rank 0 alone writes
    files and shows progress."""
    out = Path(config.out_dir)
    if resume and init_from is not None:
        raise ValueError("--resume continues the run in out_dir and --init-from starts a new one from another "
                         "run's state: pass one of them")
    if list_states(out / "states") and not (resume or overwrite):
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it "
                              "or --overwrite to start again")
    if init_from is not None:
        source = find_state(init_from)  # before anything is built or deleted: a wrong path costs nothing
        if source.resolve().parent in ((out / "states").resolve(), out.resolve()):
            raise ValueError(f"--init-from {init_from} is this run's own state; use --resume to continue it")
    trainer = make_trainer(config, device)
    main = trainer.world.is_main
    changes = None
    if resume:
        changes = _resume(trainer, force)
    elif overwrite and main:
        for old in list_states(out / "states"):
            old.unlink()
        if (out / "log.jsonl").exists():
            (out / "log.jsonl").unlink()
    if init_from is not None:
        changes = _init_from(trainer, source)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(out / "log.jsonl", trainer.step)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        if changes:  # config.json now holds the new config; keep the history of what changed when
            with (out / "resumes.jsonl").open("a") as history:
                history.write(json.dumps({"step": trainer.step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                          "changes": changes}) + "\n")
    log = (out / "log.jsonl").open("a") if main else None
    bar = tqdm(total=config.steps, initial=trainer.step, disable=not (progress and main), desc="train", unit="it")
    smooth, t0 = None, time.perf_counter()
    try:
        with _StopRequests() as stop:
            while trainer.step < config.steps:
                loss = trainer.train_step()
                smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
                bar.update(1)
                bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{trainer.lr_sched.get_last_lr()[0]:.2e}")
                if log is not None and trainer.step % config.log_every == 0:
                    log.write(json.dumps({"step": trainer.step, "loss": loss, "loss_smooth": smooth,
                                          "lr": trainer.lr_sched.get_last_lr()[0],
                                          "elapsed_s": round(time.perf_counter() - t0, 2)}) + "\n")
                    log.flush()
                last = trainer.step == config.steps
                stopping = trainer.world.any(stop.requested is not None)
                if trainer.step % config.save_every == 0 or last or stopping:
                    trainer.save()
                if main and (trainer.step % config.sample_every == 0 or last):
                    trainer.sample_grid()
                if stopping and not last:
                    if main:
                        bar.close()
                        print(f"interrupted: state saved at step {trainer.step} in {out / 'states'}; "
                              "resume with --resume", file=sys.stderr)
                    raise KeyboardInterrupt
    finally:
        bar.close()
        if log is not None:
            log.close()
    return trainer.model_path
