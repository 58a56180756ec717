"""The tests compile with XLA:CPU's LLVM back end at -O0 (tests/conftest.py) because compiling
dominates them; this checks that it changes no number: a tiny model's logits and loss gradient
computed in a process with XLA's default back end equal the ones computed with the tests' flags
up to float32 rounding (the machine code may sum in another order)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

PROGRAM = textwrap.dedent(
    """
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    sys.path.insert(0, {tests!r})
    import tiny_models
    from flaxseg import models

    model = models.create_model(
        "deeplabv3plus", num_classes=3, **{{**tiny_models.TINY_KWARGS["deeplabv3plus"]}}
    )
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 3, size=(2, 32, 32)))
    variables = jax.jit(lambda key: model.init(key, images, train=False))(jax.random.key(0))

    def loss(params):
        # Eval mode: train-mode BatchNorm over 2 tiny images amplifies any rounding into the
        # gradients (chaos, not a difference between the back ends).
        logits = model.apply({{**variables, "params": params}}, images, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    leaves = jax.tree.leaves(grads)
    np.savez(
        sys.argv[1],
        loss=np.asarray(value),
        logits=np.asarray(logits),
        grads=np.concatenate([np.ravel(g) for g in leaves]),
        flags=np.asarray(__import__("os").environ.get("XLA_FLAGS", "")),
    )
    """
)


def _run(path, xla_flags):
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    tests = os.path.dirname(os.path.abspath(__file__))
    subprocess.run(
        [sys.executable, "-c", PROGRAM.format(tests=tests), str(path)],
        env=env,
        check=True,
        timeout=600,
    )
    return np.load(path)


def test_the_tests_back_end_gives_the_default_back_ends_numbers(tmp_path):
    if "--xla_backend_optimization_level=0" not in os.environ.get("XLA_FLAGS", ""):
        pytest.skip("FLAXSEG_TEST_XLA_OPT=default: the tests already use the default back end")
    default = _run(tmp_path / "default.npz", "")
    tests = _run(tmp_path / "tests.npz", os.environ["XLA_FLAGS"])
    assert str(default["flags"]) == "" and "level=0" in str(tests["flags"])
    for name in ("loss", "logits", "grads"):  # float32 rounding of values of up to ~300
        scale = np.abs(default[name]).max()
        np.testing.assert_allclose(tests[name], default[name], rtol=0, atol=1e-5 * scale)
        assert not np.array_equal(tests[name], 0 * tests[name]), name
