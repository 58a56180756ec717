"""Pretrained PyTorch weights (torchvision, timm, MMSegmentation) for flaxseg models.

    from flaxseg import weights
    state_dict = weights.load_state_dict("resnet101-63fe2227.pth")    # {key: np.ndarray}
    model, variables = weights.convert_torchvision("deeplabv3_resnet101", state_dict)
    logits = model.apply(variables, images)          # same predictions as torchvision's model
    # A whole segmentation_models_pytorch model (smp.Unet("resnet34", in_channels=1, ...)):
    model, variables = weights.convert_smp("Unet", "resnet34", "unet_resnet34.safetensors")

    # Start a model's backbone from an ImageNet checkpoint (what train.py --pretrained does):
    variables, report = weights.load_pretrained_backbone(variables, "resnet101-63fe2227.pth",
                                                         model)
    print(report)                                    # what was loaded, what stayed random
    # A model built with in_channels != 3 gets the file's RGB first convolution adapted as
    # segmentation_models_pytorch does (weights.adapt_first_conv: 1 = sum over RGB, more =
    # RGB repeated and scaled by 3 / in_channels).

Files: ``.pth``/``.pt``/``.bin`` need PyTorch (imported only then); ``.safetensors`` needs only
the ``safetensors`` package. Layouts: conv weights OIHW -> HWIO, Linear [out, in] -> Dense
[in, out] (or folded into a k×k conv kernel, e.g. VGG's fc6 as FCN's), BatchNorm weight/bias/
running_mean/running_var -> scale/bias/mean/var; ``num_batches_tracked`` has no counterpart.
Where each tensor goes is the key map ({flax path: torch key}) that each backbone and model
module owns (``flaxseg.models.backbones.key_map``, ``PretrainedBackbone.key_map``, ...); this
module is the one converter that applies them.

Every user error (missing or truncated file, wrong architecture, unknown ``arch``) raises one
``WeightsError`` (a ``ValueError``) with one message naming the file or the keys at fault.
"""

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxseg.models import backbones, create_model
from flaxseg.models.backbones import efficientnet
from flaxseg.models.backbones.mobilenetv2 import mobilenet_v2_key_map
from flaxseg.models.backbones.resnet import RESNETS, STEM_KEY_PREFIXES
from flaxseg.models.deeplabv3 import DeepLabV3, smp_deeplabv3_key_map, torchvision_deeplabv3_key_map
from flaxseg.models.deeplabv3plus import smp_deeplabv3plus_key_map
from flaxseg.models.fcn_resnet import FCNResNet, torchvision_fcn_resnet_key_map
from flaxseg.models.heads import SMP_ENCODERS
from flaxseg.models.layers import KeyMap, prefix_key_map
from flaxseg.models.pspnet import smp_pspnet_key_map
from flaxseg.models.unet import smp_unet_key_map

TORCHVISION_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "vgg16",
    "vgg16_bn",
    "alexnet",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "fcn_resnet50",
    "fcn_resnet101",
    "mobilenet_v2",
)
# timm's ResNet/ResNeXt state dicts have torchvision's keys and layout.
TIMM_ARCHS = (
    ("resnet18", "resnet34", "resnet50", "resnext50_32x4d", "xception65", "mobilenetv2_100")
    + tuple(f"efficientnet_b{i}" for i in range(8))
    + tuple(f"tf_efficientnet_b{i}" for i in range(8))
)
# ImageNet classifier entries a backbone checkpoint may carry; a backbone has no place for them.
_CLASSIFIER_KEY = re.compile(r"^(fc|classifier|head\.fc)\.(weight|bias)$|^classifier\.\d+\.")
_LIST_LIMIT = 12


class WeightsError(ValueError):
    """A weight file or state dict that cannot be used as asked (one sentence says why)."""


# ----------------------------------------------------------------------------- reading files


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy dtype
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _unwrap(checkpoint: Any, path: str) -> dict[str, Any]:
    # Training checkpoints often nest the weights ({'state_dict': ...}, {'model': ...}).
    for key in ("state_dict", "model", "model_state"):
        if (
            isinstance(checkpoint, Mapping)
            and key in checkpoint
            and isinstance(checkpoint[key], Mapping)
        ):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(k, str) for k in checkpoint):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return dict(checkpoint)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict from ``.pth``/``.pt``/``.bin`` or ``.safetensors`` as numpy.

    A ``'module.'`` prefix (DataParallel) is removed and ``{'state_dict': ...}`` /
    ``{'model': ...}`` wrappers are unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"Weight file {path} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            state_dict = load_file(path)
        except Exception as err:  # safetensors raises its own error types
            raise WeightsError(
                f"Could not read {path} as safetensors (truncated or not a safetensors file): {err}"
            ) from err
    else:
        try:
            import torch
        except ImportError as err:
            raise WeightsError(
                f"Reading {path} needs PyTorch (pip install torch); or convert the file to "
                f".safetensors, which needs only the safetensors package."
            ) from err
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # zip, pickle and EOF errors all mean an unusable file
            raise WeightsError(
                f"Could not read {path} as a PyTorch checkpoint (truncated or not a torch.save "
                f"file): {err}"
            ) from err
        state_dict = _unwrap(checkpoint, path)
    return {_strip(key, "module."): _to_numpy(value) for key, value in state_dict.items()}


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def _as_state_dict(state_dict: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
    if isinstance(state_dict, (str, os.PathLike)):
        return load_state_dict(state_dict)
    return {key: _to_numpy(value) for key, value in state_dict.items()}


def detect_architecture(state_dict: Mapping[str, Any]) -> str | None:
    """Best guess of the network a state dict belongs to ('resnet101', 'deeplabv3_resnet50',
    'vgg16_bn', 'xception65', ...), or None."""
    keys = set(state_dict)
    prefix = ""
    if any(k.startswith("backbone.") for k in keys):
        prefix = "backbone."
        if "classifier.0.convs.0.0.weight" in keys:
            head = "deeplabv3_"
        elif "classifier.4.weight" in keys and "classifier.1.running_mean" in keys:
            head = "fcn_"
        else:
            head = ""
    else:
        head = ""
    if f"{prefix}layer1.0.conv1.weight" in keys:
        units = len(
            {k[len(prefix) :].split(".")[1] for k in keys if k.startswith(f"{prefix}layer3.")}
        )
        # Basic units (ResNet-18/34) have no conv3; ResNeXt's grouped 3×3 conv reads
        # width / groups input channels.
        block = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in keys else "basic"
        conv2 = tuple(getattr(state_dict.get(f"{prefix}layer1.0.conv2.weight"), "shape", ()))
        groups = conv2[0] // conv2[1] if block == "bottleneck" and len(conv2) == 4 else 1
        names = [
            name
            for name, spec in RESNETS.items()
            if (spec.block, spec.stage_sizes[2], spec.groups) == (block, units, groups)
        ]
        if not names:
            return None
        stem = "_v1c" if f"{prefix}stem.0.weight" in keys else ""
        return f"{head}{names[0]}{stem}"
    if f"{prefix}blocks.0.stack.conv1.conv_dw.weight" in keys:
        return "xception65"
    light = _light_architecture(state_dict, prefix)
    if light:
        return light
    if f"{prefix}features.0.weight" in keys:
        if f"{prefix}features.1.running_mean" in keys:
            return "vgg16_bn"
        return "vgg16" if f"{prefix}features.2.weight" in keys else "alexnet"
    return None


def _light_architecture(state_dict: Mapping[str, Any], prefix: str) -> str | None:
    """MobileNetV2 (torchvision's or timm's keys) or EfficientNet-B0…B7 (timm's keys, named
    'efficientnet_b*' — timm's tf_ ports have the same keys and shapes — or lukemelas' keys as
    in smp's encoders, 'efficientnet-b*')."""
    keys = {k[len(prefix) :] for k in state_dict if k.startswith(prefix)}
    if "features.1.conv.0.0.weight" in keys:
        return "mobilenet_v2"
    if "blocks.0.0.conv_dw.weight" in keys and "conv_stem.weight" in keys:
        if "blocks.0.0.se.conv_reduce.weight" not in keys:
            return "mobilenetv2_100" if "blocks.1.0.conv_pwl.weight" in keys else None
        blocks = {".".join(k.split(".")[:3]) for k in keys if k.startswith("blocks.")}
        name = "efficientnet_"
    elif "_blocks.0._depthwise_conv.weight" in keys and "_conv_stem.weight" in keys:
        blocks = {".".join(k.split(".")[:2]) for k in keys if k.startswith("_blocks.")}
        name = "efficientnet-"
    else:
        return None
    stem = next(v for k, v in state_dict.items() if k.endswith("conv_stem.weight"))
    variant = efficientnet.variant_of(len(blocks), int(np.shape(stem)[0]))
    return name + variant if variant else None


# ----------------------------------------------------------------------------- conversion


def _to_flax_layout(value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """A torch tensor in the layout of the flax variable of ``target_shape`` (unchanged when no
    layout fits: the caller reports the shape)."""
    if value.ndim == 4 and len(target_shape) == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO; depthwise [C,1,k,k] -> [k,k,1,C]
    if value.ndim == 2 and len(target_shape) == 2:
        return value.T  # Linear [out, in] -> Dense [in, out]
    if value.ndim == 2 and len(target_shape) == 4:
        # A Linear over a flattened C×kh×kw map (torch flattens NCHW) used as a kh×kw conv:
        # VGG's fc6 as FCN's 7×7 fc6, fc7 as a 1×1 conv.
        k_h, k_w, c_in, c_out = target_shape
        if value.shape == (c_out, c_in * k_h * k_w):
            return value.reshape(c_out, c_in, k_h, k_w).transpose(2, 3, 1, 0)
    return value


def _listing(what: str, items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = f" (and {len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
    return f"{len(items)} {what}: {shown}{more}"


def convert_state_dict(
    state_dict: Mapping[str, Any] | str | os.PathLike,
    key_map: Mapping[tuple[str, ...], str],
    target: Mapping[str, Any],
    *,
    ignore_classifier: bool = False,
    complete: bool = True,
    source: str = "the state dict",
    expected: str = "the model",
) -> dict[str, Any]:
    """Strictly convert ``state_dict`` along ``key_map`` ({flax path: torch key}).

    ``target`` holds the model's variables or their ``jax.eval_shape``; every path of the key
    map must exist there with the converted shape (which also says how a Linear weight folds
    into a conv kernel). Keys of the state dict that no path uses are an error, except
    ``num_batches_tracked`` counters and, with ``ignore_classifier`` (a backbone's ImageNet
    checkpoint), the classifier entries (``fc.*``, ``classifier.*``, ``head.fc.*``). All
    missing, unexpected and mis-shaped keys are reported together in one ``WeightsError``.
    ``complete`` asserts that the key map covers every variable of ``target``; without it the
    result holds only the mapped entries (merge it into initialised variables).

    Returns ``{'params': {...}, 'batch_stats': {...}}`` of float32 numpy arrays.
    """
    state_dict = _as_state_dict(state_dict)
    flat_target = traverse_util.flatten_dict(_plain(target))
    used = set(key_map.values())
    # Listed in network order (key map / file order), which reads better than sorted order.
    missing = [key for key in key_map.values() if key not in state_dict]
    unexpected = [
        key
        for key in state_dict
        if key not in used
        and not key.endswith("num_batches_tracked")
        and not (ignore_classifier and _CLASSIFIER_KEY.match(key))
    ]
    misshaped, flat = [], {}
    for path, key in key_map.items():
        assert path in flat_target, f"key map path {path} is not a variable of the model"
        if key not in state_dict:
            continue
        shape = tuple(flat_target[path].shape)
        value = _to_flax_layout(state_dict[key], shape)
        if value.shape != shape:
            misshaped.append(
                f"{key} {tuple(state_dict[key].shape)} (needs {shape} for {'/'.join(path)})"
            )
        flat[path] = value.astype(np.float32)
    if missing or unexpected or misshaped:
        found = detect_architecture(state_dict)
        looks = f" (it looks like {found!r})" if found else ""
        parts = [
            _listing(what, items)
            for what, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("keys of the wrong shape", misshaped),
            )
            if items
        ]
        raise WeightsError(f"{source}{looks} does not match {expected}: " + "; ".join(parts) + ".")
    if complete:
        unmapped = sorted(
            "/".join(p) for p in flat_target if p not in flat and p[0] in ("params", "batch_stats")
        )
        assert not unmapped, f"model variables without a source key: {unmapped[:5]}"
    return traverse_util.unflatten_dict(flat)


def _plain(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _shapes(model, size: int = 64) -> dict[str, Any]:
    images = jnp.zeros((1, size, size, getattr(model, "in_channels", 3)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    return {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}


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

    ``arch``: 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d'
    -> ``ResNet`` backbone (features keyed by stride; torchvision's ``fc`` is dropped);
    'vgg16', 'vgg16_bn', 'alexnet' -> ``VGG16`` or ``AlexNet`` features (the ``classifier`` is
    dropped); 'deeplabv3_resnet50/101' ->
    ``DeepLabV3(head='torchvision')``; 'fcn_resnet50/101' -> ``FCNResNet``. For segmentation
    models the class count is read from the checkpoint and the auxiliary head is included iff
    it holds ``aux_classifier.*``.
    ``state_dict`` may be a mapping or a file path. Returns ``(model, variables)``; the model
    computes in ``dtype``.
    """
    if arch not in TORCHVISION_ARCHS:
        raise WeightsError(
            f"Unknown torchvision arch {arch!r}; supported: {', '.join(TORCHVISION_ARCHS)}."
        )
    source = (
        f"The state dict ({state_dict})"
        if isinstance(state_dict, (str, os.PathLike))
        else "The state dict"
    )
    state_dict = _as_state_dict(state_dict)
    expected = f"torchvision's {arch!r}"
    backbone_only = arch in backbones.NAMES
    if backbone_only:
        model, key_map = backbones.create(arch, dtype=dtype), backbones.key_map(arch)
    else:
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
        _shapes(model),
        ignore_classifier=backbone_only,
        source=source,
        expected=expected,
    )
    return model, variables


def convert_timm(
    arch: str, state_dict: Mapping[str, Any] | str | os.PathLike, *, dtype: Any = jnp.float32
):
    """Build the flaxseg twin of timm model ``arch`` and convert its state dict.

    'xception65' -> ``Xception65()`` (timm's classifier ``head.fc`` is dropped; the features at
    stride 32 equal timm's ``forward_features``); 'resnet18', 'resnet34', 'resnet50',
    'resnext50_32x4d' -> ``ResNet`` (timm's keys are torchvision's; ``fc`` is dropped);
    'mobilenetv2_100' -> ``MobileNetV2`` (torchvision's network; timm's ``conv_head``/``bn2``
    are its ``features_18``, the stride-32 feature); 'efficientnet_b0'…'b7',
    'tf_efficientnet_b0'…'b7' -> ``EfficientNet(arch)`` (features equal timm's
    ``features_only=True`` model; ``conv_head``, ``bn2`` and ``classifier`` are dropped).
    Returns ``(model, variables)``.
    """
    if arch not in TIMM_ARCHS:
        raise WeightsError(f"Unknown timm arch {arch!r}; supported: {', '.join(TIMM_ARCHS)}.")
    source = (
        f"The state dict ({state_dict})"
        if isinstance(state_dict, (str, os.PathLike))
        else "The state dict"
    )
    state_dict = _as_state_dict(state_dict)
    if arch == "mobilenetv2_100":  # torchvision's network under timm's keys
        model = backbones.create("mobilenet_v2", dtype=dtype)
        key_map = mobilenet_v2_key_map(layout="timm")
    else:
        model, key_map = backbones.create(arch, dtype=dtype), backbones.key_map(arch)
    if arch in efficientnet.ARCHS:  # timm's conv_head/bn2 feed only the classifier
        heads = efficientnet.head_key_prefixes(arch)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
    variables = convert_state_dict(
        state_dict,
        key_map,
        _shapes(model),
        ignore_classifier=True,
        source=source,
        expected=f"timm's {arch!r}",
    )
    return model, variables


# ----------------------------------------------------------------------------- smp models

# smp architectures convert_smp builds (flaxseg registry name -> smp class), and the smp
# keyword arguments each understands beyond classes/in_channels/encoder_weights.
SMP_ARCHS = {
    "unet": "Unet",
    "deeplabv3": "DeepLabV3",
    "deeplabv3plus": "DeepLabV3Plus",
    "pspnet": "PSPNet",
}
_SMP_KWARGS = {
    "unet": ("decoder_channels", "decoder_use_norm", "encoder_depth", "decoder_interpolation"),
    "deeplabv3": ("encoder_output_stride", "decoder_channels", "decoder_atrous_rates"),
    "deeplabv3plus": (
        "encoder_output_stride",
        "decoder_channels",
        "decoder_atrous_rates",
        "decoder_aspp_separable",
    ),
    "pspnet": ("encoder_depth", "psp_out_channels"),
}
# Arguments of every smp model that change nothing convert_smp builds when left at smp's
# default (None: the model returns logits, has no classification head); "any": ignored (the
# weights come from the state dict; the logits are always resized to the input, which is what
# smp's ``upsampling`` does at the sizes smp accepts).
_SMP_NEUTRAL = {
    "encoder_weights": "any",
    "upsampling": "any",
    "activation": None,
    "aux_params": None,
}


def _smp_arch(model_name: str) -> str:
    arch = model_name.lower()
    if arch not in SMP_ARCHS:
        raise WeightsError(
            f"Unknown smp model {model_name!r}; supported: {', '.join(SMP_ARCHS.values())}."
        )
    return arch


def _smp_encoder(encoder_name: str) -> str:
    if encoder_name not in SMP_ENCODERS:
        raise WeightsError(
            f"Unknown smp encoder {encoder_name!r} for convert_smp; supported: "
            f"{', '.join(SMP_ENCODERS)}."
        )
    return encoder_name


def _smp_encoder_key_map(encoder: str) -> KeyMap:
    return prefix_key_map(backbones.key_map(encoder), ("backbone",), "encoder.")


def _smp_model_kwargs(arch: str, smp_kwargs: dict[str, Any]) -> dict[str, Any]:
    """flaxseg constructor arguments for smp's keyword arguments (one sentence for the rest)."""
    smp_kwargs = dict(smp_kwargs)
    for name, default in _SMP_NEUTRAL.items():
        value = smp_kwargs.pop(name, default)
        if default != "any" and value != default:
            raise WeightsError(
                f"convert_smp builds models that return logits without smp's classification "
                f"head; {name}={value!r} is not supported (leave it at {default!r})."
            )
    unknown = sorted(set(smp_kwargs) - set(_SMP_KWARGS[arch]))
    if unknown:
        raise WeightsError(
            f"convert_smp does not support smp's {', '.join(unknown)} for {SMP_ARCHS[arch]}; "
            f"supported: {', '.join(_SMP_KWARGS[arch] + tuple(_SMP_NEUTRAL))}."
        )
    get = smp_kwargs.get
    if arch == "unet":
        if get("encoder_depth", 5) != 5 or get("decoder_interpolation", "nearest") != "nearest":
            raise WeightsError(
                "convert_smp builds smp's Unet with encoder_depth=5 and "
                "decoder_interpolation='nearest' only, got "
                f"encoder_depth={get('encoder_depth', 5)!r}, "
                f"decoder_interpolation={get('decoder_interpolation', 'nearest')!r}."
            )
        norm = get("decoder_use_norm", "batchnorm")
        if norm not in (True, False, "batchnorm", "identity"):
            raise WeightsError(
                f"convert_smp supports decoder_use_norm 'batchnorm' (True) or 'identity' "
                f"(False), got {norm!r}."
            )
        kwargs = (
            {"batchnorm": norm in (True, "batchnorm")} if "decoder_use_norm" in smp_kwargs else {}
        )
        if "decoder_channels" in smp_kwargs:
            kwargs["decoder_channels"] = tuple(smp_kwargs["decoder_channels"])
        return kwargs
    if arch == "pspnet":
        return {
            "head": "smp",
            "encoder_depth": get("encoder_depth", 3),
            "head_channels": get("psp_out_channels", 512),
        }
    kwargs = {
        "head": "smp",
        "output_stride": get("encoder_output_stride", 8 if arch == "deeplabv3" else 16),
        "aspp_channels": get("decoder_channels", 256),
    }
    if "decoder_atrous_rates" in smp_kwargs:
        kwargs["atrous_rates"] = tuple(smp_kwargs["decoder_atrous_rates"])
    if arch == "deeplabv3plus":
        kwargs["decoder_channels"] = get("decoder_channels", 256)
        kwargs["separable"] = bool(get("decoder_aspp_separable", True))
    return kwargs


def _smp_head_key_map(arch: str, model: Any) -> KeyMap:
    return {
        "unet": smp_unet_key_map,
        "deeplabv3": smp_deeplabv3_key_map,
        "deeplabv3plus": smp_deeplabv3plus_key_map,
        "pspnet": smp_pspnet_key_map,
    }[arch](model)


def _encoder_keys(state_dict: Mapping[str, Any], encoder: str | None = None) -> set[str]:
    """The ``encoder.*`` keys of ``state_dict``; with ``encoder``, those smp's encoder of that
    name uses (its EfficientNets keep their classifier head's conv and BN, which no feature
    uses)."""
    head = ()
    if encoder in backbones.EFFICIENTNETS:
        head = tuple(f"encoder.{prefix}" for prefix in efficientnet.head_key_prefixes(encoder))
    return {
        k
        for k in state_dict
        if k.startswith("encoder.")
        and not k.endswith("num_batches_tracked")
        and not k.startswith(head)
    }


def _smp_encoder_of(state_dict: Mapping[str, np.ndarray]) -> str | None:
    """The smp encoder of ``SMP_ENCODERS`` whose keys and shapes the ``encoder.*`` part of
    ``state_dict`` holds (the stem's input channels aside), or None."""
    for encoder in SMP_ENCODERS:
        key_map = _smp_encoder_key_map(encoder)
        if set(key_map.values()) != _encoder_keys(state_dict, encoder):
            continue
        shapes = traverse_util.flatten_dict(_plain(_shapes(backbones.create(encoder))))
        stem_key = next(key for path, key in key_map.items() if path[-1] == "kernel")
        if all(
            key == stem_key or _to_flax_layout(state_dict[key], shape).shape == shape
            for path, key in key_map.items()
            for shape in [tuple(shapes[(path[0], *path[2:])].shape)]
        ):
            return encoder
    return None


def _smp_arch_of(state_dict: Mapping[str, Any]) -> str | None:
    """The smp architecture whose decoder keys ``state_dict`` holds, or None."""
    for arch, prefix in (
        ("unet", "decoder.blocks."),
        ("deeplabv3plus", "decoder.aspp.0.convs."),
        ("deeplabv3", "decoder.aspp.convs."),
        ("pspnet", "decoder.psp."),
    ):
        if any(k.startswith(prefix) for k in state_dict):
            return arch
    return None


def convert_smp(
    model_name: str,
    encoder_name: str,
    state_dict: Mapping[str, Any] | str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    **smp_kwargs: Any,
):
    """Build the flaxseg twin of a segmentation_models_pytorch model and convert its weights.

    ``model_name``: smp's class name or flaxseg's ('Unet'/'unet', 'DeepLabV3', 'DeepLabV3Plus',
    'PSPNet'); ``encoder_name``: smp's (one of ``SMP_ENCODERS``: 'resnet34', ...). The model is
    ``create_model('unet', backbone=encoder_name)`` (smp's U-Net) or, for the others,
    ``head='smp'``. ``state_dict``: the whole smp model's ``state_dict()`` as a mapping or a
    ``.pth``/``.safetensors`` file. ``smp_kwargs``: the keyword arguments the smp model was built
    with, where they differ from smp's defaults and change the network (``decoder_channels``,
    ``encoder_output_stride``, ``decoder_atrous_rates``, ``decoder_aspp_separable``,
    ``encoder_depth``, ``psp_out_channels``, ``decoder_use_norm``; ``encoder_weights`` and
    ``upsampling`` are ignored; PSPNet takes the ResNet encoders). ``classes`` and
    ``in_channels`` are read from the state dict (when given they must agree with it). smp
    builds its whole encoder even where ``encoder_depth`` stops it early (PSPNet: layer2), and
    its EfficientNets keep a classifier conv; those unused entries are dropped.

    Returns ``(model, variables)``: ``model.apply(variables, images)`` (NHWC) gives smp's
    logits (NCHW there). A state dict of another smp encoder or architecture raises one
    ``WeightsError``.
    """
    arch, encoder = _smp_arch(model_name), _smp_encoder(encoder_name)
    source = (
        f"The state dict ({state_dict})"
        if isinstance(state_dict, (str, os.PathLike))
        else "The state dict"
    )
    state_dict = _as_state_dict(state_dict)
    if not _encoder_keys(state_dict) or "segmentation_head.0.weight" not in state_dict:
        raise WeightsError(
            f"{source} has no 'encoder.*' and 'segmentation_head.0.weight' entries, so it is "
            f"not the state dict of a segmentation_models_pytorch model."
        )
    found_arch = _smp_arch_of(state_dict)
    if found_arch is not None and found_arch != arch:
        raise WeightsError(
            f"{source} holds an smp {SMP_ARCHS[found_arch]}, not {SMP_ARCHS[arch]}; pass "
            f"model_name={SMP_ARCHS[found_arch]!r}."
        )
    encoder_map = _smp_encoder_key_map(encoder)
    if _encoder_keys(state_dict, encoder) != set(encoder_map.values()):
        _refuse_other_encoder(state_dict, source, encoder)

    stem_key = next(key for path, key in encoder_map.items() if path[-1] == "kernel")
    in_channels = smp_kwargs.pop("in_channels", None) or int(state_dict[stem_key].shape[1])
    num_classes = smp_kwargs.pop("classes", None) or int(
        state_dict["segmentation_head.0.weight"].shape[0]
    )
    model = create_model(
        arch,
        num_classes=num_classes,
        backbone=encoder,
        in_channels=in_channels,
        dtype=dtype,
        **_smp_model_kwargs(arch, smp_kwargs),
    )
    target = _shapes(model)
    flat_target = traverse_util.flatten_dict(_plain(target))
    # smp builds its whole encoder; stages past encoder_depth (PSPNet) and an EfficientNet's
    # classifier head have no twin here.
    unbuilt = {key for path, key in encoder_map.items() if path not in flat_target}
    unbuilt |= _encoder_keys(state_dict) - _encoder_keys(state_dict, encoder)
    key_map = {path: key for path, key in encoder_map.items() if key not in unbuilt}
    key_map.update(_smp_head_key_map(arch, model))
    try:
        variables = convert_state_dict(
            {k: v for k, v in state_dict.items() if k not in unbuilt},
            key_map,
            target,
            source=source,
            expected=f"smp's {SMP_ARCHS[arch]}({encoder_name!r}) with {smp_kwargs or 'defaults'}",
        )
    except WeightsError as err:
        _refuse_other_encoder(state_dict, source, encoder, err)
        raise
    return model, variables


def _refuse_other_encoder(
    state_dict: Mapping[str, Any], source: str, encoder: str, err: Exception | None = None
) -> None:
    """One sentence when ``state_dict`` holds another smp encoder than ``encoder``; without
    ``err`` (the keys already differ) also when it holds none that flaxseg knows."""
    found = _smp_encoder_of(state_dict)
    if found is not None and found != encoder:
        raise WeightsError(
            f"{source} holds an smp model with encoder {found!r}, not {encoder!r}; pass "
            f"encoder_name={found!r}."
        ) from err
    if err is None and found is None:
        raise WeightsError(
            f"{source}'s 'encoder.*' entries are not smp's {encoder!r} encoder, nor any other "
            f"of {', '.join(SMP_ENCODERS)}."
        )


# ----------------------------------------------------------------------------- backbones


@dataclasses.dataclass(frozen=True)
class PretrainedReport:
    """What ``load_pretrained_backbone`` did: flax paths loaded and left random, and the file's
    unused keys."""

    path: str
    source: str
    loaded: tuple[str, ...]
    random: tuple[str, ...]
    unused: tuple[str, ...]
    # First convolutions adapted from the file's RGB kernel to the model's in_channels.
    adapted: tuple[str, ...] = ()

    def __str__(self) -> str:
        groups: dict[str, int] = {}
        for name in self.random:
            group = "/".join(name.split("/")[:2])
            groups[group] = groups.get(group, 0) + 1
        random = ", ".join(f"{g} ({n})" for g, n in groups.items()) or "none"
        unused = ", ".join(self.unused[:_LIST_LIMIT]) or "none"
        if len(self.unused) > _LIST_LIMIT:
            unused += f" (and {len(self.unused) - _LIST_LIMIT} more)"
        adapted = (
            f"Adapted the RGB first convolution to the model's input channels as "
            f"segmentation_models_pytorch does: {', '.join(self.adapted)}. "
            if self.adapted
            else ""
        )
        return (
            f"Loaded {len(self.loaded)} backbone tensors from {self.path} ({self.source}). "
            f"{adapted}{len(self.random)} parameter arrays stayed random: {random}. "
            f"Unused entries of the file: {unused}."
        )


def adapt_first_conv(kernel: np.ndarray, in_channels: int) -> np.ndarray:
    """An RGB first-convolution ``kernel`` (HWIO, I = 3) for images of ``in_channels`` channels,
    exactly as segmentation_models_pytorch 0.6.0's ``patch_first_conv`` (pretrained=True) does:

      - 1 channel: the sum of the three RGB input slices (no rescaling), so a grey image
        replicated to RGB and the 1-channel image give the same response;
      - 2 or more: input channel i takes RGB slice i % 3 (2: R, G; 4: R, G, B, R; ...) and the
        whole kernel is multiplied by 3 / in_channels (2: × 1.5, 4: × 0.75), which keeps the
        activation scale of an input whose channels are alike;
      - 3: the kernel unchanged.

    Every path that loads an ImageNet stem into a model with ``in_channels != 3`` calls this
    (``load_pretrained_backbone`` does it for each file kernel with 3 input channels whose model
    kernel has ``in_channels``; other converters should do the same).
    """
    kernel = np.asarray(kernel)
    assert kernel.ndim == 4 and kernel.shape[2] == 3, kernel.shape
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels!r}.")
    if in_channels == 3:
        return kernel
    if in_channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    repeated = kernel[:, :, [i % 3 for i in range(in_channels)], :]
    return (repeated * (3 / in_channels)).astype(kernel.dtype)


def _decimated_fc(
    value: np.ndarray, target_shape: tuple[int, ...], first: bool
) -> np.ndarray | None:
    """An ImageNet classifier's fc6/fc7 Linear ``value`` (weight [out, in] or bias [out]) cut
    down to the model's conv of ``target_shape``, in torch layout; None when the sizes do not
    divide. Exact for FCN's 7×7×4096 fc6; for DeepLab-LargeFOV's 3×3×1024 it is the paper's
    decimation (Chen et al. 2015, Sec. 4.1): every 4th filter and, of fc6's 7×7 window, the taps
    0, 3, 6. ``first``: the layer reads the flattened C×s×s pool5 map (fc6), else the previous
    fc's (decimated) outputs."""
    c_out = target_shape[-1]
    if value.shape[0] % c_out:
        return None
    value = value[:: value.shape[0] // c_out]
    if value.ndim == 1:
        return value
    k, _, c_in, _ = target_shape
    if not first:
        return value[:, :: value.shape[1] // c_in] if value.shape[1] % c_in == 0 else None
    side = int(round((value.shape[1] / c_in) ** 0.5))
    if side * side * c_in != value.shape[1] or k > side:
        return None
    taps = np.round(np.linspace(0, side - 1, k)).astype(int)
    return value.reshape(c_out, c_in, side, side)[:, :, taps][:, :, :, taps].reshape(c_out, -1)


def _describe(model: Any) -> str:
    backbone = getattr(model, "backbone", None)
    return getattr(model, "TITLE", type(model).__name__) + (
        f" with backbone={backbone!r}" if backbone else ""
    )


def load_pretrained_backbone(
    variables: Mapping[str, Any], path: str | os.PathLike, model: Any
) -> tuple[dict[str, Any], PretrainedReport]:
    """Load the backbone of ``model``'s ``variables`` from an ImageNet (or segmentation)
    checkpoint.

    ``model`` (the flax module the variables belong to) says which network its backbone is and
    where it sits (``model.pretrained_backbone()``); ``variables`` are its ``{'params',
    'batch_stats'}``. Accepted files: torchvision (or timm) ``resnet18/34/50/101/152`` and
    ``resnext50_32x4d``, torchvision ``vgg16[_bn]`` or
    ``alexnet``, MMSegmentation ``resnet*_v1c`` (deep stem), timm ``xception65``, and
    torchvision segmentation checkpoints (their ``backbone.*`` part). For models with fc6/fc7
    convs (FCN, DeepLab v1) the classifier's fc6/fc7 are loaded too, decimated to the model's
    size where smaller. A ResNet whose stem differs from the file's (deep stem vs 7×7) keeps a
    random stem; any other mismatch, or a model without a pretrainable backbone, raises
    ``WeightsError``.

    Returns (new variables, ``PretrainedReport``); ``str(report)`` lists what stayed random.
    """
    spec = model.pretrained_backbone() if hasattr(model, "pretrained_backbone") else None
    path = os.fspath(path)
    if spec is None:
        raise WeightsError(f"{_describe(model)} has no ImageNet backbone to load {path} into.")
    state_dict = load_state_dict(path)
    if any(key.startswith("backbone.") for key in state_dict):
        state_dict = {
            key[len("backbone.") :]: value
            for key, value in state_dict.items()
            if key.startswith("backbone.")
        }
    source = detect_architecture(state_dict) or "unrecognised checkpoint"
    kind = spec.name + ("_v1c" if spec.deep_stem else "")
    key_map = spec.key_map()
    flat = traverse_util.flatten_dict(_plain(variables))
    in_channels = getattr(model, "in_channels", 3)

    loaded, missing, misshaped, adapted = {}, [], [], []
    for flax_path, key in key_map.items():
        if flax_path not in flat:  # e.g. variables given without their 'batch_stats'
            continue
        fc = flax_path[1] in spec.fc_layers
        if key not in state_dict:
            optional = fc or (spec.name in RESNETS and key.startswith(STEM_KEY_PREFIXES))
            if not optional:
                missing.append(key)
            continue
        shape = tuple(flat[flax_path].shape)
        value = state_dict[key]
        if fc:
            value = _decimated_fc(value, shape, first=flax_path[1] == spec.fc_layers[0])
            if value is None:
                continue
        value = _to_flax_layout(value, shape)
        if _is_rgb_input_conv(value.shape, shape, in_channels):
            value = adapt_first_conv(value, in_channels)
            adapted.append("/".join(flax_path[1:]))
        if value.shape != shape:
            misshaped.append(f"{key} {state_dict[key].shape} (needs {shape})")
        loaded[flax_path] = value
    if missing or misshaped or not loaded:
        parts = [
            _listing(what, items)
            for what, items in (("missing keys", missing), ("keys of the wrong shape", misshaped))
            if items
        ]
        raise WeightsError(
            f"{path} ({source}) does not fit the model's {kind} backbone: "
            + ("; ".join(parts) or "no entry matches")
            + "."
        )

    for flax_path, value in loaded.items():
        flat[flax_path] = jnp.asarray(value, dtype=flat[flax_path].dtype)
    used = {key_map[p] for p in loaded}
    report = PretrainedReport(
        path=path,
        source=source,
        loaded=tuple("/".join(p) for p in loaded),
        random=tuple("/".join(p[1:]) for p in flat if p[0] == "params" and p not in loaded),
        unused=tuple(
            sorted(k for k in state_dict if k not in used and not k.endswith("num_batches_tracked"))
        ),
        adapted=tuple(adapted),
    )
    return traverse_util.unflatten_dict(flat), report


def _is_rgb_input_conv(file_shape: tuple[int, ...], shape: tuple[int, ...], in_channels: int):
    """Whether a file kernel (HWIO) is an RGB input convolution that the model, built for
    ``in_channels`` images, has with ``in_channels`` inputs. Inside a network file and model
    have the same widths, so only the convolutions that read the images differ like this."""
    return (
        in_channels != 3
        and len(file_shape) == 4
        and len(shape) == 4
        and file_shape[2] == 3
        and shape[2] == in_channels
        and file_shape[:2] + file_shape[3:] == shape[:2] + shape[3:]
    )
