"""Every registered model trains on the synthetic set (compiling its step once) and goes through
train → checkpoint → eval.

Tiny widths (tests/tiny_models.py), 48 px crops. The loss check overfits one real batch from the
synthetic pipeline for a few steps: with working gradients, the loss on that batch must drop.
"""

import jax
import numpy as np
import pytest
from helpers import tiny_model_config

from flaxseg import models
from flaxseg.serving.restore import build_model
from flaxseg.training import evaluation, inputs, loop, spec
from flaxseg.training.sharding import create_mesh, shard_batch

pytestmark = pytest.mark.slow  # trains every registered model


@pytest.mark.parametrize("name", models.list_models())
def test_model_trains_and_evaluates(name, data_dir, tmp_path):
    config = tiny_model_config(name, data_dir)
    mesh = create_mesh()
    model = build_model(spec.model_spec(config))
    tx, _ = loop.create_optimizer(config)
    state = loop.init_state(model, tx, config, mesh)
    batch = shard_batch(next(inputs.create_train_iterator(config)), mesh)
    train_step = loop.jit_train_step(config, mesh)
    key = jax.random.key(0)
    losses = []
    for _ in range(8):
        state, metrics = train_step(state, batch, key)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)), losses
    assert min(losses[-3:]) < losses[0], losses
    # Static shapes and a state of fixed structure: the step compiled once, not once per call.
    assert evaluation.compile_count(train_step) == 1

    # Same config, so the train step's compiled executable comes from the persistent cache.
    summary = loop.train_and_evaluate(config, tmp_path, stop_at_step=2)
    assert summary["step"] == 2
    evaluated = evaluation.evaluate_workdir(tmp_path)
    assert evaluated["miou"] == pytest.approx(summary["miou"], abs=1e-6)
    assert evaluated["report"].splitlines()[-1] == summary["report"].splitlines()[-1]
