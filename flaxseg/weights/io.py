"""Reading PyTorch state dicts as numpy, and the one error every weights function raises.

``.pth``/``.pt``/``.bin`` need PyTorch (imported only then); ``.safetensors`` needs only the
``safetensors`` package.
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

LIST_LIMIT = 12  # entries an error message or report lists before "(and N more)"


class WeightsError(ValueError):
    """A weight file or state dict that cannot be used as asked (one sentence says why)."""


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


def as_state_dict(state_dict: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
    if isinstance(state_dict, (str, os.PathLike)):
        return load_state_dict(state_dict)
    return {key: _to_numpy(value) for key, value in state_dict.items()}


def describe_source(state_dict: Any) -> str:
    """How messages name ``state_dict``: 'The state dict' plus its path when it is a file."""
    if isinstance(state_dict, (str, os.PathLike)):
        return f"The state dict ({state_dict})"
    return "The state dict"


def listing(what: str, items: list[str]) -> str:
    shown = ", ".join(items[:LIST_LIMIT])
    more = f" (and {len(items) - LIST_LIMIT} more)" if len(items) > LIST_LIMIT else ""
    return f"{len(items)} {what}: {shown}{more}"
