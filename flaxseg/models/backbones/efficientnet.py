"""EfficientNet-B0…B7 (Tan & Le, ICML 2019) feature extractors, equal to their PyTorch twins.

One module builds every B0…B7 from the compound-scaling table (width, depth) and the B0 stage
table (MBConv blocks: expand 1×1 → depthwise k×k → squeeze-excitation → project 1×1, SiLU,
identity shortcut where shape allows). ``arch`` names the PyTorch twin, and the twin fixes
everything that differs between the implementations in use:

==========================  ==============================  ============  ======  ========
``arch``                    twin                            padding       BN eps  dilation
==========================  ==============================  ============  ======  ========
``efficientnet_b0``…b7      timm ``efficientnet_b*``        symmetric     1e-5    timm
``tf_efficientnet_b0``…b7   timm ``tf_efficientnet_b*``     TF 'SAME'     1e-3    timm
``timm-efficientnet-b0``…   smp ``timm-efficientnet-b*``    symmetric     1e-5    smp
``efficientnet-b0``…b7      smp ``efficientnet-b*``         static SAME   1e-3    smp
==========================  ==============================  ============  ======  ========

* Padding. 'symmetric' pads ``d·(k − 1) / 2`` on every side (PyTorch style). TF 'SAME' is
  dynamic: it pads ``max((⌈n/s⌉ − 1)·s + d·(k − 1) + 1 − n, 0)``, the smaller half first, for the
  actual size ``n`` of every input, so it is right for any size. smp's lukemelas EfficientNet
  (``Conv2dStaticSamePadding``) computes that padding once, for the model's native resolution
  (224, 240, 260, 300, 380, 456, 528, 600 for B0…B7, divided by the strides so far), and uses it
  at every input size; 'static SAME' reproduces exactly that, so ``efficientnet-b*`` equals smp's
  encoder at every input size (at sizes where every stride-2 layer sees the same parity as at
  the native size, static and dynamic SAME agree; for B1…B7 some layers see odd native sizes).
* Features, keyed by nominal stride: the timm names return timm's ``features_only=True`` maps
  (the outputs of blocks.0, 1, 2, 4, 6); the smp names return smp's encoder features (the stem's
  activated output at stride 2; for ``efficientnet-b*`` the outputs of smp's ``out_indexes``
  blocks, e.g. blocks 2, 4, 8, 15 of B0 — smp taps B0's stride 16 at block 8, the first block of
  the 112-channel stage, and so does this module).
* Output stride 8/16 by dilation. timm (``output_stride=``): the block whose stride is removed
  keeps the current rate, every later block gets it multiplied by the removed stride. smp
  (``make_dilated``): every conv of smp's "stride-16 stage" (and "stride-32 stage") gets stride 1,
  rate 16/OS (32/OS) and symmetric padding ``(k // 2)·rate``; the stages are smp's block ranges.
* Module names follow timm's keys (``blocks.2.1.conv_dw.weight`` is ``params/blocks_2_1/conv_dw/
  kernel``); ``efficientnet_key_map('efficientnet-b*')`` maps the same paths onto smp's
  lukemelas keys (``_blocks.N._depthwise_conv``). The classifier head (``conv_head``,
  ``bn2``/``_bn1``, ``classifier``/``_fc``) is not built: no twin's features use it.
* Initialisation from scratch is timm's (``_init_weight_goog``): convolutions He-normal over
  fan_out, depthwise ones over fan_out // groups (k·k); pretrained weights replace it.
* Drop path (stochastic depth; timm ``drop_path_rate``, lukemelas ``drop_connect_rate`` 0.2 in
  smp): off by default, a model option (``SegmentationModel.drop_path_rate``). With
  ``drop_path_rate > 0`` and ``train=True`` block i of N drops its residual branch with
  probability ``rate·i/N`` and the call needs ``rngs={'dropout': key}``.
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
    check_choice,
    check_output_stride,
    check_rate,
    conv_key_map,
    conv_without_bias,
    he_normal_fan_out,
    rematerialised,
)

VARIANTS = tuple(f"b{i}" for i in range(8))
# (width multiplier, depth multiplier, native resolution) of B0…B7 (Tan & Le, Table 1 scaling).
COMPOUND_SCALING = {
    "b0": (1.0, 1.0, 224),
    "b1": (1.0, 1.1, 240),
    "b2": (1.1, 1.2, 260),
    "b3": (1.2, 1.4, 300),
    "b4": (1.4, 1.8, 380),
    "b5": (1.6, 2.2, 456),
    "b6": (1.8, 2.6, 528),
    "b7": (2.0, 3.1, 600),
}
# B0's stages: (repeats, kernel, stride, expand ratio, output channels); SE ratio 0.25 of the
# block's input channels everywhere (int(0.25·C_in), lukemelas' rule; timm's round(0.25·C_in)
# is the same for every width these tables give); stem 3×3/2 with 32 channels.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
SE_RATIO = 0.25
# smp's ``efficientnet-b*`` ``out_indexes``: the blocks (global index) whose outputs are its
# stride 4, 8, 16, 32 features.
SMP_OUT_INDEXES = {
    "b0": (2, 4, 8, 15),
    "b1": (4, 7, 15, 22),
    "b2": (4, 7, 15, 22),
    "b3": (4, 7, 17, 25),
    "b4": (5, 9, 21, 31),
    "b5": (7, 12, 26, 38),
    "b6": (8, 14, 30, 44),
    "b7": (10, 17, 37, 54),
}
# smp's ``timm-efficientnet-b*`` dilated stages (``stage_idxs`` [2, 3, 5]): timm stages 3-4
# are its stride-16 stage, stages 5-6 its stride-32 stage.
_SMP_TIMM_STAGES = {16: (3, 4), 32: (5, 6)}
# timm's ``features_only`` taps: the outputs of these stages.
_TIMM_FEATURE_STAGES = {2: 0, 4: 1, 8: 2, 16: 4, 32: 6}


@dataclasses.dataclass(frozen=True)
class Flavor:
    """What an ``arch`` name fixes (see the module docstring)."""

    padding: str  # 'symmetric' | 'same' | 'static_same'
    bn_epsilon: float
    bn_momentum: float  # flax convention: weight of the old running value
    smp: bool  # smp's feature taps and dilation rule (else timm's)
    layout: str  # 'timm' | 'lukemelas': the twin's state-dict keys


FLAVORS = {
    "timm": Flavor("symmetric", 1e-5, 0.9, False, "timm"),
    "tf": Flavor("same", 1e-3, 0.9, False, "timm"),
    "smp_timm": Flavor("symmetric", 1e-5, 0.9, True, "timm"),
    "smp": Flavor("static_same", 1e-3, 0.99, True, "lukemelas"),
}
_PREFIXES = {
    "timm": "efficientnet_",
    "tf": "tf_efficientnet_",
    "smp_timm": "timm-efficientnet-",
    "smp": "efficientnet-",
}
# Every arch name -> (variant, flavor).
ARCHS = {
    _PREFIXES[flavor] + variant: (variant, flavor) for flavor in FLAVORS for variant in VARIANTS
}


def round_channels(channels: float, multiplier: float, divisor: int = 8) -> int:
    """timm's ``round_channels`` / lukemelas' ``round_filters``: ``channels·multiplier`` to the
    nearest multiple of ``divisor`` (at least ``divisor``), never more than 10% below."""
    value = channels * multiplier
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def round_repeats(repeats: int, multiplier: float) -> int:
    """Blocks of a stage after depth scaling: ⌈repeats·multiplier⌉."""
    return int(math.ceil(repeats * multiplier))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block as built (after scaling and output-stride surgery)."""

    stage: int
    unit: int
    index: int  # global block index (lukemelas' ``_blocks.N``)
    in_channels: int
    out_channels: int
    expand_ratio: int
    kernel_size: int
    stride: int
    dilation: int
    se_channels: int
    static_size: int | None  # native input size of the block (static SAME padding), else None


def _check_arch(arch: str) -> tuple[str, Flavor]:
    check_choice(arch, tuple(ARCHS), "EfficientNet arch")
    variant, flavor = ARCHS[arch]
    return variant, FLAVORS[flavor]


def _smp_stage_blocks(arch: str, depths: list[int]) -> dict[int, range]:
    """Global block indices of smp's stride-16 and stride-32 stages (``get_stages``)."""
    variant, flavor = ARCHS[arch]
    total = sum(depths)
    if flavor == "smp":
        out = SMP_OUT_INDEXES[variant]
        return {16: range(out[1] + 1, out[2] + 1), 32: range(out[2] + 1, total)}
    starts = [sum(depths[:i]) for i in range(len(depths) + 1)]
    return {
        stride: range(starts[stages[0]], starts[stages[-1] + 1])
        for stride, stages in _SMP_TIMM_STAGES.items()
    }


def block_plan(
    arch: str = "efficientnet_b0", output_stride: int = 32, width_multiplier: float = 1.0
) -> tuple[int, list[BlockSpec]]:
    """(stem channels, every block's ``BlockSpec``) of ``EfficientNet(arch, ...)``."""
    variant, flavor = _check_arch(arch)
    check_output_stride(output_stride)
    width, depth, native = COMPOUND_SCALING[variant]
    multiplier = width * width_multiplier
    stem = round_channels(STEM_CHANNELS, multiplier)
    depths = [round_repeats(stage[0], depth) for stage in STAGES]
    smp_stages = _smp_stage_blocks(arch, depths) if flavor.smp else {}
    smp_rate = {
        index: stride // output_stride
        for stride, blocks in smp_stages.items()
        if stride > output_stride
        for index in blocks
    }
    specs, in_channels, index = [], stem, 0
    current_stride, dilation = 2, 1
    size = -(-native // 2)  # native size after the stem
    for stage, (_, kernel, stage_stride, expand, out) in enumerate(STAGES):
        out_channels = round_channels(out, multiplier)
        for unit in range(depths[stage]):
            stride = stage_stride if unit == 0 else 1
            block_dilation = dilation
            if flavor.smp:
                block_dilation = smp_rate.get(index, 1)
                if block_dilation > 1:
                    stride = 1
            elif stride > 1 and current_stride * stride > output_stride:
                dilation, stride = dilation * stride, 1
            elif stride > 1:
                current_stride *= stride
            static = size if flavor.padding == "static_same" and block_dilation == 1 else None
            specs.append(
                BlockSpec(
                    stage=stage,
                    unit=unit,
                    index=index,
                    in_channels=in_channels,
                    out_channels=out_channels,
                    expand_ratio=expand,
                    kernel_size=kernel,
                    stride=stride,
                    dilation=block_dilation,
                    se_channels=max(1, int(in_channels * SE_RATIO)),
                    static_size=static,
                )
            )
            if unit == 0:
                size = -(-size // stage_stride)
            in_channels, index = out_channels, index + 1
    return stem, specs


def feature_taps(arch: str) -> dict[int, int]:
    """{nominal stride: global index of the block whose output is returned}; -1 is the stem."""
    _check_arch(arch)
    variant, flavor = ARCHS[arch]
    if flavor == "smp":
        return {2: -1, **dict(zip((4, 8, 16, 32), SMP_OUT_INDEXES[variant]))}
    depths = [round_repeats(stage[0], COMPOUND_SCALING[variant][1]) for stage in STAGES]
    ends = {stage: sum(depths[: stage + 1]) - 1 for stage in range(len(STAGES))}
    taps = {stride: ends[stage] for stride, stage in _TIMM_FEATURE_STAGES.items()}
    if flavor == "smp_timm":
        taps[2] = -1  # smp's stride-2 feature is the stem's output
    return taps


def efficientnet_channels(arch: str = "efficientnet_b0", width_multiplier: float = 1.0):
    """Channels of the feature maps ``EfficientNet(arch)`` returns, keyed by nominal stride."""
    stem, specs = block_plan(arch, 32, width_multiplier)
    return {
        stride: stem if index < 0 else specs[index].out_channels
        for stride, index in feature_taps(arch).items()
    }


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF 'SAME' padding of one axis of ``size`` pixels: (before, after), the smaller first."""
    total = max((-(-size // stride) - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def _padding(mode: str, size: int, static_size: int | None, k: int, s: int, d: int):
    if mode == "symmetric" or (mode == "static_same" and static_size is None):
        # PyTorch-style (smp's dilated convs: (k // 2)·d, the same for odd k)
        pad = ((s - 1) + d * (k - 1)) // 2
        return pad, pad
    return same_padding(static_size if mode == "static_same" else size, k, s, d)


class SqueezeExcite(nn.Module):
    """x · sigmoid(expand(SiLU(reduce(mean over H, W of x)))); 1×1 convs with bias."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = nn.Conv
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = conv(
            self.channels,
            (1, 1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv_reduce",
        )(s)
        s = conv(
            x.shape[-1], (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name="conv_expand"
        )(nn.silu(s))
        return x * nn.sigmoid(s)


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation (EfficientNet's block).

    Expand ratio 1 (timm's ``DepthwiseSeparableConv``): depthwise → BN → SiLU → SE → 1×1 → BN
    (``conv_dw bn1 se conv_pw bn2``). Else (timm's ``InvertedResidual``): 1×1 → BN → SiLU →
    depthwise → BN → SiLU → SE → 1×1 → BN (``conv_pw bn1 conv_dw bn2 se conv_pwl bn3``). The
    identity shortcut exists when stride is 1 and channels are kept.
    """

    spec: BlockSpec
    padding: str
    bn_epsilon: float
    bn_momentum: float
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        spec = self.spec
        conv = conv_without_bias(self.dtype, self.param_dtype)
        bn = batch_norm(train, self.dtype, self.param_dtype, self.bn_epsilon)

        def norm(name):
            return bn(momentum=self.bn_momentum, name=name)

        inputs, expanded = x, spec.in_channels * spec.expand_ratio
        names = ("conv_dw", "bn1", "conv_pw", "bn2")
        if spec.expand_ratio != 1:
            x = nn.silu(norm("bn1")(conv(expanded, (1, 1), name="conv_pw")(x)))
            names = ("conv_dw", "bn2", "conv_pwl", "bn3")
        k, s, d = spec.kernel_size, spec.stride, spec.dilation
        pads = [_padding(self.padding, n, spec.static_size, k, s, d) for n in x.shape[1:3]]
        x = conv(
            expanded,
            (k, k),
            strides=(s, s),
            padding=pads,
            kernel_dilation=(d, d),
            feature_group_count=expanded,
            kernel_init=he_normal_fan_out(groups=expanded),  # timm's fan_out // groups
            name=names[0],
        )(x)
        x = nn.silu(norm(names[1])(x))
        x = SqueezeExcite(spec.se_channels, self.dtype, self.param_dtype, name="se")(x)
        x = norm(names[3])(conv(spec.out_channels, (1, 1), name=names[2])(x))
        if spec.stride == 1 and spec.in_channels == spec.out_channels:
            if train and self.drop_path_rate > 0:
                keep = 1.0 - self.drop_path_rate
                mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
                x = jnp.where(mask, x / keep, 0).astype(x.dtype)
            x = x + inputs
        return x


class EfficientNet(nn.Module):
    """EfficientNet-B0…B7 feature extractor equal to the twin ``arch`` (module docstring).

    Input [B, H, W, 3] (normalised RGB), any H, W. Output ``{2, 4, 8, 16, 32}`` -> feature maps
    keyed by nominal stride with ``efficientnet_channels(arch, width_multiplier)`` channels
    (B0: timm names 16, 24, 40, 112, 320; smp names 32, 24, 40, 112, 320). ``width_multiplier``
    scales every width on top of the variant's (tiny test nets); ``drop_path_rate`` see the
    module docstring; ``remat`` rematerialises every block (``layers.rematerialised``), with
    the same variables. Changing ``output_stride`` never changes a parameter shape.
    """

    arch: str = "efficientnet_b0"
    output_stride: int = 32
    width_multiplier: float = 1.0
    drop_path_rate: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        block_plan(self.arch, self.output_stride, self.width_multiplier)  # validates both
        if not self.width_multiplier > 0:
            raise ValueError(f"width_multiplier must be positive, got {self.width_multiplier!r}.")
        check_rate("drop_path_rate", self.drop_path_rate)
        super().__post_init__()

    @property
    def out_channels(self) -> dict[int, int]:
        return efficientnet_channels(self.arch, self.width_multiplier)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[int, jax.Array]:
        _, flavor = _check_arch(self.arch)
        stem, specs = block_plan(self.arch, self.output_stride, self.width_multiplier)
        native = COMPOUND_SCALING[ARCHS[self.arch][0]][2]
        x = x.astype(self.dtype)
        pads = [_padding(flavor.padding, n, native, 3, 2, 1) for n in x.shape[1:3]]
        x = conv_without_bias(self.dtype, self.param_dtype)(
            stem, (3, 3), strides=(2, 2), padding=pads, name="conv_stem"
        )(x)
        x = batch_norm(train, self.dtype, self.param_dtype, flavor.bn_epsilon)(
            momentum=flavor.bn_momentum, name="bn1"
        )(x)
        x = nn.silu(x)
        taps = {index: stride for stride, index in feature_taps(self.arch).items()}
        features = {taps[-1]: x} if -1 in taps else {}
        block = rematerialised(MBConv, self.remat)
        for spec in specs:
            x = block(
                spec,
                flavor.padding,
                flavor.bn_epsilon,
                flavor.bn_momentum,
                drop_path_rate=self.drop_path_rate * spec.index / len(specs),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{spec.stage}_{spec.unit}",
            )(x, train)
            if spec.index in taps:
                features[taps[spec.index]] = x
        return dict(sorted(features.items()))


def _block_layers(spec: BlockSpec) -> tuple[tuple[str, str], ...]:
    """(flax and timm name, lukemelas name) of a block's convs and BNs."""
    if spec.expand_ratio == 1:
        return (
            ("conv_dw", "_depthwise_conv"),
            ("bn1", "_bn1"),
            ("conv_pw", "_project_conv"),
            ("bn2", "_bn2"),
        )
    return (
        ("conv_pw", "_expand_conv"),
        ("bn1", "_bn0"),
        ("conv_dw", "_depthwise_conv"),
        ("bn2", "_bn1"),
        ("conv_pwl", "_project_conv"),
        ("bn3", "_bn2"),
    )


def efficientnet_key_map(arch: str = "efficientnet_b0", width_multiplier: float = 1.0) -> KeyMap:
    """{flax variable path: key} of ``EfficientNet(arch)`` onto its twin's state dict.

    timm layout (``efficientnet_b*``, ``tf_efficientnet_b*``, ``timm-efficientnet-b*``):
    ``('params', 'blocks_1_0', 'conv_dw', 'kernel') -> 'blocks.1.0.conv_dw.weight'``. lukemelas
    layout (smp ``efficientnet-b*``, without smp's ``encoder.`` prefix): ``conv_stem``/``bn1`` ->
    ``_conv_stem``/``_bn0``, block (stage, unit) -> ``_blocks.<global index>`` with ``conv_pw``
    ``bn1`` ``conv_dw`` ``bn2`` ``se.conv_reduce`` ``se.conv_expand`` ``conv_pwl`` ``bn3`` ->
    ``_expand_conv`` ``_bn0`` ``_depthwise_conv`` ``_bn1`` ``_se_reduce`` ``_se_expand``
    ``_project_conv`` ``_bn2``. The twins' heads (``conv_head``, ``bn2``, ``classifier``;
    ``_conv_head``, ``_bn1``, ``_fc``) have no counterpart (see ``head_key_prefixes``).
    """
    _, flavor = _check_arch(arch)
    lukemelas = flavor.layout == "lukemelas"
    _, specs = block_plan(arch, 32, width_multiplier)
    key_map = {}
    key_map.update(conv_key_map(("conv_stem",), "_conv_stem" if lukemelas else "conv_stem"))
    key_map.update(batchnorm_key_map(("bn1",), "_bn0" if lukemelas else "bn1"))
    for spec in specs:
        block = f"blocks_{spec.stage}_{spec.unit}"
        torch_block = f"_blocks.{spec.index}" if lukemelas else f"blocks.{spec.stage}.{spec.unit}"
        for flax, luke in _block_layers(spec):
            torch_name = f"{torch_block}.{luke if lukemelas else flax}"
            if flax.startswith("conv"):
                key_map.update(conv_key_map((block, flax), torch_name))
            else:
                key_map.update(batchnorm_key_map((block, flax), torch_name))
        for flax, luke in (("conv_reduce", "_se_reduce"), ("conv_expand", "_se_expand")):
            torch_name = f"{torch_block}.{luke}" if lukemelas else f"{torch_block}.se.{flax}"
            key_map.update(conv_key_map((block, "se", flax), torch_name, bias=True))
    return key_map


def head_key_prefixes(arch: str) -> tuple[str, ...]:
    """Key prefixes of the twin's classifier head, which the features never use: timm's
    ``conv_head``/``bn2``/``classifier``; lukemelas' ``_conv_head``/``_bn1``/``_fc``. smp's
    encoders keep the head's conv and BN in their state dicts (``timm-efficientnet-b*``:
    ``conv_head``/``bn2``; ``efficientnet-b*``: ``_conv_head``/``_bn1``)."""
    _, flavor = _check_arch(arch)
    return HEAD_KEY_PREFIXES[flavor.layout]


HEAD_KEY_PREFIXES = {
    "timm": ("conv_head.", "bn2.", "classifier."),
    "lukemelas": ("_conv_head.", "_bn1.", "_fc."),
}


def variant_of(num_blocks: int, stem_channels: int) -> str | None:
    """The B0…B7 variant with ``num_blocks`` MBConv blocks and a ``stem_channels`` stem, or None
    (B0 and B1 share a stem; every variant has its own block count)."""
    for variant, (width, depth, _) in COMPOUND_SCALING.items():
        blocks = sum(round_repeats(stage[0], depth) for stage in STAGES)
        if (blocks, round_channels(STEM_CHANNELS, width)) == (num_blocks, stem_channels):
            return variant
    return None


def architecture_of(state_dict: Mapping[str, Any]) -> str | None:
    """EfficientNet-B0…B7 in timm's keys ('efficientnet_b*'; timm's tf_ ports and smp's
    'timm-efficientnet-b*' have the same keys and shapes) or lukemelas' keys as in smp's
    encoders ('efficientnet-b*'), from its block count and stem width; else None."""
    keys = state_dict
    if "blocks.0.0.conv_dw.weight" in keys and "conv_stem.weight" in keys:
        if "blocks.0.0.se.conv_reduce.weight" not in keys:
            return None  # timm's MobileNetV2
        blocks = {".".join(k.split(".")[:3]) for k in keys if k.startswith("blocks.")}
        prefix, stem = "efficientnet_", state_dict["conv_stem.weight"]
    elif "_blocks.0._depthwise_conv.weight" in keys and "_conv_stem.weight" in keys:
        blocks = {".".join(k.split(".")[:2]) for k in keys if k.startswith("_blocks.")}
        prefix, stem = "efficientnet-", state_dict["_conv_stem.weight"]
    else:
        return None
    variant = variant_of(len(blocks), int(stem.shape[0]))
    return prefix + variant if variant else None


def _fingerprint(arch: str, state_dict: Mapping[str, Any]) -> str | None:
    return arch if architecture_of(state_dict) == arch else None


def _build(arch: str, *, base_width: int = 64, **kwargs) -> EfficientNet:
    # base_width 64 is the full network: widths scale by base_width / 64.
    return EfficientNet(arch, width_multiplier=base_width / 64, **kwargs)


def _encoder(arch: str) -> Encoder:
    smp = FLAVORS[ARCHS[arch][1]].smp
    return Encoder(
        name=arch,
        build=functools.partial(_build, arch),
        channels=lambda base_width: efficientnet_channels(arch, base_width / 64),
        dilation_styles=("smp",) if smp else ("timm",),
        drop_path=True,
        key_maps={"smp" if smp else "timm": lambda **_: efficientnet_key_map(arch)},
        fingerprint=functools.partial(_fingerprint, arch),
        head_key_prefixes=head_key_prefixes(arch),
    )


ENCODERS = {arch: _encoder(arch) for arch in ARCHS}
