"""Restoring a trained run directory (workdir) for inference: the model rebuilt from the spec
its checkpoints record, with its parameters and BatchNorm statistics, its class names and
colours. eval.py, predict.py and export.py all restore through `restore_model`; nothing but
the workdir is needed.

The spec (model name, class count, backbone, input channels, parameter dtype, constructor
arguments; training's ``model_spec`` writes it) is turned into a model by
`build_model`, which training uses too.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxseg import data as data_lib
from flaxseg import models
from flaxseg.serving import checkpoints

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(spec: dict, dtype=jnp.float32, remat: bool = False):
    """The model of ``spec`` computing in ``dtype``, rematerialising its backbone's units with
    ``remat`` (specs written before ``in_channels`` and ``param_dtype`` were recorded get the
    defaults, 3 and float32)."""
    kwargs = dict(spec["model_kwargs"])
    if remat:
        kwargs["remat"] = True
    if spec.get("backbone"):
        kwargs["backbone"] = spec["backbone"]
    kwargs.setdefault("in_channels", int(spec.get("in_channels", 3)))
    kwargs["param_dtype"] = jnp.dtype(kwargs.get("param_dtype", spec.get("param_dtype", "float32")))
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


def colormap(dataset: str) -> np.ndarray:
    """uint8 [256, 3]: the dataset's colour map, VOC's for a dataset that is not registered."""
    if dataset in data_lib.DATASETS:
        return np.asarray(data_lib.dataset_info(dataset).colormap())
    return data_lib.voc_colormap()


def restore_model(
    workdir,
    checkpoint: str = "latest",
    *,
    output_stride: Optional[int] = None,
    sharding=None,
    rgb: bool = False,
) -> dict:
    """The model of a trained workdir rebuilt from the workdir alone, with its restored
    parameters and BatchNorm statistics (placed with ``sharding``, default one device):
    {'step', 'config', 'spec', 'model', 'variables': {'params', 'batch_stats'},
    'class_names' (one per class), 'colormap' (uint8 [256, 3])}.

    ``checkpoint``: 'latest' (a damaged newest one is reported and the newest intact one
    used), 'best' or a step. ``output_stride`` rebuilds the model at another output stride.
    ``rgb`` refuses, in one sentence, a model that does not take RGB images (prediction and
    export feed it uint8 RGB)."""
    built = {}

    def restore_variables(manager, step):
        """Only the parameters and BatchNorm statistics, shaped by the recorded model."""
        meta = checkpoints.read_meta(manager, step)
        config = ml_collections.ConfigDict(meta["config"])
        spec = dict(meta["model_spec"])
        if output_stride:
            spec["model_kwargs"] = {**spec["model_kwargs"], "output_stride": output_stride}
        try:
            model = build_model(spec, DTYPES[config.dtype])
        except ValueError as error:  # e.g. --output_stride=12: the flag's fault
            raise checkpoints.NotTheCheckpoint() from error
        image = jnp.zeros((1, config.crop_size, config.crop_size, model.in_channels))
        shapes = jax.eval_shape(
            functools.partial(model.init, train=False), jax.random.key(0), image
        )
        abstract = {k: shapes.get(k, {}) for k in ("params", "batch_stats")}
        built.update(config=config, spec=spec, model=model)
        target = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return checkpoints.restore_variables(manager, step, abstract, target)

    step, restored = checkpoints.restore_workdir(workdir, checkpoint, restore_fn=restore_variables)
    variables = dict(restored["state"])
    variables.setdefault("batch_stats", {})
    channels = getattr(built["model"], "in_channels", 3)
    if rgb and channels != 3:
        raise ValueError(
            f"Prediction and export take RGB images, but the model of --workdir={workdir} takes "
            f"{channels} input channels."
        )
    config, num_classes = built["config"], built["spec"]["num_classes"]
    names = class_names(config.dataset, num_classes)
    return {
        **built,
        "step": step,
        "variables": variables,
        "class_names": names or [f"class_{i}" for i in range(num_classes)],
        "colormap": colormap(config.dataset),
    }
