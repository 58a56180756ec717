"""Every encoder added for segmentation_models_pytorch compatibility trains inside U-Net, and
DeepLab v3+ (smp's head and the paper's) trains with one encoder of each family, on the synthetic
set.

Same setup as tests/test_registry_training.py (``helpers.tiny_model_config``: 48 px crops,
batch 2, the real input pipeline and jitted train step), with the encoder as the model's
backbone at tiny widths (tests/tiny_models.py ``TINY_ENCODER_KWARGS``): with working gradients
the loss on one real batch must drop within a few steps.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
from helpers import tiny_model_config

from flaxseg import models
from flaxseg.serving.restore import build_model
from flaxseg.training import inputs, loop, spec
from flaxseg.training.sharding import create_mesh, shard_batch

pytestmark = pytest.mark.slow  # trains every encoder

ENCODERS = ("resnet18", "resnet34", "resnext50_32x4d", "mobilenet_v2", "efficientnet-b0")
# EfficientNet-B1…B7 run B0's layer code at other widths and depths (their key maps and
# parameter counts are checked against timm and smp in test_light_encoders.py, B3's forward
# too): training each in U-Net took 11 of this file's 20 minutes from an empty compile cache and
# adds nothing over B0. They are built inside U-Net below (shapes only, nothing compiled).
SCALED = tuple(f"efficientnet-b{i}" for i in range(1, 8))
STEPS = 6

# Every encoder family once, in U-Net (output stride 32, nothing dilated).
CASES = [("unet", encoder) for encoder in ENCODERS]
# DeepLab v3+ dilates its encoder (output stride 16): one encoder per family, not all twelve.
# ResNet-34 and EfficientNet-B1…B7 run the same layer code as ResNet-18 and B0 with other widths
# and block counts (trained above in U-Net), and each family's dilated forward is checked
# against smp / timm (test_resnet_encoders.py, test_light_encoders.py); compiling them all here
# too cost more than half of this file's time from an empty compile cache.
CASES += [
    ("deeplabv3plus", encoder)  # head='smp'
    for encoder in ("resnet18", "resnext50_32x4d", "mobilenet_v2", "efficientnet-b0")
]
CASES += [("deeplabv3plus_paper", "resnet18")]  # the paper head (torchvision-style dilation)


@pytest.mark.parametrize("model_name, encoder", CASES)
def test_encoder_trains_inside_the_model(model_name, encoder, data_dir):
    name = model_name.removesuffix("_paper")
    kwargs = {**tiny_models.TINY_ENCODER_KWARGS[name], "backbone": encoder}
    if model_name.endswith("_paper"):
        kwargs["head"] = "paper"
    config = tiny_model_config(name, data_dir, kwargs)
    mesh = create_mesh()
    model = build_model(spec.model_spec(config))
    assert model.backbone == encoder
    tx, _ = loop.create_optimizer(config)
    state = loop.init_state(model, tx, config, mesh)
    batch = shard_batch(next(inputs.create_train_iterator(config)), mesh)
    train_step = loop.jit_train_step(config, mesh)
    key = jax.random.key(0)
    losses = []
    for _ in range(STEPS):
        state, metrics = train_step(state, batch, key)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)), losses
    assert min(losses[-3:]) < losses[0], losses


@pytest.mark.parametrize("encoder", SCALED)
def test_scaled_efficientnets_fit_inside_unet(encoder):
    """U-Net's decoder takes each scaled EfficientNet's features (their channels from the
    encoder's table) and gives logits at the input size: the model traces, nothing compiled."""
    model = models.create_model(
        "unet", num_classes=3, **{**tiny_models.TINY_ENCODER_KWARGS["unet"], "backbone": encoder}
    )
    images = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
    variables = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), images
    )
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
    assert logits.shape == (1, 64, 96, 3)
    # The scaled encoder is the one built: every B1…B7 is deeper (more arrays) than B0.
    reference = models.create_model("unet", num_classes=3, backbone="efficientnet-b0")
    b0 = jax.eval_shape(functools.partial(reference.init, train=False), jax.random.key(0), images)
    assert len(jax.tree.leaves(variables)) > len(jax.tree.leaves(b0)), encoder
