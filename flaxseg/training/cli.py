"""Shared set-up for the absl entry points (train.py, eval.py)."""

import os
import sys
from pathlib import Path

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
        "has no dataset_info.json",  # TFDS, about a dataset version it is about to build
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
    except (ValueError, OSError) as error:  # OSError: missing, existing or unwritable paths
        logging.debug("%s failed", program, exc_info=True)
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        logging.debug("%s failed", program, exc_info=True)
        reason = str(error).strip().splitlines()[0]
        bfloat16 = "compute in bfloat16 with --config.dtype=bfloat16"
        # Rematerialisation trades compute for the backward pass's memory: training only.
        tail = (
            f"{bfloat16}, or rematerialise the backbone with --config.remat=True"
            if program == "train.py"
            else f"or {bfloat16}"
        )
        print(
            f"{program}: error: the device ran out of memory ({reason}); lower --batch_size or "
            f"--crop_size, {tail}.",
            file=sys.stderr,
        )
        sys.exit(2)


def unknown_config_field(error: Exception, argv: list[str]) -> None:
    """Exit with one sentence for a `--config.<field>` that names no field, suggesting the
    closest (ml_collections raises a 49-line traceback while the flag is defined)."""
    import difflib

    from flaxseg.configs import default

    name = str(error).split("\\n")[0].strip("\"'\\")
    given = next((a.split("=")[0] for a in argv if a.startswith(f"--config.{name}")), name)
    fields = sorted(_flat_keys(default.get_config()))
    close = difflib.get_close_matches(given.removeprefix("--config."), fields, n=3)
    hint = f"; did you mean {', '.join('--config.' + c for c in close)}?" if close else "."
    print(f"{Path(argv[0]).name}: error: {given} names no config field{hint}", file=sys.stderr)
    sys.exit(2)


def _flat_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if hasattr(value, "items"):
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys
