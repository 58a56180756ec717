"""Segmentation heads shared by several models.

``ASPP`` is DeepLab v3's Atrous Spatial Pyramid Pooling (Chen et al. 2017, Sec. 3.3); its module
names follow torchvision's ``ASPP`` (``convs_0`` ... ``convs_4``, ``project``) so torchvision's
segmentation checkpoints map onto it directly. ``FCNHead`` (3×3 conv + BN + ReLU, dropout,
classifier) is torchvision's ``FCNHead`` and PSPNet's final and auxiliary heads.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.layers import (
    ConvBNAct,
    Dtype,
    KeyMap,
    SeparableConv,
    conv_bn_key_map,
    conv_key_map,
)


def default_multi_grid(backbone: str) -> tuple[int, int, int]:
    """DeepLab v3/v3+'s multi-grid: (1, 2, 4) on ResNets (v3 paper, Table 3's best); none on
    Xception (the v3+ reference configs set none)."""
    return (1, 1, 1) if backbone == "xception65" else (1, 2, 4)


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
        batch_statistics_defined = x.shape[0] > 1
        y = ConvBNAct(
            self.features, 1, dtype=self.dtype, param_dtype=self.param_dtype, name="pool"
        )(pooled, train=train and batch_statistics_defined)
        return jnp.broadcast_to(y, x.shape[:3] + (self.features,))


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling of DeepLab v3 (Sec. 3.3) and v3+ (Sec. 3.2).

    Branches: 1×1 conv; one 3×3 conv per ``atrous_rates`` entry (depthwise-separable with
    ``separable``, as DeepLab v3+ uses on Xception); image pooling — each ``features`` channels
    with BN + ReLU. They are concatenated and projected by a 1×1 conv + BN + ReLU, then dropout.

    [B, H, W, C] -> [B, H, W, features]. ``train=True`` needs ``rngs={'dropout': key}`` when
    ``dropout_rate > 0``. Flax names: ``convs_0`` (1×1), ``convs_1..n`` (atrous),
    ``convs_{n+1}`` (pooling, its conv+BN at ``convs_{n+1}/pool``), ``project``.
    """

    features: int = 256
    atrous_rates: Sequence[int] = (6, 12, 18)
    separable: bool = False
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        branches = [ConvBNAct(self.features, 1, name="convs_0", **kw)(x, train)]
        for i, rate in enumerate(self.atrous_rates, start=1):
            if self.separable:
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
