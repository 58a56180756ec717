"""The train state: a plain pytree of step, params, BatchNorm statistics and optimiser state."""

from typing import Any

import jax.numpy as jnp
from flax.training import train_state


class TrainState(train_state.TrainState):
    batch_stats: Any = None
    # Adversarial training (flaxseg.training.adversarial): the adversary's own TrainState.
    adversary: Any = None


def init_variables(model, rng, input_shape):
    """Initialises the model's variables for an input of shape [B, H, W, 3] (float32 params)."""
    return model.init(
        {"params": rng, "dropout": rng}, jnp.zeros(input_shape, jnp.float32), train=False
    )


def create_train_state(model, tx, rng, input_shape) -> TrainState:
    variables = init_variables(model, rng, input_shape)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
    )


def state_to_checkpoint(state: TrainState) -> dict:
    """The saved part of the state (apply_fn and tx are rebuilt from the recorded model spec)."""
    saved = {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }
    if state.adversary is not None:
        saved["adversary"] = {
            "step": state.adversary.step,
            "params": state.adversary.params,
            "opt_state": state.adversary.opt_state,
        }
    return saved


def state_from_checkpoint(state: TrainState, restored: dict) -> TrainState:
    state = state.replace(
        step=restored["step"],
        params=restored["params"],
        batch_stats=restored["batch_stats"],
        opt_state=restored["opt_state"],
    )
    if state.adversary is not None:
        saved = restored["adversary"]
        state = state.replace(
            adversary=state.adversary.replace(
                step=saved["step"], params=saved["params"], opt_state=saved["opt_state"]
            )
        )
    return state
