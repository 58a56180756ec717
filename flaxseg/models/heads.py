"""Segmentation heads shared by several models.

``ASPP`` is DeepLab v3's Atrous Spatial Pyramid Pooling (Chen et al. 2017, Sec. 3.3); its module
names follow torchvision's ``ASPP`` (``convs_0`` ... ``convs_4``, ``project``) so torchvision's
segmentation checkpoints map onto it directly. ``FCNHead`` (3×3 conv + BN + ReLU, dropout,
classifier) is torchvision's ``FCNHead`` and PSPNet's final and auxiliary heads.

The segmentation_models_pytorch section below holds what the smp-compatible models share:
``SMPTwin`` (what makes a model an smp architecture's twin, which ``flaxseg.weights.convert_smp``
applies), PyTorch's 'nearest' and ``align_corners=True`` bilinear resizes (``resize_nearest``,
``resize_bilinear_aligned``), smp's separable conv (``SMPSeparableConvBNAct``) and the key maps
onto smp's ASPP. The smp-equal models take any encoder that dilates smp's way
(``backbones.Needs(dilation_style='smp')``: the ResNets, MobileNetV2 and smp's EfficientNets).
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxseg.models import backbones
from flaxseg.models.layers import (
    ConvBNAct,
    Dtype,
    KeyMap,
    SeparableConv,
    batch_norm,
    batchnorm_key_map,
    conv_bn_key_map,
    conv_key_map,
    conv_without_bias,
    he_normal_fan_out,
)


def default_multi_grid(backbone: str) -> tuple[int, ...]:
    """DeepLab v3/v3+'s multi-grid, as the encoder declares it (``Encoder.multi_grid``): (1, 2,
    4) on ResNets whose layer4 has three units (v3 paper, Table 3's best); none (all ones) on
    ResNet-18, whose layer4 has two, and on Xception (the v3+ reference configs set none)."""
    multi_grid = backbones.get(backbone).multi_grid
    assert multi_grid is not None, f"{backbone} takes no multi-grid"
    return multi_grid


def scale_atrous_rates(
    rates: Sequence[int], reference_stride: int, output_stride: int
) -> tuple[int, ...]:
    """Atrous rates at ``output_stride`` given the paper's at ``reference_stride``.

    A rate r at stride s spans r·s input pixels; keeping that field of view means doubling the
    rates when the stride halves (DeepLab v3: (6, 12, 18) at 16, (12, 24, 36) at 8).
    """
    return tuple(max(1, r * reference_stride // output_stride) for r in rates)


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool → 1×1 conv + BN + ReLU → broadcast.

    [B, H, W, C] -> [B, H, W, features]. (Bilinear upsampling of a 1×1 map, as in the paper, is
    a broadcast.)

    Batch size 1: the BN sees one value per channel, so its batch variance is 0. PyTorch raises
    ("Expected more than 1 value per channel when training"); silently using those statistics
    would zero the branch's output and gradients and drag the running variance towards 0, which
    then blows the branch up at evaluation. With a single image the branch therefore normalises
    with its running statistics (and leaves them untouched), exactly as at evaluation; the conv
    and BN scale/offset still train. With B ≥ 2 it uses batch statistics like any BN.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        batch_statistics_defined = train and x.shape[0] > 1
        y = ConvBNAct(
            self.features, 1, dtype=self.dtype, param_dtype=self.param_dtype, name="pool"
        )(pooled, train=batch_statistics_defined)
        return jnp.broadcast_to(y, x.shape[:3] + (self.features,))


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling of DeepLab v3 (Sec. 3.3) and v3+ (Sec. 3.2).

    Branches: 1×1 conv; one 3×3 conv per ``atrous_rates`` entry (depthwise-separable with
    ``separable``, as DeepLab v3+ uses on Xception: ``separable_style`` 'xception' is
    ``layers.SeparableConv`` with BN + ReLU after both convs, 'smp' is smp's
    ``SMPSeparableConvBNAct``); image pooling — each ``features`` channels with BN + ReLU.
    They are concatenated and projected by a 1×1 conv + BN + ReLU, then dropout.

    [B, H, W, C] -> [B, H, W, features]. ``train=True`` needs ``rngs={'dropout': key}`` when
    ``dropout_rate > 0``. Flax names: ``convs_0`` (1×1), ``convs_1..n`` (atrous),
    ``convs_{n+1}`` (pooling, its conv+BN at ``convs_{n+1}/pool``), ``project``.
    """

    features: int = 256
    atrous_rates: Sequence[int] = (6, 12, 18)
    separable: bool = False
    dropout_rate: float = 0.1
    separable_style: str = "xception"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        branches = [ConvBNAct(self.features, 1, name="convs_0", **kw)(x, train)]
        for i, rate in enumerate(self.atrous_rates, start=1):
            if self.separable and self.separable_style == "smp":
                branch = SMPSeparableConvBNAct(
                    self.features, dilation=rate, name=f"convs_{i}", **kw
                )
            elif self.separable:
                branch = SeparableConv(
                    self.features, dilation=rate, activation=nn.relu, name=f"convs_{i}", **kw
                )
            else:
                branch = ConvBNAct(self.features, 3, dilation=rate, name=f"convs_{i}", **kw)
            branches.append(branch(x, train))
        pooling_name = f"convs_{len(self.atrous_rates) + 1}"
        branches.append(ImagePooling(self.features, name=pooling_name, **kw)(x, train))
        y = ConvBNAct(self.features, 1, name="project", **kw)(jnp.concatenate(branches, -1), train)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class FCNHead(nn.Module):
    """3×3 conv + BN + ReLU, dropout, 1×1 classifier (with bias): torchvision's ``FCNHead``
    (``fcn_resnet*``'s head, the auxiliary head of its DeepLab v3) and PSPNet's heads.

    [B, H, W, C] -> [B, H, W, num_classes] (not resized). ``channels`` of the 3×3 conv default
    to C/4 (torchvision's). Children: the conv + BN ``conv_name`` (torchvision's key maps use
    'block', PSPNet's variables 'conv') and ``classifier``.
    """

    num_classes: int
    channels: int | None = None
    dropout_rate: float = 0.1
    conv_name: str = "block"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = self.channels or max(1, x.shape[-1] // 4)
        y = ConvBNAct(
            channels, 3, dtype=self.dtype, param_dtype=self.param_dtype, name=self.conv_name
        )(x, train)
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        return nn.Conv(
            self.num_classes,
            (1, 1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="classifier",
        )(y)


def torchvision_aspp_key_map(
    flax_prefix: tuple[str, ...], torch_prefix: str, num_rates: int = 3
) -> KeyMap:
    """Key map of a (non-separable) ``ASPP`` onto torchvision's ``ASPP`` at ``torch_prefix``."""
    key_map = {}
    for i in range(num_rates + 1):
        key_map.update(
            conv_bn_key_map(
                (*flax_prefix, f"convs_{i}"),
                f"{torch_prefix}.convs.{i}.0",
                f"{torch_prefix}.convs.{i}.1",
            )
        )
    pool = num_rates + 1
    key_map.update(
        conv_bn_key_map(
            (*flax_prefix, f"convs_{pool}", "pool"),
            f"{torch_prefix}.convs.{pool}.1",
            f"{torch_prefix}.convs.{pool}.2",
        )
    )
    key_map.update(
        conv_bn_key_map(
            (*flax_prefix, "project"), f"{torch_prefix}.project.0", f"{torch_prefix}.project.1"
        )
    )
    return key_map


def torchvision_fcn_head_key_map(flax_prefix: tuple[str, ...], torch_prefix: str) -> KeyMap:
    """Key map of ``FCNHead`` onto torchvision's ``FCNHead`` Sequential at ``torch_prefix``."""
    return {
        **conv_bn_key_map((*flax_prefix, "block"), f"{torch_prefix}.0", f"{torch_prefix}.1"),
        **conv_key_map((*flax_prefix, "classifier"), f"{torch_prefix}.4", bias=True),
    }


# ----------------------------------------------------------------------------- smp-compatible
# segmentation_models_pytorch 0.6.0's decoders (``head='smp'`` of DeepLab v3/v3+ and PSPNet,
# U-Net with an encoder backbone) resize with PyTorch's ``F.interpolate`` in two modes the
# paper-faithful models do not use; these are exact twins of them, so smp checkpoints give the
# same logits.

# smp's DeepLabV3/V3Plus ``decoder_atrous_rates`` default, used at any output stride.
SMP_ATROUS_RATES = (12, 24, 36)
# Arguments of every smp model that change nothing a twin builds when left at smp's default
# (None: the model returns logits, has no classification head); "any": ignored (the weights
# come from the state dict; the logits are always resized to the input, which is what smp's
# ``upsampling`` does at the sizes smp accepts).
SMP_NEUTRAL_KWARGS = {
    "encoder_weights": "any",
    "upsampling": "any",
    "activation": None,
    "aux_params": None,
}


@dataclasses.dataclass(frozen=True)
class SMPTwin:
    """What makes a model the twin of segmentation_models_pytorch's architecture ``name``
    (a model class's ``SMP_TWIN``; ``flaxseg.weights.convert_smp`` applies it).

    Attributes:
      name: smp's class name ('Unet', 'DeepLabV3Plus').
      decoder_prefix: a state-dict key prefix that only this architecture has.
      kwargs: the smp keyword arguments the twin understands, beyond ``classes``,
        ``in_channels`` and ``SMP_NEUTRAL_KWARGS``.
      model_kwargs: ``model_kwargs(smp_kwargs)`` -> the flaxseg constructor arguments of the
        twin (a ValueError in one sentence for a value it cannot build).
      key_map: ``key_map(model)`` -> the key map of the twin's decoder and head onto smp's state
        dict; the encoder's part (``encoder.*``) is the encoder's 'smp' key map.
    """

    name: str
    decoder_prefix: str
    kwargs: tuple[str, ...]
    model_kwargs: Callable[[dict[str, Any]], dict[str, Any]]
    key_map: Callable[[Any], KeyMap]


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    # PyTorch's 'nearest' (UpSample.h nearest_idx): copy at equal size, i >> 1 at twice the size,
    # else min(floor(i · (in / out)), in − 1) with the scale and the product in float32.
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Nearest-neighbour resize of [B, H, W, C] to ``size`` with PyTorch's
    ``F.interpolate(mode='nearest')`` indices (source row floor(i · H / H'), not the half-pixel
    'nearest-exact'), as smp's U-Net decoder upsamples."""
    rows = _nearest_indices(x.shape[1], int(size[0]))
    cols = _nearest_indices(x.shape[2], int(size[1]))
    return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


def _aligned_weights(in_size: int, out_size: int) -> np.ndarray:
    # [out, in] interpolation matrix of PyTorch's bilinear align_corners=True along one axis:
    # source position i · (in − 1) / (out − 1) in float32, its floor and the next row blended.
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    position = np.arange(out_size, dtype=np.float32) * scale
    low = np.minimum(np.floor(position).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = np.clip(position - low.astype(np.float32), 0.0, 1.0)
    weights = np.zeros((out_size, in_size), np.float32)
    np.add.at(weights, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), high), frac)
    return weights


def resize_bilinear_aligned(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize of [B, H, W, C] to ``size`` with ``align_corners=True`` (corner pixels
    map onto corner pixels), PyTorch's ``F.interpolate``/``nn.Upsample`` in that mode — smp's
    PSP pooling branches and its DeepLab/PSPNet upsamplings. (``layers.resize_bilinear`` is the
    half-pixel ``align_corners=False`` form.) The dtype is preserved."""
    h, w = int(size[0]), int(size[1])
    if x.shape[1:3] == (h, w):
        return x
    rows = jnp.asarray(_aligned_weights(x.shape[1], h), x.dtype)
    cols = jnp.asarray(_aligned_weights(x.shape[2], w), x.dtype)
    high = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,bhwc->bowc", rows, x, precision=high)
    return jnp.einsum("pw,bowc->bopc", cols, y, precision=high).astype(x.dtype)


class SMPSeparableConvBNAct(nn.Module):
    """smp's ``SeparableConv2d`` + BN + ReLU: depthwise k×k conv (dilation) → pointwise 1×1
    conv (neither with bias, no BatchNorm between them) → BN → ReLU; DeepLab v3+'s separable
    ASPP branches and decoder convs in smp. (``layers.SeparableConv``, the Xception unit, has
    a BN after the depthwise conv too.) Children ``conv_dw``, ``conv_pw``, ``bn``.

    [B, H, W, C] -> [B, H, W, features] (padding dilation·(k − 1) / 2).
    """

    features: int
    kernel_size: int = 3
    dilation: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = conv_without_bias(self.dtype, self.param_dtype)
        k, d = self.kernel_size, self.dilation
        pad = d * (k - 1) // 2
        x = conv(
            x.shape[-1],
            (k, k),
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=(d, d),
            feature_group_count=x.shape[-1],
            kernel_init=he_normal_fan_out(groups=x.shape[-1]),
            name="conv_dw",
        )(x)
        x = conv(self.features, (1, 1), name="conv_pw")(x)
        return nn.relu(batch_norm(train, self.dtype, self.param_dtype)(name="bn")(x))


def smp_separable_key_map(flax_prefix: tuple[str, ...], torch_conv: str, torch_bn: str) -> KeyMap:
    """Key map of ``SMPSeparableConvBNAct`` onto smp's ``SeparableConv2d`` Sequential at
    ``torch_conv`` (``.0`` depthwise, ``.1`` pointwise) and its BatchNorm at ``torch_bn``."""
    return {
        **conv_key_map((*flax_prefix, "conv_dw"), f"{torch_conv}.0"),
        **conv_key_map((*flax_prefix, "conv_pw"), f"{torch_conv}.1"),
        **batchnorm_key_map((*flax_prefix, "bn"), torch_bn),
    }


def smp_aspp_key_map(
    flax_prefix: tuple[str, ...], torch_prefix: str, separable: bool, num_rates: int = 3
) -> KeyMap:
    """Key map of an ``ASPP`` (``separable_style='smp'`` when ``separable``) onto smp's ``ASPP``
    at ``torch_prefix``; without separable convs its layout is torchvision's."""
    key_map = torchvision_aspp_key_map(flax_prefix, torch_prefix, num_rates)
    if separable:
        for i in range(1, num_rates + 1):
            for path in [p for p in key_map if p[len(flax_prefix) + 1] == f"convs_{i}"]:
                del key_map[path]
            key_map.update(
                smp_separable_key_map(
                    (*flax_prefix, f"convs_{i}"),
                    f"{torch_prefix}.convs.{i}.0",
                    f"{torch_prefix}.convs.{i}.1",
                )
            )
    return key_map
