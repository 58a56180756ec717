"""A run's configuration checked and resolved, and the model spec that identifies its network.

The spec (model name, class count, backbone, input channels, parameter dtype, constructor
arguments) is recorded in every checkpoint: eval.py rebuilds the model from it alone, a resumed
run must match it, and ``--init_from`` compares against it. ``architecture(spec)`` is what two
specs are compared on: the facts that decide the checkpoint's arrays, with defaults filled in,
so that a spec written before a field existed, or one that leaves a default implicit, compares
equal to one that spells it out.

The configuration's side is ``config.model`` (name, backbone, kwargs: a dict, parsed once by
train.py's flags); the spec splits ``in_channels`` and ``param_dtype`` out of the kwargs, and
``build_model`` hands the rest to ``models.create_model``, the one constructor.

Dtypes: ``param_dtype`` (the dtype of the stored parameters, float32 unless
``--model_kwargs='{"param_dtype": ...}'``) is part of the architecture: restoring arrays of
another parameter dtype is refused. The compute dtype (``--config.dtype``) is not: a run
trained in bfloat16 may be resumed or evaluated in float32 (the parameters are the same).
Likewise ``--config.remat`` (rematerialise the backbone's units to save memory) is a training
choice, not part of the spec: a run may be resumed with or without it.
"""

import functools
import math

import jax
import jax.numpy as jnp

from flaxseg import data as data_lib
from flaxseg import losses, models
from flaxseg.configs import models as model_configs
from flaxseg.models import adversarial as adversarial_models
from flaxseg.serving.restore import DTYPES
from flaxseg.training import optim, sharding, steps

# Constructor arguments that change only how a model computes, not which arrays it has.
COMPUTE_ONLY_KWARGS = ("dtype", "remat")
# Architecture facts in words, for the sentences that refuse a mismatch.
FACT_NAMES = {
    "model": "model",
    "num_classes": "classes",
    "backbone": "backbone",
    "in_channels": "input channels",
    "param_dtype": "parameter dtype",
    "model_kwargs": "model arguments",
    "adversarial": "adversary",
}


def resolve_config(config):
    """A copy of ``config`` with every unset field filled: the model's defaults (learning rate,
    auxiliary-loss weight), the dataset's class count and the adversary's paper settings (λ,
    input stride: ``flaxseg.models.adversarial.PAPER_DEFAULTS``)."""
    config = model_configs.resolve(config)
    if config.num_classes is None and config.dataset in data_lib.DATASETS:
        config.num_classes = data_lib.dataset_info(config.dataset).num_classes
    paper = adversarial_models.PAPER_DEFAULTS.get(config.get("adversary"), {})
    for field, key in (("adv_weight", "weight"), ("adv_input_stride", "input_stride")):
        if config.get(field, 0) is None and key in paper:
            config[field] = paper[key]
    return config


def validate_config(config) -> None:
    """One clear sentence for each setting a user can get wrong, before anything is written."""
    name = config.model.name
    if name not in models.list_models():
        raise ValueError(f"Unknown --model={name!r}; available: {', '.join(models.list_models())}.")
    if config.dataset not in data_lib.DATASETS:
        raise ValueError(
            f"Unknown --dataset={config.dataset!r}; available: "
            f"{', '.join(sorted(data_lib.DATASETS))}."
        )
    for name in ("crop_size", "batch_size", "steps", "eval_batch_size", "num_classes"):
        if int(config[name]) <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {config[name]}.")
    devices = jax.device_count()
    if config.batch_size % devices:
        raise ValueError(
            f"--batch_size={config.batch_size} is not divisible by the {devices} devices; "
            f"use a multiple of {devices}."
        )
    if config.eval_batch_size % devices:
        raise ValueError(
            f"--config.eval_batch_size={config.eval_batch_size} is not divisible by the "
            f"{devices} devices; use a multiple of {devices}."
        )
    parallel = config.get("parallel", "jit")
    if parallel not in sharding.PARALLEL:
        raise ValueError(f"--parallel={parallel!r} is not one of {', '.join(sharding.PARALLEL)}.")
    if parallel == "pmap" and jax.process_count() > 1:
        raise ValueError(
            f"--parallel=pmap runs on one process; this run has {jax.process_count()} "
            "processes: use --parallel=jit (the default), which spans every host's devices."
        )
    grad_accum = config.get("grad_accum", 1)
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"--config.grad_accum must be a positive integer, got {grad_accum!r}.")
    per_device = config.batch_size // devices
    if per_device % grad_accum:
        raise ValueError(
            f"--config.grad_accum={grad_accum} does not divide the per-device batch of "
            f"{per_device} (--batch_size={config.batch_size} over {devices} "
            f"device{'s' if devices > 1 else ''}); use a divisor of it."
        )
    if grad_accum > 1 and config.adversarial:
        raise ValueError(
            "--config.grad_accum > 1 does not combine with --adversarial (the adversary trains "
            "on the whole batch); use --config.grad_accum=1."
        )
    if config.dtype not in DTYPES:
        raise ValueError(f"--config.dtype={config.dtype!r} is not one of {', '.join(DTYPES)}.")
    if not isinstance(config.get("remat", False), bool):
        raise ValueError(f"--config.remat must be True or False, got {config.remat!r}.")
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"--lr must be positive, got {config.lr}.")
    optim.learning_rate_schedule(  # an unknown schedule, a 'step' schedule without its size
        1.0, config.steps, kind=config.lr_schedule, step_size=config.lr_step_size
    )
    optim.validate_param_groups(config.param_groups)
    create_loss(config)  # an unknown loss, a malformed expression, bad class weights
    loss_resolution = config.get("loss_resolution", "input")
    if loss_resolution not in steps.LOSS_RESOLUTIONS:
        raise ValueError(
            f"--config.loss_resolution={loss_resolution!r} is not one of "
            f"{', '.join(steps.LOSS_RESOLUTIONS)}."
        )
    if loss_resolution != "input" and config.adversarial:
        raise ValueError(
            "--config.loss_resolution=score_map does not combine with --adversarial (the "
            "adversary scores full-resolution maps); use --config.loss_resolution=input."
        )
    check_model_kwargs(dict(config.model.kwargs))
    if config.adversarial:
        validate_adversarial(config)


ADVERSARY_OPTIMIZERS = ("adam", "sgd")


def validate_adversarial(config) -> None:
    """One sentence for each adversarial setting a user can get wrong."""
    encodings = adversarial_models.ENCODINGS
    if config.adversarial not in encodings:
        raise ValueError(
            f"Unknown --adversarial={config.adversarial!r}; valid encodings: "
            f"{', '.join(encodings)} (or '' for none)."
        )
    if config.adversary not in adversarial_models.list_adversaries():
        raise ValueError(
            f"Unknown --adversary={config.adversary!r}; available: "
            f"{', '.join(adversarial_models.list_adversaries())}."
        )
    if not (math.isfinite(config.adv_weight) and config.adv_weight >= 0):
        raise ValueError(f"--adv_weight must be non-negative, got {config.adv_weight}.")
    from flaxseg.training import adversarial

    if config.adv_normalization not in adversarial.NORMALIZATIONS:
        raise ValueError(
            f"--config.adv_normalization={config.adv_normalization!r} is not one of "
            f"{', '.join(adversarial.NORMALIZATIONS)}."
        )
    if config.adv_input_stride < 1:
        raise ValueError(
            f"--config.adv_input_stride must be a positive integer, got {config.adv_input_stride}."
        )
    if not 0 < config.adv_tau <= 1:
        raise ValueError(f"--config.adv_tau must be in (0, 1], got {config.adv_tau}.")
    if config.adv_optimizer not in ADVERSARY_OPTIMIZERS:
        raise ValueError(
            f"--config.adv_optimizer={config.adv_optimizer!r} is not one of "
            f"{', '.join(ADVERSARY_OPTIMIZERS)}."
        )
    if not (math.isfinite(config.adv_lr) and config.adv_lr > 0):
        raise ValueError(f"--config.adv_lr must be positive, got {config.adv_lr}.")
    if not 0 <= config.adv_pretrain_steps < config.steps:
        raise ValueError(
            f"--config.adv_pretrain_steps must be in [0, --steps={config.steps}), got "
            f"{config.adv_pretrain_steps}."
        )
    if config.adv_updates < 1:
        raise ValueError(f"--config.adv_updates must be at least 1, got {config.adv_updates}.")


def create_loss(config):
    """The configured loss: ``fn(logits, labels) -> (total, {name: term})``."""
    return losses.build_loss(
        config.loss,
        num_classes=int(config.num_classes),
        ignore_label=config.ignore_label,
        class_weights=tuple(config.class_weights) or None,
        label_smoothing=config.label_smoothing,
        ohem_thresh=config.ohem_thresh,
        ohem_min_kept=config.ohem_min_kept,
        focal_gamma=config.focal_gamma,
    )


def check_model_kwargs(kwargs: dict) -> None:
    """One sentence for an ``in_channels`` or ``param_dtype`` in --model_kwargs that cannot be."""
    in_channels = kwargs.get("in_channels", 3)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(
            f"--model_kwargs in_channels must be a positive integer, got {in_channels!r}."
        )
    param_dtype = kwargs.get("param_dtype", "float32")
    if param_dtype not in DTYPES:
        raise ValueError(
            f"--model_kwargs param_dtype={param_dtype!r} is not one of {', '.join(DTYPES)}."
        )


def check_input_channels(dataset: str, in_channels: int, model: str) -> None:
    """One sentence, before any set-up, when ``dataset``'s images do not have the model's
    ``in_channels`` channels (``model`` says which model, e.g. "--model_kwargs sets").

    The registered datasets are RGB; no conversion is made up (a grey image for in_channels=1
    would be one choice among several), so a model for other inputs needs a dataset of them.
    """
    channels = data_lib.dataset_info(dataset).channels
    if channels != in_channels:
        raise ValueError(
            f"--dataset={dataset} has {channels}-channel images but {model} in_channels="
            f"{in_channels}; use a dataset with {in_channels}-channel images or in_channels="
            f"{channels}."
        )


def model_spec(config) -> dict:
    """What identifies the architecture, from ``config.model``: recorded in every checkpoint, used
    to rebuild the model. The layout is the one checkpoints had before ``config.model`` was
    nested (``model_kwargs`` holds the constructor arguments, output_stride included), so those
    restore as they are."""
    kwargs = json_values(config.model.kwargs.to_dict())
    spec = {
        "model": config.model.name,
        "num_classes": int(config.num_classes),
        "backbone": config.model.backbone or None,
        "in_channels": int(kwargs.pop("in_channels", 3)),
        "param_dtype": dtype_name(kwargs.pop("param_dtype", "float32")),
        "model_kwargs": kwargs,
    }
    if config.adversarial:  # the adversary is part of the trained state
        spec["adversarial"] = {
            "encoding": config.adversarial,
            "adversary": config.adversary,
            "adversary_kwargs": json_values(config.adversary_kwargs.to_dict()),
        }
    return spec


def json_values(value):
    """``value`` as it reads back from a checkpoint's JSON (tuples become lists), so that the
    spec of a config compares equal to the spec it recorded."""
    if isinstance(value, dict):
        return {key: json_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_values(item) for item in value]
    return value


def dtype_name(dtype) -> str:
    """'float32', 'bfloat16', ... for a dtype or its name."""
    return jnp.dtype(dtype).name


@functools.lru_cache(maxsize=None)
def _default_backbone(model: str):
    if model not in models.list_models():
        return None
    return getattr(models.create_model(model, num_classes=1), "backbone", None)


def architecture(spec: dict) -> dict:
    """The facts of a model spec that decide a checkpoint's arrays, defaults filled in: model,
    num_classes, backbone (the model's default when unset), in_channels (3), param_dtype
    (float32), the other constructor arguments (without compute-only ones) and the adversary."""
    kwargs = {k: v for k, v in spec.get("model_kwargs", {}).items() if k not in COMPUTE_ONLY_KWARGS}
    return {
        "model": spec["model"],
        "num_classes": spec["num_classes"],
        "backbone": spec.get("backbone") or _default_backbone(spec["model"]),
        "in_channels": int(kwargs.pop("in_channels", spec.get("in_channels", 3))),
        "param_dtype": dtype_name(kwargs.pop("param_dtype", spec.get("param_dtype", "float32"))),
        "model_kwargs": kwargs,
        "adversarial": spec.get("adversarial"),
    }


def spec_differences(saved_spec: dict, requested_spec: dict, facts=None) -> dict:
    """{fact: (saved value, requested value)} for each architecture fact (all, or those in
    ``facts``) on which the two specs differ, in ``FACT_NAMES`` order."""
    saved, requested = architecture(saved_spec), architecture(requested_spec)
    return {
        key: (saved[key], requested[key])
        for key in FACT_NAMES
        if (facts is None or key in facts) and saved[key] != requested[key]
    }
