"""MobileNetV2 and EfficientNet-B0…B7 encoders: parity with torchvision, timm and smp's encoders
(random weights, BN statistics perturbed), key maps, parameter counts, bad input."""

import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from parity_helpers import assert_close, images, import_torchvision, nhwc, randomise_batchnorm

from flaxseg import models, weights
from flaxseg.models import backbones
from flaxseg.models.backbones import efficientnet
from flaxseg.models.backbones.mobilenetv2 import mobilenet_v2_key_map

import_torchvision()  # CUDA wheel on CPU torch: stub its op registrations first
import segmentation_models_pytorch as smp  # noqa: E402
import timm  # noqa: E402
import torchvision  # noqa: E402

pytestmark = pytest.mark.slow  # compiles full-size MobileNet/EfficientNets for parity with PyTorch

ODD = (97, 131)  # every stride-2 step rounds
STRIDES = (2, 4, 8, 16, 32)


def _torch(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def _assert_features_close(features, references, what):
    assert tuple(features) == STRIDES, what
    for stride, reference in zip(STRIDES, references, strict=True):
        assert_close(features[stride], nhwc(reference), f"{what} stride {stride}")


def _shapes(model):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def _variables_of(name, state_dict):
    """Convert an smp encoder's state dict along ``backbones.key_map`` (what convert_smp does
    under its 'encoder.' prefix)."""
    heads = efficientnet.head_key_prefixes(name) if name in efficientnet.ARCHS else ()
    state = {k: v.numpy() for k, v in state_dict.items() if not k.startswith(heads)}
    model = backbones.create(name)
    return model, weights.convert_state_dict(state, backbones.key_map(name), _shapes(model))


def _smp_encoder(name, output_stride, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # smp's 'timm-' names
        encoder = smp.encoders.get_encoder(name, weights=None, output_stride=output_stride)
    return randomise_batchnorm(encoder)


def _count(module, skip=()):
    return sum(p.numel() for n, p in module.named_parameters() if not n.startswith(skip))


# ----------------------------------------------------------------------------- MobileNetV2


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_mobilenet_v2_matches_smp_encoder(output_stride):
    # smp's 'mobilenet_v2' is torchvision's MobileNetV2 with smp's taps and make_dilated.
    reference = _smp_encoder("mobilenet_v2", output_stride)
    model, variables = weights.convert_torchvision("mobilenet_v2", reference.state_dict())
    assert models.count_params(variables) == _count(reference) == 2_223_872
    x = images(ODD)
    features = jax.jit(model.clone(output_stride=output_stride).apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        _assert_features_close(features, reference(_torch(x))[1:], f"OS {output_stride}")


def test_mobilenet_v2_matches_torchvision_and_timm():
    torch.manual_seed(3)
    reference = randomise_batchnorm(torchvision.models.mobilenet_v2())
    model, variables = weights.convert_torchvision("mobilenet_v2", reference.state_dict())
    assert models.count_params(variables) == _count(reference, ("classifier.",))
    x = images(ODD, seed=1)
    features = jax.jit(model.apply)(variables, jnp.asarray(x))
    h, taps = _torch(x), []
    with torch.no_grad():
        for index, layer in enumerate(reference.features):
            h = layer(h)
            if index in (1, 3, 6, 13, 18):
                taps.append(h)
    _assert_features_close(features, taps, "torchvision mobilenet_v2")

    # The same tensors under timm's mobilenetv2_100 keys: one flax path, two torch keys.
    torchvision_keys, timm_keys = mobilenet_v2_key_map(), mobilenet_v2_key_map(layout="timm")
    state = reference.state_dict()
    timm_state = {timm_keys[p]: state[k] for p, k in torchvision_keys.items()}
    timm_model = timm.create_model("mobilenetv2_100")
    timm_model.load_state_dict(timm_state, strict=False)
    timm_model.eval()
    assert set(timm_state) | {"classifier.weight", "classifier.bias"} == {
        k for k in timm_model.state_dict() if not k.endswith("num_batches_tracked")
    }
    timm_state["classifier.weight"] = torch.zeros(1000, 1280)
    model, variables = weights.convert_timm("mobilenetv2_100", timm_state)
    features = jax.jit(model.apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        assert_close(features[32], nhwc(timm_model.forward_features(_torch(x))), "timm stride 32")


# ----------------------------------------------------------------------------- EfficientNet


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_efficientnet_b0_matches_timm_features(output_stride):
    torch.manual_seed(output_stride)
    reference = randomise_batchnorm(
        timm.create_model("efficientnet_b0", features_only=True, output_stride=output_stride)
    )
    model, variables = weights.convert_timm("efficientnet_b0", reference.state_dict())
    assert models.count_params(variables) == _count(reference) == 3_595_388
    x = images(ODD)
    features = jax.jit(model.clone(output_stride=output_stride).apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        _assert_features_close(features, reference(_torch(x)), f"OS {output_stride}")


def test_tf_efficientnet_b0_dynamic_same_padding_matches_timm():
    # TF 'SAME' padding at an odd size (the stride-2 convs pad 1 on one side, 0 or 1 on the
    # other) and dilation at output stride 8; the full classifier checkpoint converts too.
    torch.manual_seed(5)
    full = randomise_batchnorm(timm.create_model("tf_efficientnet_b0"))
    reference = randomise_batchnorm(
        timm.create_model("tf_efficientnet_b0", features_only=True, output_stride=8)
    )
    reference.load_state_dict(
        {k: v for k, v in full.state_dict().items() if not k.startswith(("conv_head", "bn2."))},
        strict=False,
    )
    model, variables = weights.convert_timm("tf_efficientnet_b0", full.state_dict())
    x = images(ODD, seed=2)
    features = jax.jit(model.clone(output_stride=8).apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        _assert_features_close(features, reference(_torch(x)), "tf_efficientnet_b0 OS 8")


@pytest.mark.parametrize(
    "name,size,output_stride",
    [
        ("efficientnet-b0", (96, 160), 32),
        ("efficientnet-b0", (96, 160), 16),
        ("efficientnet-b0", ODD, 8),  # static SAME padding at sizes the native 224 is not
        ("timm-efficientnet-b0", ODD, 16),
    ],
)
def test_efficientnet_b0_matches_smp_encoder(name, size, output_stride):
    reference = _smp_encoder(name, output_stride)
    model, variables = _variables_of(name, reference.state_dict())
    # smp's encoders keep the classifier's unused conv_head/bn2 (timm) or _conv_head/_bn1
    # (lukemelas): 409,600 + 2,560 parameters that no feature uses.
    unused = efficientnet.head_key_prefixes(name)
    assert models.count_params(variables) == _count(reference, unused) == 3_595_388
    x = images(size)
    features = jax.jit(model.clone(output_stride=output_stride).apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        _assert_features_close(features, reference(_torch(x))[1:], f"{name} OS {output_stride}")


def test_efficientnet_b3_matches_smp_encoder():
    # B3's native 300 px gives odd sizes (75, 19) at stride-2 layers: smp's static padding
    # there is (2, 2) where TF 'SAME' at the actual size would pad (1, 2).
    reference = _smp_encoder("efficientnet-b3", 16, seed=3)
    model, variables = _variables_of("efficientnet-b3", reference.state_dict())
    x = images(ODD, seed=3)
    features = jax.jit(model.clone(output_stride=16).apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        _assert_features_close(features, reference(_torch(x))[1:], "efficientnet-b3 OS 16")


def _meta_state(build):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = build()
    return module, {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("variant", [f"b{i}" for i in range(8)])
def test_efficientnet_key_maps_and_parameter_counts_match_timm_and_smp(variant):
    # Full-size networks only traced (eval_shape): every key of timm's features_only model and
    # of smp's lukemelas encoder (its unused head aside) is mapped, with the shape it needs.
    for name, build in (
        (
            f"efficientnet_{variant}",
            lambda: timm.create_model(f"efficientnet_{variant}", features_only=True),
        ),
        (f"efficientnet-{variant}", lambda: smp.encoders.get_encoder(f"efficientnet-{variant}")),
    ):
        module, shapes = _meta_state(build)
        unused = efficientnet.head_key_prefixes(name)
        expected = {k for k in shapes if not k.endswith("num_batches_tracked")}
        expected = {k for k in expected if not k.startswith(unused)}
        key_map = backbones.key_map(name)
        assert set(key_map.values()) == expected, name
        tree = _shapes(backbones.create(name))
        ours = traverse_util.flatten_dict(tree)
        assert set(ours) == set(key_map), name
        for path, key in key_map.items():
            torch_shape = shapes[key]
            if len(torch_shape) == 4:
                torch_shape = tuple(torch_shape[i] for i in (2, 3, 1, 0))
            assert tuple(ours[path].shape) == torch_shape, (name, key)
        assert models.count_params(tree) == _count(module, unused)
        twin_channels = (
            module.out_channels[1:]
            if name.startswith("efficientnet-")
            else module.feature_info.channels()
        )
        assert list(backbones.channels(name).values()) == list(twin_channels), name


def test_channels_and_tiny_widths():
    x = jnp.zeros((1, 33, 47, 3))
    for name in ("mobilenet_v2", "efficientnet_b0", "efficientnet-b0", "timm-efficientnet-b2"):
        model = backbones.create(name, base_width=16)
        features, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), x)
        assert {s: f.shape[-1] for s, f in features.items()} == backbones.channels(name, 16)
        assert model.out_channels == backbones.channels(name, 16), name
        if name == "efficientnet-b0":
            continue  # static SAME padding for 224 px rounds odd sizes down (tested above)
        # Nominal strides; PyTorch's rounding of odd sizes (n -> floor((n - 1) / 2) + 1).
        assert [f.shape[1:3] for f in features.values()] == [
            (17, 24),
            (9, 12),
            (5, 6),
            (3, 3),
            (2, 2),
        ], name
    assert backbones.channels("mobilenet_v2") == {2: 16, 4: 24, 8: 32, 16: 96, 32: 1280}
    assert backbones.channels("efficientnet_b0") == {2: 16, 4: 24, 8: 40, 16: 112, 32: 320}
    assert backbones.channels("efficientnet-b0") == {2: 32, 4: 24, 8: 40, 16: 112, 32: 320}
    assert backbones.channels("efficientnet-b7") == {2: 64, 4: 48, 8: 80, 16: 224, 32: 640}


def test_drop_path_only_in_training_and_needs_a_dropout_rng():
    # One MBConv with an identity shortcut (EfficientNet gives block i of N the rate
    # drop_path_rate·i/N): a dropped sample's residual branch is zero, so its output is its input.
    _, specs = efficientnet.block_plan("efficientnet_b0", width_multiplier=0.25)
    spec = specs[2]  # blocks.1.1: stride 1, 8 -> 8 channels
    assert spec.stride == 1 and spec.in_channels == spec.out_channels
    block = efficientnet.MBConv(spec, "symmetric", 1e-5, 0.9, drop_path_rate=0.5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, spec.in_channels)), jnp.float32)
    variables = block.init(jax.random.key(0), x)
    plain = block.clone(drop_path_rate=0.0)
    np.testing.assert_array_equal(block.apply(variables, x), plain.apply(variables, x))

    def train(module, rngs):
        return module.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)[0]

    dropped, kept = np.asarray(train(block, {"dropout": jax.random.key(1)})), train(plain, {})
    is_input = [np.array_equal(dropped[i], x[i]) for i in range(16)]
    assert 0 < sum(is_input) < 16  # some samples dropped, some kept (and scaled by 1 / 0.5)
    for i in np.flatnonzero(~np.array(is_input)):
        np.testing.assert_allclose(dropped[i], 2 * (kept[i] - x[i]) + x[i], rtol=1e-5, atol=1e-5)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        train(block, {})


@pytest.mark.parametrize(
    "builder,expected",
    [
        (lambda: torchvision.models.mobilenet_v2(), "mobilenet_v2"),
        (lambda: timm.create_model("mobilenetv2_100"), "mobilenetv2_100"),
        (lambda: timm.create_model("efficientnet_b3"), "efficientnet_b3"),
        (lambda: timm.create_model("tf_efficientnet_b1", features_only=True), "efficientnet_b1"),
        (lambda: smp.encoders.get_encoder("efficientnet-b5"), "efficientnet-b5"),
        (lambda: smp.encoders.get_encoder("mobilenet_v2"), "mobilenet_v2"),
    ],
)
def test_detect_architecture(builder, expected):
    _, shapes = _meta_state(builder)
    assert weights.detect_architecture({k: np.zeros(s) for k, s in shapes.items()}) == expected


# ----------------------------------------------------------------------------- bad input


def test_bad_names_and_output_stride_are_one_clear_error():
    with pytest.raises(ValueError, match=r"Unknown backbone 'efficientnet_b9'; valid .*'mobilenet"):
        backbones.create("efficientnet_b9")
    with pytest.raises(ValueError, match=r"^output_stride must be one of 8, 16, 32, got 4\.$"):
        backbones.create("efficientnet-b0", output_stride=4)
    with pytest.raises(ValueError, match=r"^output_stride must be one of 8, 16, 32, got 4\.$"):
        backbones.create("mobilenet_v2", output_stride=4)
    with pytest.raises(
        ValueError, match=r"multi_grid needs an encoder that takes it \('resnet18', "
    ):
        backbones.create("mobilenet_v2", multi_grid=(1, 2, 4))
    with pytest.raises(ValueError, match=r"Unknown EfficientNet arch 'efficientnet-b8'"):
        efficientnet.EfficientNet("efficientnet-b8")
    with pytest.raises(weights.WeightsError, match=r"Unknown timm arch 'efficientnet_b8'"):
        weights.convert_timm("efficientnet_b8", {})


def test_wrong_variant_lists_the_keys_and_what_the_file_is():
    _, shapes = _meta_state(lambda: timm.create_model("efficientnet_b0"))
    state = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    with pytest.raises(weights.WeightsError) as err:
        weights.convert_timm("efficientnet_b1", state)
    message = str(err.value)
    assert "looks like 'efficientnet_b0'" in message and "timm's 'efficientnet_b1'" in message
    # B1 has 23 blocks to B0's 16: 7 blocks are missing.
    assert "missing keys" in message and "blocks.0.1.conv_dw.weight" in message


@pytest.mark.parametrize(
    "backbone,reference",
    [
        ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2()),
        ("efficientnet_b0", lambda: timm.create_model("efficientnet_b0")),
    ],
)
def test_pretrained_imagenet_file_loads_into_a_one_channel_unet(backbone, reference, tmp_path):
    # What train.py --pretrained does: an ImageNet classifier file (head included) initialises
    # the U-Net's encoder; the RGB stem is summed to one channel as smp does.
    from model_helpers import random_variables

    state = {k: v.detach().clone() for k, v in reference().state_dict().items()}
    path = tmp_path / f"{backbone}.pth"
    torch.save(state, path)
    model = models.create_model("unet", num_classes=3, backbone=backbone, in_channels=1)
    variables = random_variables(model, jnp.zeros((1, 64, 64, 1)))
    loaded, report = weights.load_pretrained_backbone(variables, str(path), model)
    flat = traverse_util.flatten_dict(loaded["params"]["backbone"], sep="/")
    stem_key = backbones.key_map(backbone)
    stem_path, stem_torch = next(
        (path[1:], key) for path, key in stem_key.items() if path[-1] == "kernel"
    )
    stem = flat["/".join(stem_path)]
    expected = state[stem_torch].numpy().transpose(2, 3, 1, 0).sum(axis=2, keepdims=True)
    np.testing.assert_allclose(stem, expected, rtol=1e-6)
    assert len(report.adapted) == 1 and report.adapted[0].startswith("backbone/")
    assert report.random and not [name for name in report.random if "backbone" in name]
