"""Compiled memory of the training loop's own train step under each memory knob, as a table.

  python benchmarks/memory.py [--model=deeplabv3plus] [--backbone=resnet50]
      [--model_kwargs='{"base_width": 16}'] [--size=128] [--batch_size=8]

Builds the configured train step exactly as ``train.py`` does (``loop.jit_train_step``: loss,
gradients, SGD update, BatchNorm statistics; on CPU with remat the option that keeps
``jax.checkpoint``'s barriers) for float32, ``--config.remat``, ``--config.grad_accum=2`` and
``4``, ``--config.dtype=bfloat16`` and bfloat16 with remat, lowers it on abstract inputs and
prints ``memory_analysis()``: temporary (activations and workspace), arguments (state and
batch) and outputs. Nothing is run, so full-size models fit on a small machine.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flaxseg.configs import default  # noqa: E402
from flaxseg.serving.restore import DTYPES, build_model  # noqa: E402
from flaxseg.training import cli, loop, sharding  # noqa: E402
from flaxseg.training import spec as spec_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "deeplabv3plus", "Registered model.")
flags.DEFINE_string("backbone", "resnet50", "Backbone.")
flags.DEFINE_string("model_kwargs", "{}", "JSON dict of further model arguments.")
flags.DEFINE_integer("size", 128, "Square crop size.")
flags.DEFINE_integer("batch_size", 8, "Global batch size.")
flags.DEFINE_integer("num_classes", 21, "Classes.")

VARIANTS = (
    ("float32", {}),
    ("remat", {"remat": True}),
    ("grad_accum=2", {"grad_accum": 2}),
    ("grad_accum=4", {"grad_accum": 4}),
    ("bfloat16", {"dtype": "bfloat16"}),
    ("bfloat16 + remat", {"dtype": "bfloat16", "remat": True}),
)


def compiled_memory(config):
    """memory_analysis() of the configured train step compiled for abstract inputs."""
    config = spec_lib.resolve_config(config)
    spec_lib.validate_config(config)
    model = build_model(spec_lib.model_spec(config), DTYPES[config.dtype], remat=config.remat)
    mesh = sharding.create_mesh()
    tx, _ = loop.create_optimizer(config)
    state = jax.eval_shape(lambda: loop.init_state(model, tx, config, mesh))
    size = (config.batch_size, config.crop_size, config.crop_size)
    batch = {
        "image": jax.ShapeDtypeStruct((*size, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct(size, jnp.int32),
    }
    step = loop.jit_train_step(config, mesh)
    return step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()


def main(argv):
    del argv
    rows = []
    for name, overrides in VARIANTS:
        config = cli.apply_overrides(
            default.get_config(),
            {
                "model": FLAGS.model,
                "backbone": FLAGS.backbone,
                "model_kwargs": FLAGS.model_kwargs,
                "dataset": "synthetic",
                "num_classes": FLAGS.num_classes,
                "crop_size": FLAGS.size,
                "batch_size": FLAGS.batch_size,
                **overrides,
            },
        )
        memory = compiled_memory(config)
        rows.append(
            (
                name,
                memory.temp_size_in_bytes,
                memory.argument_size_in_bytes,
                memory.output_size_in_bytes,
            )
        )
    print(
        f"# {FLAGS.model} ({FLAGS.backbone}, {FLAGS.model_kwargs}), batch {FLAGS.batch_size} of "
        f"{FLAGS.size}², {jax.devices()[0].platform}, jax {jax.__version__}"
    )
    print("| train step | temp MiB | arguments MiB | outputs MiB | temp vs float32 |")
    print("|---|---|---|---|---|")
    for name, temp, arguments, outputs in rows:
        print(
            f"| {name} | {temp / 2**20:.1f} | {arguments / 2**20:.1f} | {outputs / 2**20:.1f} "
            f"| {temp / rows[0][1]:.2f}× |"
        )


if __name__ == "__main__":
    app.run(main)
