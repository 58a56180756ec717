"""Poly schedule and the weight-decay mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.training import optim


def test_poly_schedule_values():
    schedule = optim.poly_schedule(0.01, 100, power=0.9)
    for step in (0, 10, 50, 99, 100):
        assert float(schedule(step)) == pytest.approx(
            0.01 * (1 - step / 100) ** 0.9, rel=1e-5, abs=1e-9
        )


def test_weight_decay_skips_biases_and_batchnorm():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.ones(2)},
        "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
    }
    mask = optim.weight_decay_mask(params)
    assert mask == {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False, "bias": False}}
    tx = optim.create_optimizer(learning_rate=1.0, momentum=0.0, weight_decay=0.1)
    zeros = {k: {n: jnp.zeros_like(v) for n, v in d.items()} for k, d in params.items()}
    updates, _ = tx.update(zeros, tx.init(params), params)
    # With zero gradients only decayed parameters move: -lr * wd * param.
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1)
    for path in (("conv", "bias"), ("bn", "scale"), ("bn", "bias")):
        np.testing.assert_allclose(updates[path[0]][path[1]], 0.0)
