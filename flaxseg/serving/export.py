"""Serialising a trained model's inference function (export.py).

The exported function is `predict.inference_function` with the restored variables baked in
as constants: uint8 [B, H, W, 3] RGB in, float32 logits [B, H, W, C] out, the training
normalisation included. It is written with `jax.export` as serialised StableHLO (the file is
exactly ``Exported.serialize()``, readable by ``jax.export.deserialize``), with a symbolic batch
dimension, and fixed or symbolic height and width. A JSON file beside it (``<file>.json``)
records the classes, colours and shapes; `flaxseg.export.load` reads both without importing the
model code.

No registered model exports with a symbolic height and width today: their resizes, pooling and
crops build index tables with NumPy from concrete sizes, so `export_inference` asks for
``--height`` and ``--width``.
"""

import json
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxseg.constants import IMAGENET_MEAN, IMAGENET_STD
from flaxseg.serving import predict, restore

# What tracing a model with symbolic shapes raises where its Python code needs a concrete size.
_SHAPE_ERRORS = (
    jax.errors.InconclusiveDimensionOperation,
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
    TypeError,
)
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


def check_export_flags(height, width, batch_size, platforms) -> None:
    """One sentence for each export setting a user can get wrong."""
    for value, flag in ((height, "--height"), (width, "--width"), (batch_size, "--batch_size")):
        if value is not None and int(value) < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}.")
    if (height is None) != (width is None):
        raise ValueError("Pass both --height and --width, or neither (symbolic height and width).")
    if platforms is not None and (not platforms or set(platforms) - set(PLATFORMS)):
        raise ValueError(
            f"--platforms={','.join(platforms)} must name some of {', '.join(PLATFORMS)}."
        )


def export_inference(
    model,
    variables,
    *,
    height: Optional[int] = None,
    width: Optional[int] = None,
    batch_size: Optional[int] = None,
    platforms: Optional[Sequence[str]] = None,
    name: str = "The model",
) -> jax.export.Exported:
    """`jax.export` of ``model``'s inference function with ``variables`` as constants.

    The batch is symbolic unless ``batch_size`` is given; height and width are fixed when given
    and symbolic when both are None. A model whose code cannot trace a symbolic size raises a
    ValueError naming the flags that fix it. ``platforms`` (e.g. ('cpu', 'cuda')) defaults to
    the current backend.
    """
    check_export_flags(height, width, batch_size, platforms)
    platforms = None if platforms is None else tuple(platforms)
    constants = jax.device_get(variables)
    logits_fn = predict.inference_function(model)
    exporter = jax.export.export(
        jax.jit(lambda images: logits_fn(constants, images)), platforms=platforms
    )
    scope = jax.export.SymbolicScope()

    def trace(batch, rows, cols):
        return exporter(jax.ShapeDtypeStruct((batch, rows, cols, 3), jnp.uint8))

    if height is None:
        rows, cols = jax.export.symbolic_shape("height, width", scope=scope)
        try:  # a fixed batch first, so that the error names the dimension at fault
            trace(batch_size or 2, rows, cols)
        except _SHAPE_ERRORS as error:
            raise ValueError(
                f"{name} cannot be exported with a symbolic height and width "
                f"({_reason(error)}); pass --height and --width."
            ) from None
    else:
        rows, cols = int(height), int(width)
    if batch_size is not None:
        return trace(int(batch_size), rows, cols)
    (batch,) = jax.export.symbolic_shape("batch", scope=scope)
    try:
        return trace(batch, rows, cols)
    except _SHAPE_ERRORS as error:
        raise ValueError(
            f"{name} cannot be exported with a symbolic batch size ({_reason(error)}); "
            "pass --batch_size."
        ) from None


def _dims(exported: jax.export.Exported) -> list:
    """The input's dimensions: an int where fixed, the symbol's name where symbolic."""
    return [d if isinstance(d, int) else str(d) for d in exported.in_avals[0].shape]


def export_workdir(
    workdir,
    out,
    *,
    checkpoint: str = "latest",
    height: Optional[int] = None,
    width: Optional[int] = None,
    batch_size: Optional[int] = None,
    platforms: Optional[Sequence[str]] = None,
    saved_model: Optional[str] = None,
) -> dict:
    """Exports the model of ``workdir`` to ``out`` (and ``out``.json), and with ``saved_model``
    also a TensorFlow SavedModel through jax2tf. Returns the metadata written to the JSON."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out={out} is a folder; give a file name, e.g. {out / 'model.jax'}.")
    check_export_flags(height, width, batch_size, platforms)
    if saved_model:
        _import_tensorflow()  # fail before the work when TensorFlow is missing
    restored = restore.restore_model(workdir, checkpoint, rgb=True)
    spec = restored["spec"]
    exported = export_inference(
        restored["model"],
        restored["variables"],
        height=height,
        width=width,
        batch_size=batch_size,
        platforms=platforms,
        name=f"Model {spec['model']}",
    )
    metadata = {
        "format": "jax.export",
        "step": restored["step"],
        "model_spec": spec,
        "dataset": restored["config"].dataset,
        "class_names": list(restored["class_names"]),
        "colormap": np.asarray(restored["colormap"]).tolist(),
        "input": {"shape": _dims(exported), "dtype": "uint8", "layout": "NHWC RGB"},
        "output": {"shape": _dims(exported)[:3] + [spec["num_classes"]], "dtype": "float32"},
        "normalisation": {"scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "platforms": list(exported.platforms),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(exported.serialize())
    Path(f"{out}.json").write_text(json.dumps(metadata, indent=1))
    if saved_model:
        write_saved_model(
            restored["model"], restored["variables"], saved_model, exported.in_avals[0].shape
        )
    return metadata


def _import_tensorflow():
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError:
        raise ValueError(
            "--saved_model needs TensorFlow, which is not installed (pip install tensorflow)."
        ) from None
    return tf, jax2tf


def write_saved_model(model, variables, directory, input_shape) -> None:
    """A TensorFlow SavedModel of the inference function (signature 'serving_default': uint8
    [B, H, W, 3] 'images' -> float32 logits), parameters as tf.Variables, through jax2tf.
    Untested in flaxseg's CI, which has no TensorFlow."""
    tf, jax2tf = _import_tensorflow()
    dims = ["b" if not isinstance(d, int) else str(d) for d in input_shape[:3]]
    if len(dims) == 3 and not isinstance(input_shape[1], int):
        dims[1:3] = ["h", "w"]
    converted = jax2tf.convert(
        predict.inference_function(model),
        polymorphic_shapes=[None, f"({', '.join(dims)}, 3)"],
    )
    tf_variables = tf.nest.map_structure(tf.Variable, jax.device_get(variables))
    module = tf.Module()
    module._variables = tf.nest.flatten(tf_variables)
    signature = [
        tf.TensorSpec(
            [d if isinstance(d, int) else None for d in input_shape], tf.uint8, name="images"
        )
    ]
    module.serve = tf.function(
        lambda images: converted(tf_variables, images),
        autograph=False,
        input_signature=signature,
    )
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
