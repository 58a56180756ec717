"""Backbones by name: ``create``, ``channels`` and ``key_map`` are the one place that turns a
backbone name into a module, its channel counts and its PyTorch state-dict key map.

Every backbone maps [B, H, W, 3] to ``{stride: feature map}`` keyed by nominal stride, mirrors
its PyTorch twin's module layout (torchvision ResNet/VGG/AlexNet, timm Xception-65) and owns
the key map onto that twin's state dict.

    backbone = backbones.create('resnet101', output_stride=16, multi_grid=(1, 2, 4),
                                name='backbone')
    backbones.channels('resnet101')      # {4: 256, 8: 512, 16: 1024, 32: 2048}
"""

from typing import Any

import flax.linen as nn

from flaxseg.models.backbones import alexnet, vgg
from flaxseg.models.backbones.alexnet import AlexNet, alexnet_channels, torchvision_alexnet_key_map
from flaxseg.models.backbones.resnet import (
    RESNETS,
    ResNet,
    resnet_channels,
    torchvision_resnet_key_map,
)
from flaxseg.models.backbones.vgg import VGG16, torchvision_vgg16_key_map, vgg16_channels
from flaxseg.models.backbones.xception import (
    Xception65,
    timm_xception65_key_map,
    xception65_channels,
)
from flaxseg.models.layers import KeyMap, check_choice, conv_key_map

VGGS = ("vgg16", "vgg16_bn")
# Backbones whose strides can be traded for dilation at any output stride (DeepLab's).
DILATED = tuple(RESNETS) + ("xception65",)
NAMES = DILATED + VGGS + ("alexnet",)


def create(
    name: str,
    /,
    *,
    output_stride: int = 32,
    multi_grid: tuple[int, ...] | None = None,
    deep_stem: bool = False,
    base_width: int = 64,
    **kwargs: Any,
) -> nn.Module:
    """The backbone module ``name`` (one of ``NAMES``).

    ``output_stride`` 8, 16 or 32 (AlexNet: 32 only); ``multi_grid`` the rates of the last
    stage's units (ResNet, Xception; None = no multi-grid); ``deep_stem`` ResNet's three-conv
    stem; ``kwargs`` go to the module (``dtype``, ``param_dtype``, ``name``; VGG's ``pooling``
    and ``first_conv_padding``, AlexNet's, Xception's ``num_middle_units``).
    """
    check_choice(name, NAMES, "backbone")
    if deep_stem and name not in RESNETS:
        raise ValueError(f"deep_stem is a ResNet option; backbone {name!r} has no such stem.")
    if multi_grid is not None and name not in DILATED:
        raise ValueError(f"multi_grid needs a ResNet or Xception backbone, got {name!r}.")
    multi_grid = tuple(multi_grid or (1, 1, 1))
    if name in RESNETS:
        return ResNet(
            depth=RESNETS[name],
            output_stride=output_stride,
            multi_grid=multi_grid,
            deep_stem=deep_stem,
            base_width=base_width,
            **kwargs,
        )
    if name == "xception65":
        return Xception65(
            output_stride=output_stride, multi_grid=multi_grid, base_width=base_width, **kwargs
        )
    if name in VGGS:
        return VGG16(
            base_width=base_width,
            batchnorm=name == "vgg16_bn",
            output_stride=output_stride,
            **kwargs,
        )
    if output_stride != 32:
        raise ValueError(
            f"AlexNet has no dilated form: output_stride must be 32, got {output_stride!r}."
        )
    return AlexNet(base_width=base_width, **kwargs)


def channels(name: str, base_width: int = 64) -> dict[int, int]:
    """Channels of ``create(name, base_width=base_width)``'s feature maps, keyed by stride."""
    check_choice(name, NAMES, "backbone")
    if name in RESNETS:
        return resnet_channels(RESNETS[name], base_width)
    if name == "xception65":
        return xception65_channels(base_width)
    return vgg16_channels(base_width) if name in VGGS else alexnet_channels(base_width)


def key_map(name: str, *, deep_stem: bool = False, num_middle_units: int = 16) -> KeyMap:
    """{flax variable path: key} of backbone ``name`` onto its PyTorch twin's state dict:
    torchvision ``resnet*`` (MMSegmentation ``resnet*_v1c`` with ``deep_stem``), ``vgg16[_bn]``,
    ``alexnet`` (their ``features``), timm ``xception65``."""
    check_choice(name, NAMES, "backbone")
    if name in RESNETS:
        return torchvision_resnet_key_map(RESNETS[name], deep_stem)
    if name == "xception65":
        return timm_xception65_key_map(num_middle_units)
    if name in VGGS:
        return torchvision_vgg16_key_map(name == "vgg16_bn")
    return torchvision_alexnet_key_map()


def fc_key_map(name: str, fc_layers: tuple[str, str]) -> KeyMap:
    """{flax variable path: key} that puts the ImageNet classifier's fc6 and fc7 Linear layers of
    torchvision's ``vgg16[_bn]``/``alexnet`` into the model's convs ``fc_layers`` (FCN's and
    DeepLab v1's fc6/fc7; the layout change is ``flaxseg.weights``' job)."""
    check_choice(name, VGGS + ("alexnet",), "backbone with fc layers")
    torch_fc = vgg.TORCHVISION_FC_LAYERS if name in VGGS else alexnet.TORCHVISION_FC_LAYERS
    return {
        path: key
        for flax_name, torch_name in zip(fc_layers, torch_fc, strict=True)
        for path, key in conv_key_map((flax_name,), torch_name, bias=True).items()
    }


__all__ = ["DILATED", "NAMES", "RESNETS", "VGGS", "channels", "create", "fc_key_map", "key_map"]
