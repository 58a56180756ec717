"""Turn a PyTorch state dict (e.g. torchvision ImageNet weights) into flax variables.

No torch import: values may be torch tensors (anything with ``.detach()``) or numpy arrays.
A key map (``{flax_path: torch_key}``, paths starting with the collection) says what goes where;
the backbones and models define theirs.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _to_flax_layout(path: tuple[str, ...], value: np.ndarray,
                    target_shape: tuple[int, ...] | None) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)  # Conv2d OIHW -> HWIO
    elif path[-1] == "kernel" and value.ndim == 2:
        if target_shape is not None and len(target_shape) == 4:
            # A Linear over a flattened C×kh×kw map (torch flattens NCHW) used as a kh×kw conv,
            # e.g. VGG's fc6 as FCN's 7×7 fc6.
            k_h, k_w, c_in, c_out = target_shape
            value = value.reshape(c_out, c_in, k_h, k_w).transpose(2, 3, 1, 0)
        else:
            value = value.T  # Linear [out, in] -> Dense [in, out]
    return value


def torch_state_dict_to_variables(
        state_dict: Mapping[str, Any], key_map: Mapping[tuple[str, ...], str],
        target: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Convert ``state_dict`` into a nested flax variables dict along ``key_map``.

    Args:
      state_dict: torch key -> tensor/array.
      key_map: flax path (collection first, e.g. ``('params', 'features_0', 'kernel')``) ->
        torch key.
      target: optional variables (or ``jax.eval_shape`` shapes) the result must match; it is
        needed to fold a Linear weight into a k×k conv kernel and is used to check shapes.

    Returns:
      ``{'params': {...}, 'batch_stats': {...}}`` holding exactly the mapped entries (merge it
      into initialised variables to keep the unmapped ones).
    """
    flat_target = traverse_util.flatten_dict(target) if target is not None else {}
    flat = {}
    for path, torch_key in key_map.items():
        if torch_key not in state_dict:
            raise ValueError(f"The state dict has no entry {torch_key!r} (needed for {path}).")
        target_shape = tuple(flat_target[path].shape) if path in flat_target else None
        if target is not None and target_shape is None:
            raise ValueError(f"The target variables have no entry {path} for {torch_key!r}.")
        value = _to_flax_layout(path, _to_numpy(state_dict[torch_key]), target_shape)
        if target_shape is not None and value.shape != target_shape:
            raise ValueError(
                f"State dict entry {torch_key!r} has shape {value.shape} after conversion but "
                f"{path} expects {target_shape}.")
        flat[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(flat)
