"""ResNet-18/34 and ResNeXt-50 32x4d encoders: parity with torchvision (output stride 32) and
with segmentation_models_pytorch's dilated encoders (output stride 16, 8), the stride-2 stem
feature, parameter counts, weight import (torchvision, timm, load_pretrained_backbone), the
multi-grid default, and the errors for bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from model_helpers import random_variables
from parity_helpers import (
    downsampled,
    flat_shapes,
    hwio,
    images,
    import_torchvision,
    init_shapes,
    nhwc,
    randomise_batchnorm,
    relative_error,
)

from flaxseg import models, weights
from flaxseg.models import backbones
from flaxseg.models.backbones.resnet import RESNETS, ResNet, stage_plan
from flaxseg.models.heads import default_multi_grid

import_torchvision()  # CUDA wheel on CPU torch: stub its op registrations first
import segmentation_models_pytorch as smp  # noqa: E402
import timm  # noqa: E402
import torchvision  # noqa: E402

pytestmark = pytest.mark.slow  # compiles full-size ResNets for parity with PyTorch

NEW = ("resnet18", "resnet34", "resnext50_32x4d")
SIZE = (97, 131)  # odd on purpose: every stride-2 step rounds
STRIDES = (2, 4, 8, 16, 32)
FULL_CHANNELS = {
    "resnet18": {2: 64, 4: 64, 8: 128, 16: 256, 32: 512},
    "resnet34": {2: 64, 4: 64, 8: 128, 16: 256, 32: 512},
    "resnext50_32x4d": {2: 64, 4: 256, 8: 512, 16: 1024, 32: 2048},
}
# torchvision's parameter counts without the classifier (fc), as printed by torchvision.
FULL_PARAMS = {
    "resnet18": 11_176_512,
    "resnet34": 21_284_672,
    "resnet50": 23_508_032,
    "resnext50_32x4d": 22_979_904,
}


def _assert_features_close(features, reference_by_stride, what):
    errors = {
        s: relative_error(features[s], reference_by_stride[s], f"{what} {s}") for s in STRIDES
    }
    print(f"{what}: relative max |Δ| per stride {errors}")
    assert max(errors.values()) <= 1e-4, (what, errors)


def _torchvision_features(reference, x):
    with torch.no_grad():
        h = reference.relu(reference.bn1(reference.conv1(torch.from_numpy(x).permute(0, 3, 1, 2))))
        out = {2: nhwc(h)}
        h = reference.maxpool(h)
        for stride, layer in zip(
            (4, 8, 16, 32), (reference.layer1, reference.layer2, reference.layer3, reference.layer4)
        ):
            h = layer(h)
            out[stride] = nhwc(h)
    return out


def _torch_params(module):
    return sum(p.numel() for n, p in module.named_parameters() if not n.startswith("fc."))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("arch", NEW)
def test_features_match_torchvision_at_every_stride(arch):
    torch.manual_seed(0)
    reference = randomise_batchnorm(getattr(torchvision.models, arch)())
    model, variables = weights.convert_torchvision(arch, reference.state_dict())
    assert isinstance(model, ResNet) and model.out_channels == FULL_CHANNELS[arch]
    assert models.count_params(variables) == _torch_params(reference) == FULL_PARAMS[arch]
    x = images(SIZE)
    features = jax.jit(model.apply)(variables, jnp.asarray(x))
    assert sorted(features) == list(STRIDES)
    assert {s: f.shape[-1] for s, f in features.items()} == FULL_CHANNELS[arch]
    _assert_features_close(features, _torchvision_features(reference, x), f"{arch} OS32")


@pytest.mark.parametrize(
    "arch,output_stride", [("resnet34", 16), ("resnet18", 8), ("resnext50_32x4d", 8)]
)
def test_smp_dilation_matches_smp_encoder(arch, output_stride):
    torch.manual_seed(1)
    encoder = randomise_batchnorm(
        smp.encoders.get_encoder(arch, weights=None, output_stride=output_stride)
    )
    # smp's ResNet encoders are torchvision ResNets without fc: the same keys.
    model, variables = weights.convert_torchvision(arch, encoder.state_dict())
    x = images(SIZE, 1)
    smp_model = model.clone(output_stride=output_stride, dilation_style="smp")
    features = jax.jit(smp_model.apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        theirs = encoder(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert [f.shape[1] for f in theirs] == [3] + [FULL_CHANNELS[arch][s] for s in STRIDES]
    reference = {s: nhwc(f) for s, f in zip(STRIDES, theirs[1:])}
    _assert_features_close(features, reference, f"{arch} smp OS{output_stride}")
    # torchvision's style (first dilated unit keeps the previous rate) is not smp's.
    tv_features = jax.jit(model.clone(output_stride=output_stride).apply)(variables, jnp.asarray(x))
    assert relative_error(tv_features[32], reference[32], "torchvision style") > 1e-2


def _conv_geometry(module):
    return (module.stride[0], module.dilation[0], module.padding[0])


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("arch", NEW + ("resnet50",))
def test_smp_style_stage_plan_is_smps_make_dilated(arch, output_stride):
    with torch.device("meta"):
        encoder = smp.encoders.get_encoder(arch, weights=None, output_stride=output_stride)
    spec = RESNETS[arch]
    plan = stage_plan(spec.depth, output_stride, dilation_style="smp")
    layers = (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)
    for (stride, rates), layer in zip(plan, layers):
        for unit, (block, rate) in enumerate(zip(layer, rates, strict=True)):
            first_stride = stride if unit == 0 else 1
            if spec.block == "basic":  # both 3×3 convs dilated, the first one strided
                assert _conv_geometry(block.conv1) == (first_stride, rate, rate)
                assert _conv_geometry(block.conv2) == (1, rate, rate)
            else:
                assert _conv_geometry(block.conv2) == (first_stride, rate, rate)
            if block.downsample is not None:  # a 1×1 conv: its dilation changes nothing
                assert block.downsample[0].stride[0] == first_stride


@pytest.mark.parametrize("output_stride", [8, 16])
def test_torchvision_style_matches_replace_stride_with_dilation_for_resnext(output_stride):
    replace = [False, output_stride == 8, True]
    with torch.device("meta"):
        reference = torchvision.models.resnext50_32x4d(replace_stride_with_dilation=replace)
    plan = stage_plan(50, output_stride)  # torchvision's style is the default
    layers = (reference.layer1, reference.layer2, reference.layer3, reference.layer4)
    for (stride, rates), layer in zip(plan, layers):
        assert [block.conv2.dilation[0] for block in layer] == rates
        assert [block.conv2.stride[0] for block in layer] == [stride] + [1] * (len(layer) - 1)


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("arch", NEW)
def test_key_map_and_parameter_count_match_torchvision_and_timm(arch):
    with torch.device("meta"):
        reference = getattr(torchvision.models, arch)()
        timm_model = timm.create_model(arch, pretrained=False)
    expected = {
        k: tuple(v.shape)
        for k, v in reference.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    timm_keys = {
        k: tuple(v.shape)
        for k, v in timm_model.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    assert timm_keys == expected  # timm's ResNet keys and shapes are torchvision's
    key_map = backbones.key_map(arch)
    module = backbones.create(arch)
    variables = init_shapes(module)
    shapes = flat_shapes(variables)
    assert sorted(key_map.values()) == sorted(expected)
    assert set(key_map) == set(shapes)
    for path, key in key_map.items():
        assert shapes[path] == hwio(expected[key]), (path, key)
    assert models.count_params(variables) == _torch_params(reference) == FULL_PARAMS[arch]


@pytest.mark.parametrize("arch", NEW + ("resnet50",))
def test_convert_timm_state_dict(arch):
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in timm.create_model(arch).state_dict().items()}
    rng = np.random.default_rng(0)
    state = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    model, variables = weights.convert_timm(arch, state)
    assert isinstance(model, ResNet) and model.spec == RESNETS[arch]
    assert models.count_params(variables) == FULL_PARAMS[arch]
    np.testing.assert_array_equal(
        variables["params"]["layer2_0"]["conv2"]["kernel"],
        state["layer2.0.conv2.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["layer4_0"]["downsample_1"]["var"],
        state["layer4.0.downsample.1.running_var"],
    )


@pytest.mark.parametrize(
    "builder,expected",
    [
        (lambda: torchvision.models.resnet18(), "resnet18"),
        (lambda: torchvision.models.resnet34(), "resnet34"),
        (lambda: torchvision.models.resnet50(), "resnet50"),
        (lambda: torchvision.models.resnext50_32x4d(), "resnext50_32x4d"),
        (lambda: timm.create_model("resnext50_32x4d"), "resnext50_32x4d"),
        (lambda: timm.create_model("resnet18"), "resnet18"),
        (lambda: torchvision.models.resnext101_32x8d(), None),  # not one flaxseg builds
    ],
)
def test_detect_architecture_tells_the_resnets_apart(builder, expected):
    with torch.device("meta"):
        state = builder().state_dict()
    assert weights.detect_architecture(state) == expected


@pytest.mark.parametrize("arch", NEW + ("resnet50",))
@pytest.mark.parametrize("dilation_style", ["torchvision", "smp"])
def test_tiny_encoders_feature_shapes_at_odd_size(arch, dilation_style):
    reference = None
    for output_stride in (8, 16, 32):
        module = backbones.create(
            arch, output_stride=output_stride, base_width=4, dilation_style=dilation_style
        )
        variables = init_shapes(module)
        shapes = flat_shapes(variables)
        assert reference is None or shapes == reference  # dilation never changes a shape
        reference = shapes
        features = jax.eval_shape(
            module.apply, variables, jax.ShapeDtypeStruct((2, *SIZE, 3), jnp.float32)
        )
        assert sorted(features) == list(STRIDES)
        for stride, feature in features.items():
            steps = min(stride, output_stride).bit_length() - 1
            assert feature.shape == (
                2,
                downsampled(SIZE[0], steps),
                downsampled(SIZE[1], steps),
                backbones.channels(arch, 4)[stride],
            )
    assert backbones.channels(arch, 4) == module.out_channels
    assert backbones.channels(arch) == FULL_CHANNELS.get(
        arch, {2: 64, 4: 256, 8: 512, 16: 1024, 32: 2048}
    )


def test_tiny_resnext_keeps_grouped_convs():
    # base_width 4: 3×3 widths 8, 16, 32, 64 (2 · planes, as at full size) in gcd(32, width)
    # groups; at full size 128..1024 in 32 groups (torchvision's layer k: 4·2^(k-1) per group).
    shapes = flat_shapes(init_shapes(backbones.create("resnext50_32x4d", base_width=4)))
    full = flat_shapes(init_shapes(backbones.create("resnext50_32x4d")))
    for stage, (width, groups, full_width) in enumerate(
        [(8, 8, 128), (16, 16, 256), (32, 32, 512), (64, 32, 1024)], start=1
    ):
        path = ("params", f"layer{stage}_0", "conv2", "kernel")
        assert shapes[path] == (3, 3, width // groups, width)
        assert full[path] == (3, 3, full_width // 32, full_width)


# ----------------------------------------------------------------------------- multi-grid


def test_default_multi_grid_fits_every_depth():
    assert default_multi_grid("resnet18") == (1, 1)
    for name in ("resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d"):
        assert default_multi_grid(name) == (1, 2, 4)
    assert default_multi_grid("xception65") == (1, 1, 1)
    assert stage_plan(18, 16, (1, 2))[3][1] == [2, 4]
    assert stage_plan(34, 16, (1, 2, 4), dilation_style="smp")[3][1] == [2, 4, 8]
    assert stage_plan(18, 8, (1, 1, 1)) == stage_plan(18, 8)  # all ones: no multi-grid


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("deeplabv3", dict(aspp_channels=8)),
        ("deeplabv3", dict(aspp_channels=8, head="torchvision", aux_head=True)),
        ("deeplabv3plus", dict(aspp_channels=8, low_level_channels=4, decoder_channels=8)),
        ("deeplabv2", {}),
        ("pspnet", dict(head_channels=8, aux_channels=8)),
        ("refinenet", dict(features=8)),
        ("fcn_resnet", dict(aux_head=True)),
    ],
)
def test_models_build_on_resnet18(name, kwargs):
    width = {"base_width": 4}
    model = models.create_model(name, num_classes=3, backbone="resnet18", **width, **kwargs)
    images = jax.ShapeDtypeStruct((1, 45, 59, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["aux"])[0], variables, images)
    assert logits.shape == (1, 45, 59, 3)


def test_unet_builds_on_resnet34():
    model = models.create_model("unet", num_classes=2, backbone="resnet34", base_channels=4)
    images = jax.ShapeDtypeStruct((1, 45, 59, 3), jnp.float32)
    logits = jax.eval_shape(
        model.apply, jax.eval_shape(model.init, jax.random.key(0), images), images
    )
    assert logits.shape == (1, 45, 59, 2)


# ----------------------------------------------------------------------------- loading


def test_load_pretrained_backbone_with_a_full_size_resnet18_file(tmp_path):
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in torchvision.models.resnet18().state_dict().items()}
    rng = np.random.default_rng(0)
    state = {
        k: (np.array(0) if k.endswith("num_batches_tracked") else rng.normal(size=s)).astype(
            np.float32
        )
        for k, s in shapes.items()
    }
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    model = models.create_model("deeplabv3", num_classes=3, backbone="resnet18")
    variables = random_variables(model)  # full size, built on the host from eval_shape
    loaded, report = weights.load_pretrained_backbone(variables, path, model)
    backbone = loaded["params"]["backbone"]
    np.testing.assert_array_equal(
        backbone["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        loaded["batch_stats"]["backbone"]["layer4_1"]["bn2"]["mean"],
        state["layer4.1.bn2.running_mean"],
    )
    assert report.source == "resnet18"
    assert all(not name.startswith("backbone/") for name in report.random)
    assert report.unused == ("fc.bias", "fc.weight")
    assert len(report.loaded) == len(backbones.key_map("resnet18"))


# ----------------------------------------------------------------------------- errors


def test_unknown_encoder_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        backbones.create("resnet26")
    message = str(err.value)
    assert message.startswith("Unknown backbone 'resnet26'; valid backbones: 'resnet18', ")
    for name in RESNETS:
        assert repr(name) in message


def test_bad_arguments_are_one_clear_sentence():
    with pytest.raises(ValueError, match="output_stride must be one of 8, 16, 32, got 4"):
        backbones.create("resnet34", output_stride=4)
    with pytest.raises(
        ValueError,
        match=r"multi_grid must hold 2 positive integer rates \(one per unit of layer4\) for a "
        r"ResNet-18, got \(1, 2, 4\)\.",
    ):
        backbones.create("resnet18", multi_grid=(1, 2, 4))
    with pytest.raises(ValueError, match="multi_grid must hold 3 positive .* got \\(1, 2\\)"):
        backbones.create("resnext50_32x4d", multi_grid=(1, 2))
    with pytest.raises(ValueError, match="multi_grid must hold 2 .* got \\(1, 2, 4\\)"):
        models.create_model(
            "deeplabv3", num_classes=2, backbone="resnet18", base_width=4, multi_grid=(1, 2, 4)
        ).init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
    with pytest.raises(
        ValueError, match="dilation_style must be one of 'torchvision', 'smp', got 'mmseg'"
    ):
        backbones.create("resnet18", dilation_style="mmseg")
    with pytest.raises(ValueError, match="dilation_style must be one of 'timm', got 'smp'"):
        backbones.create("xception65", dilation_style="smp")
    with pytest.raises(ValueError, match="No ResNet has depth 50 with groups=32 and width_per"):
        ResNet(depth=50, groups=32, width_per_group=8)


def test_resnet34_file_for_resnet18_names_the_keys():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in torchvision.models.resnet34().state_dict().items()}
    state = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    with pytest.raises(weights.WeightsError) as err:
        weights.convert_torchvision("resnet18", state)
    message = str(err.value)
    # ResNet-34 has 1 + 2 + 4 + 1 more units than ResNet-18, 10 tensors each (two conv + BN).
    assert message.startswith(
        "The state dict (it looks like 'resnet34') does not match torchvision's 'resnet18': "
        "80 unexpected keys: layer1.2.conv1.weight, "
    )
    assert "missing" not in message and "wrong shape" not in message
    with pytest.raises(weights.WeightsError, match="Unknown timm arch 'resnet26'.*resnext50_32x4d"):
        weights.convert_timm("resnet26", state)
