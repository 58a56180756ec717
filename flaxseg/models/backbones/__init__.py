"""Encoders by name: one registry that every backbone module fills with its own table.

Each backbone module (``resnet.py``, ``xception.py``, ``vgg.py``, ``alexnet.py``,
``mobilenetv2.py``, ``efficientnet.py``) exports ``ENCODERS = {name: Encoder(...)}``: what the
encoder offers — its constructor, feature channels per stride, the output strides it can give,
how it dilates, its key maps per weight source and how to recognise its state dict (see
``encoder.Encoder``). This module registers them (smp's ``encoders.update(resnet_encoders)``),
and ``create``, ``channels``, ``key_map`` read the entries. Models state what they need
(``Needs``: the strides they read, the output strides they dilate to, ...) and accept any
encoder that gives it; ``flaxseg.weights`` takes its architecture tables and fingerprints from
the same entries.

Every backbone maps [B, H, W, 3] to ``{stride: feature map}`` keyed by nominal stride, mirrors
its PyTorch twin's module layout (torchvision ResNet/VGG/AlexNet/MobileNetV2, timm Xception-65
and EfficientNet, smp's encoders) and owns the key map onto that twin's state dict.

    backbone = backbones.create('resnet101', output_stride=16, multi_grid=(1, 2, 4),
                                name='backbone')
    backbones.channels('resnet101')      # {2: 64, 4: 256, 8: 512, 16: 1024, 32: 2048}
    backbones.create('resnet34', output_stride=8, dilation_style='smp')   # smp's dilation

Adding an encoder is one module that defines the flax network and its ``Encoder`` entry, and
one registration (``register(Encoder(name='my_net', build=MyNet, channels=..., ...))``, or an
``ENCODERS`` table added to the loop below).
"""

from typing import Any

import flax.linen as nn

from flaxseg.models.backbones import alexnet, efficientnet, mobilenetv2, resnet, vgg, xception
from flaxseg.models.backbones.encoder import Encoder, Needs
from flaxseg.models.backbones.resnet import RESNETS
from flaxseg.models.layers import KeyMap, check_choice, check_one_of, conv_key_map

_REGISTRY: dict[str, Encoder] = {}


def register(encoder: Encoder) -> Encoder:
    """Make ``encoder`` a backbone that ``create`` builds and models and ``flaxseg.weights``
    accept by its name; a name registered twice is refused."""
    if encoder.name in _REGISTRY:
        raise ValueError(
            f"Encoder {encoder.name!r} is already registered; choose another name or "
            f"unregister({encoder.name!r}) first."
        )
    _REGISTRY[encoder.name] = encoder
    return encoder


def unregister(name: str) -> Encoder:
    """Remove the encoder ``name`` from the registry (and return its entry)."""
    check_choice(name, names(), "backbone")
    return _REGISTRY.pop(name)


def names(source: str | None = None) -> tuple[str, ...]:
    """Registered encoder names in registration order; with ``source``, those with a key map
    onto that weight source ('torchvision', 'timm', 'smp', ...)."""
    return tuple(
        name for name, encoder in _REGISTRY.items() if source is None or source in encoder.key_maps
    )


def get(name: str, owner: str | None = None) -> Encoder:
    """The registered ``Encoder`` called ``name`` (one sentence listing the names if none)."""
    check_choice(name, names(), "backbone", owner)
    return _REGISTRY[name]


def encoders() -> tuple[Encoder, ...]:
    """Every registered encoder, in registration order."""
    return tuple(_REGISTRY.values())


def able(needs: Needs) -> tuple[str, ...]:
    """Names of the registered encoders that meet ``needs``."""
    return tuple(name for name, encoder in _REGISTRY.items() if needs.unmet(encoder) is None)


def check_needs(name: str, needs: Needs, owner: str) -> None:
    """One sentence when encoder ``name`` cannot give what model ``owner`` needs, e.g.
    ``Encoder 'alexnet' cannot give stride 2, which U-Net needs; encoders that can: ...``."""
    unmet = needs.unmet(get(name, owner))
    if unmet is not None:
        raise ValueError(
            f"Encoder {name!r} {unmet}, which {owner} needs; encoders that can: "
            f"{', '.join(map(repr, able(needs)))}."
        )


def create(
    name: str,
    /,
    *,
    output_stride: int = 32,
    multi_grid: tuple[int, ...] | None = None,
    deep_stem: bool = False,
    base_width: int = 64,
    dilation_style: str | None = None,
    remat: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """The backbone module of the registered encoder ``name``.

    ``output_stride`` one of the encoder's ``output_strides`` (8, 16 or 32; AlexNet: 32 only);
    ``multi_grid`` the rates of the last stage's units (encoders that take one: ResNet,
    Xception; None = no multi-grid); ``deep_stem`` ResNet's three-conv stem; ``dilation_style``
    how strides are traded for dilation, one of the encoder's ``dilation_styles`` (None: its
    default): a ResNet's 'torchvision' (the first unit of a dilated stage keeps the previous
    rate) or 'smp' (every unit gets the stage's rate, as segmentation_models_pytorch's
    ``make_dilated``); ``remat`` rematerialises the repeated units (ResNet blocks, Xception
    units, MobileNetV2/EfficientNet blocks; VGG and AlexNet have none and ignore it) in the
    backward pass, with the same variables (``layers.rematerialised``); ``kwargs`` go to the
    module (``dtype``, ``param_dtype``, ``name``; VGG's ``pooling`` and
    ``first_conv_padding``, AlexNet's, Xception's ``num_middle_units``, EfficientNet's
    ``drop_path_rate``).
    """
    encoder = get(name)
    if output_stride not in encoder.output_strides:
        if output_stride not in (8, 16, 32):
            check_one_of("output_stride", output_stride, encoder.output_strides)
        raise ValueError(
            f"Encoder {name!r} cannot give output stride {output_stride}; its output strides: "
            f"{', '.join(map(str, encoder.output_strides))}."
        )
    options: dict[str, Any] = {}
    if encoder.multi_grid is not None:
        options["multi_grid"] = multi_grid
    elif multi_grid is not None:
        raise ValueError(_no_option("multi_grid", name))
    if encoder.deep_stem:
        options["deep_stem"] = deep_stem
    elif deep_stem:
        raise ValueError(_no_option("deep_stem", name))
    if dilation_style is not None and dilation_style not in encoder.dilation_styles:
        raise ValueError(
            f"dilation_style must be one of {', '.join(map(repr, encoder.dilation_styles))}, "
            f"got {dilation_style!r} (encoder {name!r} dilates no other way)."
        )
    if len(encoder.dilation_styles) > 1:
        options["dilation_style"] = dilation_style or encoder.dilation_styles[0]
    return encoder.build(
        output_stride=output_stride, base_width=base_width, remat=remat, **options, **kwargs
    )


def _no_option(option: str, name: str) -> str:
    takers = [n for n, e in _REGISTRY.items() if getattr(e, option) not in (None, False)]
    return (
        f"{option} needs an encoder that takes it ({', '.join(map(repr, takers))}), got {name!r}."
    )


def channels(name: str, base_width: int = 64) -> dict[int, int]:
    """Channels of ``create(name, base_width=base_width)``'s feature maps, keyed by stride."""
    return get(name).channels(base_width)


def key_map(name: str, source: str | None = None, **options: Any) -> KeyMap:
    """{flax variable path: key} of encoder ``name`` onto the state dict of its twin from weight
    ``source`` (default: its first, the ImageNet network: torchvision/timm ``resnet*`` and
    ``resnext50_32x4d`` — MMSegmentation ``resnet*_v1c`` with ``deep_stem=True`` —,
    ``vgg16[_bn]``, ``alexnet`` (their ``features``), timm ``xception65``, torchvision (= smp)
    ``mobilenet_v2``, timm ``[tf_]efficientnet_b*`` and smp ``timm-efficientnet-b*`` (timm
    keys), smp ``efficientnet-b*`` (lukemelas keys), smp's without its ``encoder.`` prefix).
    ``options``: ``deep_stem``, ``num_middle_units`` (Xception's middle flow). smp's
    EfficientNet encoders keep their classifier head's conv and BN, which no feature uses: their
    keys start with the encoder's ``head_key_prefixes``."""
    encoder = get(name)
    source = source or next(iter(encoder.key_maps), None)
    check_choice(source, tuple(encoder.key_maps), f"weight source of encoder {name!r}")
    return encoder.key_maps[source](**options)


def fc_key_map(name: str, fc_layers: tuple[str, str]) -> KeyMap:
    """{flax variable path: key} that puts the ImageNet classifier's fc6 and fc7 Linear layers of
    torchvision's ``vgg16[_bn]``/``alexnet`` into the model's convs ``fc_layers`` (FCN's and
    DeepLab v1's fc6/fc7; the layout change is ``flaxseg.weights``' job)."""
    check_choice(
        name, tuple(n for n, e in _REGISTRY.items() if e.fc_layers), "backbone with fc layers"
    )
    return {
        path: key
        for flax_name, torch_name in zip(fc_layers, get(name).fc_layers, strict=True)
        for path, key in conv_key_map((flax_name,), torch_name, bias=True).items()
    }


for _module in (resnet, xception, vgg, alexnet, mobilenetv2, efficientnet):
    for _encoder in _module.ENCODERS.values():
        register(_encoder)

# The built-in families by name, for the models that are one family's network (FCN and
# DeepLab v1 on VGG, PSPNet/RefineNet/FCN-ResNet on ResNets, DeepLab v2 on the dilated ones).
VGGS = tuple(vgg.ENCODERS)
EFFICIENTNETS = tuple(efficientnet.ENCODERS)
LIGHT = tuple(mobilenetv2.ENCODERS) + EFFICIENTNETS
DILATED = tuple(name for name, encoder in _REGISTRY.items() if encoder.multi_grid is not None)
NAMES = names()

__all__ = [
    "DILATED",
    "EFFICIENTNETS",
    "LIGHT",
    "NAMES",
    "RESNETS",
    "VGGS",
    "Encoder",
    "Needs",
    "able",
    "channels",
    "check_needs",
    "create",
    "encoders",
    "fc_key_map",
    "get",
    "key_map",
    "names",
    "register",
    "unregister",
]
