"""Dilated backbones: ResNet (torchvision layout, multi-grid, deep stem) and aligned Xception-65.

Structure is checked against torchvision/timm modules on the meta device (no memory, no
compute); shapes by tracing; numerics of the deep stem against a torch reference. Full-size
numerical parity of the converted networks is in test_weights.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from parity_helpers import downsampled, flat_shapes, hwio, import_torchvision, init_shapes

from flaxseg.models import backbones, count_params
from flaxseg.models.backbones.resnet import (
    ResNet,
    resnet_channels,
    stage_plan,
    torchvision_resnet_key_map,
)
from flaxseg.models.backbones.xception import (
    Xception65,
    timm_xception65_key_map,
    xception65_channels,
)

import_torchvision()  # CUDA wheel on CPU torch: stub its op registrations first
import timm  # noqa: E402
import torchvision  # noqa: E402

# ----------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize(
    "output_stride,replace",
    [(32, [False, False, False]), (16, [False, False, True]), (8, [False, True, True])],
)
@pytest.mark.parametrize("depth", [50, 101])
def test_stage_plan_matches_torchvision_dilation(depth, output_stride, replace):
    with torch.device("meta"):
        reference = getattr(torchvision.models, f"resnet{depth}")(
            replace_stride_with_dilation=replace
        )
    plan = stage_plan(depth, output_stride)
    for (stride, rates), layer in zip(
        plan, (reference.layer1, reference.layer2, reference.layer3, reference.layer4)
    ):
        assert [block.conv2.dilation[0] for block in layer] == rates
        assert [block.conv2.stride[0] for block in layer] == [stride] + [1] * (len(layer) - 1)


@pytest.mark.parametrize("output_stride,rates", [(32, [1, 2, 4]), (16, [2, 4, 8]), (8, [4, 8, 16])])
def test_multi_grid_multiplies_the_last_stage_rate(output_stride, rates):
    # DeepLab v3, Sec. 3.2: "when output_stride = 16 and Multi_Grid = (1, 2, 4), the three
    # convolutions will have rates = 2 · (1, 2, 4) = (2, 4, 8) in the block4".
    plan = stage_plan(101, output_stride, (1, 2, 4))
    assert plan[3][1] == rates
    assert plan[:3] == stage_plan(101, output_stride)[:3]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(output_stride=4), "output_stride must be one of 8, 16, 32, got 4"),
        (dict(output_stride=12), "output_stride must be one of 8, 16, 32, got 12"),
        (dict(depth=26), "ResNet depth must be one of 18, 34, 50, 101, 152, got 26"),
        (dict(multi_grid=(1, 2)), "multi_grid must hold 3 positive integer rates"),
        (dict(multi_grid=(1, 0, 2)), "multi_grid must hold 3"),
    ],
)
def test_resnet_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNet(**kwargs)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("deep_stem", [False, True])
def test_resnet_feature_shapes_at_odd_size(output_stride, deep_stem):
    module = ResNet(depth=50, output_stride=output_stride, deep_stem=deep_stem, base_width=4)
    height, width = 97, 131
    variables = init_shapes(module)
    features = jax.eval_shape(
        module.apply, variables, jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
    )
    assert sorted(features) == [2, 4, 8, 16, 32]
    for stride, feature in features.items():
        steps = min(stride, output_stride).bit_length() - 1  # dilated stages keep the size
        assert feature.shape == (
            2,
            downsampled(height, steps),
            downsampled(width, steps),
            resnet_channels(50, 4)[stride],
        )
    assert module.out_channels == {2: 4, 4: 16, 8: 32, 16: 64, 32: 128}


def test_output_stride_and_multi_grid_change_no_parameter_shape():
    reference = flat_shapes(init_shapes(ResNet(depth=50, base_width=4)))
    for output_stride in (8, 16):
        for multi_grid in ((1, 1, 1), (1, 2, 4)):
            module = ResNet(
                depth=50, base_width=4, output_stride=output_stride, multi_grid=multi_grid
            )
            assert flat_shapes(init_shapes(module)) == reference


@pytest.mark.parametrize("depth", [50, 101, 152])
def test_resnet_key_map_covers_torchvision_state_dict(depth):
    with torch.device("meta"):
        reference = getattr(torchvision.models, f"resnet{depth}")()
    expected = {
        k: tuple(v.shape)
        for k, v in reference.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    key_map = torchvision_resnet_key_map(depth)
    variables = init_shapes(ResNet(depth=depth))
    shapes = flat_shapes(variables)
    assert sorted(key_map.values()) == sorted(expected)
    assert set(key_map) == set(shapes)
    for path, key in key_map.items():
        assert shapes[path] == hwio(expected[key]), (path, key)
    fc = sum(p.numel() for n, p in reference.named_parameters() if n.startswith("fc."))
    assert count_params(variables) == sum(p.numel() for p in reference.parameters()) - fc


def _mmseg_deep_stem(base=64):
    """MMSegmentation ResNetV1c's stem, written independently: conv-BN-ReLU ×3 (32, 32, 64)."""
    c1, c2 = base // 2, base
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, c1, 3, 2, 1, bias=False),
        torch.nn.BatchNorm2d(c1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(c1, c1, 3, 1, 1, bias=False),
        torch.nn.BatchNorm2d(c1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(c1, c2, 3, 1, 1, bias=False),
        torch.nn.BatchNorm2d(c2),
        torch.nn.ReLU(),
    )


def test_deep_stem_matches_an_independent_torch_stem():
    torch.manual_seed(0)
    stem = _mmseg_deep_stem()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in stem:
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.copy_(torch.rand(layer.num_features, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(layer.num_features, generator=generator))
                layer.bias.copy_(torch.rand(layer.num_features, generator=generator) - 0.5)
    stem.eval()
    reference = torchvision.models.resnet50().eval()  # its layer1..4 follow the deep stem
    state = {f"stem.{k}": v for k, v in stem.state_dict().items()}
    state.update({k: v for k, v in reference.state_dict().items() if k.startswith("layer")})
    module = ResNet(depth=50, deep_stem=True)
    key_map = torchvision_resnet_key_map(50, deep_stem=True)
    assert sorted(key_map.values()) == sorted(k for k in state if "num_batches" not in k)
    flat = {
        path: (
            state[key].numpy().transpose(2, 3, 1, 0) if state[key].ndim == 4 else state[key].numpy()
        )
        for path, key in key_map.items()
    }
    variables = traverse_util.unflatten_dict(flat)
    assert flat_shapes(variables) == flat_shapes(init_shapes(module))

    x = np.random.default_rng(0).normal(size=(1, 45, 59, 3)).astype(np.float32)
    ours = jax.jit(module.apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        h = reference.maxpool(stem(torch.from_numpy(x).permute(0, 3, 1, 2)))
        for layer in (reference.layer1, reference.layer2):
            h = layer(h)
    theirs = h.permute(0, 2, 3, 1).numpy()
    assert ours[8].shape == theirs.shape
    assert np.abs(np.asarray(ours[8]) - theirs).max() <= 1e-4 * np.abs(theirs).max()


# ----------------------------------------------------------------------------- Xception-65


def test_xception_key_map_and_parameter_count_match_timm():
    with torch.device("meta"):
        reference = timm.create_model("xception65", num_classes=0)
    expected = {
        k: tuple(v.shape)
        for k, v in reference.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    key_map = timm_xception65_key_map()
    variables = init_shapes(Xception65())
    shapes = flat_shapes(variables)
    assert sorted(key_map.values()) == sorted(expected)
    assert set(key_map) == set(shapes)
    for path, key in key_map.items():
        assert shapes[path] == hwio(expected[key]), (path, key)
    assert count_params(variables) == sum(p.numel() for p in reference.parameters()) == 37_867_312


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_xception_dilation_matches_timm(output_stride):
    with torch.device("meta"):
        reference = timm.create_model("xception65", num_classes=0, output_stride=output_stride)
    module = Xception65(output_stride=output_stride)
    dilations, strides = {}, {}

    def record(next_fun, args, kwargs, context):
        conv = context.module
        if context.method_name == "__call__" and conv.name == "conv_dw":
            path = conv.scope.path  # (..., 'blocks_i', 'stack_convj', 'conv_dw')
            key = ".".join((path[-3].replace("_", "."), "stack", path[-2][-5:]))
            dilations[key], strides[key] = conv.kernel_dilation[0], conv.strides[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        init_shapes(module)
    for name, block in reference.blocks.named_children():
        for j in (1, 2, 3):
            conv = getattr(block.stack, f"conv{j}").conv_dw
            key = f"blocks.{name}.stack.conv{j}"
            assert (dilations[key], strides[key]) == (conv.dilation[0], conv.stride[0]), key


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_xception_feature_shapes_at_odd_size(output_stride):
    module = Xception65(output_stride=output_stride, base_width=8, num_middle_units=2)
    height, width = 97, 131
    features = jax.eval_shape(
        module.apply, init_shapes(module), jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    )
    assert sorted(features) == [4, 8, 16, 32]
    for stride, feature in features.items():
        steps = min(stride, output_stride).bit_length() - 1
        assert feature.shape == (
            1,
            downsampled(height, steps),
            downsampled(width, steps),
            xception65_channels(8)[stride],
        )


def test_xception_rejects_bad_arguments():
    with pytest.raises(ValueError, match="output_stride must be one of 8, 16, 32, got 64"):
        Xception65(output_stride=64)
    with pytest.raises(ValueError, match="multi_grid must hold 3"):
        Xception65(multi_grid=(1, 2, 4, 8))


def test_backbone_factory_builds_every_backbone_by_name():
    with pytest.raises(
        ValueError,
        match="Unknown backbone 'resnet26'; valid backbones: 'resnet18', 'resnet34', "
        "'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d', 'xception65', "
        "'vgg16', 'vgg16_bn', 'alexnet'",
    ):
        backbones.create("resnet26")
    module = backbones.create(
        "xception65", output_stride=8, multi_grid=(1, 2, 4), base_width=8, name="backbone"
    )
    assert isinstance(module, Xception65) and module.multi_grid == (1, 2, 4)
    assert (module.output_stride, module.base_width, module.name) == (8, 8, "backbone")
    deep = backbones.create("resnet152", output_stride=16, deep_stem=True)
    assert isinstance(deep, ResNet) and (deep.depth, deep.deep_stem) == (152, True)
    assert backbones.channels("resnet101") == {2: 64, 4: 256, 8: 512, 16: 1024, 32: 2048}
    for name in backbones.NAMES:  # channels() agrees with the modules it describes
        assert backbones.channels(name, 8) == backbones.create(name, base_width=8).out_channels
    with pytest.raises(ValueError, match="deep_stem needs an encoder that takes it .*got 'vgg16'"):
        backbones.create("vgg16", deep_stem=True)
    with pytest.raises(
        ValueError,
        match="multi_grid needs an encoder that takes it .*'xception65'\\), got 'vgg16_bn'",
    ):
        backbones.create("vgg16_bn", multi_grid=(1, 2, 4))
    with pytest.raises(
        ValueError,
        match="Encoder 'alexnet' cannot give output stride 16; its output strides: 32\\.",
    ):
        backbones.create("alexnet", output_stride=16)
