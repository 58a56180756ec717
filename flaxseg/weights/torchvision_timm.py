"""torchvision and timm models: their encoders (the registered encoders' 'torchvision' and
'timm' key maps, by the names those libraries use) and torchvision's own segmentation models."""

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxseg.models import backbones
from flaxseg.models.deeplabv3 import DeepLabV3, torchvision_deeplabv3_key_map
from flaxseg.models.fcn_resnet import FCNResNet, torchvision_fcn_resnet_key_map
from flaxseg.weights.convert import convert_encoder, convert_state_dict, variable_shapes
from flaxseg.weights.detect import detect_architecture
from flaxseg.weights.io import WeightsError, as_state_dict, describe_source

# torchvision's segmentation models (encoders are the registry's).
TORCHVISION_SEGMENTATION = (
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "fcn_resnet50",
    "fcn_resnet101",
)


def _encoders(source: str) -> dict[str, str]:
    """{name ``source`` uses: registered encoder} of the encoders with a ``source`` key map."""
    return {backbones.get(name).source_name(source): name for name in backbones.names(source)}


def torchvision_archs() -> tuple[str, ...]:
    """The ``arch`` names ``convert_torchvision`` takes."""
    return tuple(_encoders("torchvision")) + TORCHVISION_SEGMENTATION


def timm_archs() -> tuple[str, ...]:
    """The ``arch`` names ``convert_timm`` takes."""
    return tuple(_encoders("timm"))


def _segmentation_num_classes(state_dict: Mapping[str, np.ndarray], arch: str, source: str) -> int:
    if "classifier.4.weight" not in state_dict:
        found = detect_architecture(state_dict)
        looks = f"; it looks like {found!r}" if found else ""
        raise WeightsError(
            f"{source} has no 'classifier.4.weight', so it is not a torchvision {arch!r} "
            f"checkpoint{looks}."
        )
    return int(state_dict["classifier.4.weight"].shape[0])


def convert_torchvision(
    arch: str, state_dict: Mapping[str, Any] | str | os.PathLike, *, dtype: Any = jnp.float32
):
    """Build the flaxseg twin of torchvision model ``arch`` and convert its state dict.

    ``arch`` (``torchvision_archs()``): every registered encoder with a 'torchvision' key map
    by its torchvision name — 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
    'resnext50_32x4d' -> ``ResNet`` backbone (features keyed by stride; torchvision's ``fc`` is
    dropped); 'vgg16', 'vgg16_bn', 'alexnet' -> ``VGG16`` or ``AlexNet`` features (the
    ``classifier`` is dropped); 'mobilenet_v2' -> ``MobileNetV2``; and 'deeplabv3_resnet50/101' ->
    ``DeepLabV3(head='torchvision')``; 'fcn_resnet50/101' -> ``FCNResNet``. For segmentation
    models the class count is read from the checkpoint and the auxiliary head is included iff
    it holds ``aux_classifier.*``.
    ``state_dict`` may be a mapping or a file path. Returns ``(model, variables)``; the model
    computes in ``dtype``.
    """
    if arch not in torchvision_archs():
        raise WeightsError(
            f"Unknown torchvision arch {arch!r}; supported: {', '.join(torchvision_archs())}."
        )
    if arch in _encoders("torchvision"):
        return convert_encoder(
            _encoders("torchvision")[arch], state_dict, source="torchvision", dtype=dtype
        )
    source = describe_source(state_dict)
    state_dict = as_state_dict(state_dict)
    family, backbone = arch.split("_")
    depth = int(backbone[len("resnet") :])
    num_classes = _segmentation_num_classes(state_dict, arch, source)
    aux_head = "aux_classifier.0.weight" in state_dict
    if family == "deeplabv3":
        model = DeepLabV3(
            num_classes=num_classes,
            backbone=backbone,
            head="torchvision",
            aux_head=aux_head,
            dtype=dtype,
        )
        key_map = torchvision_deeplabv3_key_map(depth, aux_head)
    else:
        model = FCNResNet(
            num_classes=num_classes, backbone=backbone, aux_head=aux_head, dtype=dtype
        )
        key_map = torchvision_fcn_resnet_key_map(depth, aux_head)
    variables = convert_state_dict(
        state_dict,
        key_map,
        variable_shapes(model),
        source=source,
        expected=f"torchvision's {arch!r}",
    )
    return model, variables


def convert_timm(
    arch: str, state_dict: Mapping[str, Any] | str | os.PathLike, *, dtype: Any = jnp.float32
):
    """Build the flaxseg twin of timm model ``arch`` and convert its state dict.

    ``arch`` (``timm_archs()``): every registered encoder with a 'timm' key map, by timm's name:
    'xception65' -> ``Xception65()`` (timm's classifier ``head.fc`` is dropped; the features at
    stride 32 equal timm's ``forward_features``); 'resnet18', 'resnet34', 'resnet50',
    'resnext50_32x4d' -> ``ResNet`` (timm's keys are torchvision's; ``fc`` is dropped);
    'mobilenetv2_100' -> ``MobileNetV2`` (torchvision's network; timm's ``conv_head``/``bn2``
    are its ``features_18``, the stride-32 feature); 'efficientnet_b0'…'b7',
    'tf_efficientnet_b0'…'b7' -> ``EfficientNet(arch)`` (features equal timm's
    ``features_only=True`` model; ``conv_head``, ``bn2`` and ``classifier`` are dropped).
    Returns ``(model, variables)``.
    """
    if arch not in timm_archs():
        raise WeightsError(f"Unknown timm arch {arch!r}; supported: {', '.join(timm_archs())}.")
    return convert_encoder(_encoders("timm")[arch], state_dict, source="timm", dtype=dtype)
