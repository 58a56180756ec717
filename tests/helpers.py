"""What the tests share (no test module imports another): the one function that puts a model into
a training config, tiny training configs, a tiny trained run directory, tiny models and random
images.

``tests/conftest.py`` turns the expensive ones into session fixtures (``data_dir``: the synthetic
set built once per session; ``trained_workdir``: one tiny finished run).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
from tiny_models import TINY_KWARGS

from flaxseg import models
from flaxseg.configs import default
from flaxseg.data import pipeline
from flaxseg.training import cli, loop, spec

# The tiny FCN of the training tests (VGG-16 at 1/16 width, fc6/fc7 of 16 channels).
TINY_FCN = json.dumps({"base_width": 4, "fc_channels": 16})


def set_model(config, name=None, backbone=None, kwargs=None):
    """Puts a model into a training ``config`` and returns it: ``name``, ``backbone`` and the
    constructor ``kwargs`` (a dict or a JSON string); ``None`` leaves that part as it is.

    Every test that chooses a model for a training config goes through here, so a change to how
    a config names its model is made in this one place."""
    if name is not None:
        config.model.name = name
    if backbone is not None:
        config.model.backbone = backbone
    if kwargs is not None:
        config.model.kwargs = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs)
    return config


def tiny_config(data_dir, **overrides):
    """The training tests' config: a tiny FCN-8s (VGG-16) on the synthetic set, 64 px crops,
    batch 4, 12 steps; ``overrides`` (``model``, ``backbone`` and ``model_kwargs`` included) are
    train.py's flag names or config fields, applied as train.py applies them, except that
    ``model_kwargs`` replaces the tiny FCN's arguments instead of joining them.
    Not resolved (model defaults unset)."""
    config = default.get_config()
    set_model(config, "fcn8s", "vgg16", {} if "model_kwargs" in overrides else TINY_FCN)
    config.dataset = "synthetic"
    config.data_dir = data_dir
    config.crop_size = 64
    config.batch_size = 4
    config.eval_batch_size = 4
    config.steps = 12
    config.lr = 0.01
    config.log_every = 3
    config.eval_every = 1000
    config.checkpoint_every = 6
    config.progress_bar = False
    return cli.apply_overrides(config, overrides)


def tiny_model_config(name, data_dir, kwargs=None):
    """Registered model ``name`` at tiny widths (``kwargs``, default ``TINY_KWARGS[name]``) on
    the synthetic set: 48 px crops, batch 2, 8 steps at one learning rate for all, resolved."""
    config = default.get_config()
    set_model(config, name, kwargs=TINY_KWARGS[name] if kwargs is None else kwargs)
    config.dataset = "synthetic"
    config.data_dir = data_dir
    config.crop_size = 48
    config.batch_size = 2
    config.eval_batch_size = 2
    config.eval_bucket_multiple = 160  # synthetic images are ≤ 160 px: one eval shape, one compile
    config.steps = 8
    config.lr = (
        0.02  # one rate for all: some paper defaults (DeepLab v2: 2.5e-4) barely move in 8 steps
    )
    config.log_every = 1
    config.progress_bar = False
    return spec.resolve_config(config)


def train_tiny_workdir(workdir, data_dir):
    """Trains a tiny U-Net (BatchNorm, so batch_stats are restored too) for 2 steps on the
    synthetic set into ``workdir`` and returns it."""
    config = tiny_model_config("unet", data_dir)
    config.steps = 2
    loop.train_and_evaluate(config, workdir, stop_at_step=2)
    return workdir


def tiny_model(name, num_classes, tiny=None, **kwargs):
    """``models.create_model(name)`` at tiny widths (``tiny``, default ``TINY_KWARGS[name]``),
    ``kwargs`` overriding them."""
    tiny = TINY_KWARGS[name] if tiny is None else tiny
    return models.create_model(name, num_classes=num_classes, **{**tiny, **kwargs})


def images(batch, height, width, channels=3, seed=0):
    """Standard-normal float32 NHWC images (numpy's generator, so the same on every backend)."""
    return jnp.asarray(
        np.random.default_rng(seed).normal(size=(batch, height, width, channels)), jnp.float32
    )


def reference_logits(restored, image: np.ndarray) -> np.ndarray:
    """A restored run's model (``{"model", "variables"}``) on the input pipeline's own
    normalisation (numpy), not predict.py's: the reference for predict and export."""
    normalised = pipeline.normalise(image)
    logits = restored["model"].apply(restored["variables"], normalised[None], train=False)
    return np.asarray(logits[0], np.float32)


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a test's subprocess with ``devices`` virtual CPU devices, keeping the
    flags the tests run under (conftest.py's back-end level)."""
    flags = os.environ.get("XLA_FLAGS", "")
    return f"{flags} --xla_force_host_platform_device_count={devices}".strip()
