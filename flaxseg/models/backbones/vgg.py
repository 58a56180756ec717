"""VGG-16 (Simonyan & Zisserman 2015, configuration D), with or without BatchNorm.

Thirteen 3×3 convolutions with ReLU in five blocks (2, 2, 3, 3, 3 convs; widths
base_width·(1, 2, 4, 8, 8)), each block closed by a max-pool. Module names mirror torchvision's
``vgg16().features`` / ``vgg16_bn().features``: the conv at ``features.<i>`` is the flax
submodule ``features_<i>`` and its BatchNorm is ``features_<i+1>``, so ImageNet weights load
through ``torchvision_vgg16_key_map`` without renaming tables.

The segmentation papers ran VGG in Caffe, whose nets differ from torchvision's in two knobs:
``first_conv_padding=100`` (FCN: conv1_1 pads 100 so that any input survives fc6's 7×7 VALID
conv) and ``pooling``:

  - 'floor': 2×2 stride-2 pools rounding down (torchvision's classification VGG);
  - 'ceil':  2×2 stride-2 pools rounding up (Caffe; FCN). FCN's fixed crop offsets (19/27/31,
    5, 9) give exactly the input size for every H, W only with these: floor pooling drops the
    last row of every odd-sized map, so the final crop runs off the end for many sizes (FCN-32s:
    239 of the heights 1–599) and inputs under 26 px no longer survive fc6;
  - 'deeplab': 3×3 stride-2 pad-1 pools rounding up (Caffe), as in DeepLab's released VGG nets
    (``DeepLab-LargeFOV/train.prototxt``): 513 px pool to 257, 129, 65.

Output stride (DeepLab v1, Chen et al. 2015): below 32, every pool that would exceed the output
stride becomes a 3×3 stride-1 pad-1 pool and later convs are dilated by the stride removed
(8: pool4/pool5 stride 1, conv5 dilation 2). Neither knob changes a parameter shape.
"""

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones.encoder import Encoder
from flaxseg.models.layers import (
    Dtype,
    KeyMap,
    batch_norm,
    batchnorm_key_map,
    check_one_of,
    check_output_stride,
    conv_key_map,
    he_normal_fan_out,
    max_pool,
)

VGG16_BLOCK_DEPTHS = (2, 2, 3, 3, 3)
VGG16_WIDTH_MULTIPLIERS = (1, 2, 4, 8, 8)
POOLINGS = ("floor", "ceil", "deeplab")
# torchvision's ``classifier`` Linear layers fc6 (on the flattened 7×7 pool5) and fc7.
TORCHVISION_FC_LAYERS = ("classifier.0", "classifier.3")


def vgg16_channels(base_width: int = 64) -> dict[int, int]:
    """Channels of each feature map returned by ``VGG16``, keyed by stride."""
    widths = [base_width * m for m in VGG16_WIDTH_MULTIPLIERS]
    return {1: widths[0], 2: widths[0], 4: widths[1], 8: widths[2], 16: widths[3], 32: widths[4]}


def conv_layout(batchnorm: bool) -> list[list[int]]:
    """Index in torchvision's ``features`` Sequential of every conv, grouped by block."""
    per_conv = 3 if batchnorm else 2  # conv, [bn,] relu
    indices, i = [], 0
    for depth in VGG16_BLOCK_DEPTHS:
        indices.append([i + per_conv * j for j in range(depth)])
        i += per_conv * depth + 1  # + the max-pool
    return indices


def conv_relu(
    x: jax.Array,
    index: int,
    features: int,
    *,
    batchnorm: bool,
    train: bool,
    padding: int = 1,
    dilation: int = 1,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> jax.Array:
    """VGG's 3×3 conv ``features_<index>`` (+ BatchNorm ``features_<index+1>``) + ReLU, created
    in the calling module (``VGG16`` and SegNet's encoder)."""
    # torchvision keeps the conv bias even before BatchNorm; so do we, to load it.
    x = nn.Conv(
        features,
        (3, 3),
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=(dilation, dilation),
        kernel_init=he_normal_fan_out(),
        dtype=dtype,
        param_dtype=param_dtype,
        name=f"features_{index}",
    )(x)
    if batchnorm:
        x = batch_norm(train, dtype, param_dtype)(name=f"features_{index + 1}")(x)
    return nn.relu(x)


class VGG16(nn.Module):
    """VGG-16 feature extractor returning feature maps keyed by stride.

    Input [B, H, W, 3] (normalised RGB). Output dict (nominal strides; with
    ``first_conv_padding=100`` the maps are larger than H/s):
      1: conv1_2 after ReLU (before pool1), base_width channels
      2: pool1, 4: pool2, 8: pool3, 16: pool4, 32: pool5 — each block's max-pooled output.
    Channel counts are ``out_channels`` (= ``vgg16_channels(base_width)``).
    """

    base_width: int = 64
    batchnorm: bool = False
    first_conv_padding: int = 1
    pooling: str = "floor"
    output_stride: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_output_stride(self.output_stride)
        check_one_of("VGG pooling", self.pooling, POOLINGS)
        super().__post_init__()

    @property
    def out_channels(self) -> dict[int, int]:
        return vgg16_channels(self.base_width)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[int, jax.Array]:
        features = {}
        conv = functools.partial(
            conv_relu,
            batchnorm=self.batchnorm,
            train=train,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        stride, dilation = 1, 1
        for block, (indices, mult) in enumerate(
            zip(conv_layout(self.batchnorm), VGG16_WIDTH_MULTIPLIERS)
        ):
            for index in indices:
                pad = self.first_conv_padding if index == 0 else dilation
                x = conv(x, index, self.base_width * mult, padding=pad, dilation=dilation)
            if block == 0:
                features[1] = x
            if 2 * stride > self.output_stride:
                x = max_pool(x, 3, 1, padding=1)
                dilation *= 2
            elif self.pooling == "deeplab":
                x = max_pool(x, 3, 2, padding=1, ceil_mode=True)
                stride *= 2
            else:
                x = max_pool(x, 2, 2, ceil_mode=self.pooling == "ceil")
                stride *= 2
            features[2 ** (block + 1)] = x
        return features


def torchvision_vgg16_key_map(batchnorm: bool) -> KeyMap:
    """Map flax variable paths of ``VGG16`` to torchvision ``vgg16[_bn]().features`` keys.

    Paths start with the collection: ``('params', 'features_0', 'kernel') ->
    'features.0.weight'``, BN scale/bias -> weight/bias and ``('batch_stats', ..., 'mean'/'var')
    -> running_mean/running_var``. Prefix the paths with the backbone's module path
    (``layers.prefix_key_map``) to load into a model.
    """
    key_map = {}
    for index in (i for block in conv_layout(batchnorm) for i in block):
        key_map.update(conv_key_map((f"features_{index}",), f"features.{index}", bias=True))
        if batchnorm:
            key_map.update(batchnorm_key_map((f"features_{index + 1}",), f"features.{index + 1}"))
    return key_map


def _build(batchnorm: bool, *, remat: bool = False, **kwargs) -> VGG16:
    del remat  # no repeated units to rematerialise
    return VGG16(batchnorm=batchnorm, **kwargs)


def _fingerprint(name: str, state_dict: Mapping[str, Any]) -> str | None:
    # torchvision's features: a BatchNorm at features.1 (vgg16_bn), a conv at features.2
    # (vgg16; AlexNet's features.2 is a pool).
    if "features.0.weight" not in state_dict:
        return None
    if "features.1.running_mean" in state_dict:
        found = "vgg16_bn"
    else:
        found = "vgg16" if "features.2.weight" in state_dict else None
    return name if found == name else None


ENCODERS = {
    name: Encoder(
        name=name,
        build=functools.partial(_build, name == "vgg16_bn"),
        channels=vgg16_channels,
        dilation_styles=("deeplab",),
        key_maps={
            "torchvision": functools.partial(
                lambda batchnorm, **_: torchvision_vgg16_key_map(batchnorm), name == "vgg16_bn"
            )
        },
        fingerprint=functools.partial(_fingerprint, name),
        fc_layers=TORCHVISION_FC_LAYERS,
    )
    for name in ("vgg16", "vgg16_bn")
}
