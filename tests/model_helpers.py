"""Test helpers for models: random variables without compiling ``init``, the train-mode check.

XLA-compiling a model's ``init`` on CPU is dominated by the random initialisers (tens of
seconds for a tiny SegNet on a loaded 2-core machine); tests that check geometry and train-mode
behaviour only need *some* well-scaled variables of the right shapes, which ``jax.eval_shape``
gives for free and numpy fills.
"""

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, images=None, seed=0):
    """``params`` and ``batch_stats`` for ``model`` at ``images``' shape (default 1×64×64×3),
    built on the host from ``eval_shape``: He-scaled normal kernels (activations stay O(1)
    through deep stacks), BatchNorm scales and variances in [0.5, 1.5], biases and means
    0.1·N(0, 1). FCN's zero-initialised score layers would make a real ``init``'s logits 0."""
    if images is None:
        images = jnp.zeros((1, 64, 64, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    shapes = {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=leaf.shape)
        else:
            value = 0.1 * rng.standard_normal(leaf.shape)
        return np.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def check_train_mode(model, variables, images, num_classes):
    """Apply ``model`` with ``train=True`` under two dropout seeds and check the train-mode
    contract: float32 logits at the input size, dropout that follows the rng, every BatchNorm
    statistic updated. Returns the first run's logits and updated collections."""
    train_apply = jax.jit(
        lambda seed: model.apply(
            variables,
            images,
            train=True,
            mutable=["batch_stats", "aux"],
            rngs={"dropout": jax.random.key(seed)},
        )
    )
    (first, updates), (second, _) = train_apply(1), train_apply(2)
    assert first.shape == (*images.shape[:3], num_classes) and first.dtype == jnp.float32
    assert not np.allclose(first, second)  # the dropout rng matters
    changed = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"]
    )
    assert all(jax.tree.leaves(changed))
    return first, updates
