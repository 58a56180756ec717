"""The dilated backbones DeepLab-style models choose from by name.

``make_dilated_backbone('resnet101', output_stride=16)`` returns a module mapping [B, H, W, 3]
to ``{4, 8, 16, 32}`` feature maps (nominal strides) and ``dilated_backbone_channels`` gives
their channel counts. Every entry accepts ``output_stride`` 8, 16 or 32 and ``multi_grid``.
"""

from typing import Any

import flax.linen as nn

from flaxseg.models.backbones.resnet import ResNet, resnet_channels
from flaxseg.models.backbones.xception import Xception65, xception65_channels
from flaxseg.models.layers import check_choice

RESNET_DEPTHS = {"resnet50": 50, "resnet101": 101, "resnet152": 152}
DILATED_BACKBONES = tuple(RESNET_DEPTHS) + ("xception65",)


def make_dilated_backbone(backbone: str, *, output_stride: int, multi_grid: tuple[int, ...],
                          base_width: int = 64, **kwargs: Any) -> nn.Module:
    """Build ``backbone`` (see ``DILATED_BACKBONES``); ``kwargs`` go to its constructor
    (``dtype``, ``param_dtype``, ``name``, ``deep_stem`` for ResNets, ``num_middle_units`` for
    Xception)."""
    check_choice(backbone, DILATED_BACKBONES, "backbone")
    if backbone == "xception65":
        return Xception65(output_stride=output_stride, multi_grid=tuple(multi_grid),
                          base_width=base_width, **kwargs)
    return ResNet(depth=RESNET_DEPTHS[backbone], output_stride=output_stride,
                  multi_grid=tuple(multi_grid), base_width=base_width, **kwargs)


def dilated_backbone_channels(backbone: str, base_width: int = 64) -> dict[int, int]:
    """Channels of ``make_dilated_backbone(backbone)``'s features, keyed by nominal stride."""
    check_choice(backbone, DILATED_BACKBONES, "backbone")
    if backbone == "xception65":
        return xception65_channels(base_width)
    return resnet_channels(RESNET_DEPTHS[backbone], base_width)


def default_multi_grid(backbone: str) -> tuple[int, int, int]:
    """DeepLab v3/v3+'s multi-grid: (1, 2, 4) on ResNets (v3 paper, Table 3's best); none on
    Xception (the v3+ reference configs set none)."""
    return (1, 1, 1) if backbone == "xception65" else (1, 2, 4)
