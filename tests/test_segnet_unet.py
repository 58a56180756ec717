"""SegNet and U-Net: geometry at odd sizes, train mode, the paper's U-Net, parameter counts."""

import functools
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import images as _images
from model_helpers import check_train_mode, random_variables
from tiny_models import TINY_KWARGS

from flaxseg import models, weights
from flaxseg.models import pooling, unet

NUM_CLASSES = 3


def _torchvision():
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import torchvision

    return torchvision


def _apply(model, variables, images, **kwargs):
    return jax.jit(functools.partial(model.apply, **kwargs))(variables, images)


def _conv_params(c_in, c_out, k=3, bias=True, bn=False):
    return k * k * c_in * c_out + (c_out if bias else 0) + (2 * c_out if bn else 0)


# ----------------------------------------------------------------------------- shared checks


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("segnet", {}),
        ("segnet", {"ceil_mode": False}),
        ("unet", {}),
        ("unet", {"backbone": "resnet50"}),
    ],
)
def test_logits_at_input_size_for_odd_sizes(name, kwargs):
    model = models.create_model(name, num_classes=NUM_CLASSES, **{**TINY_KWARGS[name], **kwargs})
    variables = random_variables(model, jnp.zeros((1, 35, 33, 3)))
    # Floor pooling needs >= 32 px; rounding-up pools/strides handle maps smaller than 2^depth.
    sizes = [(35, 47), (9, 5)] if kwargs.get("ceil_mode", True) else [(35, 47), (63, 33)]
    for height, width in sizes:
        logits = _apply(model, variables, _images(2, height, width))
        assert logits.shape == (2, height, width, NUM_CLASSES)
        assert logits.dtype == jnp.float32
        assert np.isfinite(np.asarray(logits)).all() and float(jnp.std(logits)) > 0


@pytest.mark.parametrize("name", ["segnet", "unet"])
def test_train_mode_updates_batch_stats_and_uses_dropout(name):
    model = models.create_model(name, num_classes=NUM_CLASSES, **TINY_KWARGS[name])
    images = _images(2, 33, 41)
    _, updates = check_train_mode(model, random_variables(model, images), images, NUM_CLASSES)
    assert "aux" not in updates or not updates["aux"]


def test_bad_arguments_raise_one_clear_error():
    with pytest.raises(ValueError, match="valid backbones: 'vgg16_bn'"):
        models.create_model("segnet", num_classes=21, backbone="vgg16")
    with pytest.raises(ValueError, match="'unet', 'resnet18', 'resnet34', 'resnet50', 'resnet101'"):
        models.create_model("unet", num_classes=2, backbone="resnet26")
    with pytest.raises(ValueError, match="'same', 'valid'"):
        models.create_model("unet", num_classes=2, padding="reflect")
    with pytest.raises(ValueError, match="needs backbone='unet'"):
        models.create_model("unet", num_classes=2, padding="valid", backbone="resnet50")
    with pytest.raises(ValueError, match="at least 188 px, got 100"):
        unet.valid_output_size(100)
    with pytest.raises(ValueError, match="ceil_mode=True"):
        model = models.create_model("segnet", num_classes=2, base_width=2, ceil_mode=False)
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 31, 40, 3)))


# ----------------------------------------------------------------------------- SegNet


def test_segnet_decoder_unpools_at_the_encoder_argmax():
    # Record block 1's activation (before pool1), the output of decoder block 2 and the input
    # of decoder block 1: that input must be decoder block 2's output unpooled exactly at
    # pool1's argmax positions (for an odd 35×33 map).
    model = models.create_model("segnet", num_classes=NUM_CLASSES, base_width=4)
    images = _images(1, 35, 33)
    variables = random_variables(model, images)

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            if context.module.name == "features_4":  # conv1_2's BatchNorm
                seen["block1"] = nn.relu(out)
            elif context.module.name == "conv2_1_D":
                seen["decoder2_out"] = out
            elif context.module.name == "conv1_2_D":
                seen["decoder1_in"] = args[0]
        return out

    @jax.jit
    def recorded_apply(variables, images):
        with nn.intercept_methods(record):
            model.apply(variables, images)
        return dict(seen)

    seen = {}
    seen = recorded_apply(variables, images)
    _, indices = pooling.max_pool_with_indices(seen["block1"], ceil_mode=True)
    assert seen["decoder2_out"].shape == (1, 18, 17, 4)
    assert float(jnp.mean(seen["decoder2_out"] != 0)) > 0.1  # not a vacuous all-zero check
    np.testing.assert_array_equal(
        seen["decoder1_in"], pooling.max_unpool(seen["decoder2_out"], indices, (35, 33))
    )


def test_segnet_parameter_count_matches_vgg16_bn_plus_mirrored_decoder():
    tv = _torchvision()
    encoder = sum(p.numel() for p in tv.models.vgg16_bn().features.parameters())
    # Decoder blocks 5..1 (Caffe SegNet): conv+BN+ReLU with bias, then a 3×3 classifier.
    decoder_convs = [
        (512, 512),
        (512, 512),
        (512, 512),
        (512, 512),
        (512, 512),
        (512, 256),
        (256, 256),
        (256, 256),
        (256, 128),
        (128, 128),
        (128, 64),
        (64, 64),
    ]
    decoder = sum(_conv_params(i, o, bn=True) for i, o in decoder_convs)
    classifier = _conv_params(64, 21)
    model = models.create_model("segnet", num_classes=21)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert models.count_params(shapes) == encoder + decoder + classifier == 29_455_125


def test_segnet_encoder_loads_torchvision_vgg16_bn_files(tmp_path):
    # The paper's own initialisation: torchvision's vgg16_bn file (its `features`, as built by
    # torchvision at full size, with non-trivial BN statistics) into the encoder.
    import torch

    tv = _torchvision()
    torch.manual_seed(0)
    features = tv.models.vgg.make_layers(tv.models.vgg.cfgs["D"], batch_norm=True)
    with torch.no_grad():
        for layer in features:
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.normal_()
                layer.running_var.uniform_(0.5, 1.5)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(10, 4)  # an ImageNet classifier entry
    torch.save(state, tmp_path / "vgg16_bn.pth")
    model = models.create_model("segnet", num_classes=21)
    variables = random_variables(model)
    loaded, report = weights.load_pretrained_backbone(variables, tmp_path / "vgg16_bn.pth", model)

    flat, before = traverse_util.flatten_dict(loaded), traverse_util.flatten_dict(variables)
    for path, key in model.pretrained_backbone().key_map().items():
        assert path[1] == "encoder"
        value = state[key].numpy()
        expected = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
        np.testing.assert_array_equal(flat[path], expected)
    assert len(report.loaded) == 13 * 6 and report.source == "vgg16_bn"
    for path, value in before.items():  # the decoder and classifier are untouched
        if path[1] != "encoder":
            np.testing.assert_array_equal(flat[path], value)
    assert {name.split("/")[0] for name in report.random} == {
        "classifier",
        *(
            f"conv{b}_{c}_D"
            for b, c in [
                (5, 3),
                (5, 2),
                (5, 1),
                (4, 3),
                (4, 2),
                (4, 1),
                (3, 3),
                (3, 2),
                (3, 1),
                (2, 2),
                (2, 1),
                (1, 2),
            ]
        ),
    }
    assert report.unused == ("classifier.6.weight",)


def test_unet_paper_encoder_has_no_pretrained_backbone(tmp_path):
    model = models.create_model("unet", num_classes=2)
    with pytest.raises(
        weights.WeightsError,
        match=r"^U-Net with backbone='unet' has no ImageNet backbone to load "
        r".*r50.pth into\.$",
    ):
        weights.load_pretrained_backbone({}, tmp_path / "r50.pth", model)


# ----------------------------------------------------------------------------- U-Net


def test_unet_paper_geometry_and_parameter_count():
    model = models.create_model("unet", num_classes=2, padding="valid", in_channels=1)
    x = jax.ShapeDtypeStruct((1, 572, 572, 1), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.eval_shape(model.apply, shapes, x).shape == (1, 388, 388, 2)
    assert unet.valid_output_size(572) == 388
    # The paper's configuration: 1 input channel, 2 classes, biases, no BatchNorm.
    assert models.count_params(shapes) == 31_030_658
    # Independent arithmetic: 2 convs per level, 2×2 up-convs, 1×1 classifier.
    widths = [64, 128, 256, 512, 1024]
    expected, c_in = 0, 1
    for w in widths:
        expected += _conv_params(c_in, w) + _conv_params(w, w)
        c_in = w
    for w in reversed(widths[:-1]):
        expected += _conv_params(2 * w, w, k=2)  # up-conv 2w -> w
        expected += _conv_params(2 * w, w) + _conv_params(w, w)
    expected += _conv_params(64, 2, k=1)
    assert expected == 31_030_658


def test_unet_valid_crops_align_encoder_and_decoder():
    # Unpadded convolutions are translation-equivariant, and so is the whole net for shifts
    # by a multiple of 16 (4 pools) if and only if every skip is cropped at the right offset:
    # the tile at offset 16 of a larger input gives exactly the shifted output.
    model = models.create_model(
        "unet", num_classes=2, padding="valid", base_channels=2, in_channels=1
    )
    big = _images(1, 204, 204, channels=1)
    variables = random_variables(model, big)
    out_big = _apply(model, variables, big)
    out_tile = _apply(model, variables, big[:, 16 : 16 + 188, 16 : 16 + 188])
    assert out_big.shape == (1, 20, 20, 2) and out_tile.shape == (1, 4, 4, 2)
    np.testing.assert_allclose(out_tile, out_big[:, 16:20, 16:20], atol=1e-5)
