"""Test helpers for models: random variables without compiling ``init``.

XLA-compiling a model's ``init`` on CPU is dominated by the random initialisers (tens of
seconds for a tiny SegNet on a loaded 2-core machine); tests that check geometry and train-mode
behaviour only need *some* well-scaled variables of the right shapes, which ``jax.eval_shape``
gives for free and numpy fills.
"""

import jax
import numpy as np
from flax import traverse_util


def random_variables(model, images, seed=0):
    """Variables for ``model`` at ``images``' shape: He-scaled normal kernels, small biases,
    BatchNorm at identity (scale 1, mean 0, var 1)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        shape, name = leaf.shape, path[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name in ("scale", "var"):
            value = np.ones(shape)
        elif name == "mean":
            value = np.zeros(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        flat[path] = np.asarray(value, leaf.dtype)
    return traverse_util.unflatten_dict(flat)
