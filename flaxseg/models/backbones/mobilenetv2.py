"""MobileNetV2 (Sandler et al., CVPR 2018) in torchvision's layout, equal to smp's encoder.

A 3×3/2 stem (32), 17 inverted residual blocks (1×1 expand → 3×3 depthwise → 1×1 linear
projection, BN after each, ReLU6 after the first two, identity shortcut where stride is 1 and
channels are kept) and a final 1×1 conv to 1280 channels with BN + ReLU6. Module and parameter
names mirror torchvision's ``mobilenet_v2`` state-dict keys (``features.4.conv.1.0.weight`` is
``params/features_4/conv_1_0/kernel``), so its weights (and smp's ``mobilenet_v2`` encoder's,
which is torchvision's model) load through ``mobilenet_v2_key_map``; the same map onto timm's
``mobilenetv2_100`` (the same network, keys ``conv_stem``, ``blocks.i.j.conv_dw``, ...) is
``mobilenet_v2_key_map(layout='timm')``.

Features, keyed by nominal stride, are smp's ``mobilenet_v2`` encoder outputs: the outputs of
``features.1`` (16 channels, stride 2), ``features.3`` (24), ``features.6`` (32),
``features.13`` (96) and ``features.18`` (1280, stride 32).

Output stride 8/16 by dilation as smp's ``make_dilated`` does it (torchvision's MobileNetV2 has
no dilated form): every conv of ``features.7``–``13`` (the stride-16 stage) and of
``features.14``–``18`` (the stride-32 stage) beyond the output stride gets stride 1, dilation
``stage stride / output_stride`` and padding ``dilation`` (3×3). ``width_multiplier`` is
torchvision's ``width_mult`` (channels rounded to multiples of 8; the last conv keeps 1280
below 1.0).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision's ``_make_divisible(c · width_mult, 8)`` is timm's ``round_channels``.
from flaxseg.models.backbones.efficientnet import round_channels
from flaxseg.models.backbones.encoder import Encoder
from flaxseg.models.layers import (
    Dtype,
    KeyMap,
    batch_norm,
    batchnorm_key_map,
    check_choice,
    check_output_stride,
    conv_key_map,
    conv_without_bias,
    he_normal_fan_out,
    rematerialised,
)

# torchvision's inverted residual settings: (expand ratio t, channels c, repeats n, stride s).
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# smp's taps: {nominal stride: index in ``features``} and its dilated stages (``get_stages``).
FEATURE_INDEXES = {2: 1, 4: 3, 8: 6, 16: 13, 32: 18}
_SMP_STAGES = {16: range(7, 14), 32: range(14, 19)}
LAYOUTS = ("torchvision", "timm")


def block_plan(width_multiplier: float = 1.0) -> list[tuple[int, int, int, int]]:
    """(input channels, output channels, expand ratio, stride) of ``features.1``–``17``."""
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier!r}.")
    plan, in_channels = [], round_channels(STEM_CHANNELS, width_multiplier)
    for t, c, n, s in SETTINGS:
        out = round_channels(c, width_multiplier)
        for unit in range(n):
            plan.append((in_channels, out, t, s if unit == 0 else 1))
            in_channels = out
    return plan


def mobilenet_v2_channels(width_multiplier: float = 1.0) -> dict[int, int]:
    """Channels of the feature maps ``MobileNetV2`` returns, keyed by nominal stride."""
    plan = block_plan(width_multiplier)
    last = round_channels(LAST_CHANNELS, max(1.0, width_multiplier))
    return {
        stride: last if index == 18 else plan[index - 1][1]
        for stride, index in FEATURE_INDEXES.items()
    }


class InvertedResidual(nn.Module):
    """torchvision's ``InvertedResidual``; children named after its ``conv`` Sequential.

    t = 1: depthwise (``conv_0_0``, BN ``conv_0_1``, ReLU6) → 1×1 (``conv_1``) → BN (``conv_2``).
    t > 1: 1×1 expand (``conv_0_*``) → depthwise (``conv_1_*``) → 1×1 (``conv_2``) → BN
    (``conv_3``).
    """

    in_channels: int
    out_channels: int
    expand_ratio: int
    stride: int = 1
    dilation: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = conv_without_bias(self.dtype, self.param_dtype)
        norm = batch_norm(train, self.dtype, self.param_dtype)
        inputs, hidden = x, int(round(self.in_channels * self.expand_ratio))
        index = 0
        if self.expand_ratio != 1:
            x = nn.relu6(norm(name="conv_0_1")(conv(hidden, (1, 1), name="conv_0_0")(x)))
            index = 1
        s, d = self.stride, self.dilation
        x = conv(
            hidden,
            (3, 3),
            strides=(s, s),
            padding=((d, d), (d, d)),
            kernel_dilation=(d, d),
            feature_group_count=hidden,
            kernel_init=he_normal_fan_out(groups=hidden),  # timm's fan_out // groups
            name=f"conv_{index}_0",
        )(x)
        x = nn.relu6(norm(name=f"conv_{index}_1")(x))
        x = conv(self.out_channels, (1, 1), name=f"conv_{index + 1}")(x)
        x = norm(name=f"conv_{index + 2}")(x)
        if self.stride == 1 and self.in_channels == self.out_channels:
            x = x + inputs
        return x


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor (see the module docstring).

    Input [B, H, W, 3] (normalised RGB), any H, W. Output ``{2, 4, 8, 16, 32}`` -> feature maps
    (nominal strides) with ``mobilenet_v2_channels(width_multiplier)`` channels (16, 24, 32,
    96, 1280 at 1.0). Spatial sizes follow PyTorch: a stride-2 step maps n to ⌊(n − 1)/2⌋ + 1.
    ``remat`` rematerialises every block (``layers.rematerialised``), with the same variables.
    """

    output_stride: int = 32
    width_multiplier: float = 1.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_output_stride(self.output_stride)
        block_plan(self.width_multiplier)
        super().__post_init__()

    @property
    def out_channels(self) -> dict[int, int]:
        return mobilenet_v2_channels(self.width_multiplier)

    def _rate(self, index: int) -> int:
        for stride, indexes in _SMP_STAGES.items():
            if index in indexes and stride > self.output_stride:
                return stride // self.output_stride
        return 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[int, jax.Array]:
        conv = conv_without_bias(self.dtype, self.param_dtype)
        norm = batch_norm(train, self.dtype, self.param_dtype)
        plan = block_plan(self.width_multiplier)
        x = x.astype(self.dtype)
        x = conv(plan[0][0], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="features_0_0")(
            x
        )
        x = nn.relu6(norm(name="features_0_1")(x))
        taps = {index: stride for stride, index in FEATURE_INDEXES.items()}
        features = {}
        block = rematerialised(InvertedResidual, self.remat)
        for index, (c_in, c_out, t, stride) in enumerate(plan, start=1):
            rate = self._rate(index)
            x = block(
                c_in,
                c_out,
                t,
                stride=1 if rate > 1 else stride,
                dilation=rate,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"features_{index}",
            )(x, train)
            if index in taps:
                features[taps[index]] = x
        last = round_channels(LAST_CHANNELS, max(1.0, self.width_multiplier))
        x = nn.relu6(norm(name="features_18_1")(conv(last, (1, 1), name="features_18_0")(x)))
        features[32] = x
        return features


def _block_names(expand_ratio: int) -> tuple[tuple[str, str, bool], ...]:
    """(flax/torchvision child, timm child, is a BatchNorm) of an inverted residual's layers."""
    if expand_ratio == 1:
        return (
            ("conv_0_0", "conv_dw", False),
            ("conv_0_1", "bn1", True),
            ("conv_1", "conv_pw", False),
            ("conv_2", "bn2", True),
        )
    return (
        ("conv_0_0", "conv_pw", False),
        ("conv_0_1", "bn1", True),
        ("conv_1_0", "conv_dw", False),
        ("conv_1_1", "bn2", True),
        ("conv_2", "conv_pwl", False),
        ("conv_3", "bn3", True),
    )


def mobilenet_v2_key_map(width_multiplier: float = 1.0, layout: str = "torchvision") -> KeyMap:
    """{flax variable path: key} of ``MobileNetV2`` onto torchvision's ``mobilenet_v2`` (and
    smp's ``mobilenet_v2`` encoder, without its ``encoder.`` prefix) or, with
    ``layout='timm'``, timm's ``mobilenetv2_100`` state dict.

    torchvision: every flax name is the key with '.' for '_' (``('params', 'features_4',
    'conv_1_0', 'kernel') -> 'features.4.conv.1.0.weight'``). timm: ``features_0_*`` ->
    ``conv_stem``/``bn1``, ``features_<i>`` -> ``blocks.<stage>.<unit>``, ``features_18_*`` ->
    ``conv_head``/``bn2``. The classifiers (``classifier.1``; ``classifier``) have no counterpart.
    """
    check_choice(layout, LAYOUTS, "MobileNetV2 layout")
    timm = layout == "timm"
    layers = [
        (("features_0_0",), "conv_stem" if timm else "features.0.0", False),
        (("features_0_1",), "bn1" if timm else "features.0.1", True),
        (("features_18_0",), "conv_head" if timm else "features.18.0", False),
        (("features_18_1",), "bn2" if timm else "features.18.1", True),
    ]
    stage_units = [
        (stage, unit) for stage, (_, _, n, _) in enumerate(SETTINGS) for unit in range(n)
    ]
    plan = block_plan(width_multiplier)
    for index, ((_, _, t, _), (stage, unit)) in enumerate(zip(plan, stage_units), start=1):
        for flax_name, timm_name, is_bn in _block_names(t):
            torch_name = (
                f"blocks.{stage}.{unit}.{timm_name}"
                if timm
                else f"features.{index}.conv.{flax_name[len('conv_') :].replace('_', '.')}"
            )
            layers.append(((f"features_{index}", flax_name), torch_name, is_bn))
    key_map = {}
    for path, torch_name, is_bn in layers:
        key_map.update(
            batchnorm_key_map(path, torch_name) if is_bn else conv_key_map(path, torch_name)
        )
    return key_map


def _build(*, base_width: int = 64, **kwargs) -> MobileNetV2:
    # base_width 64 is the full network: widths scale by base_width / 64.
    return MobileNetV2(width_multiplier=base_width / 64, **kwargs)


def _fingerprint(state_dict: Mapping[str, Any]) -> str | None:
    """'mobilenet_v2' for torchvision's keys, 'mobilenetv2_100' for timm's (its blocks have no
    squeeze-excitation, unlike timm's EfficientNets)."""
    keys = state_dict
    if "features.1.conv.0.0.weight" in keys:
        return "mobilenet_v2"
    timm = "blocks.0.0.conv_dw.weight" in keys and "conv_stem.weight" in keys
    if timm and "blocks.0.0.se.conv_reduce.weight" not in keys:
        return "mobilenetv2_100" if "blocks.1.0.conv_pwl.weight" in keys else None
    return None


ENCODERS = {
    "mobilenet_v2": Encoder(
        name="mobilenet_v2",
        build=_build,
        channels=lambda base_width: mobilenet_v2_channels(base_width / 64),
        dilation_styles=("smp",),
        # smp's mobilenet_v2 encoder is torchvision's network.
        key_maps={
            "torchvision": lambda **_: mobilenet_v2_key_map(),
            "timm": lambda **_: mobilenet_v2_key_map(layout="timm"),
            "smp": lambda **_: mobilenet_v2_key_map(),
        },
        source_names={"timm": "mobilenetv2_100"},
        fingerprint=_fingerprint,
    )
}
