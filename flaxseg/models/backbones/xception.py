"""Aligned Xception-65 (Chen et al., DeepLab v3+, ECCV 2018, Sec. 3.3 and Fig. 4).

The modified Xception of DeepLab v3+: a deeper middle flow (16 units), every max-pool replaced
by a strided depthwise-separable convolution (so atrous rates can replace strides), and BN + ReLU
after every 3×3 depthwise conv in the exit flow's last unit.

  stem:   3×3 conv 32 stride 2, 3×3 conv 64 (each + BN + ReLU)
  entry:  3 units (128, 256, 728), each ReLU-sepconv ×3 with the last one strided, plus a
          1×1 strided conv + BN shortcut
  middle: 16 units of 728 with identity shortcuts
  exit:   one unit (728, 1024, 1024) strided with a conv shortcut, one unit (1536, 1536, 2048)
          of sepconv + BN + ReLU with no shortcut

A separable conv is depthwise 3×3 → BN → [ReLU] → pointwise 1×1 → BN → [ReLU]. Module and
parameter names mirror timm's ``xception65`` (``blocks.3.stack.conv2.conv_dw.weight`` is
``params/blocks_3/stack_conv2/conv_dw/kernel``), whose weights (ported from the TF DeepLab
checkpoints) therefore load through ``timm_xception65_key_map``. BatchNorm epsilon is 1e-3 as in
TF and timm.

Output stride: strides are replaced by dilation as in TF DeepLab and timm — the unit whose
stride is removed keeps the current rate and every later unit has the rate multiplied by 2. With
``multi_grid`` the three separable convs of the last unit get ``rate × multi_grid`` (TF DeepLab's
``unit_rate_list``). Neither changes a parameter shape.

Features, keyed by nominal stride, are TF DeepLab's end points: the output of the second
separable conv (its pointwise BN, before the ReLU) of the unit that downsamples next, i.e. the
last map at that resolution — ``4`` is v3+'s low-level feature ``entry_flow/block2/unit_1/
xception_module/separable_conv2_pointwise`` — and ``32`` the network's output.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones.encoder import Encoder
from flaxseg.models.layers import (
    Dtype,
    KeyMap,
    SeparableConv,
    batch_norm,
    batchnorm_key_map,
    check_at_least,
    check_output_stride,
    conv_key_map,
    conv_without_bias,
    rematerialised,
)

XCEPTION_BN_EPSILON = 1e-3
# (channels of the three separable convs, stride) of the entry-flow units, the middle-flow unit
# and the exit-flow units, at base_width 64.
_ENTRY = (((128, 128, 128), 2), ((256, 256, 256), 2), ((728, 728, 728), 2))
_MIDDLE = ((728, 728, 728), 1)
_EXIT = (((728, 1024, 1024), 2), ((1536, 1536, 2048), 1))


def _scaled(channels: int, base_width: int) -> int:
    return max(1, channels * base_width // 64)


def xception65_channels(base_width: int = 64) -> dict[int, int]:
    """Channels of the feature maps ``Xception65`` returns, keyed by nominal stride."""
    return {
        4: _scaled(256, base_width),
        8: _scaled(728, base_width),
        16: _scaled(1024, base_width),
        32: _scaled(2048, base_width),
    }


class XceptionUnit(nn.Module):
    """One Xception module: three separable convs (the last one strided) plus a shortcut.

    ``start_with_relu``: ReLU before each separable conv and none inside (entry/middle flow and
    the first exit unit); otherwise ReLU after each BN inside (the last exit unit). The shortcut
    is a strided 1×1 conv + BN when shape changes, the identity otherwise, or absent
    (``skip=False``). Returns (output, end point), the end point being the second separable
    conv's output (see the module docstring).
    """

    features: Sequence[int]
    stride: int = 1
    dilations: Sequence[int] = (1, 1, 1)
    start_with_relu: bool = True
    skip: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        inner_act = None if self.start_with_relu else nn.relu
        y, end_point = x, x
        for i, (channels, rate) in enumerate(zip(self.features, self.dilations)):
            if self.start_with_relu:
                y = nn.relu(y)
            y = SeparableConv(
                channels,
                stride=self.stride if i == 2 else 1,
                dilation=rate,
                activation=inner_act,
                bn_epsilon=XCEPTION_BN_EPSILON,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"stack_conv{i + 1}",
            )(y, train)
            if i == 1:
                end_point = y
        if not self.skip:
            return y, end_point
        if self.stride != 1 or x.shape[-1] != self.features[-1]:
            s = self.stride
            x = conv_without_bias(self.dtype, self.param_dtype)(
                self.features[-1], (1, 1), strides=(s, s), name="shortcut_conv"
            )(x)
            x = batch_norm(train, self.dtype, self.param_dtype, XCEPTION_BN_EPSILON)(
                name="shortcut_bn"
            )(x)
        return y + x, end_point


def _unit_configs(num_middle_units: int):
    return list(_ENTRY) + [_MIDDLE] * num_middle_units + list(_EXIT)


class Xception65(nn.Module):
    """Aligned Xception-65 feature extractor (see the module docstring).

    Input [B, H, W, 3]; output ``{4, 8, 16, 32}`` -> feature maps (nominal strides) with
    ``xception65_channels(base_width)`` channels (256, 728, 1024, 2048 at base_width 64).
    ``num_middle_units`` (16 in the paper) and ``base_width`` only exist to build tiny test nets.
    ``remat`` rematerialises every unit (``layers.rematerialised``), with the same variables.
    """

    output_stride: int = 32
    multi_grid: tuple[int, ...] = (1, 1, 1)
    base_width: int = 64
    num_middle_units: int = 16
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_output_stride(self.output_stride)
        if len(self.multi_grid) != 3 or any(int(m) != m or m < 1 for m in self.multi_grid):
            raise ValueError(
                f"multi_grid must hold 3 positive integer rates (one per separable conv of the "
                f"last exit-flow unit), got {tuple(self.multi_grid)!r}."
            )
        check_at_least("base_width", self.base_width)
        check_at_least("num_middle_units", self.num_middle_units, 0)
        super().__post_init__()

    @property
    def out_channels(self) -> dict[int, int]:
        return xception65_channels(self.base_width)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[int, jax.Array]:
        x = x.astype(self.dtype)
        for index, (channels, stride) in enumerate(((32, 2), (64, 1))):
            x = conv_without_bias(self.dtype, self.param_dtype)(
                _scaled(channels, self.base_width),
                (3, 3),
                strides=(stride, stride),
                padding=((1, 1), (1, 1)),
                name=f"stem_{index}_conv",
            )(x)
            x = batch_norm(train, self.dtype, self.param_dtype, XCEPTION_BN_EPSILON)(
                name=f"stem_{index}_bn"
            )(x)
            x = nn.relu(x)

        features, current_stride, rate = {}, 2, 1
        configs = _unit_configs(self.num_middle_units)
        unit_class = rematerialised(XceptionUnit, self.remat)
        for index, (channels, stride) in enumerate(configs):
            unit_rate = rate
            if stride > 1 and current_stride * stride > self.output_stride:
                rate, stride = rate * stride, 1
            elif stride > 1:
                current_stride *= stride
            last = index == len(configs) - 1
            rates = tuple(unit_rate * int(m) for m in self.multi_grid) if last else (unit_rate,) * 3
            x, end_point = unit_class(
                tuple(_scaled(c, self.base_width) for c in channels),
                stride=stride,
                dilations=rates,
                start_with_relu=not last,
                skip=not last,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{index}",
            )(x, train)
            # Units that downsample (nominally) close a resolution: their end point is its
            # last map. The first unit's (stride 2) is not returned.
            if configs[index][1] > 1 and index > 0:
                features[4 * 2 ** len(features)] = end_point
        features[32] = x
        return features


def timm_xception65_key_map(num_middle_units: int = 16) -> KeyMap:
    """Map flax variable paths of ``Xception65`` to timm ``xception65`` state-dict keys.

    ``('params', 'blocks_3', 'stack_conv2', 'conv_dw', 'kernel') ->
    'blocks.3.stack.conv2.conv_dw.weight'``; timm's classifier (``head.fc.*``) has no
    counterpart.
    """
    key_map = {}
    for index in range(2):
        key_map.update(conv_key_map((f"stem_{index}_conv",), f"stem.{index}.conv"))
        key_map.update(batchnorm_key_map((f"stem_{index}_bn",), f"stem.{index}.bn"))
    configs = _unit_configs(num_middle_units)
    in_channels = 64
    for index, (channels, stride) in enumerate(configs):
        block, torch_block = f"blocks_{index}", f"blocks.{index}"
        for i in range(1, 4):
            flax_conv, torch_conv = (block, f"stack_conv{i}"), f"{torch_block}.stack.conv{i}"
            for part in ("dw", "pw"):
                key_map.update(
                    conv_key_map((*flax_conv, f"conv_{part}"), f"{torch_conv}.conv_{part}")
                )
                key_map.update(
                    batchnorm_key_map((*flax_conv, f"bn_{part}"), f"{torch_conv}.bn_{part}")
                )
        last = index == len(configs) - 1
        if not last and (stride != 1 or in_channels != channels[-1]):
            key_map.update(conv_key_map((block, "shortcut_conv"), f"{torch_block}.shortcut.conv"))
            key_map.update(batchnorm_key_map((block, "shortcut_bn"), f"{torch_block}.shortcut.bn"))
        in_channels = channels[-1]
    return key_map


def _build(*, multi_grid: Sequence[int] | None = None, **kwargs) -> Xception65:
    return Xception65(multi_grid=tuple(multi_grid or (1, 1, 1)), **kwargs)


def _key_map(num_middle_units: int = 16, **_) -> KeyMap:
    return timm_xception65_key_map(num_middle_units)


def _fingerprint(state_dict: Mapping[str, Any]) -> str | None:
    return "xception65" if "blocks.0.stack.conv1.conv_dw.weight" in state_dict else None


# The v3+ reference configs set no multi-grid on Xception-65.
ENCODERS = {
    "xception65": Encoder(
        name="xception65",
        build=_build,
        channels=xception65_channels,
        dilation_styles=("timm",),
        multi_grid=(1, 1, 1),
        key_maps={"timm": _key_map},
        fingerprint=_fingerprint,
    )
}
