"""Dilated ResNet-18/34/50/101/152 and ResNeXt-50 32x4d (He et al. 2016; Xie et al. 2017) in
torchvision's layout, for segmentation.

``RESNETS`` is the one table of the ResNets flaxseg builds: block type, units per stage and
cardinality (groups × channels per group) of each name. Basic units (ResNet-18/34) are two 3×3
convs; bottleneck units put the stride in the 3×3 conv (torchvision's "ResNet v1.5"), whose
width is ``planes · width_per_group / 64 · groups`` (ResNeXt: 32 groups of 4 channels at
layer1, doubling per stage). Module and parameter names mirror torchvision's state-dict keys
one to one (``layer3.4.conv2.weight`` is ``params/layer3_4/conv2/kernel``,
``layer1.0.downsample.1.running_mean`` is ``batch_stats/layer1_0/downsample_1/mean``), so
ImageNet weights (torchvision's or timm's, whose ResNet keys are the same) load through
``torchvision_resnet_key_map`` without any table of exceptions.

Features: ``{2: stem, 4: layer1, 8: layer2, 16: layer3, 32: layer4}`` keyed by nominal stride;
the stride-2 map is the stem's last ReLU before the max-pool, as in smp's ``ResNetEncoder``.

Output stride (Chen et al., DeepLab): for ``output_stride`` 16 the stride of layer4, for 8 the
strides of layer3 and layer4, are replaced by dilation. ``dilation_style`` says how:
  - 'torchvision' (default): as torchvision's ``replace_stride_with_dilation`` (and
    MMSegmentation's ``contract_dilation``), the first unit of a dilated stage keeps the previous
    stage's rate (it is the unit that used to downsample), the others get 2 (layer4 at 16) or
    2 and 4 (layer3 and layer4 at 8).
  - 'smp': as segmentation_models_pytorch's ``make_dilated``, every conv of a dilated stage gets
    the stage's rate ``nominal stride / output_stride`` (layer4 at 16: 2; layer3, layer4 at 8:
    2, 4), the first unit included; its strides become 1 (the downsample 1×1 conv's too, whose
    dilation changes nothing).
Both 3×3 convs of a basic unit take the unit's rate (torchvision refuses dilated basic units;
smp dilates them this way).

Multi-grid (DeepLab v3, Sec. 3.2): the units of layer4 get rates ``stage_rate × multi_grid`` — at
output stride 16 with (1, 2, 4) that is (2, 4, 8). None, or all ones of any length (the
(1, 1, 1) that callers pass for "none" also fits ResNet-18), means no multi-grid and keeps
torchvision's layout exactly; any other value needs one rate per unit of layer4 (3; 2 for
ResNet-18).

Deep stem (Bag of Tricks' ResNet-C; PSPNet; MMSegmentation's ``ResNetV1c``): three 3×3 convs
(32, 32, 64 channels at base_width 64; strides 2, 1, 1) replace the 7×7 conv. Their names follow
MMSegmentation's keys (``stem.0``, ``stem.1``, ``stem.3``, ...), so its v1c weights load too.

``base_width`` (64 = the papers') scales every width: planes ``base_width · 2^i`` per stage. For
ResNeXt the 3×3 conv keeps its width ratio (``2 · planes`` for 32x4d) and uses
``gcd(groups, width)`` groups, which is 32 at full size and fewer at test-size widths.

Changing ``output_stride``, ``multi_grid`` or ``dilation_style`` never changes a parameter
shape: variables trained one way can be evaluated another. ``remat`` rematerialises every unit
(``layers.rematerialised``: less memory, one more forward pass) with the same variables.
"""

import dataclasses
import functools
import math
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
    check_at_least,
    check_one_of,
    check_output_stride,
    conv_key_map,
    conv_without_bias,
    rematerialised,
)


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """One ResNet: depth, block type ('basic' or 'bottleneck'), units per stage (layer1..4),
    and the bottleneck 3×3 conv's cardinality (torchvision's ``groups``/``width_per_group``)."""

    depth: int
    block: str
    stage_sizes: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64

    @property
    def expansion(self) -> int:
        """Output channels of a unit / its planes (torchvision's ``block.expansion``)."""
        return 1 if self.block == "basic" else 4


# Backbone names -> architecture: the one table of the ResNets flaxseg builds.
RESNETS = {
    "resnet18": ResNetSpec(18, "basic", (2, 2, 2, 2)),
    "resnet34": ResNetSpec(34, "basic", (3, 4, 6, 3)),
    "resnet50": ResNetSpec(50, "bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetSpec(101, "bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetSpec(152, "bottleneck", (3, 8, 36, 3)),
    "resnext50_32x4d": ResNetSpec(50, "bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
}
DEPTHS = tuple(sorted({spec.depth for spec in RESNETS.values()}))
DILATION_STYLES = ("torchvision", "smp")
# Torch keys of either stem (torchvision's 7×7 conv1/bn1, MMSegmentation's deep ``stem.*``): a
# file with the other stem leaves the model's stem random.
STEM_KEY_PREFIXES = ("conv1.", "bn1.", "stem.")
# Deep-stem convs as (torchvision-style index of the conv, channels at base_width 64, stride);
# the BatchNorm of conv i is at i + 1 and its ReLU at i + 2, as in MMSegmentation's Sequential.
_DEEP_STEM = ((0, 32, 2), (3, 32, 1), (6, 64, 1))


def resnet_spec(depth: int = 101, groups: int = 1, width_per_group: int = 64) -> ResNetSpec:
    """The ``RESNETS`` entry with this depth and cardinality; a clear error when there is none."""
    check_one_of("ResNet depth", depth, DEPTHS)
    for spec in RESNETS.values():
        if (spec.depth, spec.groups, spec.width_per_group) == (depth, groups, width_per_group):
            return spec
    valid = ", ".join(
        f"{name} ({spec.depth}, {spec.groups}, {spec.width_per_group})"
        for name, spec in RESNETS.items()
    )
    raise ValueError(
        f"No ResNet has depth {depth} with groups={groups} and width_per_group="
        f"{width_per_group}; valid (depth, groups, width_per_group): {valid}."
    )


def resnet_channels(
    depth: int = 101, base_width: int = 64, groups: int = 1, width_per_group: int = 64
) -> dict[int, int]:
    """Channels of the feature maps ``ResNet`` returns, keyed by nominal stride."""
    spec = resnet_spec(depth, groups, width_per_group)
    return {2: base_width} | {
        4 * 2**i: base_width * 2**i * spec.expansion for i in range(len(spec.stage_sizes))
    }


def _multi_grid(spec: ResNetSpec, multi_grid: tuple[int, ...] | None) -> tuple[int, ...] | None:
    # None when there is none (None or all ones), else checked against layer4's unit count.
    if multi_grid is None or all(m == 1 for m in multi_grid):
        return None
    units = spec.stage_sizes[-1]
    if len(multi_grid) != units or any(int(m) != m or m < 1 for m in multi_grid):
        raise ValueError(
            f"multi_grid must hold {units} positive integer rates (one per unit of layer4) "
            f"for a ResNet-{spec.depth}, got {tuple(multi_grid)!r}."
        )
    return tuple(int(m) for m in multi_grid)


def stage_plan(
    depth: int,
    output_stride: int,
    multi_grid: tuple[int, ...] | None = None,
    dilation_style: str = "torchvision",
) -> list[tuple[int, list[int]]]:
    """(stride of the first unit, dilation of every unit) for layer1..layer4."""
    spec = resnet_spec(depth)
    check_output_stride(output_stride)
    check_one_of("dilation_style", dilation_style, DILATION_STYLES)
    multi_grid = _multi_grid(spec, multi_grid)
    plan, current_stride, dilation = [], 4, 1  # stride 4 after the stem and its max-pool
    for index, size in enumerate(spec.stage_sizes):
        stride, previous = (1 if index == 0 else 2), dilation
        if current_stride * stride > output_stride:
            dilation, stride = dilation * stride, 1
        else:
            current_stride *= stride
        first = previous if dilation_style == "torchvision" else dilation
        rates = [first] + [dilation] * (size - 1)
        if index == len(spec.stage_sizes) - 1 and multi_grid is not None:
            rates = [dilation * m for m in multi_grid]
        plan.append((stride, rates))
    return plan


def _dilated_conv(conv, features: int, stride: int, dilation: int, name: str, groups: int = 1):
    d = dilation
    return conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding=((d, d), (d, d)),
        kernel_dilation=(d, d),
        feature_group_count=groups,
        name=name,
    )


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: 3×3 (stride) → BN → ReLU → 3×3 → BN, + shortcut, ReLU.

    [B, H, W, C_in] -> [B, H/stride, W/stride, planes]; both 3×3 convs use ``dilation``. The
    shortcut is a strided 1×1 conv + BN (``downsample_0``/``downsample_1``) when ``downsample``
    is set, else the identity.
    """

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = conv_without_bias(self.dtype, self.param_dtype)
        norm = batch_norm(train, self.dtype, self.param_dtype)
        s, d = self.stride, self.dilation
        y = nn.relu(norm(name="bn1")(_dilated_conv(conv, self.planes, s, d, "conv1")(x)))
        y = norm(name="bn2")(_dilated_conv(conv, self.planes, 1, d, "conv2")(y))
        if self.downsample:
            x = conv(self.planes, (1, 1), strides=(s, s), name="downsample_0")(x)
            x = norm(name="downsample_1")(x)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1×1 → 3×3 (stride, dilation, groups) → 1×1 (×4), each with BN.

    [B, H, W, C_in] -> [B, H/stride, W/stride, 4·planes]; ``width`` is the 1×1/3×3 convs' width
    (``planes`` for ResNet, ``2·planes`` for ResNeXt 32x4d). The shortcut is a strided 1×1 conv +
    BN (``downsample_0``/``downsample_1``) when ``downsample`` is set, else the identity.
    """

    width: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    planes: int | None = None  # None: ``width`` (ResNet)
    groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = conv_without_bias(self.dtype, self.param_dtype)
        norm = batch_norm(train, self.dtype, self.param_dtype)
        out = 4 * (self.planes or self.width)
        y = nn.relu(norm(name="bn1")(conv(self.width, (1, 1), name="conv1")(x)))
        y = _dilated_conv(conv, self.width, self.stride, self.dilation, "conv2", self.groups)(y)
        y = nn.relu(norm(name="bn2")(y))
        y = norm(name="bn3")(conv(out, (1, 1), name="conv3")(y))
        if self.downsample:
            s = self.stride
            x = norm(name="downsample_1")(conv(out, (1, 1), strides=(s, s), name="downsample_0")(x))
        return nn.relu(y + x)


def _bottleneck_width(spec: ResNetSpec, planes: int) -> tuple[int, int]:
    # (3×3 conv width, its groups): torchvision's int(planes · width_per_group / 64) · groups.
    width = max(1, planes * spec.width_per_group * spec.groups // 64)
    return width, math.gcd(spec.groups, width)


class ResNet(nn.Module):
    """Dilated ResNet/ResNeXt feature extractor (see the module docstring).

    ``depth``, ``groups`` and ``width_per_group`` name an entry of ``RESNETS`` (ResNeXt-50
    32x4d: 50, 32, 4). Input [B, H, W, 3] (normalised RGB). Output ``{2: stem, 4: layer1,
    8: layer2, 16: layer3, 32: layer4}`` keyed by NOMINAL stride (a dilated stage keeps the
    previous resolution), with ``resnet_channels(depth, base_width, ...)`` channels.
    Spatial sizes follow PyTorch: every stride-2 step maps n to floor((n − 1) / 2) + 1.
    """

    depth: int = 101
    output_stride: int = 32
    multi_grid: tuple[int, ...] | None = None
    deep_stem: bool = False
    base_width: int = 64
    groups: int = 1
    width_per_group: int = 64
    dilation_style: str = "torchvision"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        resnet_spec(self.depth, self.groups, self.width_per_group)
        stage_plan(self.depth, self.output_stride, self.multi_grid, self.dilation_style)
        check_at_least("base_width", self.base_width)
        super().__post_init__()

    @property
    def spec(self) -> ResNetSpec:
        return resnet_spec(self.depth, self.groups, self.width_per_group)

    @property
    def out_channels(self) -> dict[int, int]:
        return resnet_channels(self.depth, self.base_width, self.groups, self.width_per_group)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[int, jax.Array]:
        conv = conv_without_bias(self.dtype, self.param_dtype)
        norm = batch_norm(train, self.dtype, self.param_dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        spec = self.spec
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
        features = {2: x}
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        plan = stage_plan(self.depth, self.output_stride, self.multi_grid, self.dilation_style)
        block = rematerialised(BasicBlock if spec.block == "basic" else Bottleneck, self.remat)
        for index, (stride, rates) in enumerate(plan):
            planes = self.base_width * 2**index
            for unit, rate in enumerate(rates):
                common = dict(
                    stride=stride if unit == 0 else 1,
                    dilation=rate,
                    downsample=_has_downsample(spec, index, unit),
                    name=f"layer{index + 1}_{unit}",
                    **kw,
                )
                if spec.block == "basic":
                    x = block(planes, **common)(x, train)
                else:
                    width, groups = _bottleneck_width(spec, planes)
                    x = block(width, planes=planes, groups=groups, **common)(x, train)
            features[4 * 2**index] = x
        return features


def _has_downsample(spec: ResNetSpec, stage: int, unit: int) -> bool:
    # torchvision: the first unit of a stage that strides or changes the channel count; only
    # ResNet-18/34's layer1 (base_width in, base_width out, stride 1) has none.
    return unit == 0 and (stage > 0 or spec.expansion != 1)


def torchvision_resnet_key_map(
    depth: int = 101, deep_stem: bool = False, groups: int = 1, width_per_group: int = 64
) -> KeyMap:
    """Map flax variable paths of ``ResNet`` to torchvision ``resnet<depth>()`` (or
    ``resnext50_32x4d()``) state-dict keys, which timm's ResNets share.

    Paths start with the collection (``('params', 'layer1_0', 'conv1', 'kernel') ->
    'layer1.0.conv1.weight'``): every flax name is the torch name with '.' for '_'. The
    classifier (``fc.*``) has no counterpart. With ``deep_stem`` the stem keys are
    MMSegmentation ResNetV1c's (``stem.0.weight``, ``stem.1.running_mean``, ...).
    """
    spec = resnet_spec(depth, groups, width_per_group)
    pairs = (
        [(f"stem_{i}", f"stem_{i + 1}") for i, _, _ in _DEEP_STEM]
        if deep_stem
        else [("conv1", "bn1")]
    )
    convs_per_unit = 2 if spec.block == "basic" else 3
    for stage, size in enumerate(spec.stage_sizes):
        for unit in range(size):
            convs = [(f"conv{i}", f"bn{i}") for i in range(1, convs_per_unit + 1)]
            if _has_downsample(spec, stage, unit):
                convs.append(("downsample_0", "downsample_1"))
            pairs += [
                (f"layer{stage + 1}_{unit}/{conv}", f"layer{stage + 1}_{unit}/{bn}")
                for conv, bn in convs
            ]
    key_map = {}
    for conv, bn in pairs:
        key_map.update(conv_key_map(conv.split("/"), conv.replace("/", ".").replace("_", ".")))
        key_map.update(batchnorm_key_map(bn.split("/"), bn.replace("/", ".").replace("_", ".")))
    return key_map


# ----------------------------------------------------------------------------- registry entries


def fingerprint(name: str, state_dict: Mapping[str, Any]) -> str | None:
    """``name`` (``name + '_v1c'`` with MMSegmentation's deep stem) when ``state_dict`` holds the
    ResNet ``name`` in torchvision's (= timm's) keys: its block type, layer3 depth and
    cardinality; else None."""
    keys = set(state_dict)
    if "layer1.0.conv1.weight" not in keys:
        return None
    units = len({k.split(".")[1] for k in keys if k.startswith("layer3.")})
    # Basic units (ResNet-18/34) have no conv3; ResNeXt's grouped 3×3 conv reads
    # width / groups input channels.
    block = "bottleneck" if "layer1.0.conv3.weight" in keys else "basic"
    conv2 = tuple(getattr(state_dict.get("layer1.0.conv2.weight"), "shape", ()))
    groups = conv2[0] // conv2[1] if block == "bottleneck" and len(conv2) == 4 else 1
    spec = RESNETS[name]
    if (spec.block, spec.stage_sizes[2], spec.groups) != (block, units, groups):
        return None
    return name + ("_v1c" if "stem.0.weight" in keys else "")


def _build(spec: ResNetSpec, *, multi_grid=None, **kwargs) -> ResNet:
    return ResNet(
        depth=spec.depth,
        groups=spec.groups,
        width_per_group=spec.width_per_group,
        multi_grid=None if multi_grid is None else tuple(multi_grid),
        **kwargs,
    )


def _channels(spec: ResNetSpec, base_width: int) -> dict[int, int]:
    return resnet_channels(spec.depth, base_width, spec.groups, spec.width_per_group)


def _key_map(spec: ResNetSpec, deep_stem: bool = False, **_) -> KeyMap:
    return torchvision_resnet_key_map(spec.depth, deep_stem, spec.groups, spec.width_per_group)


def _encoder(name: str, spec: ResNetSpec, sources: tuple[str, ...]) -> Encoder:
    units = spec.stage_sizes[-1]
    key_map = functools.partial(_key_map, spec)
    return Encoder(
        name=name,
        build=functools.partial(_build, spec),
        channels=functools.partial(_channels, spec),
        dilation_styles=DILATION_STYLES,
        # DeepLab v3's multi-grid (1, 2, 4) where layer4 has three units; none on ResNet-18.
        multi_grid=(1, 2, 4) if units == 3 else (1,) * units,
        deep_stem=True,
        key_maps={source: key_map for source in sources},
        fingerprint=functools.partial(fingerprint, name),
        stem_key_prefixes=STEM_KEY_PREFIXES,
    )


# torchvision's keys are timm's (the ResNets convert_timm takes) and smp's encoders'; with
# ``deep_stem`` the torchvision map reads MMSegmentation's v1c stem.
_TIMM = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")
ENCODERS = {
    name: _encoder(name, spec, ("torchvision", *(("timm",) if name in _TIMM else ()), "smp"))
    for name, spec in RESNETS.items()
}
