"""Pretrained PyTorch weights (torchvision, timm, MMSegmentation) for flaxseg models.

    from flaxseg import weights
    state_dict = weights.load_state_dict("resnet101-63fe2227.pth")    # {key: np.ndarray}
    model, variables = weights.convert_torchvision("deeplabv3_resnet101", state_dict)
    logits = model.apply(variables, images)          # same predictions as torchvision's model

    # Start a model's backbone from an ImageNet checkpoint (what train.py --pretrained does):
    variables, report = weights.load_pretrained_backbone(variables, "resnet101-63fe2227.pth",
                                                         model)
    print(report)                                    # what was loaded, what stayed random

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

from flaxseg.models import backbones
from flaxseg.models.backbones.resnet import RESNETS, STAGE_SIZES, STEM_KEY_PREFIXES
from flaxseg.models.deeplabv3 import DeepLabV3, torchvision_deeplabv3_key_map
from flaxseg.models.fcn_resnet import FCNResNet, torchvision_fcn_resnet_key_map

TORCHVISION_ARCHS = (
    "resnet50",
    "resnet101",
    "resnet152",
    "vgg16",
    "vgg16_bn",
    "alexnet",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "fcn_resnet50",
    "fcn_resnet101",
)
TIMM_ARCHS = ("xception65",)
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
        if f"{prefix}layer1.0.conv3.weight" in keys:  # bottleneck units
            depth = {size[2]: d for d, size in STAGE_SIZES.items()}.get(units)
        else:  # basic units: torchvision's ResNet-18/34, which flaxseg does not build
            depth = {2: 18, 6: 34}.get(units)
        if depth is None:
            return None
        stem = "_v1c" if f"{prefix}stem.0.weight" in keys else ""
        return f"{head}resnet{depth}{stem}"
    if f"{prefix}blocks.0.stack.conv1.conv_dw.weight" in keys:
        return "xception65"
    if f"{prefix}features.0.weight" in keys:
        if f"{prefix}features.1.running_mean" in keys:
            return "vgg16_bn"
        return "vgg16" if f"{prefix}features.2.weight" in keys else "alexnet"
    return None


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
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
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

    ``arch``: 'resnet50', 'resnet101', 'resnet152' -> ``ResNet`` backbone (features keyed by
    stride; torchvision's ``fc`` is dropped); 'vgg16', 'vgg16_bn', 'alexnet' -> ``VGG16`` or
    ``AlexNet`` features (the ``classifier`` is dropped); 'deeplabv3_resnet50/101' ->
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
    """Build the flaxseg twin of timm model ``arch`` ('xception65') and convert its state dict.

    Returns ``(Xception65(), variables)``; timm's classifier (``head.fc``) is dropped. The
    features at stride 32 equal timm's ``forward_features``.
    """
    if arch not in TIMM_ARCHS:
        raise WeightsError(f"Unknown timm arch {arch!r}; supported: {', '.join(TIMM_ARCHS)}.")
    source = (
        f"The state dict ({state_dict})"
        if isinstance(state_dict, (str, os.PathLike))
        else "The state dict"
    )
    model = backbones.create(arch, dtype=dtype)
    variables = convert_state_dict(
        _as_state_dict(state_dict),
        backbones.key_map(arch),
        _shapes(model),
        ignore_classifier=True,
        source=source,
        expected=f"timm's {arch!r}",
    )
    return model, variables


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

    def __str__(self) -> str:
        groups: dict[str, int] = {}
        for name in self.random:
            group = "/".join(name.split("/")[:2])
            groups[group] = groups.get(group, 0) + 1
        random = ", ".join(f"{g} ({n})" for g, n in groups.items()) or "none"
        unused = ", ".join(self.unused[:_LIST_LIMIT]) or "none"
        if len(self.unused) > _LIST_LIMIT:
            unused += f" (and {len(self.unused) - _LIST_LIMIT} more)"
        return (
            f"Loaded {len(self.loaded)} backbone tensors from {self.path} ({self.source}). "
            f"{len(self.random)} parameter arrays stayed random: {random}. "
            f"Unused entries of the file: {unused}."
        )


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
    'batch_stats'}``. Accepted files: torchvision ``resnet50/101/152``, ``vgg16[_bn]`` or
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

    loaded, missing, misshaped = {}, [], []
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
    )
    return traverse_util.unflatten_dict(flat), report
