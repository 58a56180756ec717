"""Schedules, the weight-decay mask and per-parameter groups (Caffe's lr_mult / decay_mult)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxseg.training import optim


def test_poly_schedule_values():
    schedule = optim.poly_schedule(0.01, 100, power=0.9)
    for step in (0, 10, 50, 99, 100):
        assert float(schedule(step)) == pytest.approx(
            0.01 * (1 - step / 100) ** 0.9, rel=1e-5, abs=1e-9
        )


def test_step_and_constant_schedules():
    step = optim.learning_rate_schedule(0.001, 6000, kind="step", step_size=2000, gamma=0.1)
    for t, expected in ((0, 1e-3), (1999, 1e-3), (2000, 1e-4), (4000, 1e-5), (5999, 1e-5)):
        assert float(step(t)) == pytest.approx(expected, rel=1e-5)
    constant = optim.learning_rate_schedule(0.1, 10, kind="constant")
    assert float(constant(0)) == float(constant(9)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"--config.lr_schedule='cosine' is not one of poly"):
        optim.learning_rate_schedule(0.1, 10, kind="cosine")
    with pytest.raises(ValueError, match=r"--config.lr_step_size must be positive"):
        optim.learning_rate_schedule(0.1, 10, kind="step")


def test_weight_decay_skips_biases_and_batchnorm():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.ones(2)},
        "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
    }
    mask = optim.weight_decay_mask(params)
    assert mask == {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False, "bias": False}}
    tx = optim.create_optimizer(learning_rate=1.0, momentum=0.0, weight_decay=0.1)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # With zero gradients only decayed parameters move: -lr * wd * param.
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1)
    for path in (("conv", "bias"), ("bn", "scale"), ("bn", "bias")):
        np.testing.assert_allclose(updates[path[0]][path[1]], 0.0)


RULES = (
    {"pattern": r"^upscore", "lr_mult": 0.0},
    {"pattern": r"^classifier/kernel$", "lr_mult": 10.0},
    {"pattern": r"^classifier/bias$", "lr_mult": 20.0, "weight_decay": 0.0},
    {"pattern": r"conv_dw/kernel$", "weight_decay": 0.0},
)


def _toy_params():
    rng = np.random.default_rng(0)
    leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {
        "body": {"kernel": leaf(4, 3), "bias": leaf(3)},
        "sep": {"conv_dw": {"kernel": leaf(3, 3)}},
        "classifier": {"kernel": leaf(4, 3), "bias": leaf(3)},
        "upscore": {"kernel": leaf(4, 4)},
    }


def test_param_groups_name_each_leaf():
    groups = optim.param_groups(_toy_params(), RULES, weight_decay=5e-4)
    assert groups["upscore/kernel"] == {"lr_mult": 0.0, "weight_decay": 0.0, "rule": 0}
    assert groups["classifier/kernel"] == {"lr_mult": 10.0, "weight_decay": 5e-4, "rule": 1}
    assert groups["classifier/bias"] == {"lr_mult": 20.0, "weight_decay": 0.0, "rule": 2}
    assert groups["sep/conv_dw/kernel"] == {"lr_mult": 1.0, "weight_decay": 0.0, "rule": 3}
    assert groups["body/kernel"] == {"lr_mult": 1.0, "weight_decay": 5e-4, "rule": None}
    assert groups["body/bias"] == {"lr_mult": 1.0, "weight_decay": 0.0, "rule": None}
    assert "frozen: 1 arrays, e.g. upscore/kernel" in optim.describe_groups(groups)


def _train(params, rules, steps=5, momentum=0.9, weight_decay=0.0):
    """SGD on the linear least-squares toy problem ½‖x·W + b − y‖² for every leaf."""
    tx = optim.create_optimizer(
        learning_rate=0.01, momentum=momentum, weight_decay=weight_decay, param_groups=rules
    )
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 3))

    def loss(p):
        out = x @ p["body"]["kernel"] + p["body"]["bias"]
        out = out + x @ p["classifier"]["kernel"] + p["classifier"]["bias"]
        out = out + (x @ p["upscore"]["kernel"])[:, :3] + (x[:, :3] @ p["sep"]["conv_dw"]["kernel"])
        return 0.5 * jnp.sum((out - y) ** 2)

    @jax.jit
    def step(p, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(p), opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return params


def test_frozen_leaf_is_bit_identical_after_steps():
    start = _toy_params()
    trained = _train(start, RULES, weight_decay=5e-4)
    assert np.array_equal(
        np.asarray(trained["upscore"]["kernel"]), np.asarray(start["upscore"]["kernel"])
    )
    assert not np.allclose(trained["body"]["kernel"], start["body"]["kernel"])


def test_lr_mult_ten_moves_ten_times_as_far():
    # One plain SGD step (no momentum, no decay): the update is −lr·mult·grad, so with the same
    # gradient the ×10 leaf moves exactly ten times as far as it does at ×1.
    start = _toy_params()
    plain = _train(start, (), steps=1, momentum=0.0)
    boosted = _train(
        start, ({"pattern": r"^classifier/kernel$", "lr_mult": 10.0},), steps=1, momentum=0.0
    )
    moved_plain = np.asarray(plain["classifier"]["kernel"] - start["classifier"]["kernel"])
    moved_boosted = np.asarray(boosted["classifier"]["kernel"] - start["classifier"]["kernel"])
    np.testing.assert_allclose(moved_boosted, 10 * moved_plain, rtol=1e-5)
    np.testing.assert_allclose(plain["body"]["kernel"], boosted["body"]["kernel"], rtol=1e-6)


@pytest.mark.parametrize(
    "rules, message",
    [
        (({"lr_mult": 2.0},), r"param_groups\[0\] must be a dict with a 'pattern'"),
        (({"pattern": "(", "lr_mult": 2.0},), r"pattern '\(' is not a regular expression"),
        (({"pattern": "a", "lr": 2.0},), r"unknown keys \['lr'\]"),
        (({"pattern": "a", "lr_mult": -1.0},), r"lr_mult must be non-negative"),
    ],
)
def test_bad_param_groups_get_one_sentence(rules, message):
    with pytest.raises(ValueError, match=message):
        optim.create_optimizer(learning_rate=0.1, param_groups=rules)
