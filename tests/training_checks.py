"""Checks the fine-tuning tasks' tests share."""

from __future__ import annotations

import torch


def overfit_loss_ratio(trainer, steps: int, repeats: int) -> float:
    """The loss on items 0 and 1 after ``steps`` training steps over the loss before them, both
    measured on the same noise and timesteps (``repeats`` draws from one seed): a deterministic
    measure of whether training lowers the loss. The training itself draws as it would have."""

    def held_out_loss() -> float:
        trainer.noise_gen.manual_seed(123)
        with torch.no_grad():
            return sum(trainer.compute_loss(torch.tensor([0, 1]), trainer.net).item() for _ in range(repeats))

    state = trainer.noise_gen.get_state()
    start = held_out_loss()
    trainer.noise_gen.set_state(state)
    for _ in range(steps):
        trainer.train_step()
    return held_out_loss() / start


def last_state_tensors(run) -> dict:
    """The adapters, their EMA and Adam's moments in a run's last saved state, flat by name: what
    two runs must share bit for bit to have trained alike."""
    from unfog.training.state import list_states, load_state

    state = load_state(list_states(run / "states")[-1])
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"ema.{k}": v for k, v in state["ema"]["model"].items()},
            **{f"adam.{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}}
