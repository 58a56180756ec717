"""Backbones by name: ``create``, ``channels`` and ``key_map`` are the one place that turns a
backbone name into a module, its channel counts and its PyTorch state-dict key map.

Every backbone maps [B, H, W, 3] to ``{stride: feature map}`` keyed by nominal stride, mirrors
its PyTorch twin's module layout (torchvision ResNet/VGG/AlexNet, timm Xception-65) and owns
the key map onto that twin's state dict.

    backbone = backbones.create('resnet101', output_stride=16, multi_grid=(1, 2, 4),
                                name='backbone')
    backbones.channels('resnet101')      # {2: 64, 4: 256, 8: 512, 16: 1024, 32: 2048}
    backbones.create('resnet34', output_stride=8, dilation_style='smp')   # smp's dilation
"""

import functools
from typing import Any

import flax.linen as nn

from flaxseg.models.backbones import alexnet, efficientnet, vgg
from flaxseg.models.backbones.alexnet import AlexNet, alexnet_channels, torchvision_alexnet_key_map
from flaxseg.models.backbones.efficientnet import (
    EfficientNet,
    efficientnet_channels,
    efficientnet_key_map,
)
from flaxseg.models.backbones.mobilenetv2 import (
    MobileNetV2,
    mobilenet_v2_channels,
    mobilenet_v2_key_map,
)
from flaxseg.models.backbones.resnet import (
    DILATION_STYLES,
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
from flaxseg.models.layers import KeyMap, check_choice, check_one_of, conv_key_map

VGGS = ("vgg16", "vgg16_bn")
# Backbones whose strides can be traded for dilation at any output stride (DeepLab's).
DILATED = tuple(RESNETS) + ("xception65",)
# Light encoders (MobileNetV2, EfficientNet-B0…B7; output stride 8/16/32, no multi-grid): the
# name is the PyTorch twin's, which fixes padding, BN epsilon, feature taps and dilation rule
# (flaxseg/models/backbones/efficientnet.py): 'efficientnet_b0' timm, 'tf_efficientnet_b0' timm's
# TF port, 'timm-efficientnet-b0' and 'efficientnet-b0' smp's encoders.
EFFICIENTNETS = tuple(efficientnet.ARCHS)
LIGHT = ("mobilenet_v2",) + EFFICIENTNETS
NAMES = DILATED + VGGS + ("alexnet",) + LIGHT


def create(
    name: str,
    /,
    *,
    output_stride: int = 32,
    multi_grid: tuple[int, ...] | None = None,
    deep_stem: bool = False,
    base_width: int = 64,
    dilation_style: str = "torchvision",
    remat: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """The backbone module ``name`` (one of ``NAMES``).

    ``output_stride`` 8, 16 or 32 (AlexNet: 32 only); ``multi_grid`` the rates of the last
    stage's units (ResNet, Xception; None = no multi-grid); ``deep_stem`` ResNet's three-conv
    stem; ``dilation_style`` how a ResNet trades strides for dilation: 'torchvision' (the first
    unit of a dilated stage keeps the previous rate) or 'smp' (every unit gets the stage's rate,
    as segmentation_models_pytorch's ``make_dilated``); ``remat`` rematerialises the repeated
    units (ResNet blocks, Xception units, MobileNetV2/EfficientNet blocks; VGG and AlexNet have
    none and ignore it) in the backward pass, with the same variables (``layers.rematerialised``);
    ``kwargs`` go to the module (``dtype``,
    ``param_dtype``, ``name``; VGG's ``pooling`` and ``first_conv_padding``, AlexNet's,
    Xception's ``num_middle_units``).
    """
    check_choice(name, NAMES, "backbone")
    if deep_stem and name not in RESNETS:
        raise ValueError(f"deep_stem is a ResNet option; backbone {name!r} has no such stem.")
    if multi_grid is not None and name not in DILATED:
        raise ValueError(f"multi_grid needs a ResNet or Xception backbone, got {name!r}.")
    check_one_of("dilation_style", dilation_style, DILATION_STYLES)
    if dilation_style != "torchvision" and name not in RESNETS:
        raise ValueError(f"dilation_style is a ResNet option; backbone {name!r} has none.")
    if name in RESNETS:
        spec = RESNETS[name]
        return ResNet(
            depth=spec.depth,
            groups=spec.groups,
            width_per_group=spec.width_per_group,
            output_stride=output_stride,
            multi_grid=None if multi_grid is None else tuple(multi_grid),
            deep_stem=deep_stem,
            base_width=base_width,
            dilation_style=dilation_style,
            remat=remat,
            **kwargs,
        )
    if name in LIGHT:
        # base_width 64 is the full network: widths scale by base_width / 64.
        cls = MobileNetV2 if name == "mobilenet_v2" else functools.partial(EfficientNet, name)
        return cls(
            output_stride=output_stride, width_multiplier=base_width / 64, remat=remat, **kwargs
        )
    multi_grid = tuple(multi_grid or (1, 1, 1))
    if name == "xception65":
        return Xception65(
            output_stride=output_stride,
            multi_grid=multi_grid,
            base_width=base_width,
            remat=remat,
            **kwargs,
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
        spec = RESNETS[name]
        return resnet_channels(spec.depth, base_width, spec.groups, spec.width_per_group)
    if name == "xception65":
        return xception65_channels(base_width)
    if name == "mobilenet_v2":
        return mobilenet_v2_channels(base_width / 64)
    if name in EFFICIENTNETS:
        return efficientnet_channels(name, base_width / 64)
    return vgg16_channels(base_width) if name in VGGS else alexnet_channels(base_width)


def key_map(name: str, *, deep_stem: bool = False, num_middle_units: int = 16) -> KeyMap:
    """{flax variable path: key} of backbone ``name`` onto its PyTorch twin's state dict:
    torchvision/timm ``resnet*`` and ``resnext50_32x4d`` (MMSegmentation ``resnet*_v1c`` with
    ``deep_stem``), ``vgg16[_bn]``,
    ``alexnet`` (their ``features``), timm ``xception65``, torchvision (= smp) ``mobilenet_v2``,
    timm ``[tf_]efficientnet_b*`` and smp ``timm-efficientnet-b*`` (timm keys), smp
    ``efficientnet-b*`` (lukemelas keys, without smp's ``encoder.`` prefix). smp's EfficientNet
    encoders keep their classifier head's conv and BN, which no feature uses: their keys start
    with ``efficientnet.head_key_prefixes(name)``."""
    check_choice(name, NAMES, "backbone")
    if name in RESNETS:
        spec = RESNETS[name]
        return torchvision_resnet_key_map(spec.depth, deep_stem, spec.groups, spec.width_per_group)
    if name == "xception65":
        return timm_xception65_key_map(num_middle_units)
    if name in VGGS:
        return torchvision_vgg16_key_map(name == "vgg16_bn")
    if name == "mobilenet_v2":
        return mobilenet_v2_key_map()
    if name in EFFICIENTNETS:
        return efficientnet_key_map(name)
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


__all__ = [
    "DILATED",
    "EFFICIENTNETS",
    "LIGHT",
    "NAMES",
    "RESNETS",
    "VGGS",
    "channels",
    "create",
    "fc_key_map",
    "key_map",
]
