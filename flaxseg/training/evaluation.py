"""Evaluation: the jitted eval step over a split, the confusion matrix, the printed report, and
the evaluation of a trained workdir (eval.py)."""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flaxseg import metrics as metrics_lib
from flaxseg.training import checkpointing, inputs, steps
from flaxseg.training import spec as spec_lib
from flaxseg.training import state as state_lib
from flaxseg.training.sharding import create_mesh, replicated, shard_batch


def jit_eval_step(num_classes: int, ignore_label: int, mesh):
    step = functools.partial(steps.eval_step, num_classes=num_classes, ignore_label=ignore_label)
    return jax.jit(step, out_shardings=replicated(mesh))


def evaluate(
    state, eval_iterator, eval_fn, mesh, num_classes: int, label_transform=None, progress=False
) -> np.ndarray:
    """Runs the eval step over a finite iterator; returns the summed confusion matrix (int64).

    ``label_transform(labels) -> labels`` (host numpy) selects which pixels count, e.g. a
    boundary band, by setting the others to the ignore label.
    """
    confusion = np.zeros((num_classes, num_classes), np.int64)
    if progress and jax.process_index() == 0:
        from tqdm import tqdm

        eval_iterator = tqdm(eval_iterator, desc="validation", unit="batch", leave=False)
    for batch in eval_iterator:
        if label_transform is not None:
            batch = {**batch, "label": label_transform(batch["label"])}
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


def evaluate_workdir(
    workdir,
    *,
    split: str = "validation",
    checkpoint: str = "latest",
    data_dir: Optional[str] = None,
    manual_dir: Optional[str] = None,
    batch_size: Optional[int] = None,
    output_stride: Optional[int] = None,
    label_transform=None,
) -> dict:
    """Restores a checkpoint from `workdir` alone and evaluates it on `split`; returns the
    summary and the report."""
    mesh = create_mesh()
    built = {}

    def restore_variables(manager, step):
        """Only the parameters and BatchNorm statistics, shaped by the recorded model."""
        meta = checkpointing.read_meta(manager, step)
        config = ml_collections.ConfigDict(meta["config"])
        spec = dict(meta["model_spec"])
        if output_stride:
            spec["model_kwargs"] = {**spec["model_kwargs"], "output_stride": output_stride}
        try:
            model = spec_lib.build_model(spec, spec_lib.DTYPES[config.dtype])
        except ValueError as error:  # e.g. --output_stride=12: the flag's fault
            raise checkpointing.NotTheCheckpoint() from error
        image = jnp.zeros((1, config.crop_size, config.crop_size, 3))
        shapes = jax.eval_shape(
            functools.partial(model.init, train=False), jax.random.key(0), image
        )
        abstract = {k: shapes.get(k, {}) for k in ("params", "batch_stats")}
        built.update(config=config, spec=spec, model=model)
        return checkpointing.restore_variables(manager, step, abstract, replicated(mesh))

    step, restored = checkpointing.restore_workdir(
        workdir, checkpoint, restore_fn=restore_variables
    )
    config, spec, model = built["config"], built["spec"], built["model"]
    if data_dir:
        config.data_dir = data_dir
    if manual_dir:
        config.manual_dir = manual_dir
    if batch_size:
        config.eval_batch_size = batch_size
    if config.eval_batch_size % jax.device_count():
        raise ValueError(
            f"--batch_size={config.eval_batch_size} is not divisible by the "
            f"{jax.device_count()} devices."
        )
    saved = restored["state"]
    state = state_lib.TrainState.create(
        apply_fn=model.apply,
        tx=optax.set_to_zero(),
        params=saved["params"],
        batch_stats=saved.get("batch_stats") or {},
    )
    num_classes = spec["num_classes"]
    eval_fn = jit_eval_step(num_classes, config.ignore_label, mesh)
    confusion = evaluate(
        state,
        inputs.create_eval_iterator(config, split),
        eval_fn,
        mesh,
        num_classes,
        label_transform,
    )
    summary = summarize(confusion)
    summary["step"] = step
    summary["report"] = format_report(confusion, spec_lib.class_names(config.dataset, num_classes))
    return summary
