"""The training and evaluation loops: where data meets models.

Sections: configuration checks / model spec · input pipeline · sharding · steps · loop · evaluation.
"""

import functools
import json
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxseg import data as data_lib
from flaxseg import metrics as metrics_lib
from flaxseg import models
from flaxseg.configs import models as model_configs
from flaxseg.constants import IMAGENET_MEAN, IMAGENET_STD, VOC_CLASSES
from flaxseg.data import pipeline
from flaxseg.training import checkpointing, optim, steps
from flaxseg.training import state as state_lib
from flaxseg.training.writer import MetricWriter

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------------------------
# Configuration checks and the model spec.
# ----------------------------------------------------------------------------------------------


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
    for name in ("crop_size", "batch_size", "steps", "eval_batch_size"):
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
    if config.lr is not None and config.lr <= 0:
        raise ValueError(f"--lr must be positive, got {config.lr}.")
    model_kwargs(config)


def model_kwargs(config) -> dict:
    try:
        kwargs = (
            json.loads(config.model_kwargs)
            if isinstance(config.model_kwargs, str)
            else dict(config.model_kwargs)
        )
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--model_kwargs={config.model_kwargs!r} is not a JSON object: {error}."
        ) from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model_kwargs={config.model_kwargs!r} is not a JSON object.")
    return kwargs


def model_spec(config) -> dict:
    """What identifies the architecture: recorded in every checkpoint, used to rebuild the model."""
    kwargs = model_kwargs(config)
    if config.output_stride:
        kwargs["output_stride"] = int(config.output_stride)
    return {
        "model": config.model,
        "num_classes": int(config.num_classes),
        "backbone": config.backbone or None,
        "model_kwargs": kwargs,
    }


def build_model(spec: dict, dtype=jnp.float32):
    kwargs = dict(spec["model_kwargs"])
    if spec.get("backbone"):
        kwargs["backbone"] = spec["backbone"]
    return models.create_model(
        spec["model"], num_classes=spec["num_classes"], dtype=dtype, **kwargs
    )


# ----------------------------------------------------------------------------------------------
# Input pipeline.
# ----------------------------------------------------------------------------------------------


def _data_kwargs(config) -> dict:
    return {"data_dir": config.data_dir or None, "manual_dir": config.manual_dir or None}


def create_train_iterator(config):
    source = data_lib.get_data_source(config.dataset, "train", **_data_kwargs(config))
    return pipeline.create_train_iterator(
        source,
        batch_size=config.batch_size // jax.process_count(),
        crop_size=config.crop_size,
        seed=config.seed,
        min_scale=config.min_scale,
        max_scale=config.max_scale,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        ignore_label=config.ignore_label,
        worker_count=config.worker_count,
    )


def create_eval_iterator(config, split: str = "validation"):
    source = data_lib.get_data_source(config.dataset, split, **_data_kwargs(config))
    return pipeline.create_eval_iterator(
        source,
        batch_size=config.eval_batch_size // jax.process_count(),
        bucket_multiple=config.eval_bucket_multiple,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        ignore_label=config.ignore_label,
    )


# ----------------------------------------------------------------------------------------------
# Sharding: one mesh axis 'data' over every device of every host; state replicated.
# ----------------------------------------------------------------------------------------------


def create_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Assembles the global batch from this host's part, split along the batch axis over 'data'."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
    }


# ----------------------------------------------------------------------------------------------
# Steps, jitted once with shardings.
# ----------------------------------------------------------------------------------------------


def jit_train_step(config, mesh):
    replicated = NamedSharding(mesh, PartitionSpec())
    step = functools.partial(
        steps.train_step, ignore_label=config.ignore_label, aux_loss_weight=config.aux_loss_weight
    )
    return jax.jit(step, out_shardings=(replicated, replicated), donate_argnums=0)


def jit_eval_step(num_classes: int, ignore_label: int, mesh):
    replicated = NamedSharding(mesh, PartitionSpec())
    step = functools.partial(steps.eval_step, num_classes=num_classes, ignore_label=ignore_label)
    return jax.jit(step, out_shardings=replicated)


def create_optimizer(config):
    schedule = optim.poly_schedule(config.lr, config.steps, config.lr_power, config.warmup_steps)
    tx = optim.create_optimizer(
        learning_rate=schedule, momentum=config.momentum, weight_decay=config.weight_decay
    )
    return tx, schedule


def init_state(model, tx, config, mesh):
    replicated = NamedSharding(mesh, PartitionSpec())
    init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    input_shape = (1, config.crop_size, config.crop_size, 3)
    create = jax.jit(
        lambda rng: state_lib.create_train_state(model, tx, rng, input_shape),
        out_shardings=replicated,
    )
    return create(init_rng)


def load_pretrained(state, path, mesh):
    """Loads backbone weights from a PyTorch/safetensors file into a fresh state; says what stayed random."""
    from flaxseg import weights

    if not Path(path).is_file():
        raise FileNotFoundError(f"--pretrained={path} does not exist.")
    variables, report = weights.load_pretrained_backbone(
        {"params": jax.device_get(state.params), "batch_stats": jax.device_get(state.batch_stats)},
        path,
    )
    _say(str(report))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(variables["params"], replicated)
    return state.replace(
        params=params,
        batch_stats=jax.device_put(variables.get("batch_stats", {}), replicated),
        opt_state=jax.jit(state.tx.init, out_shardings=replicated)(params),
    )


# ----------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------


def evaluate(state, eval_iterator, eval_fn, mesh, num_classes: int) -> np.ndarray:
    """Runs the eval step over a finite iterator; returns the summed confusion matrix (int64)."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for batch in eval_iterator:
        confusion += np.asarray(jax.device_get(eval_fn(state, shard_batch(batch, mesh))), np.int64)
    return confusion


def summarize(confusion) -> dict:
    return {
        "miou": metrics_lib.mean_iou(confusion),
        "pixel_accuracy": metrics_lib.pixel_accuracy(confusion),
        "mean_class_accuracy": metrics_lib.mean_class_accuracy(confusion),
    }


def format_report(confusion, class_names=None) -> str:
    """Per-class IoU table, pixel accuracy, and `mIoU: 0.xxxx` as the last line."""
    iou = metrics_lib.per_class_iou(confusion)
    names = class_names or [f"class_{i}" for i in range(len(iou))]
    width = max(len(name) for name in names)
    lines = [f"{'class':<{width}}  IoU"]
    lines += [
        f"{name:<{width}}  {'   n/a' if np.isnan(value) else f'{value:.4f}'}"
        for name, value in zip(names, iou)
    ]
    summary = summarize(confusion)
    lines.append(f"pixel accuracy: {summary['pixel_accuracy']:.4f}")
    lines.append(f"mean class accuracy: {summary['mean_class_accuracy']:.4f}")
    lines.append(f"mIoU: {summary['miou']:.4f}")
    return "\n".join(lines)


def class_names(num_classes: int):
    return list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) else None


# ----------------------------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------------------------


def _checkpoint_meta(config, spec) -> dict:
    return {"model_spec": spec, "config": config.to_dict()}


def train_and_evaluate(config, workdir, *, stop_at_step: Optional[int] = None) -> dict:
    """Trains `config.model` on `config.dataset`, resuming from `workdir` if it holds a checkpoint.

    `stop_at_step` ends this run early (with a checkpoint) although the schedule spans
    `config.steps`, e.g. to fit a time-limited job; running again continues exactly.
    Returns the last validation summary ({'miou', 'pixel_accuracy', ...}), 'step', 'report' (the
    printed per-class table) and 'history' (the logged training scalars, one dict per log step).
    """
    config = model_configs.resolve(config)
    validate_config(config)
    spec = model_spec(config)
    workdir = Path(workdir)
    manager = checkpointing.create_manager(workdir, keep=config.keep_checkpoints, read_only=True)
    latest = manager.latest_step()
    if latest is not None:
        checkpointing.check_compatible(
            checkpointing.read_meta(manager, latest)["model_spec"], spec, workdir
        )
    model = build_model(spec, DTYPES[config.dtype])  # raises on an unknown backbone or argument

    train_iterator = create_train_iterator(config)
    mesh = create_mesh()
    tx, schedule = create_optimizer(config)
    state = init_state(model, tx, config, mesh)
    _say(
        f"{config.model}: {models.count_params(state.params):,} parameters, "
        f"{jax.device_count()} device(s), global batch {config.batch_size}"
    )

    if config.pretrained and latest is None:
        state = load_pretrained(state, config.pretrained, mesh)
    manager = checkpointing.create_manager(workdir, keep=config.keep_checkpoints)
    if latest is not None:
        restored = checkpointing.restore(manager, latest, state_lib.state_to_checkpoint(state))
        state = state_lib.state_from_checkpoint(state, restored["state"])
        train_iterator.set_state(restored["data"])
        _say(f"Resumed from {checkpointing.checkpoint_dir(workdir)} at step {latest}.")

    train_fn = jit_train_step(config, mesh)
    eval_fn = jit_eval_step(config.num_classes, config.ignore_label, mesh)
    dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    writer = MetricWriter(workdir)
    meta = _checkpoint_meta(config, spec)

    start = int(jax.device_get(state.step))
    summary, confusion, history = {}, None, []
    last_step = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
    progress = _progress_bar(config, start)
    window, window_start = [], time.perf_counter()
    for step in range(start + 1, last_step + 1):
        batch = shard_batch(next(train_iterator), mesh)
        state, train_metrics = train_fn(state, batch, dropout_rng)
        window.append(train_metrics)
        if step % config.log_every == 0 or step == last_step:
            scalars = {
                key: float(np.mean([m[key] for m in jax.device_get(window)])) for key in window[0]
            }
            elapsed = time.perf_counter() - window_start
            scalars["images_per_second"] = len(window) * config.batch_size / elapsed
            scalars["learning_rate"] = float(schedule(step - 1))
            writer.write_scalars(
                step, {f"train/{k}": v for k, v in scalars.items()}, log=progress is None
            )
            history.append({"step": step, **scalars})
            if progress is not None:
                progress.set_postfix(
                    loss=f"{scalars['loss']:.4f}", img_per_s=f"{scalars['images_per_second']:.1f}"
                )
            window, window_start = [], time.perf_counter()
        if progress is not None:
            progress.update(1)

        evaluated = step % config.eval_every == 0 or step == last_step
        if evaluated:
            confusion = evaluate(
                state, create_eval_iterator(config), eval_fn, mesh, config.num_classes
            )
            summary = summarize(confusion)
            writer.write_scalars(step, {f"val/{k}": v for k, v in summary.items()})
        if step % config.checkpoint_every == 0 or step == last_step:
            checkpointing.save(
                manager,
                step,
                state=state_lib.state_to_checkpoint(state),
                data_state=train_iterator.get_state(),
                meta=meta,
                metrics={"miou": summary["miou"]} if evaluated else None,
            )
    if progress is not None:
        progress.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if confusion is None:  # the run had already reached config.steps: report the saved model
        confusion = evaluate(state, create_eval_iterator(config), eval_fn, mesh, config.num_classes)
        summary = summarize(confusion)
    summary["step"] = int(jax.device_get(state.step))
    summary["report"] = format_report(confusion, class_names(config.num_classes))
    summary["history"] = history
    return summary


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _progress_bar(config, start):
    if not config.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Evaluation of a workdir (eval.py).
# ----------------------------------------------------------------------------------------------


def evaluate_workdir(
    workdir,
    *,
    split: str = "validation",
    checkpoint: str = "latest",
    data_dir: Optional[str] = None,
    manual_dir: Optional[str] = None,
    batch_size: Optional[int] = None,
    output_stride: Optional[int] = None,
) -> dict:
    """Restores a checkpoint from `workdir` alone, evaluates it on `split`; returns summary + report."""
    workdir = Path(workdir)
    if not checkpointing.checkpoint_dir(workdir).is_dir():
        raise FileNotFoundError(
            f"No checkpoints in {checkpointing.checkpoint_dir(workdir)}; "
            "train first with train.py --workdir."
        )
    manager = checkpointing.create_manager(workdir, read_only=True)
    step = checkpointing.resolve_step(manager, checkpoint)
    restored = checkpointing.restore(manager, step)
    meta = restored["meta"]
    config = ml_collections.ConfigDict(meta["config"])
    if data_dir:
        config.data_dir = data_dir
    if manual_dir:
        config.manual_dir = manual_dir
    if batch_size:
        config.eval_batch_size = batch_size
    spec = dict(meta["model_spec"])
    if output_stride:
        spec["model_kwargs"] = {**spec["model_kwargs"], "output_stride": output_stride}
    if config.eval_batch_size % jax.device_count():
        raise ValueError(
            f"--batch_size={config.eval_batch_size} is not divisible by the "
            f"{jax.device_count()} devices."
        )
    model = build_model(spec, DTYPES[config.dtype])
    mesh = create_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    saved = restored["state"]
    state = state_lib.TrainState.create(
        apply_fn=model.apply,
        tx=optax.set_to_zero(),
        params=jax.device_put(saved["params"], replicated),
        batch_stats=jax.device_put(saved.get("batch_stats") or {}, replicated),
    )
    eval_fn = jit_eval_step(spec["num_classes"], config.ignore_label, mesh)
    confusion = evaluate(
        state, create_eval_iterator(config, split), eval_fn, mesh, spec["num_classes"]
    )
    summary = summarize(confusion)
    summary["step"] = step
    summary["report"] = format_report(confusion, class_names(spec["num_classes"]))
    return summary
