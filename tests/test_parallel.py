"""Data parallelism, gradient accumulation and mixed precision give the update they promise.

* --parallel=jit (a mesh of 8 virtual CPU devices), --parallel=pmap (8 replicas, sums over the
  axis, SyncBN) and one device give the same parameters and BatchNorm statistics after 3 steps,
  for a pixel-sum loss (cross-entropy: counts added over devices) and one that is not
  (cross-entropy + Dice: computed on the gathered logits); the training loop runs either way and
  a pmap run's checkpoint resumes under jit.
* --config.grad_accum=N equals one step on the whole batch (no BatchNorm, pixel-sum loss), and
  with BatchNorm moves the running statistics by the mean of the micro-batches' updates.
* --config.dtype=bfloat16 computes in bfloat16 with float32 parameters, statistics and loss.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, xla_flags

from flaxseg.serving.restore import DTYPES, build_model
from flaxseg.training import loop, sharding
from flaxseg.training import spec as spec_lib

pytestmark = pytest.mark.slow  # compiles train steps on 8 virtual devices and under pmap

REPO = Path(__file__).resolve().parents[1]

# A U-Net with BatchNorm after every conv and no dropout (dropout masks are drawn per device
# under pmap, so they could not match the mesh's).
UNET_BN = json.dumps({"base_channels": 4, "batchnorm": True, "dropout_rate": 0.0})

_EIGHT_DEVICES = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from helpers import tiny_config
from flaxseg import models
from flaxseg.training import loop, sharding, spec
assert jax.device_count() == 8, jax.devices()
data_dir, workdir = sys.argv[1], sys.argv[2]
# In float64: in float32 the runs agree to 1e-7 in one step, but small-batch BatchNorm and
# momentum amplify the rounding of a different summation order to ~1e-4 in three (chaos).
jax.config.update("jax_enable_x64", True)


def config_for(loss, parallel, num_classes=5):
    config = spec.resolve_config(tiny_config(
        data_dir, model="unet", backbone="", model_kwargs=%(kwargs)r, num_classes=num_classes,
        crop_size=32, batch_size=8, eval_batch_size=8, lr=0.05, loss=loss, parallel=parallel))
    spec.validate_config(config)
    return config


rng = np.random.default_rng(0)
batches = []
for index in range(3):
    label = rng.integers(0, 5, (8, 32, 32)).astype(np.int32)
    label[:, : index + 2] = 255
    label[0, :, :20] = 255  # devices see different numbers of valid pixels
    batches.append({"image": rng.normal(size=(8, 32, 32, 3)), "label": label})
key = jax.random.key(1)
mesh = sharding.create_mesh()
one_device = Mesh(np.asarray(jax.devices()[:1]), ("data",))
report = {}
for loss in ("cross_entropy", "cross_entropy+0.5*dice"):
    results = {}
    for name, parallel, run_mesh in (("one", "jit", one_device), ("mesh", "jit", mesh),
                                     ("pmap", "pmap", mesh)):
        config = config_for(loss, parallel)
        model = models.create_model("unet", num_classes=5, dtype=jnp.float64,
                                    param_dtype=jnp.float64, **config.model.kwargs)
        tx, _ = loop.create_optimizer(config)
        state = loop.init_state(model, tx, config, run_mesh)
        step = loop.jit_train_step(config, run_mesh)
        if parallel == "pmap":
            state = sharding.to_replicas(state)
        losses = []
        for batch in batches:
            if parallel == "pmap":
                state, metrics = step(state, sharding.split_for_replicas(batch), key)
                metrics = jax.tree.map(lambda x: x[0], metrics)
            else:
                state, metrics = step(state, sharding.shard_batch(batch, run_mesh), key)
            losses.append([float(metrics[k]) for k in ("loss", "pixel_accuracy")])
        if parallel == "pmap":
            replicas = jax.device_get((state.params, state.batch_stats))
            spread = max(float(np.max(np.abs(x - x[0]))) for x in jax.tree.leaves(replicas))
            report[f"{loss}/replicas_differ"] = spread
            state = sharding.from_replicas(state, mesh)
        results[name] = (jax.device_get((state.params, state.batch_stats)), losses)
    reference, reference_losses = results["one"]
    report[f"{loss}/dtype"] = str(jax.tree.leaves(reference)[0].dtype)
    for name in ("mesh", "pmap"):
        tree, run_losses = results[name]
        report[f"{loss}/{name}"] = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(tree))
        )
        report[f"{loss}/{name}_metrics"] = float(
            np.max(np.abs(np.subtract(reference_losses, run_losses)))
        )
    report[f"{loss}/stats_moved"] = float(max(
        np.max(np.abs(x)) for x in jax.tree.leaves(reference[1])))

# The loop itself under pmap (float32): 2 steps, checkpoint, then 1 more step resumed under jit.
jax.config.update("jax_enable_x64", False)
config = config_for("cross_entropy", "pmap", num_classes=None)  # the dataset's 21
config.steps, config.checkpoint_every, config.eval_every = 2, 2, 2
summary = loop.train_and_evaluate(config, workdir)
config = config_for("cross_entropy", "jit", num_classes=None)
config.steps = 3
resumed = loop.train_and_evaluate(config, workdir)
report["loop_steps"] = [summary["step"], resumed["step"]]
report["loop_miou"] = [summary["miou"], resumed["miou"]]
print(json.dumps(report))
""" % {"kwargs": UNET_BN}


def test_mesh_pmap_and_one_device_give_the_same_update(data_dir, tmp_path):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": xla_flags(8),
        "PYTHONPATH": str(REPO / "tests"),
    }
    result = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICES, data_dir, str(tmp_path / "wd")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for loss in ("cross_entropy", "cross_entropy+0.5*dice"):
        assert report[f"{loss}/dtype"] == "float64", report
        assert report[f"{loss}/mesh"] <= 1e-5, report
        assert report[f"{loss}/pmap"] <= 1e-5, report
        assert report[f"{loss}/mesh_metrics"] <= 1e-5, report
        assert report[f"{loss}/pmap_metrics"] <= 1e-5, report
        assert report[f"{loss}/replicas_differ"] == 0.0, report
        assert report[f"{loss}/stats_moved"] > 1e-3, report  # BatchNorm statistics were trained
    assert report["loop_steps"] == [2, 3], report
    assert all(0.0 <= m <= 1.0 for m in report["loop_miou"]), report


def _state(config):
    model = build_model(spec_lib.model_spec(config), DTYPES[config.dtype])
    tx, _ = loop.create_optimizer(config)
    return model, loop.init_state(model, tx, config, sharding.create_mesh())


def _config(tmp_path, **overrides):
    config = spec_lib.resolve_config(
        tiny_config(
            str(tmp_path),
            **{
                "model": "unet",
                "backbone": "",
                "num_classes": 5,
                "crop_size": 32,
                "batch_size": 4,
                "lr": 0.05,
                **overrides,
            },
        )
    )
    spec_lib.validate_config(config)
    return config


def _batch(seed=0, size=4):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 5, (size, 32, 32)).astype(np.int32)
    label[:, :3] = 255
    label[1, :, :24] = 255  # micro-batches with different numbers of valid pixels
    return {"image": rng.normal(size=(size, 32, 32, 3)).astype(np.float32), "label": label}


def _train(config, batches):
    _, state = _state(config)
    step = loop.jit_train_step(config, sharding.create_mesh())
    history = []
    for batch in batches:
        state, metrics = step(state, batch, jax.random.key(0))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    kwargs = json.dumps({"base_channels": 4, "batchnorm": False, "dropout_rate": 0.0})
    batches = [_batch(0), _batch(1)]
    whole, whole_metrics = _train(_config(tmp_path, model_kwargs=kwargs), batches)
    parts, parts_metrics = _train(_config(tmp_path, model_kwargs=kwargs, grad_accum=4), batches)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(parts.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert int(parts.step) == 2
    for m1, m2 in zip(whole_metrics, parts_metrics):
        for key in ("loss", "cross_entropy", "pixel_accuracy"):
            assert m1[key] == pytest.approx(m2[key], rel=1e-5), (key, m1, m2)


def test_gradient_accumulation_with_batchnorm_and_a_non_pixel_sum_loss(tmp_path):
    """BatchNorm normalises each micro-batch alone and its running statistics move by the mean of
    the micro-batches' updates; Dice (not a pixel sum) is averaged over the micro-batches."""
    config = _config(tmp_path, model_kwargs=UNET_BN, loss="dice", grad_accum=2)
    model, state = _state(config)
    batch = _batch(2)
    halves = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]).swapaxes(0, 1), batch)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    dice = spec_lib.create_loss(config)
    stats, half_losses = [], []
    for index in range(2):
        half = jax.tree.map(lambda x: x[index], halves)
        logits, updates = model.apply(variables, half["image"], train=True, mutable="batch_stats")
        stats.append(updates["batch_stats"])
        half_losses.append(float(dice(logits, half["label"])[0]))
    expected = jax.tree.map(lambda a, b: (a + b) / 2, *stats)
    new_state, metrics = _train(config, [batch])
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new_state.batch_stats)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert metrics[0]["loss"] == pytest.approx(np.mean(half_losses), rel=1e-5)


def test_bfloat16_computes_in_bfloat16_with_float32_state_and_learns(tmp_path):
    config32 = _config(tmp_path, model_kwargs=UNET_BN)
    config16 = _config(tmp_path, model_kwargs=UNET_BN, dtype="bfloat16")
    model32, state = _state(config32)
    model16, _ = _state(config16)
    batch = _batch(3)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits32 = model32.apply(variables, batch["image"], train=False)
    logits16 = model16.apply(variables, batch["image"], train=False)
    assert logits16.dtype == jnp.float32  # the output is cast back for the softmax and loss
    # bfloat16 keeps 8 significant bits: a relative error of a few 2^-8 through the network.
    scale = float(jnp.max(jnp.abs(logits32)))
    assert float(jnp.max(jnp.abs(logits16 - logits32))) <= 0.05 * scale
    assert float(jnp.max(jnp.abs(logits16 - logits32))) > 0  # it really computed in bfloat16
    jaxpr = str(
        jax.make_jaxpr(functools.partial(model16.apply, train=False))(variables, batch["image"])
    )
    assert "bf16" in jaxpr and "conv_general_dilated" in jaxpr

    trained, history = _train(config16, [batch] * 8)
    dtypes = {x.dtype for x in jax.tree.leaves((trained.params, trained.batch_stats))}
    assert dtypes == {np.dtype(np.float32)}, dtypes
    assert history[0]["loss"].dtype == np.float32
    losses = [float(h["loss"]) for h in history]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"parallel": "shard_map"}, "--parallel='shard_map' is not one of jit, pmap."),
        (
            {"grad_accum": 3},
            "--config.grad_accum=3 does not divide the per-device batch of 4 (--batch_size=4 "
            "over 1 device)",
        ),
        ({"grad_accum": 0}, "--config.grad_accum must be a positive integer, got 0."),
    ],
)
def test_bad_parallel_settings_are_one_sentence(tmp_path, overrides, message):
    with pytest.raises(ValueError) as error:
        _config(tmp_path, model_kwargs=UNET_BN, **overrides)
    assert message in str(error.value)


def test_pmap_is_refused_across_processes(tmp_path, monkeypatch):
    """pmap's per-process replicas are not set up across hosts (a 2-process run hung after its
    steps, in validation or the checkpoint): one sentence instead."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError) as error:
        _config(tmp_path, model_kwargs=UNET_BN, parallel="pmap")
    assert str(error.value) == (
        "--parallel=pmap runs on one process; this run has 2 processes: use --parallel=jit (the "
        "default), which spans every host's devices."
    )


def test_a_resume_on_another_process_count_continues_the_global_stream():
    """Two hosts after 3 steps of batch 2 each have read 6 examples of one global stream; one
    host resuming their checkpoint continues at global position 12 (not 6: no replay)."""
    from flaxseg.data import pipeline
    from flaxseg.training import inputs

    rng = np.random.default_rng(0)
    source = [
        {
            "image": rng.integers(0, 255, (40, 40, 3), dtype=np.uint8),
            "segmentation_mask": rng.integers(0, 5, (40, 40, 1), dtype=np.uint8),
        }
        for _ in range(10)
    ]

    def stream(**kwargs):
        return pipeline.create_train_iterator(source, crop_size=16, seed=3, **kwargs)

    host = stream(batch_size=2, shard_index=1, shard_count=2)
    for _ in range(3):
        next(host)
    saved = json.loads(json.dumps({"iterator": host.get_state(), "process_count": 2}))
    single = stream(batch_size=4)
    for _ in range(3):
        next(single)
    resumed = stream(batch_size=4)
    inputs.restore_iterator(resumed, saved)  # this test runs in 1 process
    expected, got = next(single), next(resumed)
    np.testing.assert_array_equal(expected["label"], got["label"])
    np.testing.assert_array_equal(expected["image"], got["image"])
    old_format = stream(batch_size=4)
    inputs.restore_iterator(old_format, {"next_index": 12})  # grain's state alone
    np.testing.assert_array_equal(next(old_format)["label"], expected["label"])

    with_workers = {"iterator": {"workers": [{"next_index": 3}]}, "process_count": 2}
    with pytest.raises(ValueError, match="saved by 2 processes with grain workers"):
        inputs.restore_iterator(stream(batch_size=4), with_workers)
