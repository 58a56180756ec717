"""Shared set-up for the absl entry points (train.py, eval.py)."""

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import jax
from absl import flags, logging

# train.py's shortcut flags, one row each: (flag, type, help, the config field it sets). A flag
# left unset keeps the config's value. A dict-valued field (DICT_FIELDS; type dict) takes a JSON
# object, merged into the config's dict (the flag's entries win); an argument inside one
# ("model.kwargs.output_stride") is merged in the same way.
SHORTCUTS = (
    ("model", str, "Model name (flaxseg.models.list_models()).", "model.name"),
    ("backbone", str, "Backbone name; default: the model's own.", "model.backbone"),
    (
        "model_kwargs",
        dict,
        "JSON dict of extra model arguments, merged into the config's, e.g. "
        "'{\"base_width\": 16}'.",
        "model.kwargs",
    ),
    ("dataset", str, "Dataset name (flaxseg.data.list_datasets()).", "dataset"),
    ("data_dir", str, "TFDS data_dir.", "data_dir"),
    ("manual_dir", str, "Folder holding the dataset's archives or folders.", "manual_dir"),
    ("steps", int, "Number of training steps.", "steps"),
    ("batch_size", int, "Global batch size.", "batch_size"),
    ("crop_size", int, "Square training crop size in pixels.", "crop_size"),
    ("lr", float, "Base learning rate.", "lr"),
    (
        "output_stride",
        int,
        "Output stride (DeepLab/PSPNet models): 8, 16 or 32.",
        "model.kwargs.output_stride",
    ),
    (
        "pretrained",
        str,
        "Backbone weights (.pth/.pt/.safetensors, torchvision/timm).",
        "pretrained",
    ),
    (
        "init_from",
        str,
        "Workdir of another run whose matching parameters start this one.",
        "init_from",
    ),
    ("seed", int, "Random seed (initialisation, data order, augmentation, dropout).", "seed"),
    (
        "adversarial",
        str,
        "Adversarial training with this input encoding: basic, product, scaling.",
        "adversarial",
    ),
    ("adversary", str, "Adversary network (flaxseg.models.adversarial).", "adversary"),
    (
        "parallel",
        str,
        "Data parallelism: 'jit' (one program over the device mesh, the default) or 'pmap' "
        "(jax.pmap with cross-device sums and synchronised BatchNorm; the same update).",
        "parallel",
    ),
    ("adv_weight", float, "Weight λ of the segmenter's adversarial loss.", "adv_weight"),
)
FIELDS = {flag: field for flag, _, _, field in SHORTCUTS}
# The config fields that hold a dict of constructor arguments.
DICT_FIELDS = ("model.kwargs", "adversary_kwargs")
# The absl definer of each SHORTCUTS type (train.py defines the flags itself, so that --help
# lists them under train.py).
FLAG_DEFINERS = {
    str: flags.DEFINE_string,
    dict: flags.DEFINE_string,  # JSON text
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
}


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
    """``config`` with the overrides that were given (not None) written over it.

    A key is a shortcut flag's name (``SHORTCUTS``: ``model``, ``model_kwargs``, ...) or a config
    field (``adv_pretrain_steps``, ``model.backbone``). A dict-valued field takes a mapping or a
    JSON object (parsed here, once, naming the flag when it is not one) and is merged into the
    config's dict: a recipe's model arguments stay unless the flag names them.
    """
    config = config.copy_and_resolve_references()
    for name, value in overrides.items():
        if value is not None:
            _assign(config, FIELDS.get(name, name), value, f"--{name}")
    return config


def parse_dict(value, flag: str) -> dict:
    """The dict of ``value``: a mapping, or the JSON object a flag gave as text."""
    if isinstance(value, Mapping):
        return dict(value)
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{flag}={value!r} is not a JSON object: {error}.") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{flag}={value!r} is not a JSON object.")
    return parsed


def _assign(config, field: str, value, flag: str) -> None:
    head, _, leaf = field.rpartition(".")
    if head in DICT_FIELDS:  # one argument of a dict-valued field ("model.kwargs.output_stride")
        field, value = head, {leaf: value}
        head, _, leaf = field.rpartition(".")
    parent = config
    for key in filter(None, head.split(".")):
        parent = parent[key]
    if field in DICT_FIELDS:  # merged into the config's dict
        value = {**parent[leaf].to_dict(), **parse_dict(value, flag)}
    parent[leaf] = value


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
    flags_given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    given = next(
        (f for f in flags_given if f.startswith(f"--config.{name}")),
        next((f for f in flags_given if f.endswith(f".{name}")), f"--config.{name}"),
    )
    field = given.removeprefix("--config.")
    if field in FIELDS:  # a field that moved (--config.backbone is --config.model.backbone)
        hint = f"; use --{field} (it sets --config.{FIELDS[field]})."
    elif field.startswith("model.kwargs."):  # an argument the config does not set yet
        argument = field.removeprefix("model.kwargs.")
        hint = f"; set a new model argument with --model_kwargs='{{\"{argument}\": ...}}'."
    else:
        fields = sorted(_flat_keys(default.get_config()))
        close = difflib.get_close_matches(field, fields, n=3)
        hint = f"; did you mean {', '.join('--config.' + c for c in close)}?" if close else "."
    print(f"{Path(argv[0]).name}: error: {given} names no config field{hint}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (app.run's ``flags_parser``), with one sentence for a
    ``--config.<field>`` that names no field of a recipe given with ``--config=``."""
    from absl import app

    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:
        unknown_config_field(error, argv)


def check_config_groups(argv: list[str]) -> None:
    """Exit with one sentence for ``--config.model=<name>``: ``config.model`` is a group (name,
    backbone, kwargs), which ml_collections would try to parse as a dict."""
    given = next((a for a in argv if a.startswith("--config.model=")), None)
    if given:
        value = given.split("=", 1)[1]
        print(
            f"{Path(argv[0]).name}: error: --config.model is a group (name, backbone, kwargs); "
            f"use --model={value} or --config.model.name={value}.",
            file=sys.stderr,
        )
        sys.exit(2)


def _flat_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if hasattr(value, "items") and value:
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys
