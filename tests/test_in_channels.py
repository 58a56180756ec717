"""``in_channels`` on every model: images of 1, 4, ... channels, one sentence for images of
another width, pretrained RGB stems adapted as segmentation_models_pytorch's
``patch_first_conv`` does, and the training loop refusing a dataset of other channels."""

import functools
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import tiny_config, tiny_model

from flaxseg import models, weights
from flaxseg.training import loop

NUM_CLASSES = 5


_tiny = functools.partial(tiny_model, num_classes=NUM_CLASSES)


def _shapes(model, images):
    init = functools.partial(model.init, train=False)
    variables = jax.eval_shape(init, jax.random.key(0), images)
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
    flat = traverse_util.flatten_dict(variables["params"])
    return {"/".join(path): leaf.shape for path, leaf in flat.items()}, logits


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_takes_in_channels_in_its_first_convolution_only(name):
    rgb, _ = _shapes(_tiny(name), jnp.zeros((1, 33, 35, 3)))
    for channels in (1, 4):
        shapes, logits = _shapes(
            _tiny(name, in_channels=channels), jnp.zeros((2, 33, 35, channels))
        )
        assert logits.shape == (2, 33, 35, NUM_CLASSES) and logits.dtype == jnp.float32
        assert shapes.keys() == rgb.keys()
        changed = {path for path in shapes if shapes[path] != rgb[path]}
        # Only the convolutions that read the images change, and only in their input width.
        assert changed, name
        for path in changed:
            assert len(rgb[path]) == 4 and rgb[path][2] == 3, (name, path)
            assert shapes[path] == rgb[path][:2] + (channels,) + rgb[path][3:], (name, path)


@pytest.mark.parametrize("name", models.list_models())
def test_images_of_another_channel_count_get_one_sentence(name):
    model = _tiny(name, in_channels=1)
    title = type(model).TITLE
    with pytest.raises(ValueError) as error:
        jax.eval_shape(
            functools.partial(model.init, train=False),
            jax.random.key(0),
            jnp.zeros((1, 32, 32, 3)),
        )
    assert str(error.value) == (
        f"{title} with in_channels=1 expects NHWC images of shape [batch, height, width, 1], "
        "got shape (1, 32, 32, 3); build the model with in_channels=3 or give it 1-channel "
        "images."
    )
    with pytest.raises(ValueError, match=r"\], got shape \(32, 32, 1\)\.\n"):
        jax.eval_shape(
            functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((32, 32, 1))
        )
    with pytest.raises(ValueError) as error:
        models.create_model(name, num_classes=NUM_CLASSES, in_channels=0)
    assert str(error.value) == "in_channels must be at least 1, got 0."


@pytest.mark.slow
def test_unet_valid_padding_checks_the_images_too():
    """U-Net with padding='valid' returns its logits without ``finish``; the check still runs.
    Real forwards at 1 and 4 channels."""
    model = _tiny("unet", in_channels=4, padding="valid")
    images = jnp.ones((1, 188, 188, 4))
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    assert jax.eval_shape(model.apply, variables, images).shape == (1, 4, 4, NUM_CLASSES)
    with pytest.raises(ValueError, match="U-Net with in_channels=4 expects"):
        jax.eval_shape(model.apply, variables, images[..., :3])
    for channels in (1, 4):
        model = _tiny("unet", in_channels=channels)
        images = jax.random.uniform(jax.random.key(1), (1, 48, 48, channels))
        logits = model.apply(model.init(jax.random.key(0), images), images)
        assert logits.shape == (1, 48, 48, NUM_CLASSES) and np.isfinite(logits).all()


def _patch_first_conv():
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    from segmentation_models_pytorch.encoders._utils import patch_first_conv

    return patch_first_conv


@pytest.mark.parametrize("in_channels", [1, 2, 3, 4, 7])
def test_first_conv_adaptation_equals_smp_patch_first_conv(in_channels):
    import torch

    patch_first_conv = _patch_first_conv()
    torch.manual_seed(0)
    # ResNet's 7×7/2 stem, followed by another conv (patch_first_conv patches only the first).
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), torch.nn.Conv2d(64, 3, 1)
    )
    rgb_kernel = network[0].weight.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if in_channels != 3:  # smp's set_in_channels returns early for 3
        patch_first_conv(network, new_in_channels=in_channels, pretrained=True)
    expected = network[0].weight.detach().numpy().transpose(2, 3, 1, 0)
    adapted = weights.adapt_first_conv(rgb_kernel, in_channels)
    assert adapted.shape == (7, 7, in_channels, 64) == expected.shape
    np.testing.assert_allclose(adapted, expected, rtol=1e-6, atol=1e-7)
    # The rule in words: 1 = sum over RGB; more = RGB repeated, times 3 / in_channels.
    if in_channels == 1:
        np.testing.assert_allclose(adapted[:, :, 0], rgb_kernel.sum(axis=2), rtol=1e-6)
    else:
        scale = 3 / in_channels
        np.testing.assert_allclose(
            adapted[:, :, -1], rgb_kernel[:, :, (in_channels - 1) % 3] * scale
        )


def _torch_file(path, network, key_map, channels=3):
    """A PyTorch state dict of ``network``'s variables under ``key_map`` (a user's .pth)."""
    import torch

    variables = network.init(jax.random.key(7), np.zeros((1, 32, 32, channels), np.float32))
    flat = traverse_util.flatten_dict(variables)
    state = {}
    for flax_path, key in key_map.items():
        value = np.asarray(flat[flax_path])
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
        state[key] = torch.from_numpy(np.array(value))
    torch.save(state, path)
    return {key: value.numpy() for key, value in state.items()}


def _init(model, channels):
    variables = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, channels)), train=False)
    return {k: variables[k] for k in ("params", "batch_stats") if k in variables}


@pytest.mark.slow
def test_pretrained_resnet_stem_for_one_channel_gives_the_rgb_model_on_grey_images(tmp_path):
    from flaxseg.models.backbones.resnet import ResNet, torchvision_resnet_key_map

    path = tmp_path / "resnet18.pth"  # the tiny DeepLab's backbone (tests/tiny_models.py)
    state = _torch_file(path, ResNet(depth=18, base_width=4), torchvision_resnet_key_map(18))
    rgb_model, gray_model = _tiny("deeplabv3"), _tiny("deeplabv3", in_channels=1)
    rgb, _ = weights.load_pretrained_backbone(_init(rgb_model, 3), path, rgb_model)
    gray, report = weights.load_pretrained_backbone(_init(gray_model, 1), path, gray_model)

    kernel = np.asarray(gray["params"]["backbone"]["conv1"]["kernel"])
    np.testing.assert_allclose(
        kernel, state["conv1.weight"].transpose(2, 3, 1, 0).sum(axis=2, keepdims=True), rtol=1e-6
    )
    assert report.adapted == ("backbone/conv1/kernel",)
    assert "Adapted the RGB first convolution to the model's input channels" in str(report)
    # Summing over RGB makes a 1-channel image act like its grey RGB replica.
    images = jax.random.uniform(jax.random.key(2), (1, 40, 40, 1))
    np.testing.assert_allclose(
        gray_model.apply(gray, images),
        rgb_model.apply(rgb, jnp.repeat(images, 3, axis=-1)),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.slow
def test_pretrained_vgg_stem_for_four_channels_is_repeated_and_rescaled(tmp_path):
    from flaxseg.models import backbones

    path = tmp_path / "vgg16.pth"
    state = _torch_file(path, backbones.create("vgg16", base_width=4), backbones.key_map("vgg16"))
    model = _tiny("fcn8s", in_channels=4)
    variables, report = weights.load_pretrained_backbone(_init(model, 4), path, model)
    rgb = state["features.0.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_allclose(
        variables["params"]["backbone"]["features_0"]["kernel"],
        weights.adapt_first_conv(rgb, 4),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        variables["params"]["backbone"]["features_0"]["kernel"][:, :, 3], rgb[:, :, 0] * 0.75
    )
    assert report.adapted == ("backbone/features_0/kernel",)
    # The other convolutions are loaded as they are.
    np.testing.assert_allclose(
        variables["params"]["backbone"]["features_2"]["kernel"],
        state["features.2.weight"].transpose(2, 3, 1, 0),
    )


def test_training_on_rgb_data_with_another_in_channels_is_refused_before_set_up(tmp_path):
    config = tiny_config(
        str(tmp_path / "tfds"),
        model_kwargs=json.dumps({"base_width": 4, "fc_channels": 16, "in_channels": 1}),
    )
    with pytest.raises(ValueError) as error:
        loop.train_and_evaluate(config, tmp_path / "wd")
    assert str(error.value) == (
        "--dataset=synthetic has 3-channel images but --model_kwargs sets in_channels=1; use a "
        "dataset with 1-channel images or in_channels=3."
    )
    assert not (tmp_path / "wd").exists() and not (tmp_path / "tfds").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_channels": 0}, "--model_kwargs in_channels must be a positive integer, got 0."),
        ({"in_channels": "1"}, "--model_kwargs in_channels must be a positive integer, got '1'."),
        (
            {"param_dtype": "int8"},
            "--model_kwargs param_dtype='int8' is not one of float32, bfloat16, float16.",
        ),
    ],
)
def test_bad_in_channels_flag_gets_one_sentence(tmp_path, kwargs, message):
    config = tiny_config(str(tmp_path / "tfds"), model_kwargs=json.dumps(kwargs))
    with pytest.raises(ValueError) as error:
        loop.train_and_evaluate(config, tmp_path / "wd")
    assert str(error.value) == message
    assert not (tmp_path / "wd").exists()
