"""Evaluation: the jitted eval step over a split, the confusion matrix, the printed report, and
the evaluation of a trained workdir (eval.py), optionally with test-time augmentation
(multi-scale, flip, sliding windows; `flaxseg.inference`) and the dense CRF.

Whole images are padded to a few bucket shapes (`config.eval_bucket_multiple`), so the eval
step compiles once per bucket however many image sizes the split has; `compilations` in the
summary counts the executables actually built."""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxseg import data as data_lib
from flaxseg import inference
from flaxseg import metrics as metrics_lib
from flaxseg.constants import IMAGENET_MEAN, IMAGENET_STD
from flaxseg.data import pipeline
from flaxseg.serving import restore
from flaxseg.training import inputs, steps
from flaxseg.training import state as state_lib
from flaxseg.training.sharding import create_mesh, replicated, shard_batch


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How eval predicts: softmax averaged over ``scales`` × (identity, flip if ``flip``), each
    whole or in ``window``-pixel sliding windows overlapping by ``overlap``, then the dense CRF
    if ``crf``. The defaults are plain inference."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window: Optional[int] = None
    overlap: float = 0.33
    crf: bool = False

    def __post_init__(self):
        object.__setattr__(
            self, "scales", inference.check_options(self.scales, self.window, self.overlap)
        )

    @property
    def plain(self) -> bool:
        return self == InferenceOptions()

    @property
    def needs_sizes(self) -> bool:
        """Scaling and flipping act on each image's real (unpadded) size."""
        return self.flip or self.scales != (1.0,)


def parse_scales(values) -> tuple[float, ...]:
    """``--scales=0.5,0.75,1.0`` (absl's list of strings) -> (0.5, 0.75, 1.0), checked."""
    scales = []
    for value in values:
        try:
            scales.append(float(value))
        except ValueError:
            raise ValueError(
                f"--scales takes numbers such as 0.5,1.0,1.5, got {value!r}."
            ) from None
    return inference.check_options(scales)


def to_uint8(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Normalised float images -> the uint8 RGB they came from (padding -> the mean colour)."""
    pixels = (images * jnp.asarray(std) + jnp.asarray(mean)) * 255.0
    return jnp.clip(jnp.round(pixels), 0, 255).astype(jnp.uint8)


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
        probs = jax.vmap(inference.dense_crf)(to_uint8(batch["image"]), probs)
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


def sized_eval_batches(
    source,
    *,
    batch_size: int,
    bucket_multiple: int,
    ignore_label: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    num_threads: int = 4,
):
    """`pipeline.create_eval_iterator`'s batches of this host's share of ``source``, each with
    its images' real sizes added as ``'size'``: int32 [B, 2] (height, width); dummies get
    their bucket's shape."""
    sizes = pipeline.image_sizes(source)
    plan = pipeline.eval_batch_plan(
        sizes,
        batch_size=batch_size,
        bucket_multiple=bucket_multiple,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    batches = pipeline.create_eval_iterator(
        source,
        batch_size=batch_size,
        bucket_multiple=bucket_multiple,
        mean=mean,
        std=std,
        ignore_label=ignore_label,
        sizes=sizes,
        num_threads=num_threads,
    )
    # The iterator yields the plan's batches in the plan's order.
    for (shape, indices), batch in zip(plan, batches, strict=True):
        real = [shape if index is None else sizes[index] for index in indices]
        yield {**batch, "size": np.asarray(real, np.int32)}


def create_sized_eval_iterator(config, split: str = "validation"):
    """`inputs.create_eval_iterator` with the real image sizes (`sized_eval_batches`)."""
    source = data_lib.get_data_source(
        config.dataset,
        split,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
    )
    return sized_eval_batches(
        source,
        batch_size=config.eval_batch_size // jax.process_count(),
        bucket_multiple=config.eval_bucket_multiple,
        ignore_label=config.ignore_label,
    )


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
    iterator = (
        create_sized_eval_iterator(config, split)
        if options.needs_sizes
        else inputs.create_eval_iterator(config, split)
    )
    confusion = evaluate(state, iterator, eval_fn, mesh, num_classes, label_transform)
    summary = summarize(confusion)
    summary["step"] = step
    summary["compilations"] = compile_count(eval_fn)
    summary["report"] = format_report(confusion, restored["class_names"])
    return summary
