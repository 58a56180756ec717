"""VGG-16 (Simonyan & Zisserman 2015, configuration D), with or without BatchNorm.

Thirteen 3×3 convolutions with ReLU in five blocks (2, 2, 3, 3, 3 convs; widths
base_width·(1, 2, 4, 8, 8)), each block closed by a 2×2 stride-2 max-pool. Module names mirror
torchvision's ``vgg16().features`` / ``vgg16_bn().features``: the conv at
``features.<i>`` is the flax submodule ``features_<i>`` and its BatchNorm is ``features_<i+1>``,
so ImageNet weights load through ``torchvision_vgg16_key_map`` without renaming tables.

Two knobs exist for FCN (Long et al. 2015), whose reference Caffe nets differ from torchvision:
``first_conv_padding=100`` (conv1_1 pads 100 so that any input survives fc6's 7×7 VALID conv)
and ``ceil_mode=True`` (Caffe pools round up). FCN's fixed crop offsets (19/27/31, 5, 9) give
exactly the input size for every H, W only with ceil-mode pooling: floor pooling drops the last
row of every odd-sized map, so the final crop runs off the end for many sizes (FCN-32s: 239 of
the heights 1–599) and inputs under 26 px no longer survive fc6's 7×7 VALID conv.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.layers import (BN_EPSILON, BN_MOMENTUM, Dtype, check_output_stride,
                                   he_normal_fan_out, max_pool)

VGG16_BLOCK_DEPTHS = (2, 2, 3, 3, 3)
VGG16_WIDTH_MULTIPLIERS = (1, 2, 4, 8, 8)


def vgg16_channels(base_width: int = 64) -> dict[int, int]:
    """Channels of each feature map returned by ``VGG16``, keyed by stride."""
    widths = [base_width * m for m in VGG16_WIDTH_MULTIPLIERS]
    return {1: widths[0], 2: widths[0], 4: widths[1], 8: widths[2], 16: widths[3],
            32: widths[4]}


def _torchvision_conv_indices(batchnorm: bool) -> list[list[int]]:
    """Index in torchvision's ``features`` Sequential of every conv, grouped by block."""
    per_conv = 3 if batchnorm else 2  # conv, [bn,] relu
    indices, i = [], 0
    for depth in VGG16_BLOCK_DEPTHS:
        indices.append([i + per_conv * j for j in range(depth)])
        i += per_conv * depth + 1  # + the max-pool
    return indices


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
    ceil_mode: bool = False
    # DeepLab v1 (Chen et al. 2015): below 32, the pools that would exceed the output stride
    # become 3×3 stride-1 (pad 1) pools and later convs are dilated by the stride removed
    # (8: pool4/pool5 stride 1, conv5 dilation 2). Parameter shapes do not change.
    output_stride: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_output_stride(self.output_stride)
        super().__post_init__()

    @property
    def out_channels(self) -> dict[int, int]:
        return vgg16_channels(self.base_width)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[int, jax.Array]:
        features = {}
        conv_indices = _torchvision_conv_indices(self.batchnorm)
        stride, dilation = 1, 1
        for block, (indices, mult) in enumerate(zip(conv_indices, VGG16_WIDTH_MULTIPLIERS)):
            for index in indices:
                pad = self.first_conv_padding if index == 0 else dilation
                # torchvision keeps the conv bias even before BatchNorm; so do we, to load it.
                x = nn.Conv(self.base_width * mult, (3, 3), padding=((pad, pad), (pad, pad)),
                            kernel_dilation=(dilation, dilation),
                            kernel_init=he_normal_fan_out(), dtype=self.dtype,
                            param_dtype=self.param_dtype, name=f"features_{index}")(x)
                if self.batchnorm:
                    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                                     epsilon=BN_EPSILON, dtype=self.dtype,
                                     param_dtype=self.param_dtype,
                                     name=f"features_{index + 1}")(x)
                x = nn.relu(x)
            if block == 0:
                features[1] = x
            if 2 * stride > self.output_stride:
                x = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
                dilation *= 2
            else:
                x = max_pool(x, 2, 2, ceil_mode=self.ceil_mode)
                stride *= 2
            features[2 ** (block + 1)] = x
        return features


VGG16BN = functools.partial(VGG16, batchnorm=True)


def torchvision_vgg16_key_map(batchnorm: bool) -> dict[tuple[str, ...], str]:
    """Map flax variable paths of ``VGG16`` to torchvision ``vgg16[_bn]().features`` keys.

    Paths start with the collection: ``('params', 'features_0', 'kernel') ->
    'features.0.weight'`` (conv kernels need OIHW -> HWIO), BN scale/bias -> weight/bias and
    ``('batch_stats', ..., 'mean'/'var') -> running_mean/running_var``. torchvision's
    ``num_batches_tracked`` counters have no flax counterpart (flax BN always uses momentum) and
    are not mapped. Prefix the paths with the backbone's module name to load into a model.
    """
    key_map = {}
    for index in (i for block in _torchvision_conv_indices(batchnorm) for i in block):
        conv = f"features_{index}"
        key_map[("params", conv, "kernel")] = f"features.{index}.weight"
        key_map[("params", conv, "bias")] = f"features.{index}.bias"
        if batchnorm:
            bn, torch_bn = f"features_{index + 1}", f"features.{index + 1}"
            key_map[("params", bn, "scale")] = f"{torch_bn}.weight"
            key_map[("params", bn, "bias")] = f"{torch_bn}.bias"
            key_map[("batch_stats", bn, "mean")] = f"{torch_bn}.running_mean"
            key_map[("batch_stats", bn, "var")] = f"{torch_bn}.running_var"
    return key_map
