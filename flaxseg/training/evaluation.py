"""Evaluation: the jitted eval step over a split, the confusion matrix, the printed report, and
the evaluation of a trained workdir (eval.py), optionally with test-time augmentation
(multi-scale, flip, sliding windows; `flaxseg.inference`) and the dense CRF.

Whole images are padded to a few bucket shapes (`config.eval_bucket_multiple`), so the eval
step compiles once per bucket however many image sizes the split has; `compilations` in the
summary counts the executables actually built."""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxseg import inference
from flaxseg import metrics as metrics_lib
from flaxseg.data import pipeline
from flaxseg.serving import restore
from flaxseg.serving.options import InferenceOptions
from flaxseg.training import inputs, steps
from flaxseg.training import state as state_lib
from flaxseg.training.sharding import create_mesh, replicated, shard_batch


def tta_eval_step(
    state,
    batch,
    *,
    num_classes: int,
    ignore_label: int,
    options: InferenceOptions,
    axis_name: Optional[str] = None,
):
    """`steps.eval_step` with test-time augmentation and/or the CRF: the confusion matrix of
    argmax of `inference.predict_probs` (then `inference.dense_crf`). ``batch['size']``
    [B, 2], when present, holds each image's real size inside its padded bucket."""

    def apply_fn(images):
        variables = steps.model_variables(state.params, state.batch_stats)
        return state.apply_fn(variables, images, train=False)

    probs = inference.predict_probs(
        apply_fn,
        batch["image"],
        scales=options.scales,
        flip=options.flip,
        window=options.window,
        overlap=options.overlap,
        sizes=batch.get("size"),
    )
    if options.crf:
        probs = jax.vmap(inference.dense_crf)(pipeline.to_uint8(batch["image"]), probs)
    predictions = jnp.argmax(probs, axis=-1)
    confusion = metrics_lib.confusion_matrix(batch["label"], predictions, num_classes, ignore_label)
    if axis_name is not None:
        confusion = jax.lax.psum(confusion, axis_name)
    return confusion


def jit_eval_step(
    num_classes: int, ignore_label: int, mesh, options: Optional[InferenceOptions] = None
):
    """The jitted eval step, plain or with ``options``; ``compile_count(fn)`` tells how many
    shapes it has compiled for."""
    if options is None or options.plain:
        step = functools.partial(
            steps.eval_step, num_classes=num_classes, ignore_label=ignore_label
        )
    else:
        step = functools.partial(
            tta_eval_step, num_classes=num_classes, ignore_label=ignore_label, options=options
        )
    return jax.jit(step, out_shardings=replicated(mesh))


def compile_count(jitted) -> int:
    """Executables a jitted function holds, one per distinct input shape it was called with."""
    return jitted._cache_size()


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
    options: Optional[InferenceOptions] = None,
) -> dict:
    """Restores a checkpoint from `workdir` alone and evaluates it on `split`; returns the
    summary ('miou', 'pixel_accuracy', 'mean_class_accuracy', 'step', 'compilations': how many
    times the eval step compiled) and the report. ``options``: test-time augmentation / CRF
    (default plain inference)."""
    options = options or InferenceOptions()
    mesh = create_mesh()
    restored = restore.restore_model(
        workdir, checkpoint, output_stride=output_stride, sharding=replicated(mesh)
    )
    step, config, spec, model = (restored[k] for k in ("step", "config", "spec", "model"))
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
    saved = restored["variables"]
    state = state_lib.TrainState.create(
        apply_fn=model.apply,
        tx=optax.set_to_zero(),
        params=saved["params"],
        batch_stats=saved.get("batch_stats") or {},
    )
    num_classes = spec["num_classes"]
    if options.window is not None:
        inference.check_options(
            options.scales,
            options.window,
            options.overlap,
            output_stride=getattr(model, "output_stride", None) or 32,
        )
    eval_fn = jit_eval_step(num_classes, config.ignore_label, mesh, options)
    iterator = inputs.create_eval_iterator(config, split, with_sizes=options.needs_sizes)
    confusion = evaluate(state, iterator, eval_fn, mesh, num_classes, label_transform)
    summary = summarize(confusion)
    summary["step"] = step
    summary["compilations"] = compile_count(eval_fn)
    summary["report"] = format_report(confusion, restored["class_names"])
    return summary
