"""A run's configuration checked and resolved, and the model spec that identifies its network.

The spec (model name, class count, backbone, constructor arguments) is recorded in every
checkpoint: eval.py rebuilds the model from it alone, a resumed run must match it, and
``--init_from`` compares against it.
"""

import json
import math

import jax
import jax.numpy as jnp

from flaxseg import data as data_lib
from flaxseg import models
from flaxseg.configs import models as model_configs
from flaxseg.models import adversarial as adversarial_models
from flaxseg.training import losses, optim

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_config(config):
    """A copy of ``config`` with every unset field filled: the model's defaults (learning rate,
    auxiliary-loss weight) and the dataset's class count."""
    config = model_configs.resolve(config)
    if config.num_classes is None and config.dataset in data_lib.DATASETS:
        config.num_classes = data_lib.dataset_info(config.dataset).num_classes
    return config


def validate_config(config) -> None:
    """One clear sentence for each setting a user can get wrong, before anything is written."""
    if config.model not in models.list_models():
        raise ValueError(
            f"Unknown --model={config.model!r}; available: {', '.join(models.list_models())}."
        )
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
    if config.dtype not in DTYPES:
        raise ValueError(f"--config.dtype={config.dtype!r} is not one of {', '.join(DTYPES)}.")
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"--lr must be positive, got {config.lr}.")
    optim.learning_rate_schedule(  # an unknown schedule, a 'step' schedule without its size
        1.0, config.steps, kind=config.lr_schedule, step_size=config.lr_step_size
    )
    optim.validate_param_groups(config.param_groups)
    create_loss(config)  # an unknown loss, a malformed expression, bad class weights
    model_kwargs(config)
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
    parse_model_kwargs(config.adversary_kwargs, "--config.adversary_kwargs")


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


def parse_model_kwargs(text, flag: str = "--model_kwargs") -> dict:
    """The JSON object of model arguments in ``text`` (a str or already a mapping)."""
    if not isinstance(text, str):
        return dict(text)
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag}={text!r} is not a JSON object: {error}.") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"{flag}={text!r} is not a JSON object.")
    return kwargs


def merge_model_kwargs(base, override) -> str:
    """``base`` model arguments (a recipe's) updated by ``override`` (the flag's), as JSON."""
    return json.dumps({**parse_model_kwargs(base), **parse_model_kwargs(override)})


def model_kwargs(config) -> dict:
    return parse_model_kwargs(config.model_kwargs)


def model_spec(config) -> dict:
    """What identifies the architecture: recorded in every checkpoint, used to rebuild the model."""
    kwargs = model_kwargs(config)
    if config.output_stride:
        kwargs["output_stride"] = int(config.output_stride)
    spec = {
        "model": config.model,
        "num_classes": int(config.num_classes),
        "backbone": config.backbone or None,
        "model_kwargs": kwargs,
    }
    if config.adversarial:  # the adversary is part of the trained state
        spec["adversarial"] = {
            "encoding": config.adversarial,
            "adversary": config.adversary,
            "adversary_kwargs": parse_model_kwargs(config.adversary_kwargs),
        }
    return spec


def build_model(spec: dict, dtype=jnp.float32):
    kwargs = dict(spec["model_kwargs"])
    if spec.get("backbone"):
        kwargs["backbone"] = spec["backbone"]
    return models.create_model(
        spec["model"], num_classes=spec["num_classes"], dtype=dtype, **kwargs
    )


def class_names(dataset: str, num_classes: int):
    """The dataset's class names when the model predicts its classes, else None."""
    if dataset in data_lib.DATASETS:
        names = data_lib.dataset_info(dataset).class_names
        if len(names) == num_classes:
            return list(names)
    return None
