"""Shared set-up for the absl entry points (train.py, eval.py)."""

import os
import sys

import jax
from absl import logging


def enable_compilation_cache() -> None:
    """Persistent XLA compilation cache, so a second run (or a resume) skips recompiling."""
    directory = os.environ.get(
        "JAX_COMPILATION_CACHE_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "flaxseg_jax_cache"),
    )
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def quiet_library_logs() -> None:
    """Orbax and TFDS log every step at INFO; keep stdout for flaxseg's own lines unless -v
    asked."""
    from absl import flags

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    # Orbax warns about two things flaxseg does on purpose: checkpoints saved between evaluations
    # carry no mIoU, and eval.py opens the checkpoint directory read-only.
    expected = (
        "did not provide metrics",
        "Given directory is read only",
        "OpenCV is not installed",  # TFDS falls back to PIL, which flaxseg uses anyway
    )
    logging.get_absl_logger().addFilter(
        lambda record: not any(text in record.getMessage() for text in expected)
    )


def apply_overrides(config, overrides: dict):
    """``config`` with the flags that were given (not None) written over it.

    ``model_kwargs`` is merged into the config's (a recipe's model arguments stay unless the
    flag names them), everything else replaces the config's value.
    """
    from flaxseg.training import spec

    config = config.copy_and_resolve_references()
    for name, value in overrides.items():
        if value is None:
            continue
        if name == "model_kwargs":
            value = spec.merge_model_kwargs(config.model_kwargs, value)
        config[name] = value
    return config


def run_or_exit(program: str, fn, *args, **kwargs):
    """Calls fn; an error a user caused (bad flag, path, data, workdir) ends in one line and
    exit code 2."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        logging.debug("%s failed", program, exc_info=True)
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(2)
