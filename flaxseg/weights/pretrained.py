"""Starting a model's backbone from an ImageNet (or segmentation) checkpoint, and adapting an
RGB first convolution to other input channels as segmentation_models_pytorch does."""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxseg.models import backbones
from flaxseg.weights.convert import plain, to_flax_layout
from flaxseg.weights.detect import detect_architecture
from flaxseg.weights.io import LIST_LIMIT, WeightsError, listing, load_state_dict


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
        unused = ", ".join(self.unused[:LIST_LIMIT]) or "none"
        if len(self.unused) > LIST_LIMIT:
            unused += f" (and {len(self.unused) - LIST_LIMIT} more)"
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
    # A file with the other stem form (ResNet's 7×7 vs deep stem) leaves the stem random.
    stem_keys = backbones.get(spec.name).stem_key_prefixes
    flat = traverse_util.flatten_dict(plain(variables))
    in_channels = getattr(model, "in_channels", 3)

    loaded, missing, misshaped, adapted = {}, [], [], []
    for flax_path, key in key_map.items():
        if flax_path not in flat:  # e.g. variables given without their 'batch_stats'
            continue
        fc = flax_path[1] in spec.fc_layers
        if key not in state_dict:
            optional = fc or key.startswith(stem_keys)
            if not optional:
                missing.append(key)
            continue
        shape = tuple(flat[flax_path].shape)
        value = state_dict[key]
        if fc:
            value = _decimated_fc(value, shape, first=flax_path[1] == spec.fc_layers[0])
            if value is None:
                continue
        value = to_flax_layout(value, shape)
        if _is_rgb_input_conv(value.shape, shape, in_channels):
            value = adapt_first_conv(value, in_channels)
            adapted.append("/".join(flax_path[1:]))
        if value.shape != shape:
            misshaped.append(f"{key} {state_dict[key].shape} (needs {shape})")
        loaded[flax_path] = value
    if missing or misshaped or not loaded:
        parts = [
            listing(what, items)
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
