"""Dilated ResNet-50/101/152 (He et al. 2016) in torchvision's layout, for segmentation.

Bottleneck units put the stride in the 3×3 conv (torchvision's "ResNet v1.5"). Module and
parameter names mirror torchvision's state-dict keys one to one (``layer3.4.conv2.weight`` is
``params/layer3_4/conv2/kernel``, ``layer1.0.downsample.1.running_mean`` is
``batch_stats/layer1_0/downsample_1/mean``), so ImageNet weights load through
``torchvision_resnet_key_map`` without any table of exceptions.

Output stride (Chen et al., DeepLab): for ``output_stride`` 16 the stride of layer4, for 8 the
strides of layer3 and layer4, are replaced by dilation 2 and 4. As in torchvision's
``replace_stride_with_dilation`` (and MMSegmentation's ``contract_dilation``), the first unit of
a dilated stage keeps the previous stage's rate: it is the unit that used to downsample.

Multi-grid (DeepLab v3, Sec. 3.2): the three units of layer4 get rates
``stage_rate × multi_grid`` — at output stride 16 with (1, 2, 4) that is (2, 4, 8). The default
(1, 1, 1) means no multi-grid and keeps torchvision's layout exactly.

Deep stem (Bag of Tricks' ResNet-C; PSPNet; MMSegmentation's ``ResNetV1c``): three 3×3 convs
(32, 32, 64 channels at base_width 64; strides 2, 1, 1) replace the 7×7 conv. Their names follow
MMSegmentation's keys (``stem.0``, ``stem.1``, ``stem.3``, ...), so its v1c weights load too.

Changing ``output_stride`` or ``multi_grid`` never changes a parameter shape: variables trained
at one output stride can be evaluated at another.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.layers import (
    Dtype,
    KeyMap,
    batch_norm,
    batchnorm_key_map,
    check_at_least,
    check_one_of,
    check_output_stride,
    conv_key_map,
    conv_without_bias,
)

STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# Backbone names -> depth: the one table of the ResNets flaxseg builds.
RESNETS = {f"resnet{depth}": depth for depth in STAGE_SIZES}
# Torch keys of either stem (torchvision's 7×7 conv1/bn1, MMSegmentation's deep ``stem.*``): a
# file with the other stem leaves the model's stem random.
STEM_KEY_PREFIXES = ("conv1.", "bn1.", "stem.")
EXPANSION = 4  # bottleneck output channels / 3×3 conv channels
# Deep-stem convs as (torchvision-style index of the conv, channels at base_width 64, stride);
# the BatchNorm of conv i is at i + 1 and its ReLU at i + 2, as in MMSegmentation's Sequential.
_DEEP_STEM = ((0, 32, 2), (3, 32, 1), (6, 64, 1))


def resnet_channels(depth: int = 101, base_width: int = 64) -> dict[int, int]:
    """Channels of the feature maps ``ResNet`` returns, keyed by nominal stride."""
    _check_depth(depth)
    return {
        4: base_width * EXPANSION,
        8: 2 * base_width * EXPANSION,
        16: 4 * base_width * EXPANSION,
        32: 8 * base_width * EXPANSION,
    }


def _check_depth(depth: int) -> None:
    check_one_of("ResNet depth", depth, tuple(STAGE_SIZES))


def stage_plan(
    depth: int, output_stride: int, multi_grid: tuple[int, ...] = (1, 1, 1)
) -> list[tuple[int, list[int]]]:
    """(stride of the first unit, dilation of every unit) for layer1..layer4."""
    _check_depth(depth)
    check_output_stride(output_stride)
    sizes = STAGE_SIZES[depth]
    if len(multi_grid) != sizes[-1] or any(int(m) != m or m < 1 for m in multi_grid):
        raise ValueError(
            f"multi_grid must hold {sizes[-1]} positive integer rates (one per unit of layer4), "
            f"got {tuple(multi_grid)!r}."
        )
    plan, current_stride, dilation = [], 4, 1  # stride 4 after the stem and its max-pool
    for index, size in enumerate(sizes):
        stride, previous = (1 if index == 0 else 2), dilation
        if current_stride * stride > output_stride:
            dilation, stride = dilation * stride, 1
        else:
            current_stride *= stride
        rates = [previous] + [dilation] * (size - 1)
        if index == len(sizes) - 1 and tuple(multi_grid) != (1,) * size:
            rates = [dilation * int(m) for m in multi_grid]
        plan.append((stride, rates))
    return plan


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1×1 → 3×3 (stride, dilation) → 1×1 (×4), each with BN.

    [B, H, W, C_in] -> [B, H/stride, W/stride, 4·width]; the shortcut is a strided 1×1 conv + BN
    (``downsample_0``/``downsample_1``) when ``downsample`` is set, else the identity.
    """

    width: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = conv_without_bias(self.dtype, self.param_dtype)
        norm = batch_norm(train, self.dtype, self.param_dtype)
        d, s = self.dilation, self.stride
        y = nn.relu(norm(name="bn1")(conv(self.width, (1, 1), name="conv1")(x)))
        y = conv(
            self.width,
            (3, 3),
            strides=(s, s),
            padding=((d, d), (d, d)),
            kernel_dilation=(d, d),
            name="conv2",
        )(y)
        y = nn.relu(norm(name="bn2")(y))
        y = norm(name="bn3")(conv(self.width * EXPANSION, (1, 1), name="conv3")(y))
        if self.downsample:
            x = conv(self.width * EXPANSION, (1, 1), strides=(s, s), name="downsample_0")(x)
            x = norm(name="downsample_1")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """Dilated ResNet feature extractor (see the module docstring).

    Input [B, H, W, 3] (normalised RGB). Output ``{4: layer1, 8: layer2, 16: layer3,
    32: layer4}`` keyed by NOMINAL stride (a dilated stage keeps the previous resolution), with
    ``resnet_channels(depth, base_width)`` channels: 4·, 8·, 16·, 32·base_width.
    Spatial sizes follow PyTorch: every stride-2 step maps n to floor((n − 1) / 2) + 1.
    """

    depth: int = 101
    output_stride: int = 32
    multi_grid: tuple[int, ...] = (1, 1, 1)
    deep_stem: bool = False
    base_width: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        stage_plan(self.depth, self.output_stride, self.multi_grid)  # validates all three
        check_at_least("base_width", self.base_width)
        super().__post_init__()

    @property
    def out_channels(self) -> dict[int, int]:
        return resnet_channels(self.depth, self.base_width)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[int, jax.Array]:
        conv = conv_without_bias(self.dtype, self.param_dtype)
        norm = batch_norm(train, self.dtype, self.param_dtype)
        x = x.astype(self.dtype)
        if self.deep_stem:
            for index, channels, stride in _DEEP_STEM:
                x = conv(
                    max(1, channels * self.base_width // 64),
                    (3, 3),
                    strides=(stride, stride),
                    padding=((1, 1), (1, 1)),
                    name=f"stem_{index}",
                )(x)
                x = nn.relu(norm(name=f"stem_{index + 1}")(x))
        else:
            x = conv(
                self.base_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name="conv1"
            )(x)
            x = nn.relu(norm(name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        features = {}
        plan = stage_plan(self.depth, self.output_stride, self.multi_grid)
        for index, (stride, rates) in enumerate(plan):
            width = self.base_width * 2**index
            for unit, rate in enumerate(rates):
                x = Bottleneck(
                    width,
                    stride=stride if unit == 0 else 1,
                    dilation=rate,
                    downsample=unit == 0,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{index + 1}_{unit}",
                )(x, train)
            features[4 * 2**index] = x
        return features


def torchvision_resnet_key_map(depth: int = 101, deep_stem: bool = False) -> KeyMap:
    """Map flax variable paths of ``ResNet`` to torchvision ``resnet<depth>()`` state-dict keys.

    Paths start with the collection (``('params', 'layer1_0', 'conv1', 'kernel') ->
    'layer1.0.conv1.weight'``): every flax name is the torch name with '.' for '_'. The
    classifier (``fc.*``) has no counterpart. With ``deep_stem`` the stem keys are
    MMSegmentation ResNetV1c's (``stem.0.weight``, ``stem.1.running_mean``, ...).
    """
    _check_depth(depth)
    pairs = (
        [(f"stem_{i}", f"stem_{i + 1}") for i, _, _ in _DEEP_STEM]
        if deep_stem
        else [("conv1", "bn1")]
    )
    for stage, size in enumerate(STAGE_SIZES[depth], start=1):
        for unit in range(size):
            convs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            if unit == 0:
                convs.append(("downsample_0", "downsample_1"))
            pairs += [
                (f"layer{stage}_{unit}/{conv}", f"layer{stage}_{unit}/{bn}") for conv, bn in convs
            ]
    key_map = {}
    for conv, bn in pairs:
        key_map.update(conv_key_map(conv.split("/"), conv.replace("/", ".").replace("_", ".")))
        key_map.update(batchnorm_key_map(bn.split("/"), bn.replace("/", ".").replace("_", ".")))
    return key_map
