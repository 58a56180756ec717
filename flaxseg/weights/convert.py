"""The one converter: a state dict along a key map ({flax path: torch key}) into flaxseg
variables, strictly (every missing, unexpected and mis-shaped key reported in one error).

Layouts: conv weights OIHW -> HWIO, Linear [out, in] -> Dense [in, out] (or folded into a k×k
conv kernel, e.g. VGG's fc6 as FCN's), BatchNorm weight/bias/running_mean/running_var ->
scale/bias/mean/var; ``num_batches_tracked`` has no counterpart.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxseg.models import backbones
from flaxseg.weights.detect import detect_architecture
from flaxseg.weights.io import WeightsError, as_state_dict, describe_source, listing

# ImageNet classifier entries a backbone checkpoint may carry; a backbone has no place for them.
_CLASSIFIER_KEY = re.compile(r"^(fc|classifier|head\.fc)\.(weight|bias)$|^classifier\.\d+\.")


def to_flax_layout(value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
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
    state_dict = as_state_dict(state_dict)
    flat_target = traverse_util.flatten_dict(plain(target))
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
        value = to_flax_layout(state_dict[key], shape)
        if value.shape != shape:
            misshaped.append(
                f"{key} {tuple(state_dict[key].shape)} (needs {shape} for {'/'.join(path)})"
            )
        flat[path] = value.astype(np.float32)
    if missing or unexpected or misshaped:
        found = detect_architecture(state_dict)
        looks = f" (it looks like {found!r})" if found else ""
        parts = [
            listing(what, items)
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


def plain(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def variable_shapes(model, size: int = 64) -> dict[str, Any]:
    images = jnp.zeros((1, size, size, getattr(model, "in_channels", 3)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    return {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}


def convert_encoder(
    name: str,
    state_dict: Mapping[str, Any] | str | os.PathLike,
    *,
    source: str | None = None,
    dtype: Any = jnp.float32,
    expected: str | None = None,
    **create_kwargs: Any,
):
    """Build the registered encoder ``name`` and convert the state dict of its twin from weight
    ``source`` (one of the encoder's ``key_maps``; default its first) along that key map.

    The twin's ImageNet classifier (``fc``/``classifier``/``head.fc`` and the encoder's
    ``head_key_prefixes``) is dropped; anything else that does not fit is one ``WeightsError``.
    ``create_kwargs`` go to ``backbones.create`` (e.g. ``base_width`` of a test-size network).
    Returns ``(module, variables)``: ``module.apply(variables, images)`` gives the features.
    ``convert_torchvision`` and ``convert_timm`` call this for their encoders.
    """
    encoder = backbones.get(name)
    source = source or next(iter(encoder.key_maps), None)
    if source not in encoder.key_maps:
        raise WeightsError(
            f"Encoder {name!r} has no key map for weight source {source!r}; its sources: "
            f"{', '.join(encoder.key_maps) or 'none'}."
        )
    source_text = describe_source(state_dict)
    state_dict = as_state_dict(state_dict)
    if encoder.head_key_prefixes:  # e.g. timm EfficientNet's conv_head/bn2 feed only the classifier
        heads = encoder.head_key_prefixes
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
    model = backbones.create(name, dtype=dtype, **create_kwargs)
    variables = convert_state_dict(
        state_dict,
        backbones.key_map(name, source),
        variable_shapes(model),
        ignore_classifier=True,
        source=source_text,
        expected=expected or f"{source}'s {encoder.source_name(source)!r}",
    )
    return model, variables
